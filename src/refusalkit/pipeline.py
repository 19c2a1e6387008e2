"""The ``extract`` job: data → candidates → selection → validation, in one run directory.

Layout (``DIR``)::

    config.yaml                    resolved configuration
    manifest.json                  package versions, hardware, seed, git revision, stage timings
    data/splits.json               the prompts of every split (shared by all variants)
    <variant>/direction/
        candidates.safetensors     key "candidates" [positions, L+1, d_model]; harmful/harmless means
        candidates.json            positions, post-instruction tokens, prompt counts
        direction.safetensors      key "direction": the raw difference in means (norm in direction.json)
        direction.json             layer, position, scores, fallback, ...
        scores.json                every candidate's scores and why it was discarded
        selection_pos{-k}.png      scores across layers, one plot per position
        validation.json            refusal rates by generation on held-out prompts
        completions.jsonl          every validation completion and its verdict

Each stage is skipped when its outputs exist (``force=True`` recomputes); every file is written
atomically, so an interrupt leaves only finished artifacts.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import artifacts
from .config import Config, apply_settings, commented_yaml
from .errors import UserError
from .extract import candidate_directions, mean_activations
from .formatting import post_instruction_ids, tokenize_instructions
from .forward import forward_last
from .generate import generate
from .hooks import ablation_hooks, addition_hooks
from .judge import RefusalJudge, summarize
from .manifest import update_manifest
from .models import LoadedModel, load_model
from .prompts import load_prompts, load_refusal_phrases, refusal_first_phrases, split_prompts
from .select import Scorer, refusal_scores, refusal_token_ids, select_direction

log = logging.getLogger(__name__)


class Progress:
    """tqdm bars on stderr (quiet when ``enabled`` is False)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def bar(self, total: int, desc: str, unit: str = "prompt"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, leave=False, dynamic_ncols=True)


@dataclass
class RunDir:
    root: Path
    variant: str = "base"

    @property
    def direction_dir(self) -> Path:
        return self.root / self.variant / "direction"

    @property
    def variant_model_dir(self) -> Path:
        return self.root / self.variant / "model"

    def f(self, name: str) -> Path:
        return self.direction_dir / name


class ModelOwner:
    """The one owner of a loaded model: it loads, releases and swaps; nobody else replaces it.

    Holders ask :attr:`lm` every time they need the model and never keep it across a
    :meth:`use` or :meth:`release`: both drop the owner's reference (so the old model is freed
    when nothing else holds it) and bump :attr:`generation`, which an :class:`~refusalkit.aird.AirdEdit`
    or any other holder may compare to detect a stale model. One model is loaded at a time.
    """

    def __init__(self, cfg: Config, root: Path, variant: str = "base"):
        self.cfg, self.root, self.variant = cfg, root, variant
        self._lm: LoadedModel | None = None
        self.generation = 0

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = self._load(self.variant)
        return self._lm

    def _load(self, variant: str) -> LoadedModel:
        override = None
        if variant != "base":
            model_dir = RunDir(self.root, variant).variant_model_dir
            if not (model_dir / "config.json").exists():
                raise UserError(f"variant {variant!r} has no model in {model_dir}; "
                                "create it first (refusalkit compress) or use --variant base")
            override = str(model_dir)
        c = self.cfg
        log.info("loading model %s", c.model if override is None else override)
        return load_model(c.model, dtype=c.dtype, device=c.device, chat_template=c.chat_template, path_override=override)

    def release(self) -> None:
        """Drop the loaded model (freed once no stale holder keeps it) and invalidate holders."""
        if self._lm is not None:
            self._lm = None
            self.generation += 1
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def use(self, variant: str) -> LoadedModel:
        """Swap to ``variant`` (released first, so two models are never held at once)."""
        if variant != self.variant:
            self.release()
            self.variant = variant
        return self.lm


