"""ASR arithmetic, Wilson intervals, judge agreement, resumable record logs, decoding grids."""

from __future__ import annotations

import json
import math

import pytest

from refusalkit.core.errors import UserError
from refusalkit.evaluation.records import RecordLog
from refusalkit.evaluation.stats import agreement, chi2_sf, cochran_q, holm, rate, spearman, wilson_interval


def test_wilson_interval_known_values():
    # Reference values (Wilson 1927 score interval, z = 1.96), e.g. from statsmodels proportion_confint(method="wilson").
    lo, hi = wilson_interval(3, 24)
    assert lo == pytest.approx(0.04343, abs=1e-4) and hi == pytest.approx(0.31001, abs=1e-4)
    lo, hi = wilson_interval(0, 100)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.03699, abs=1e-4)
    lo, hi = wilson_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.96301, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_wilson_interval_contains_rate_and_shrinks_with_n():
    for k, n in [(1, 10), (5, 10), (9, 10), (50, 100), (13, 519)]:
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
    # every k of every n up to 120: the bounds hold the rate, exactly 0 / 1 at the ends (25/25 rounded
    # to 0.9999999999999999 and broke the report's error bars)
    for n in range(1, 121):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
    w_small = wilson_interval(12, 24)
    w_large = wilson_interval(50, 100)
    assert (w_large[1] - w_large[0]) < (w_small[1] - w_small[0])


def test_rate_dict():
    r = rate(7, 100)
    assert r["rate"] == 0.07 and r["k"] == 7 and r["n"] == 100 and len(r["ci95"]) == 2


def test_agreement_and_kappa():
    a = [True, True, False, False, True, False, False, False]
    assert agreement(a, a)["kappa"] == pytest.approx(1.0)
    assert agreement(a, a)["agreement"] == 1.0
    b = [not x for x in a]
    assert agreement(a, b)["agreement"] == 0.0
    assert agreement(a, b)["kappa"] < 0
    # hand-computed: po = 6/8, pa = 3/8, pb = 3/8, pe = 9/64 + 25/64 = 34/64, kappa = (48/64 - 34/64) / (30/64)
    c = [True, False, True, False, True, False, False, False]
    res = agreement(a, c)
    assert res["agreement"] == pytest.approx(6 / 8)
    assert res["kappa"] == pytest.approx(14 / 30)
    assert res["both_true"] == 2 and res["only_a"] == 1 and res["only_b"] == 1 and res["both_false"] == 4


def test_summarize_rows_any_config_breaks_a_prompt():
    from refusalkit.evaluation.stats import summarize_rows

    def row(prompt, label, label2=None):
        v = {"substring": {"label": label, "reason": ""}}
        if label2:
            v["model:x"] = {"label": label2, "reason": ""}
        return {"prompt": prompt, "verdicts": v}

    rows = [
        row("a", "refusal", "refusal"),
        row("a", "compliance", "compliance"),  # a broken by one config
        row("b", "degenerate", "compliance"),
        row("b", "refusal", "refusal"),  # degenerate never counts
        row("c", "refusal", "refusal"),
        row("c", "refusal", "refusal"),
    ]
    s = summarize_rows(rows, ["substring", "model:x"], "substring")
    assert s["asr"]["k"] == 1 and s["asr"]["n"] == 3
    assert s["judges"]["model:x"]["asr"]["k"] == 2
    assert s["judges"]["substring"]["verdicts"]["degenerate"]["k"] == 1
    assert s["n_completions"] == 6 and s["n_prompts"] == 3
    ag = s["agreement"]["substring vs model:x"]
    assert ag["agreement"] == pytest.approx(2 / 3)


