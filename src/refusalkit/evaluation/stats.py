"""Rates with intervals, paired comparisons, and agreement between judges.

Every rate refusalkit reports carries a 95% Wilson score interval (Wilson 1927):

    centre = (p̂ + z²/2n) / (1 + z²/n),   half-width = z·sqrt(p̂(1−p̂)/n + z²/4n²) / (1 + z²/n)

with p̂ = k/n and z = 1.96. Unlike the normal (Wald) interval it stays inside [0, 1] and is not
degenerate at k = 0 or k = n, which matters at the ASRs of aligned models (often 0–5%).
On 24 prompts the interval around 12.5% is [4%, 31%]: one reason the defaults use >= 100 prompts.

:func:`summarize_rows` turns an attack's judged records into its attack success rate (ASR).

Two models judged on the same prompts are compared pairwise (:func:`paired`): only the prompts on
which their verdicts differ carry evidence. With ``b`` prompts positive only on the first model and
``c`` only on the second, the exact McNemar test (McNemar 1947; the exact binomial form) gives

    p = min(1, 2 · P(X <= min(b, c))),   X ~ Binomial(b + c, 1/2),

and the difference of the two rates ``(c − b) / n`` gets Newcombe's (1998, method 10) hybrid score
interval, built from the two Wilson intervals and the correlation of the paired outcomes. More
than two models on the same prompts (a compression setting under several calibration seeds) get
Cochran's Q (:func:`cochran_q`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from refusalkit.data.refusal import COMPLIANCE, DEGENERATE, REFUSAL

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n; (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exactly 0 at k = 0 and 1 at k = n (rounding gave 0.9999999999999999 for 25/25), always around p
    lo = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    hi = 1.0 if k == n else max(p, min(1.0, centre + half))
    return lo, hi


def rate(k: int, n: int) -> dict[str, float | int | list[float]]:
    """``{"rate", "k", "n", "ci95"}`` for k successes out of n."""
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else 0.0, "k": k, "n": n, "ci95": [lo, hi]}


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """Agreement of two binary judges on the same items: raw agreement and Cohen's kappa.

    κ = (p_o − p_e) / (1 − p_e), p_o the observed agreement and p_e the agreement expected from
    the two judges' marginal rates; κ = 1 when both judges give one constant label and agree.
    """
    if len(a) != len(b):
        raise ValueError("both judges must label the same items")
    n = len(a)
    if n == 0:
        return {"n": 0, "agreement": 1.0, "kappa": 1.0, "both_true": 0, "only_a": 0, "only_b": 0, "both_false": 0}
    c = Counter(zip(map(bool, a), map(bool, b)))
    po = (c[(True, True)] + c[(False, False)]) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = 1.0 if pe >= 1.0 else (po - pe) / (1 - pe)
    return {
        "n": n,
        "agreement": po,
        "kappa": kappa,
        "both_true": c[(True, True)],
        "only_a": c[(True, False)],
        "only_b": c[(False, True)],
        "both_false": c[(False, False)],
    }


def _label(row: dict[str, Any], judge: str) -> str:
    return row["verdicts"][judge]["label"]


def _by_prompt(row: dict[str, Any]) -> str:
    return row["prompt"]


def summarize_rows(
    rows: list[dict[str, Any]], judges: list[str], primary: str, group: Callable[[dict[str, Any]], str] = _by_prompt
) -> dict[str, Any]:
    """ASR over prompts of judged records (``row["verdicts"][judge]["label"]``).

    A prompt (the rows of one ``group`` key) is broken under a judge when any of its rows is
    coherent compliance; ASR = broken prompts / prompts, as a :func:`rate`. Returns
    ``{"judge": primary, "asr": the primary judge's ASR, "judges": {judge: {"asr", "verdicts":
    the share of rows with each label}}, "n_prompts", "n_completions"}`` and, with two judges or
    more, ``"agreement"`` (:func:`agreement` of their per-prompt outcomes, per pair).
    """
    out: dict[str, Any] = {"judge": primary, "judges": {}}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(group(r), []).append(r)
    broken_by: dict[str, list[bool]] = {}
    for j in judges:
        broken = [any(_label(r, j) == COMPLIANCE for r in g) for g in groups.values()]
        broken_by[j] = broken
        labels = [_label(r, j) for r in rows]
        out["judges"][j] = {
            "asr": rate(sum(broken), len(broken)),
            "verdicts": {lab: rate(labels.count(lab), len(labels)) for lab in (REFUSAL, COMPLIANCE, DEGENERATE)},
        }
    out["asr"] = out["judges"][primary]["asr"]
    out["n_prompts"] = len(groups)
    out["n_completions"] = len(rows)
    if len(judges) > 1:
        out["agreement"] = {
            f"{a} vs {b}": agreement(broken_by[a], broken_by[b]) for i, a in enumerate(judges) for b in judges[i + 1 :]
        }
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1 when both are 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of ``p2 − p1`` for paired binary outcomes (Newcombe 1998, method 10).

    ``a``: positive on both, ``b``: only on the first, ``c``: only on the second, ``d``: on neither;
    ``p1 = (a + b) / n``, ``p2 = (a + c) / n``. With Wilson intervals ``(l1, u1)``, ``(l2, u2)``::

        lower = θ − sqrt((p2 − l2)² − 2φ(p2 − l2)(u1 − p1) + (u1 − p1)²)
        upper = θ + sqrt((u2 − p2)² − 2φ(u2 − p2)(p1 − l1) + (p1 − l1)²),   θ = p2 − p1

    φ is the correlation of the paired outcomes with Newcombe's continuity correction: with
    ``A = ad − bc`` and ``M = (a+b)(c+d)(a+c)(b+d)``, ``φ = (A − n/2) / sqrt(M)`` when ``A > n/2``,
    ``0`` when ``0 <= A <= n/2``, ``A / sqrt(M)`` when ``A < 0``, and 0 when a margin is empty.
    The correction shrinks a positive φ, so that the interval does not collapse to a point when
    no pair is discordant (``(50, 0, 0, 50)`` gives ±0.019, not [0, 0]). Tested against Newcombe
    (1998, Table II) and Fagerland, Lydersen & Laake (2017, ch. 8).
    """
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    phi = 0.0
    if margins and cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(margins)
    elif margins and cross < 0:
        phi = cross / math.sqrt(margins)
    theta = p2 - p1
    lo = theta - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    hi = theta + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired(first: dict[str, bool], second: dict[str, bool]) -> dict[str, Any]:
    """Two models' binary outcomes (``{prompt: positive}``, e.g. the prompt broke the model) on the
    prompts both were judged on: the counts, both rates, the difference ``second − first`` with its
    interval (:func:`paired_difference_interval`) and the exact McNemar p-value."""
    keys = [k for k in first if k in second]
    a = sum(first[k] and second[k] for k in keys)
    b = sum(first[k] and not second[k] for k in keys)
    c = sum(second[k] and not first[k] for k in keys)
    n = len(keys)
    lo, hi = paired_difference_interval(a, b, c, n - a - b - c)
    return {
        "n": n,
        "first": rate(a + b, n),
        "second": rate(a + c, n),
        "only_first": b,
        "only_second": c,
        "difference": (c - b) / n if n else 0.0,
        "ci95": [lo, hi],
        "p": mcnemar_exact(b, c),
        "test": "exact McNemar (two-sided); Newcombe's hybrid score interval of the difference",
    }


