"""Control by behaviour: does a refusal direction still control refusal in a model, on held-out prompts?

A high cosine with the base direction does not show that a direction still *controls* refusal (a
quantized model's direction can keep cosine > 0.97 while ablating it no longer removes refusal), and
the selection scores a direction was chosen by are measured on the very prompts it was chosen on,
where the selection's filters already force them to look right. So for a model (the base model or a
variant) and a direction, refusalkit generates on the run's **test split** — disjoint from the
training prompts the direction was computed on and from the validation prompts it was selected on —
in four conditions: harmful prompts plain and with the direction ablated everywhere (x' = x − r̂r̂ᵀx,
Arditi et al. 2024, Eq. 4), harmless prompts plain and with the direction added at the input of its
layer (Eq. 5). The direction **controls** refusal in the model when both paired exact McNemar tests
on the same prompts hold: ablation lowers the harmful prompts' refusal, addition raises the harmless
prompts' refusal.

Two directions are measured on every variant: its own selected direction (F1: a single direction
mediates refusal in every variant) and the base model's direction (is the *base* mechanism still in
control of the variant?). The base direction's control on the variant is compared with its control
on the base model, prompt by prompt (:func:`refusalkit.evaluation.stats.paired_effect_difference`):
the loss of control, decided against ``verdict.control_margin`` (F2: kept in function).

Writes ``<V>/direction/control.json`` (per-prompt outcomes of each condition; the report's
:mod:`refusalkit.study.report.control` tests them) and
``control.jsonl`` (the completions). The base model's own conditions, and a variant's own when it
was validated by generation with the same settings, are read from its validation's completions
instead of generated again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout, prepare
from refusalkit.core.manifest import update_manifest
from refusalkit.core.progress import Progress

VALIDATION_CONDITIONS = {"harmful_ablated": "ablated:own", "harmless_added": "added:own"}


def _reusable_rows(layout: RunLayout, variant: str, data: dict, max_new_tokens: int) -> dict[str, dict[str, bool]]:
    """The conditions a validation by generation already measured on these test prompts, with these
    settings: ``{condition: {prompt: refused}}`` (own-direction conditions renamed as in control.json)."""
    vpath, cpath = layout.direction(variant, "validation.json"), layout.direction(variant, "completions.jsonl")
    if not (vpath.is_file() and cpath.is_file()):
        return {}
    val = artifacts.read_json(vpath)
    if val.get("max_new_tokens") != max_new_tokens:
        return {}
    out: dict[str, dict[str, bool]] = {}
    for row in (json.loads(line) for line in cpath.read_text(encoding="utf-8").splitlines() if line.strip()):
        name = VALIDATION_CONDITIONS.get(row["condition"], row["condition"])
        out.setdefault(name, {})[row["prompt"]] = row["verdict"] == "refusal"
    for name, kind in (("harmful_baseline", "harmful"), ("harmless_baseline", "harmless")):
        if set(out.get(name, {})) != set(data[kind]["test"]):
            return {}
    return out


def run_control(
    cfg: Config, root: str | Path, variant: str, progress: bool = True, force: bool = False
) -> dict[str, Any]:
    """Measure the control of ``variant``'s own direction (when it has a selected one) and of the base
    direction (a variant) on the test split; write and return ``control.json``. Reused when done
    (``force``: measured again)."""
    root = Path(root)
    layout = RunLayout(root)
    path, rows_path = layout.direction(variant, "control.json"), layout.direction(variant, "control.jsonl")
    if path.is_file() and rows_path.is_file() and not force:
        return artifacts.read_json(path)
    data = artifacts.read_json(layout.splits) if layout.splits.is_file() else None
    if not data or not data["harmful"].get("test") or not data["harmless"].get("test"):
        raise UserError(
            f"{root} has no held-out test prompts (validation.enabled was off when the data were split); "
            "control by behaviour needs them: run with validation.enabled true in a new run directory"
        )
    manifest = prepare(cfg, root, force=False, keep_existing=True)
    t0, before = time.time(), snapshot()
    max_new = cfg.validation.max_new_tokens
    directions: dict[str, dict[str, Any]] = {}
    own = layout.direction(variant, "direction.json")
    if own.is_file():
        directions["own"] = {**artifacts.read_json(own), "file": layout.direction(variant, "direction.safetensors")}
    if variant != "base":
        base = layout.direction("base", "direction.json")
        directions["base"] = {**artifacts.read_json(base), "file": layout.direction("base", "direction.safetensors")}
    conditions = {} if force else _reusable_rows(layout, variant, data, max_new)
    wanted: list[tuple[str, str, str | None]] = [
        ("harmful_baseline", "harmful", None),
        ("harmless_baseline", "harmless", None),
    ]
    for which in directions:
        wanted += [(f"ablated:{which}", "harmful", which), (f"added:{which}", "harmless", which)]
    todo = [w for w in wanted if w[0] not in conditions]
    rows = _generate_conditions(cfg, layout, variant, todo, data, directions, conditions, progress) if todo else []
    result = {
        "variant": variant,
        "split": "test",
        "n_test": {k: len(data[k]["test"]) for k in ("harmful", "harmless")},
        "max_new_tokens": max_new,
        "judge": "refusal substrings + degeneracy detector",
        "directions": {w: {"layer": d["layer"], "position": d["position"]} for w, d in directions.items()},
        "conditions": {k: conditions[k] for k, _, _ in wanted},
        "generated": sorted({r["condition"] for r in rows}),
    }
    result["seconds"] = round(time.time() - t0, 1)
    artifacts.write_jsonl(rows_path, rows)
    artifacts.write_json(path, result)
    update_manifest(
        layout.manifest, cfg.seed, f"{variant}/control", result["seconds"], manifest, since(before)["tokens"]
    )
    return result


def _generate_conditions(
    cfg: Config,
    layout: RunLayout,
    variant: str,
    todo: list[tuple[str, str, str | None]],
    data: dict[str, Any],
    directions: dict[str, dict[str, Any]],
    conditions: dict[str, dict[str, bool]],
    progress: bool,
) -> list[dict[str, Any]]:
    """Generate and judge the conditions ``todo`` (name, prompt kind, which direction or None) on the
    test split; each condition's per-prompt refusals go into ``conditions``; the rows, one per completion."""
    from refusalkit.data.prompts import load_refusal_phrases
    from refusalkit.data.refusal import SubstringJudge, settle_rule
    from refusalkit.direction.generate import Condition, generate_conditions
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.session import Session

    rows: list[dict[str, Any]] = []
    session = Session(cfg=cfg, layout=layout, variant=variant, progress=Progress(progress))
    judge = SubstringJudge(load_refusal_phrases(cfg.validation.refusal_phrases))
    try:
        lm = session.lm
        wanted: dict[str, Condition] = {}
        for name, kind, which in todo:
            ids = tokenize_instructions(lm.tokenizer, data[kind]["test"], cfg.system_prompt)
            d = None if which is None else artifacts.load_tensors(directions[which]["file"])["direction"]
            if d is None:
                wanted[name] = Condition(ids)
            elif name.startswith("ablated"):
                wanted[name] = Condition(ids, ablate=d)
            else:
                wanted[name] = Condition(ids, add=(d, int(directions[which]["layer"])))
        total = sum(len(c.ids) for c in wanted.values())
        with session.progress.bar(total, f"{variant}: control (generation)") as bar:
            outs = generate_conditions(lm, wanted, max_new_tokens=cfg.validation.max_new_tokens,
                                       batch_size=cfg.batch_size, progress=bar.update,
                                       settled=settle_rule(cfg.early_stop, [judge]))  # fmt: skip
        for name, kind, _ in todo:
            prompts = data[kind]["test"]
            verdicts = judge.judge_many(prompts, outs[name])
            conditions[name] = {p: v.label == "refusal" for p, v in zip(prompts, verdicts)}
            rows += [
                {"condition": name, "prompt": p, "completion": o, "verdict": v.label}
                for p, o, v in zip(prompts, outs[name], verdicts)
            ]
    finally:
        session.owner.release()
    return rows