def test_record_log_resumes_and_drops_torn_line(tmp_path):
    settings = {"a": 1}
    log = RecordLog(tmp_path, "vanilla", settings)
    log.append([{"key": "p1", "completion": "x"}, {"key": "p2", "completion": "y"}])
    with open(log.partial, "a") as f:
        f.write('{"key": "p3", "compl')  # interrupted mid-write
    again = RecordLog(tmp_path, "vanilla", settings)
    assert set(again.rows) == {"p1", "p2"}
    assert again.missing(["p1", "p2", "p3"]) == ["p3"]
    again.append([{"key": "p3", "completion": "z"}])
    rows = again.finish(["p1", "p2", "p3"])
    assert [r["key"] for r in rows] == ["p1", "p2", "p3"]
    assert not log.partial.exists()
    lines = (tmp_path / "vanilla.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["p1", "p2", "p3"]
    # a finished log is reused; asking for more prompts extends it without redoing the old ones
    done = RecordLog(tmp_path, "vanilla", settings)
    assert done.missing(["p1", "p2", "p3", "p4"]) == ["p4"]
    done.append([{"key": "p4", "completion": "w"}])
    assert [r["key"] for r in done.finish(["p1", "p2", "p3", "p4"])] == ["p1", "p2", "p3", "p4"]


def test_record_log_refuses_other_settings(tmp_path):
    log = RecordLog(tmp_path, "decoding", {"grid": "small"})
    log.append([{"key": "k", "completion": "c"}])
    with pytest.raises(UserError, match="interrupted decoding evaluation with other settings"):
        RecordLog(tmp_path, "decoding", {"grid": "huang"})
    log.finish(["k"])
    with pytest.raises(UserError, match="other evaluation settings"):
        RecordLog(tmp_path, "decoding", {"grid": "huang"})
    forced = RecordLog(tmp_path, "decoding", {"grid": "huang"}, force=True)
    assert forced.rows == {}


def test_parse_grid():
    from refusalkit.evaluation.plan import parse_grid

    name, decs = parse_grid("temperature=0.7,top_p=0.9,top_k=50")
    assert name == "custom" and [d.name for d in decs] == ["temperature=0.7", "top_p=0.9", "top_k=50"]
    assert decs[0].temperature == 0.7 and decs[1].top_p == 0.9 and decs[2].top_k == 50
    assert len(parse_grid("huang")[1]) == 50
    for bad in ("temp=1", "top_p=2", "top_k=x", ""):
        with pytest.raises(UserError):
            parse_grid(bad)


def test_held_out_excludes_direction_prompts():
    from refusalkit.data.prompts import load_prompts
    from refusalkit.evaluation.plan import held_out

    adv = load_prompts("advbench")
    splits = {"harmful": {"source": "advbench", "train": adv[:10], "val": adv[20:25], "test": adv[30:40]}}
    prompts, info = held_out("advbench", 100, splits, "harmful")
    assert len(prompts) == 100 and not set(prompts) & set(adv[:10] + adv[20:25])
    assert prompts[:10] == adv[10:20]  # source order, test prompts allowed
    assert info["excluded_direction_prompts"] == 15
    with pytest.raises(UserError, match="asked for"):
        held_out("advbench", 600, splits, "harmful")
    # a source that contains the split's (harmful-all: advbench, then harmbench) leaves them out too: the
    # same 100 first prompts, never one the direction was trained or selected on
    wide, info = held_out("harmful-all", 600, splits, "harmful")
    assert wide[:100] == prompts and not set(wide) & set(adv[:10] + adv[20:25])
    assert info["excluded_direction_prompts"] == 15


def test_make_plan_resolves_auto_by_machine():
    from refusalkit.core.settings import load_config
    from refusalkit.evaluation.plan import make_plan

    cfg = load_config(overrides={"evaluation.decoding_system_prompts": "none", "system_prompt": "Be safe."})
    cpu, gpu = make_plan(cfg.evaluation, cfg, gpu=False), make_plan(cfg.evaluation, cfg, gpu=True)
    assert (cpu.max_new_tokens, cpu.grid, len(cpu.decodings), cpu.gcg_steps, cpu.gcg_search_width) == (
        64,
        "small",
        7,
        20,
        64,
    )
    assert (gpu.max_new_tokens, gpu.grid, len(gpu.decodings), gpu.gcg_steps, gpu.gcg_search_width) == (
        256,
        "huang",
        50,
        250,
        512,
    )
    assert cpu.systems == {"none": ""}
    both = load_config(overrides={"system_prompt": "Be safe."})
    assert make_plan(both.evaluation, both, gpu=False).systems == {"default": "Be safe.", "none": ""}
    fixed = load_config(overrides={"evaluation.max_new_tokens": "32", "evaluation.decoding_grid": "top_k=5"})
    plan = make_plan(fixed.evaluation, fixed, gpu=True)
    assert plan.max_new_tokens == 32 and [d.name for d in plan.decodings] == ["top_k=5"]
    with pytest.raises(UserError):
        load_config(overrides={"evaluation.max_new_tokens": "lots"})


def test_gcg_candidates_per_forward_by_machine_and_kept_out_of_compared_settings():
    from dataclasses import asdict

    from refusalkit.core.settings import load_config
    from refusalkit.evaluation.attacks import gcg_config, gcg_settings
    from refusalkit.evaluation.plan import make_plan

    cfg = load_config(overrides={"evaluation.gcg_search_width": "96"})
    on = {gpu: gcg_config(make_plan(cfg.evaluation, cfg, gpu=gpu), cfg.evaluation) for gpu in (False, True)}
    assert (on[False].search_width, on[False].eval_batch_size) == (96, 64)
    assert (on[True].search_width, on[True].eval_batch_size) == (96, 96)  # every candidate in one forward
    # Suffixes optimized with another batch size (e.g. before this setting existed) stay valid.
    old = {"gcg": {**asdict(on[True]), "eval_batch_size": 64}, "variant": "base"}
    new = {"gcg": asdict(on[True]), "variant": "base"}
    assert gcg_settings(old) == gcg_settings(new) and "eval_batch_size" not in gcg_settings(new)["gcg"]
    other = {"gcg": {**asdict(on[True]), "n_steps": 3}, "variant": "base"}
    assert gcg_settings(other) != gcg_settings(new)


def test_chunks_cover_every_item_once_grouped_by_system_and_message():
    from refusalkit.evaluation.runner import Item, _chunks
    from refusalkit.evaluation.sampling import GREEDY, temperature_config

    hot = temperature_config(0.7)
    items = [
        Item(f"{s}|{d.name}|{p}", p, p, s, d, {}) for p in "abcde" for s in ("default", "none") for d in (GREEDY, hot)
    ]
    items.append(Item("default|greedy|f", "f", "f", "default", GREEDY, {}))
    chunks = _chunks(items, batch_size=5)
    seen = [it.key for c in chunks for its in c.by_message.values() for it in its]
    assert sorted(seen) == sorted(it.key for it in items) and len(seen) == len(items)
    for c in chunks:
        assert {it.system for its in c.by_message.values() for it in its} == {c.system}
        assert len(c.by_message) <= 5 // 2  # two decodings per message: two messages per chunk
        assert c.decodings == [
            d for d in (GREEDY, hot) if any(it.decoding == d for its in c.by_message.values() for it in its)
        ]
    assert [c.system for c in chunks] == ["default"] * 3 + ["none"] * 3
    assert _chunks([], batch_size=4) == []


def test_mcnemar_exact_against_hand_computed_values():
    from refusalkit.evaluation.stats import mcnemar_exact

    # 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2): 14/0 -> 2 / 2^14; 23/7 -> 2 * sum_{i<=7} C(30, i) / 2^30
    assert mcnemar_exact(14, 0) == pytest.approx(2 / 2**14, rel=1e-12)
    assert mcnemar_exact(0, 14) == mcnemar_exact(14, 0)
    assert mcnemar_exact(23, 7) == pytest.approx(2 * 2804012 / 2**30, rel=1e-9)  # 0.00522
    assert mcnemar_exact(1, 3) == pytest.approx(0.625)  # 2 * (1 + 4) / 16
    assert mcnemar_exact(5, 3) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # 0.7266
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_difference_interval_hand_computed_and_correlation():
    from refusalkit.evaluation.stats import paired_difference_interval

    # a = b = c = d = 1: phi = 0, p1 = p2 = 0.5, Wilson(2, 4) = 0.5 -/+ 0.349967, so theta = 0 -/+ sqrt(2) * 0.349967
    lo, hi = paired_difference_interval(1, 1, 1, 1)
    assert lo == pytest.approx(-0.494928, abs=1e-5) and hi == pytest.approx(0.494928, abs=1e-5)
    # discordant pairs only in one direction: the interval excludes 0 and contains the estimate
    lo, hi = paired_difference_interval(20, 0, 14, 66)
    assert 0 < lo < 0.14 < hi < 0.3
    # strongly correlated outcomes (few discordant pairs) give a narrower interval than phi = 0 would
    lo_c, hi_c = paired_difference_interval(40, 2, 6, 52)
    l1, u1 = wilson_interval(42, 100)
    l2, u2 = wilson_interval(46, 100)
    half_indep = ((0.46 - l2) ** 2 + (u1 - 0.42) ** 2) ** 0.5
    assert 0.04 - lo_c < half_indep
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)


