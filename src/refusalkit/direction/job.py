"""The ``extract`` job: data → candidates → selection → validation, in one run directory.

Writes ``<variant>/direction/`` and ``data/splits.json`` (:class:`~refusalkit.core.layout.RunLayout`):
candidates (key "candidates" [positions, L+1, d_model] and the harmful / harmless means), the
selected direction (key "direction": the raw difference in means) with ``direction.json``, every
candidate's scores and why it was discarded, one selection plot per position, and the validation
by generation with its completions.

Each stage is skipped when its outputs exist (``force=True`` recomputes); every file is written
atomically, so an interrupt leaves only finished artifacts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout, prepare
from refusalkit.core.progress import Progress
from refusalkit.data.prompts import load_prompts, load_refusal_phrases, split_prompts
from refusalkit.data.refusal import SubstringJudge, settle_rule, summarize
from refusalkit.direction.extract import candidate_directions, mean_activations, prompt_streams
from refusalkit.direction.forward import forward_last
from refusalkit.direction.generate import Condition, generate_conditions
from refusalkit.direction.noise import floors_by_position
from refusalkit.direction.select import Scorer, default_refusal_ids, refusal_scores, select_direction
from refusalkit.models.chat import post_instruction_ids, tokenize_instructions
from refusalkit.models.session import Session

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def stage_data(s: Session) -> dict[str, dict[str, list[str]]]:
    path = s.layout.splits
    if not s.needs(path):
        return artifacts.read_json(path)
    c = s.cfg
    out = {}
    for kind, source in (("harmful", c.harmful), ("harmless", c.harmless)):
        sp = split_prompts(load_prompts(source), c.n_train, c.n_val, c.n_test if c.validation.enabled else 0, c.seed)
        out[kind] = {"source": source, "train": sp.train, "val": sp.val, "test": sp.test}
    artifacts.write_json(path, out)
    return out


def _filter_train(s: Session, data: dict, refusal_ids: list[int]) -> tuple[list[str], list[str], dict[str, int]]:
    """Arditi's filter: keep harmful prompts with refusal score > 0 and harmless ones with score <= 0."""
    lm, c = s.lm, s.cfg
    kept = {}
    for kind, keep in (("harmful", lambda x: x > 0), ("harmless", lambda x: x <= 0)):
        prompts = data[kind]["train"]
        ids = tokenize_instructions(lm.tokenizer, prompts, c.system_prompt)
        scores = refusal_scores(
            forward_last(lm.model, ids, pad_id=lm.tokenizer.pad_token_id, batch_size=c.batch_size), refusal_ids
        )
        kept[kind] = [p for p, sc in zip(prompts, scores.tolist()) if keep(sc)]
        if not kept[kind]:
            raise UserError(f"filtering left no {kind} training prompts; turn filter_train off or use other prompts")
    return kept["harmful"], kept["harmless"], {k: len(v) for k, v in kept.items()}


def _train_ids(s: Session, data: dict) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """The training prompts the difference in means uses (after Arditi's filter when
    ``filter_train``), chat-formatted and tokenized per kind, and their counts."""
    c, tok = s.cfg, s.lm.tokenizer
    harmful, harmless = data["harmful"]["train"], data["harmless"]["train"]
    counts = {"harmful": len(harmful), "harmless": len(harmless)}
    if c.filter_train:
        harmful, harmless, counts = _filter_train(s, data, default_refusal_ids(tok))
    ids = {k: tokenize_instructions(tok, p, c.system_prompt) for k, p in (("harmful", harmful), ("harmless", harmless))}
    return ids, counts