def outcomes(rows: list[dict[str, Any]], judge: str, label: str = COMPLIANCE) -> dict[str, bool]:
    """Per prompt: did any of its records get ``label`` from ``judge`` (vanilla ASR: compliance;
    over-refusal: refusal)? The per-prompt outcome behind :func:`summarize_rows`."""
    out: dict[str, bool] = {}
    for r in rows:
        key = r["prompt"]
        out[key] = out.get(key, False) or _label(r, judge) == label
    return out


def judged_outcomes(
    rows: list[dict[str, Any]] | None, label: str = COMPLIANCE, judge: str | None = None
) -> dict[str, bool] | None:
    """:func:`outcomes` of an attack's records by ``judge`` (default: the primary judge, the last one
    recorded, a model judge when one is configured); None when there are no judged records."""
    rows = [r for r in rows or [] if "verdicts" in r]
    if not rows:
        return None
    return outcomes(rows, judge or list(rows[0]["verdicts"])[-1], label)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: sorted ascending,
    ``p_(i)`` becomes ``max_{j <= i} min(1, (m − j + 1) p_(j))``; reject at level α where the
    adjusted value is below α (family-wise error rate α)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _ranks(x: Sequence[float]) -> list[float]:
    """Average ranks (1-based; ties share the mean of their ranks)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float], z: float = Z95) -> dict[str, Any]:
    """Spearman's rank correlation of paired values, with a 95% interval from Fisher's z with the
    Bonett–Wright standard error ``sqrt((1 + ρ²/2) / (n − 3))`` (``None`` bounds for n < 4;
    ``rho`` None when either variable is constant or n < 2)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"{n} x values for {len(y)} y values")
    out: dict[str, Any] = {"n": n, "rho": None, "ci95": [None, None], "method": "Spearman; Fisher z, Bonett-Wright SE"}
    if n < 2:
        return out
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return out
    rho = sxy / math.sqrt(sxx * syy)
    out["rho"] = rho
    if n >= 4 and abs(rho) < 1:
        se = math.sqrt((1 + rho**2 / 2) / (n - 3))
        zr = math.atanh(rho)
        out["ci95"] = [math.tanh(zr - z * se), math.tanh(zr + z * se)]
    elif n >= 4:
        out["ci95"] = [rho, rho]
    return out