def test_paired_difference_interval_published_examples():
    """Newcombe's method 10 with his continuity-corrected phi, against published values (our
    difference is second − first, so their intervals appear mirrored)."""
    from refusalkit.evaluation.stats import paired_difference_interval

    # Newcombe (1998), Stat Med 17:2635, Table II, example (a): e, f, g, h = 36, 12, 2, 0 -> +0.0569 to +0.3404
    lo, hi = paired_difference_interval(36, 12, 2, 0)
    assert (round(-hi, 4), round(-lo, 4)) == (0.0569, 0.3404)
    # Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. (2012): 59, 6, 16, 80 -> -0.1186 to -0.0046
    lo, hi = paired_difference_interval(59, 6, 16, 80)
    assert (round(-hi, 4), round(-lo, 4)) == (-0.1186, -0.0046)
    # ad - bc = 2068 > n/2 = 50: phi = (2068 - 50) / sqrt(42 * 58 * 46 * 54), not 2068 / sqrt(...)
    l1, u1 = wilson_interval(42, 100)
    l2, u2 = wilson_interval(46, 100)
    phi = (2068 - 50) / (42 * 58 * 46 * 54) ** 0.5
    lo, hi = paired_difference_interval(40, 2, 6, 52)
    assert lo == pytest.approx(
        0.04 - ((0.46 - l2) ** 2 - 2 * phi * (0.46 - l2) * (u1 - 0.42) + (u1 - 0.42) ** 2) ** 0.5
    )
    assert hi == pytest.approx(
        0.04 + ((u2 - 0.46) ** 2 - 2 * phi * (u2 - 0.46) * (0.42 - l1) + (0.42 - l1) ** 2) ** 0.5
    )
    # no discordant pair: a real interval around 0, not [0, 0]
    lo, hi = paired_difference_interval(50, 0, 0, 50)
    assert -0.03 < lo < -0.01 and hi == pytest.approx(-lo)