def stage_extract(s: Session, data: dict) -> torch.Tensor:
    cand_path, meta_path = s.direction_file("candidates.safetensors"), s.direction_file("candidates.json")
    if not s.needs(cand_path, meta_path):
        return artifacts.load_tensors(cand_path)["candidates"]
    lm, c = s.lm, s.cfg
    post = post_instruction_ids(lm.tokenizer, c.system_prompt)
    n_pos = len(post)
    ids, counts = _train_ids(s, data)
    means, rows = {}, {}
    floors = s.variant == "base" and c.noise_resamples >= 1  # the per-prompt rows also give the noise floor
    for kind in ("harmful", "harmless"):
        with s.progress.bar(len(ids[kind]), f"activations ({kind})") as bar:
            if floors:
                rows[kind] = prompt_streams(lm, ids[kind], n_pos, batch_size=c.batch_size, progress=bar.update)
                means[kind] = rows[kind].double().mean(0)
            else:
                means[kind] = mean_activations(lm, ids[kind], n_pos, batch_size=c.batch_size, progress=bar.update)
    cands = candidate_directions(means["harmful"], means["harmless"])
    artifacts.save_tensors(
        cand_path,
        {"candidates": cands, "harmful_mean": means["harmful"].float(), "harmless_mean": means["harmless"].float()},
    )
    artifacts.write_json(
        meta_path,
        {
            "shape": list(cands.shape),
            "positions": list(range(-n_pos, 0)),
            "post_instruction_tokens": [lm.tokenizer.decode([t]) for t in post],
            "layers": "0..L-1: input of decoder block l; L: output of the last block (final stream, before the final norm)",
            "n_train": counts,
            "filtered": c.filter_train,
            "noise_floors": None
            if not floors
            else floors_by_position(
                rows["harmful"], rows["harmless"], list(range(-n_pos, 0)), resamples=c.noise_resamples, seed=c.seed
            ),
        },
    )
    return cands