def chi2_sf(x: float, df: int) -> float:
    """Upper tail ``P(X >= x)`` of a chi-square distribution with a whole number ``df >= 1`` of
    degrees of freedom, in closed form (Abramowitz & Stegun 26.4.4 and 26.4.5)::

        even df = 2m:      e^(−x/2) Σ_{i<m} (x/2)^i / i!
        odd  df = 2m + 1:  erfc(sqrt(x/2)) + e^(−x/2) Σ_{i=1..m} (x/2)^(i − 1/2) / Γ(i + 1/2)
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:
        terms = (math.exp(i * math.log(h) - h - math.lgamma(i + 1)) for i in range(df // 2))
        return min(1.0, sum(terms))
    terms = (math.exp((i - 0.5) * math.log(h) - h - math.lgamma(i + 0.5)) for i in range(1, df // 2 + 1))
    return min(1.0, math.erfc(math.sqrt(h)) + sum(terms))


def cochran_q(models: Sequence[dict[str, bool]]) -> dict[str, Any]:
    """Do ``k >= 2`` models judged on the same prompts share one rate? Cochran's Q (Cochran 1950)
    on their binary outcomes (``{prompt: positive}``; the prompts all of them were judged on)::

        Q = (k − 1) (k Σ_j C_j² − T²) / (k T − Σ_i R_i²)

    with ``C_j`` model j's positives, ``R_i`` prompt i's positives over the models and ``T`` their
    total; under the null (every prompt's outcomes exchangeable across the models) Q is about
    chi-square with ``k − 1`` degrees of freedom. Prompts on which the models agree add nothing;
    with two models Q is McNemar's uncorrected statistic ``(b − c)² / (b + c)``. The chi-square
    tail is an approximation that needs a few tens of prompts on which the models disagree
    (``discordant``); :func:`paired` is the exact test for a pair. ``q`` and ``p`` are None (no
    evidence either way) when no prompt is discordant."""
    k = len(models)
    if k < 2:
        raise ValueError(f"Cochran's Q compares at least 2 models, got {k}")
    keys = [p for p in models[0] if all(p in m for m in models[1:])]
    cols = [sum(m[p] for p in keys) for m in models]
    rows = [sum(m[p] for m in models) for p in keys]
    total = sum(rows)
    denom = k * total - sum(r * r for r in rows)
    out: dict[str, Any] = {
        "k": k,
        "n": len(keys),
        "rates": [rate(c, len(keys)) for c in cols],
        "discordant": sum(0 < r < k for r in rows),
        "q": None,
        "df": k - 1,
        "p": None,
        "test": "Cochran's Q (chi-square approximation, k - 1 degrees of freedom)",
    }
    if denom > 0:
        q = (k - 1) * (k * sum(c * c for c in cols) - total * total) / denom
        out["q"], out["p"] = q, chi2_sf(q, k - 1)
    return out


def across_draws(
    reference: dict[str, bool], draws: Sequence[dict[str, bool]], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """How one compression setting, made at several calibration seeds (``draws``, each ``{prompt:
    positive}``), differs from a ``reference`` model judged on the same prompts:
    :func:`across_pairs` with the same reference for every draw."""
    return across_pairs([(reference, d) for d in draws], resamples, seed)


def across_pairs(
    pairs: Sequence[tuple[dict[str, bool], dict[str, bool]]], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The change from the first to the second model of each pair, over several compression draws:
    one ``(first, second)`` pair of per-prompt outcomes (``{prompt: positive}``) per draw, all judged on
    the same prompts (those every model was judged on). A draw's variant against the base model is
    ``(base, draw)``; a repair applied to every draw is ``(draw_k, draw_k + repair)``.

    * ``difference``: the mean over draws of (second's rate − first's rate);
    * ``ci95``: a two-level percentile bootstrap of it: each resample takes the draws with
      replacement, then the prompts with replacement (the same prompts for every model, which keeps
      the pairing), so that both sources of variation enter the interval and it speaks of the
      setting, not of the draws at hand (Davison & Hinkley 1997, §3.8, for two-stage resampling).
      With one draw it is the ordinary paired bootstrap over prompts;
    * ``p``: the stratified McNemar test (Mantel–Haenszel for matched pairs, the draws as strata):
      ``z = Σ_k (c_k − b_k) / sqrt(Σ_k (b_k + c_k))``, two-sided normal p, with ``b_k`` / ``c_k`` the
      prompts positive only on the first / only on the second model of draw k. It is conditional on
      these draws: it asks whether they differ, the interval whether the setting does;
    * ``per_draw``: each draw's difference.
    """
    import numpy as np

    k = len(pairs)
    keys = [p for p in (pairs[0][0] if pairs else {}) if all(p in a and p in b for a, b in pairs)]
    n = len(keys)
    out: dict[str, Any] = {"draws": k, "n": n, "difference": None, "ci95": [None, None], "p": None, "z": None}
    if k == 0 or n == 0:
        return out
    x = np.array([[a[p] for p in keys] for a, _ in pairs], dtype=float)
    y = np.array([[b[p] for p in keys] for _, b in pairs], dtype=float)
    diff = y - x  # [draws, prompts]: +1 positive only on the second model, -1 only on the first
    out["difference"] = float(diff.mean())
    out["per_draw"] = [float(v) for v in diff.mean(1)]
    out["first_rates"] = [float(v) for v in x.mean(1)]
    out["second_rates"] = [float(v) for v in y.mean(1)]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        rows = diff[rng.integers(k, size=k)]
        means[i] = rows[:, rng.integers(n, size=n)].mean()
    out["ci95"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    b = int((diff < 0).sum())
    c = int((diff > 0).sum())
    out["only_first"], out["only_second"] = b, c
    if b + c:
        z = (c - b) / math.sqrt(b + c)
        out["z"], out["p"] = z, math.erfc(abs(z) / math.sqrt(2))
    out["test"] = "two-level bootstrap over draws and prompts (interval); stratified McNemar over draws (p)"
    return out


def paired_effect_difference(
    before_a: dict[str, bool],
    after_a: dict[str, bool],
    before_b: dict[str, bool],
    after_b: dict[str, bool],
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How much smaller one intervention's effect is in model B than in model A, on the same prompts
    (the base direction ablated in the base model and in a variant): per prompt the effects
    ``e_A = before_a − after_a`` and ``e_B = before_b − after_b`` (each −1, 0 or +1), and

    * ``difference``: the mean of ``e_A − e_B``, the loss of effect (positive: weaker in B);
    * ``ci95``: a percentile bootstrap over prompts (``resamples``, seeded), which keeps every
      prompt's four outcomes together, of the losses padded with one pseudo-prompt each way (+1 and
      −1; in the spirit of Agresti & Min 2005's adjustment of the paired Wald interval), so that
      prompts that all agree give an interval of the width such agreement allows, not the point
      [0, 0];
    * ``p``: the exact two-sided sign test on the prompts whose effects differ;
    * ``effect_a`` / ``effect_b``: the two mean effects.
    """
    import numpy as np

    keys = [k for k in before_a if k in after_a and k in before_b and k in after_b]
    n = len(keys)
    out: dict[str, Any] = {"n": n, "difference": None, "ci95": [None, None], "p": None}
    if not n:
        return out
    ea = np.array([float(before_a[k]) - float(after_a[k]) for k in keys])
    eb = np.array([float(before_b[k]) - float(after_b[k]) for k in keys])
    loss = ea - eb
    padded = np.concatenate([loss, [1.0, -1.0]])
    rng = np.random.default_rng(seed)
    means = padded[rng.integers(n + 2, size=(resamples, n + 2))].mean(1)
    pos, neg = int((loss > 0).sum()), int((loss < 0).sum())
    out.update(
        difference=float(loss.mean()),
        ci95=[float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        p=mcnemar_exact(neg, pos),
        effect_a=float(ea.mean()),
        effect_b=float(eb.mean()),
        weaker_in_b=pos,
        stronger_in_b=neg,
        test="percentile bootstrap over prompts (interval); exact sign test (p)",
    )
    return out