def test_paired_counts_and_outcomes():
    from refusalkit.evaluation.stats import outcomes, paired

    rows = [
        {"prompt": p, "verdicts": {"substring": {"label": lab}}}
        for p, lab in [("a", "refusal"), ("a", "compliance"), ("b", "refusal"), ("c", "degenerate"), ("d", "refusal")]
    ]
    broke = outcomes(rows, "substring")
    assert broke == {"a": True, "b": False, "c": False, "d": False}
    assert outcomes(rows, "substring", "refusal") == {"a": True, "b": True, "c": False, "d": True}
    after = {"a": False, "b": False, "c": True, "d": False, "e": True}  # "e" was not judged on both: left out
    res = paired(broke, after)
    assert res["n"] == 4 and res["only_first"] == 1 and res["only_second"] == 1
    assert res["first"]["k"] == 1 and res["second"]["k"] == 1 and res["difference"] == 0.0 and res["p"] == 1.0


def test_holm_against_hand_computed_values():
    # sorted p: 0.01, 0.02, 0.04, 0.30 -> 4 x 0.01 = 0.04, max(0.04, 3 x 0.02) = 0.06,
    # max(0.06, 2 x 0.04) = 0.08, max(0.08, 1 x 0.30) = 0.30; returned in the input order
    assert holm([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert holm([]) == [] and holm([0.03]) == [0.03]


def test_spearman_against_hand_computed_values():
    # ranks x 1 2 3 4 5, y 2 1 4 3 5: d^2 = 1+1+1+1+0 = 4, rho = 1 - 6*4 / (5*24) = 0.8
    res = spearman([0.1, 0.2, 0.3, 0.4, 0.5], [20, 10, 40, 30, 50])
    assert res["rho"] == pytest.approx(0.8) and res["n"] == 5
    z, se = math.atanh(0.8), math.sqrt((1 + 0.8**2 / 2) / 2)
    assert res["ci95"] == pytest.approx([math.tanh(z - 1.959963984540054 * se), math.tanh(z + 1.959963984540054 * se)])
    assert spearman([1, 2, 3], [3, 2, 1])["rho"] == pytest.approx(-1.0) and spearman([1, 2, 3], [3, 2, 1])["ci95"] == [
        None,
        None,
    ]
    ties = spearman([1, 1, 2, 3], [1, 2, 3, 4])  # average ranks 1.5, 1.5, 3, 4
    assert ties["rho"] == pytest.approx(0.9486832980505138)
    assert spearman([1, 1, 1], [1, 2, 3])["rho"] is None and spearman([1], [2])["rho"] is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_chi2_tail_against_tabulated_quantiles():
    # the 95% quantiles of chi-square with 1..5 degrees of freedom (tables), and df = 2's closed form e^(-x/2)
    for df, x in [(1, 3.841458820694124), (2, 5.991464547107979), (3, 7.814727903251178), (4, 9.487729036781154),
                  (5, 11.070497693516351)]:  # fmt: skip
        assert chi2_sf(x, df) == pytest.approx(0.05, abs=1e-12)
    assert chi2_sf(6.634896601021214, 1) == pytest.approx(0.01, abs=1e-12)
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5), abs=1e-15)
    assert chi2_sf(0.0, 3) == 1.0 and chi2_sf(-1.0, 1) == 1.0
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