@dataclass
class Session:
    """What the stages share: the config, the run directory, the model's owner."""

    cfg: Config
    run: RunDir
    progress: Progress
    force: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    _ran: bool = False
    owner: ModelOwner | None = None

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = ModelOwner(self.cfg, self.run.root, self.run.variant)

    @property
    def lm(self) -> LoadedModel:
        """The owner's current model: ask each time, never keep it across a swap."""
        return self.owner.lm

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        """Run a stage; record its time in the manifest only if it computed something."""
        self._ran = False
        t0 = time.time()
        out = fn()
        if self._ran:
            self.manifest = update_manifest(self.run.root / "manifest.json", self.cfg.seed,
                                            f"{self.run.variant}/{stage}", time.time() - t0, self.manifest)
        return out

    def needs(self, *paths: Path) -> bool:
        """True (and the stage counts as run) when ``--force`` or any output is missing."""
        need = self.force or not all(p.exists() for p in paths)
        self._ran = self._ran or need
        return need


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def prepare(cfg: Config, root: Path, force: bool) -> dict[str, Any]:
    """Check and write ``config.yaml``; refuse to mix analysis settings in one run directory."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {root}: {e.strerror}; choose a writable --run") from e
    cfg_path = root / "config.yaml"
    if cfg_path.exists() and not force:
        try:
            old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise UserError(f"{cfg_path} is corrupt; delete it or re-run with --force") from None
        old_cfg = Config()
        try:
            apply_settings(old_cfg, old)
        except UserError:
            raise UserError(f"{cfg_path} holds settings this version does not know; use a new --run or --force") from None
        diff = {k for k, v in cfg.analysis_key().items() if old_cfg.analysis_key().get(k) != v}
        if diff:
            raise UserError(f"run directory {root} was made with other settings ({', '.join(sorted(diff))}); "
                            "use a new --run, the same settings, or --force to recompute everything")
    artifacts.write_text(cfg_path, "# resolved configuration of this run\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    mpath = root / "manifest.json"
    return artifacts.read_json(mpath) if mpath.exists() else {}


def stage_data(s: Session) -> dict[str, dict[str, list[str]]]:
    path = s.run.root / "data" / "splits.json"
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
        scores = refusal_scores(forward_last(lm.model, ids, pad_id=lm.tokenizer.pad_token_id, batch_size=c.batch_size),
                                refusal_ids)
        kept[kind] = [p for p, sc in zip(prompts, scores.tolist()) if keep(sc)]
        if not kept[kind]:
            raise UserError(f"filtering left no {kind} training prompts; turn filter_train off or use other prompts")
    return kept["harmful"], kept["harmless"], {k: len(v) for k, v in kept.items()}


def stage_extract(s: Session, data: dict) -> torch.Tensor:
    cand_path, meta_path = s.run.f("candidates.safetensors"), s.run.f("candidates.json")
    if not s.needs(cand_path, meta_path):
        return artifacts.load_tensors(cand_path)["candidates"]
    lm, c = s.lm, s.cfg
    post = post_instruction_ids(lm.tokenizer, c.system_prompt)
    n_pos = len(post)
    harmful, harmless = data["harmful"]["train"], data["harmless"]["train"]
    counts = {"harmful": len(harmful), "harmless": len(harmless)}
    if c.filter_train:
        harmful, harmless, counts = _filter_train(s, data, _refusal_ids(lm))
    means = {}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        ids = tokenize_instructions(lm.tokenizer, prompts, c.system_prompt)
        with s.progress.bar(len(ids), f"activations ({kind})") as bar:
            means[kind] = mean_activations(lm, ids, n_pos, batch_size=c.batch_size, progress=bar.update)
    cands = candidate_directions(means["harmful"], means["harmless"])
    artifacts.save_tensors(cand_path, {"candidates": cands, "harmful_mean": means["harmful"].float(),
                                       "harmless_mean": means["harmless"].float()})
    artifacts.write_json(meta_path, {
        "shape": list(cands.shape), "positions": list(range(-n_pos, 0)),
        "post_instruction_tokens": [lm.tokenizer.decode([t]) for t in post],
        "layers": "0..L-1: input of decoder block l; L: output of the last block (final stream, before the final norm)",
        "n_train": counts, "filtered": c.filter_train,
    })
    return cands


def _refusal_ids(lm: LoadedModel) -> list[int]:
    return refusal_token_ids(lm.tokenizer, refusal_first_phrases())


def stage_select(s: Session, data: dict, cands: torch.Tensor) -> dict[str, Any]:
    paths = [s.run.f(n) for n in ("direction.safetensors", "direction.json", "scores.json")]
    if not s.needs(*paths):
        return artifacts.read_json(paths[1])
    lm, c, sc = s.lm, s.cfg, s.cfg.selection
    n_pos = cands.shape[0]
    rids = _refusal_ids(lm)
    harmful_ids = tokenize_instructions(lm.tokenizer, data["harmful"]["val"], c.system_prompt)
    harmless_ids = tokenize_instructions(lm.tokenizer, data["harmless"]["val"], c.system_prompt)
    scorer = Scorer(lm, harmful_ids, harmless_ids, rids, n_pos, batch_size=c.batch_size)
    bars: dict[str, Any] = {}

    def progress(phase: str, k: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = s.progress.bar(total, f"selection: {phase}", unit="cand")
        bars[phase].update(k)

    try:
        res = select_direction(lm, cands, scorer, kl_threshold=sc.kl_threshold,
                               induce_refusal_threshold=sc.induce_refusal_threshold,
                               prune_layer_fraction=sc.prune_layer_fraction, mode=sc.mode,
                               screen_prompts=sc.screen_prompts, screen_keep=sc.screen_keep,
                               fallback=sc.fallback, fallback_margin=sc.fallback_margin,
                               screen_kl_slack=sc.screen_kl_slack, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    direction = cands[res.position + n_pos, res.layer]
    post = post_instruction_ids(lm.tokenizer, c.system_prompt)
    info = {
        "layer": res.layer, "position": res.position, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "model": c.model, "variant": s.run.variant,
        "ablation_score": res.chosen.ablation_score, "addition_score": res.chosen.addition_score, "kl": res.chosen.kl,
        "norm": direction.norm().item(), "normalized": False,
        "layer_meaning": "residual stream at the input of decoder block `layer`",
        "token": lm.tokenizer.decode([post[res.position]]),
        "fallback": res.fallback, "baseline": res.baseline, "thresholds": res.thresholds,
        "n_candidates": len(res.scores), "n_fully_scored": res.n_fully_scored,
        "refusal_tokens": [lm.tokenizer.decode([t]) for t in rids],
    }
    artifacts.write_json(paths[2], res.to_json())
    artifacts.save_tensors(paths[0], {"direction": direction})
    from .plots import plot_selection

    labels = {p: lm.tokenizer.decode([post[p]]) for p in range(-n_pos, 0)}
    plot_selection(res.to_json()["candidates"], res.baseline, lm.n_layers, res.thresholds["layer_cutoff"],
                   (res.position, res.layer), s.run.direction_dir, labels, kl_threshold=sc.kl_threshold)
    artifacts.write_json(paths[1], info)  # last: its presence marks the stage as done
    return info


def stage_validate(s: Session, data: dict, info: dict[str, Any]) -> dict[str, Any] | None:
    c = s.cfg
    if not c.validation.enabled:
        return None
    vpath, cpath = s.run.f("validation.json"), s.run.f("completions.jsonl")
    if not s.needs(vpath, cpath):
        return artifacts.read_json(vpath)
    lm = s.lm
    direction = artifacts.load_tensors(s.run.f("direction.safetensors"))["direction"]
    judge = RefusalJudge(load_refusal_phrases(c.validation.refusal_phrases))
    conditions = {
        "harmful_baseline": ("harmful", ([], [])),
        "harmful_ablated": ("harmful", ablation_hooks(lm.model, direction)),
        "harmless_baseline": ("harmless", ([], [])),
        "harmless_added": ("harmless", addition_hooks(lm.model, direction, info["layer"])),
    }
    rows, summary = [], {}
    total = sum(len(data[k]["test"]) for k, _ in conditions.values())
    with s.progress.bar(total, "validation (generation)") as bar:
        for name, (kind, hooks) in conditions.items():
            prompts = data[kind]["test"]
            ids = tokenize_instructions(lm.tokenizer, prompts, c.system_prompt)
            outs = generate(lm, ids, max_new_tokens=c.validation.max_new_tokens, batch_size=c.batch_size,
                            hooks=hooks, progress=bar.update)
            verdicts = judge.judge_many(outs)
            summary[name] = summarize(verdicts)
            rows += [{"condition": name, "prompt": p, "completion": o, "verdict": v.label, "reason": v.reason}
                     for p, o, v in zip(prompts, outs, verdicts)]
    result = {
        "harmful_refusal_rate": summary["harmful_baseline"]["refusal_rate"],
        "harmful_refusal_rate_ablated": summary["harmful_ablated"]["refusal_rate"],
        "harmless_refusal_rate": summary["harmless_baseline"]["refusal_rate"],
        "harmless_refusal_rate_added": summary["harmless_added"]["refusal_rate"],
        "n_test": {k: len(data[k]["test"]) for k in ("harmful", "harmless")},
        "max_new_tokens": c.validation.max_new_tokens, "judge": "refusal substrings + degeneracy detector",
        "conditions": summary, "layer": info["layer"], "position": info["position"],
    }
    artifacts.write_jsonl(cpath, rows)
    artifacts.write_json(vpath, result)
    return result


def run_extract(cfg: Config, root: str | Path, variant: str = "base", force: bool = False,
                progress: bool = True, validate: bool = True) -> dict[str, Any]:
    """Run every stage that is not done yet; return a summary dict.

    ``validate=False`` skips validation by generation even when ``validation.enabled`` (``run``
    uses it for variants when ``run.validate_variants`` is off); an existing validation is returned.
    """
    root = Path(root)
    manifest = prepare(cfg, root, force)
    s = Session(cfg=cfg, run=RunDir(root, variant), progress=Progress(progress), force=force, manifest=manifest)
    t0 = time.time()
    data = s.timed("data", lambda: stage_data(s))
    cands = s.timed("extract", lambda: stage_extract(s, data))
    info = s.timed("select", lambda: stage_select(s, data, cands))
    if validate:
        val = s.timed("validate", lambda: stage_validate(s, data, info))
    else:
        val = artifacts.read_json(s.run.f("validation.json")) if s.run.f("validation.json").exists() else None
    return {"direction": info, "validation": val, "seconds": round(time.time() - t0, 1),
            "run": str(root), "variant": variant, "model_info": s.lm.info if s.owner.loaded else None}


def default_config_text() -> str:
    return commented_yaml() + "\n"