def _select(s: Session, data: dict, cands: torch.Tensor) -> Any:
    """Arditi's selection on the validation prompts, with progress bars; the SelectionResult."""
    lm, c, sc = s.lm, s.cfg, s.cfg.selection
    scorer = Scorer(
        lm,
        tokenize_instructions(lm.tokenizer, data["harmful"]["val"], c.system_prompt),
        tokenize_instructions(lm.tokenizer, data["harmless"]["val"], c.system_prompt),
        default_refusal_ids(lm.tokenizer),
        cands.shape[0],
        batch_size=c.batch_size,
    )
    bars: dict[str, Any] = {}

    def progress(phase: str, k: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = s.progress.bar(total, f"selection: {phase}", unit="cand")
        bars[phase].update(k)

    settings = {
        k: getattr(sc, k)
        for k in (
            "kl_threshold",
            "induce_refusal_threshold",
            "prune_layer_fraction",
            "mode",
            "screen_prompts",
            "screen_keep",
            "fallback",
            "fallback_margin",
            "screen_kl_slack",
        )
    }
    try:
        return select_direction(lm, cands, scorer, progress=progress, **settings)
    finally:
        for b in bars.values():
            b.close()


def stage_select(s: Session, data: dict, cands: torch.Tensor) -> dict[str, Any]:
    paths = [s.direction_file(n) for n in ("direction.safetensors", "direction.json", "scores.json")]
    if not s.needs(*paths):
        return artifacts.read_json(paths[1])
    lm, c = s.lm, s.cfg
    res = _select(s, data, cands)
    n_pos = cands.shape[0]
    direction = cands[res.position + n_pos, res.layer]
    post = post_instruction_ids(lm.tokenizer, c.system_prompt)
    info = {
        "layer": res.layer, "position": res.position, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "model": c.model, "variant": s.variant, "ablation_score": res.chosen.ablation_score,
        "addition_score": res.chosen.addition_score, "kl": res.chosen.kl, "norm": direction.norm().item(),
        "normalized": False, "layer_meaning": "residual stream at the input of decoder block `layer`",
        "token": lm.tokenizer.decode([post[res.position]]), "fallback": res.fallback, "baseline": res.baseline,
        "thresholds": res.thresholds, "n_candidates": len(res.scores), "n_fully_scored": res.n_fully_scored,
        "refusal_tokens": [lm.tokenizer.decode([t]) for t in default_refusal_ids(lm.tokenizer)],
    }  # fmt: skip
    from refusalkit.direction.stability import source_stability

    info["source_stability"] = source_stability(res.to_json(), resamples=c.noise_resamples, seed=c.seed)
    artifacts.write_json(paths[2], res.to_json())
    artifacts.save_tensors(paths[0], {"direction": direction})
    from refusalkit.direction.plots import plot_selection

    labels = {p: lm.tokenizer.decode([post[p]]) for p in range(-n_pos, 0)}
    plot_selection(res.to_json()["candidates"], res.baseline, lm.n_layers, res.thresholds["layer_cutoff"],
                   (res.position, res.layer), s.layout.direction_dir(s.variant), labels,
                   kl_threshold=c.selection.kl_threshold)  # fmt: skip
    artifacts.write_json(paths[1], info)  # last: its presence marks the stage as done
    return info


def stage_validate(s: Session, data: dict, info: dict[str, Any]) -> dict[str, Any] | None:
    c = s.cfg
    if not c.validation.enabled:
        return None
    vpath, cpath = s.direction_file("validation.json"), s.direction_file("completions.jsonl")
    if not s.needs(vpath, cpath):
        return artifacts.read_json(vpath)
    lm = s.lm
    direction = artifacts.load_tensors(s.direction_file("direction.safetensors"))["direction"]
    judge = SubstringJudge(load_refusal_phrases(c.validation.refusal_phrases))
    conditions = {
        "harmful_baseline": ("harmful", Condition([])),
        "harmful_ablated": ("harmful", Condition([], ablate=direction)),
        "harmless_baseline": ("harmless", Condition([])),
        "harmless_added": ("harmless", Condition([], add=(direction, int(info["layer"])))),
    }
    wanted = {
        name: replace(cond, ids=tokenize_instructions(lm.tokenizer, data[kind]["test"], c.system_prompt))
        for name, (kind, cond) in conditions.items()
    }
    rows, summary = [], {}
    with s.progress.bar(sum(len(w.ids) for w in wanted.values()), "validation (generation)") as bar:
        outs = generate_conditions(lm, wanted, max_new_tokens=c.validation.max_new_tokens, batch_size=c.batch_size,
                                   progress=bar.update, settled=settle_rule(c.early_stop, [judge]))  # fmt: skip
    for name, (kind, _) in conditions.items():
        prompts = data[kind]["test"]
        verdicts = judge.judge_many(prompts, outs[name])
        summary[name] = summarize(verdicts)
        rows += [
            {"condition": name, "prompt": p, "completion": o, "verdict": v.label, "reason": v.reason}
            for p, o, v in zip(prompts, outs[name], verdicts)
        ]
    result = {
        "harmful_refusal_rate": summary["harmful_baseline"]["refusal_rate"],
        "harmful_refusal_rate_ablated": summary["harmful_ablated"]["refusal_rate"],
        "harmless_refusal_rate": summary["harmless_baseline"]["refusal_rate"],
        "harmless_refusal_rate_added": summary["harmless_added"]["refusal_rate"],
        "n_test": {k: len(data[k]["test"]) for k in ("harmful", "harmless")},
        "max_new_tokens": c.validation.max_new_tokens,
        "judge": "refusal substrings + degeneracy detector",
        "conditions": summary,
        "layer": info["layer"],
        "position": info["position"],
    }
    artifacts.write_jsonl(cpath, rows)
    artifacts.write_json(vpath, result)
    return result


def stage_noise(s: Session, data: dict, info: dict[str, Any]) -> dict[str, Any] | None:
    """The base model's noise floor for every cosine ``compare`` reports
    (:mod:`refusalkit.direction.noise`): ``noise_resamples`` bootstrap resamples of the training
    prompts' streams at the selected position, read from what the extraction's forward made (a run
    extracted before that, or with other resamples or seed, runs the prompts again). Base model only;
    ``None`` when off."""
    c = s.cfg
    path = s.direction_file("noise_floor.json")
    if s.variant != "base" or c.noise_resamples < 1:
        return None
    if not s.needs(path):
        rec = artifacts.read_json(path)
        made_by = (rec.get("position"), rec.get("resamples"), rec.get("seed"))
        if made_by == (int(info["position"]), c.noise_resamples, c.seed):
            return rec
        s._ran = True  # a re-selected direction or other settings: a stale floor is recomputed
    from refusalkit.direction.noise import floor_record, noise_floor_record, prompt_activations

    made = artifacts.read_json(s.direction_file("candidates.json")).get("noise_floors")
    at = str(int(info["position"]))
    if made and (made["resamples"], made["seed"]) == (c.noise_resamples, c.seed) and at in made["by_position"]:
        rec = floor_record(made["by_position"][at], made["n_prompts"], layer=int(info["layer"]),
                           position=int(at), resamples=c.noise_resamples, seed=c.seed)  # fmt: skip
        artifacts.write_json(path, rec)  # the extraction's forward made it: no second pass
        return rec
    lm = s.lm
    ids, _ = _train_ids(s, data)
    acts = {}
    for kind in ("harmful", "harmless"):
        with s.progress.bar(len(ids[kind]), f"noise floor ({kind})") as bar:
            acts[kind] = prompt_activations(
                lm, ids[kind], int(info["position"]), batch_size=c.batch_size, progress=bar.update
            )
    rec = noise_floor_record(
        acts["harmful"],
        acts["harmless"],
        layer=int(info["layer"]),
        position=int(info["position"]),
        resamples=c.noise_resamples,
        seed=c.seed,
    )
    artifacts.write_json(path, rec)
    return rec


def ensure_noise_floor(cfg: Config, root: str | Path, progress: bool = False) -> dict[str, Any] | None:
    """The base model's noise floor, computed now when the base extraction predates it (``compare``
    on an older run); ``None`` when ``noise_resamples`` is 0 or the base has no direction yet."""
    layout = RunLayout(root)
    made = layout.direction("base", "noise_floor.json").exists()
    if cfg.noise_resamples < 1 or not layout.direction("base", "direction.json").exists():
        return None
    if not made and not layout.splits.exists():  # directions written by hand (no prompts): no floor
        return None
    s = Session(cfg=cfg, layout=layout, variant="base", progress=Progress(progress))
    try:
        rec = stage_noise(s, stage_data(s), artifacts.read_json(s.direction_file("direction.json")))
    finally:
        s.owner.release()
    return rec


def run_extract(
    cfg: Config,
    root: str | Path,
    variant: str = "base",
    force: bool = False,
    progress: bool = True,
    validate: bool = True,
    select: bool = True,
) -> dict[str, Any]:
    """Run every stage that is not done yet; return a summary dict.

    ``validate=False`` skips validation by generation even when ``validation.enabled`` (``run``
    uses it for variants when ``run.validate_variants`` is off); an existing validation is returned.
    ``select=False`` (a variant only): the candidate directions alone, no selection and no
    validation (``compare`` then judges the variant at the base source; ``"direction"`` is the
    selection already on disk, if any).
    """
    if not select and variant == "base":
        raise UserError("the base model's direction needs its selection (select=False is for variants)")
    root = Path(root)
    manifest = prepare(cfg, root, force)
    s = Session(
        cfg=cfg, layout=RunLayout(root), variant=variant, progress=Progress(progress), force=force, manifest=manifest
    )
    t0 = time.time()
    data = s.timed("data", lambda: stage_data(s))
    cands = s.timed("extract", lambda: stage_extract(s, data))
    if not select:
        path = s.direction_file("direction.json")
        s.owner.release()
        return {
            "direction": artifacts.read_json(path) if path.exists() else None,
            "validation": None,
            "seconds": round(time.time() - t0, 1),
            "run": str(root),
            "variant": variant,
            "model_info": None,
            "candidates_shape": list(cands.shape),
        }
    info = s.timed("select", lambda: stage_select(s, data, cands))
    s.timed("noise", lambda: stage_noise(s, data, info))
    if validate:
        val = s.timed("validate", lambda: stage_validate(s, data, info))
    else:
        val = (
            artifacts.read_json(s.direction_file("validation.json"))
            if s.direction_file("validation.json").exists()
            else None
        )
    model_info = s.lm.info if s.owner.loaded else None
    s.owner.release()
    return {
        "direction": info,
        "validation": val,
        "seconds": round(time.time() - t0, 1),
        "run": str(root),
        "variant": variant,
        "model_info": model_info,
    }