def test_cochran_q_against_hand_computed_values():
    # three models on six prompts; model positives C = 5, 3, 1 (T = 9), prompt positives R = 3,1,2,1,0,2
    # (sum of squares 19): Q = 2 (3 * 35 - 81) / (3 * 9 - 19) = 6, df = 2, p = e^-3
    rows = {"p1": (1, 1, 1), "p2": (1, 0, 0), "p3": (1, 1, 0), "p4": (1, 0, 0), "p5": (0, 0, 0), "p6": (1, 1, 0)}
    models = [{p: bool(v[j]) for p, v in rows.items()} for j in range(3)]
    res = cochran_q(models)
    assert res["q"] == pytest.approx(6.0) and res["df"] == 2 and res["p"] == pytest.approx(math.exp(-3))
    assert res["n"] == 6 and res["discordant"] == 4 and [r["k"] for r in res["rates"]] == [5, 3, 1]
    # two models: McNemar's uncorrected statistic (b - c)^2 / (b + c), here b = 7, c = 2
    a = {f"q{i}": i < 7 for i in range(12)}
    b = {f"q{i}": 7 <= i < 9 or i == 11 for i in range(12)}
    a["q11"] = True  # one prompt positive on both
    two = cochran_q([a, b])
    assert two["q"] == pytest.approx(25 / 9) and two["p"] == pytest.approx(chi2_sf(25 / 9, 1))
    # only the prompts every model was judged on count; no discordant prompt: no statistic
    assert cochran_q([{"x": True, "y": False}, {"x": True, "y": False, "z": True}])["q"] is None
    assert cochran_q([{"x": True}, {"x": True}, {"x": True}])["discordant"] == 0
    with pytest.raises(ValueError):
        cochran_q([a])


def test_across_draws_counts_draws_and_prompts():
    """One setting at several draws against a reference: the mean difference, the stratified McNemar
    statistic by hand, and a two-level interval that widens with the spread between draws."""
    from refusalkit.evaluation.stats import across_draws

    ref = {i: i < 10 for i in range(100)}
    low, high = {i: i < 20 for i in range(100)}, {i: i < 60 for i in range(100)}
    res = across_draws(ref, [low, high])
    assert res["draws"] == 2 and res["n"] == 100 and res["difference"] == pytest.approx(0.30)
    # b = 0 prompts only on the reference, c = 10 + 50 only on a draw: z = 60 / sqrt(60)
    assert res["z"] == pytest.approx(60 / 60**0.5) and res["p"] == pytest.approx(math.erfc(60**0.5 / 2**0.5))
    lo, hi = res["ci95"]
    assert lo <= 0.12 and hi >= 0.48  # about the two draws' own differences (+10, +50 points), not +30 ± prompts
    one = across_draws(ref, [low])
    # one draw: the ordinary paired bootstrap over prompts, around +10 points
    assert one["difference"] == pytest.approx(0.10) and 0.03 < one["ci95"][0] < 0.10 < one["ci95"][1] < 0.17
    # identical draws add no spread: the same interval as one of them, up to resampling noise
    same = across_draws(ref, [low, low, low])
    assert same["ci95"][0] == pytest.approx(one["ci95"][0], abs=0.03) and same["ci95"][1] == pytest.approx(
        one["ci95"][1], abs=0.03
    )
    assert across_draws(ref, [ref])["p"] is None and across_draws(ref, [])["difference"] is None


def test_across_pairs_pairs_each_draw_with_its_own_reference():
    """A repair applied to two draws: each repaired draw against its own unrepaired draw."""
    from refusalkit.evaluation.stats import across_pairs

    d1, d2 = {i: i < 50 for i in range(100)}, {i: i < 70 for i in range(100)}
    r1, r2 = {i: i < 20 for i in range(100)}, {i: i < 30 for i in range(100)}
    res = across_pairs([(d1, r1), (d2, r2)])
    assert res["per_draw"] == pytest.approx([-0.30, -0.40]) and res["difference"] == pytest.approx(-0.35)
    assert (res["only_first"], res["only_second"]) == (70, 0) and res["z"] == pytest.approx(-(70**0.5))
    assert res["first_rates"] == pytest.approx([0.5, 0.7]) and res["second_rates"] == pytest.approx([0.2, 0.3])
    assert res["ci95"][1] < 0


def test_paired_effect_difference_by_hand():
    """Four prompts: the intervention flips 2 of 4 in model A, 1 of 4 in model B (the same prompt flipped
    in both, one only in A): loss +25 pt, sign test on 1 prompt p = 1, effects 0.5 and 0.25."""
    from refusalkit.evaluation.stats import paired_effect_difference

    before_a, after_a = dict(enumerate([1, 1, 1, 0])), dict(enumerate([0, 0, 1, 0]))
    before_b, after_b = dict(enumerate([1, 1, 1, 0])), dict(enumerate([1, 0, 1, 0]))
    res = paired_effect_difference(before_a, after_a, before_b, after_b)
    assert res["difference"] == pytest.approx(0.25) and res["p"] == 1.0 and res["n"] == 4
    assert (res["effect_a"], res["effect_b"], res["weaker_in_b"], res["stronger_in_b"]) == (0.5, 0.25, 1, 0)
    lo, hi = res["ci95"]
    assert lo < 0.0 < 0.25 < hi <= 0.75  # four prompts and the two pseudo-prompts
    agree = paired_effect_difference(before_a, after_a, before_a, after_a)  # the same flips in both models
    assert agree["difference"] == 0.0 and agree["ci95"][0] < 0 < agree["ci95"][1]  # not the point [0, 0]
    # 20 prompts all flipped in A and none in B: sign test p = 2 / 2^20
    flipped = paired_effect_difference({i: True for i in range(20)}, {i: False for i in range(20)},
                                       {i: True for i in range(20)}, {i: True for i in range(20)})  # fmt: skip
    assert flipped["difference"] == 1.0 and flipped["p"] == pytest.approx(2 / 2**20)
    assert 0.6 < flipped["ci95"][0] < 1.0 == flipped["ci95"][1]
    assert paired_effect_difference({}, {}, {}, {})["difference"] is None
