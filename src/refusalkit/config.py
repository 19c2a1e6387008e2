"""The typed configuration. Precedence: defaults < config file (``--config``) < command-line flags.

Every field carries a description; ``refusalkit config`` prints the commented default file
(the same text as ``configs/default.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SelectionConfig:
    kl_threshold: float = _f(0.1, "Discard candidates whose ablation changes harmless next-token distributions by more KL than this (Arditi: 0.1).")
    induce_refusal_threshold: float = _f(0.0, "Discard candidates whose addition score (refusal log-odds on harmless prompts) is below this (Arditi: 0.0).")
    prune_layer_fraction: float = _f(0.2, "Discard candidates in the last fraction of layers (Arditi: 0.2).")
    mode: str = _f("fast", "fast: screen every candidate by ablation on a few prompts, score the best in full; full: score every candidate in full.")
    screen_prompts: int = _f(4, "Harmful (ablation score) and harmless (KL) validation prompts of each kind used by the fast screen.")
    screen_keep: int = _f(8, "Candidates that pass the screen into full scoring.")
    screen_kl_slack: float = _f(2.0, "The screen ranks candidates with screened KL <= slack x kl_threshold first, then by ablation score.")
    fallback: str = _f("relative", "When no candidate passes: relative (explicit, recorded relaxation, see README) or error.")
    fallback_margin: float = _f(1.0, "relative fallback: addition must raise the harmless refusal score by this many log-odds over its baseline.")


@dataclass
class ValidationConfig:
    enabled: bool = _f(True, "Measure refusal rates by generation on the held-out test prompts.")
    max_new_tokens: int = _f(48, "Tokens generated per completion (greedy).")
    refusal_phrases: str | None = _f(None, "A .txt file of refusal substrings for the judge (default: refusalkit's documented list).")


@dataclass
class EvaluationConfig:
    prompts: str = _f("advbench", "Harmful prompts under attack: advbench, harmbench, ... or a .txt/.jsonl/.csv file. Prompts the run used to train or select its direction are left out.")
    n_prompts: int = _f(100, "Harmful prompts per attack (at least 100 by default: on 24 prompts one flipped verdict moves the ASR by 4 points).")
    harmless: str = _f("alpaca", "Harmless prompts for over-refusal (those used for the direction are left out).")
    n_harmless: int = _f(100, "Harmless prompts for the over-refusal rate.")
    attacks: str = _f("vanilla,decoding,suffix", "Attacks to run, comma-separated: vanilla, decoding, suffix.")
    max_new_tokens: str = _f("auto", "Tokens per completion: auto (256 on GPU, 64 on CPU) or a number.")
    seed: int = _f(0, "Seed of sampled completions (decoding attack) and of GCG.")
    decoding_grid: str = _f("auto", "Decoding attack grid: huang (Huang et al. 2023: 20 temperatures, 21 top-p, 9 top-k), small (7 of them), auto (huang on GPU, small on CPU), or a list such as 'temperature=0.7,top_p=0.9,top_k=50'.")
    decoding_system_prompts: str = _f("default,none", "System prompt settings the decoding attack sweeps: default (the run's system_prompt), none (an empty system message), comma-separated.")
    decoding_n_prompts: int = _f(0, "Harmful prompts for the decoding attack (0: n_prompts).")
    suffix_mode: str = _f("self", "suffix attack: self (optimize GCG suffixes on the model evaluated) or transfer (apply the suffixes optimized on suffix_source).")
    suffix_source: str = _f("base", "transfer mode: the variant whose eval/suffixes.json is applied.")
    gcg_prompts: str = _f("auto", "Prompts that get their own GCG suffix: auto (10 on GPU, 2 on CPU) or a number.")
    gcg_universal_prompts: str = _f("auto", "Training prompts of the universal suffix (0: none): auto (10 on GPU, 2 on CPU) or a number.")
    gcg_steps: str = _f("auto", "GCG optimization steps: auto (250 on GPU, 20 on CPU) or a number.")
    gcg_search_width: str = _f("auto", "GCG candidates per step: auto (512 on GPU, 64 on CPU; Zou et al.: 512) or a number.")
    gcg_topk: int = _f(256, "GCG top-k substitutions per suffix position (Zou et al.: 256).")
    judge_model: str | None = _f(None, "A model-based judge: hub id or folder of a HarmBench / LlamaGuard classifier, or any chat model; null: none.")
    judge_format: str = _f("auto", "Model judge prompt format: auto, harmbench, llamaguard, chat.")
    utility_tasks: str = _f("offline", "Zero-shot tasks: offline (the BIG-bench suite), paper (boolq, rte, hellaswag, ... when reachable), all, none (perplexity only), or a comma-separated list.")
    utility_limit: int = _f(200, "Items per utility task (0: all).")
    ppl_tokens: int = _f(4096, "Held-out Wikipedia tokens for perplexity.")
    backend: str = _f("torch", "Generation back end: torch, or vllm (GPU machines, variants saved to disk).")


@dataclass
class RunConfig:
    variants: str = _f("magnitude-0.5,wanda-0.5,llm-int8,awq-w8", "Compressed variants `refusalkit run` makes, comma-separated full method names (see `refusalkit sources`).")
    calibration: str = _f("wikipedia", "Calibration data of Wanda / SparseGPT / AWQ: wikipedia, alpaca, advbench, a prompt file or text:FILE.")
    n_calibration: int = _f(32, "Calibration samples.")
    attacks: str = _f("auto", "Attacks run on every variant: auto (vanilla,decoding,suffix on GPU; vanilla on CPU) or a comma-separated list.")
    utility: bool = _f(True, "Also zero-shot accuracy (lm-eval) and perplexity of every variant.")
    repair: str = _f("moved", "Variants AIRD repairs: moved (direction source shifted or cosine below moved_cosine), pruned, all, none.")
    moved_cosine: float = _f(0.99, "A variant whose selected direction has a cosine below this with the base direction counts as moved.")
    aird_alpha_scale: str = _f("1.0", "AIRD alphas as a multiple of the paper's (0.02 attention output, 0.01 MLP down): a number, or auto (the smallest within budgets that reaches the base model's ASR).")
    aird_direction: str = _f("raw", "AIRD's r: raw (the difference in means, gain alpha*||r||^2) or unit (gain alpha).")
    aird_placement: str = _f("source", "AIRD's block: source (block `layer` of the direction, the paper's index) or previous (block layer-1, whose output is the stream read).")
    aird_sparse: bool = _f(True, "Also the sparsity-preserving AIRD (the update restricted to the non-zeros) of every pruned variant repaired.")
    aird_curve: bool = _f(True, "Measure the alpha curve (ASR, over-refusal, degenerate rate, perplexity against alpha) of every repair.")
    aird_scales: str = _f("0.25,0.5,1,2,4,8,16", "Alpha scales of the curve and of the automatic choice.")
    aird_search_prompts: int = _f(32, "Harmful and harmless held-out prompts of each alpha curve point (disjoint from the evaluation's).")
    validate_variants: bool = _f(True, "Validate every variant's direction by generation too (the base model's always is when validation.enabled); false: the comparison judges a variant's direction by its selection scores.")


@dataclass
class Config:
    model: str = _f("default", "Hub id, local Hugging Face folder, local .gguf file, or a short name: default, smollm2-135m.")
    dtype: str = _f("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16.")
    device: str = _f("auto", "auto (device_map='auto' over all GPUs, else CPU), cpu, cuda or cuda:N.")
    chat_template: str | None = _f(None, "A Jinja chat template (file or string) for a tokenizer that has none.")
    system_prompt: str | None = _f(None, "null: the chat template's own default (Qwen injects one); a string: this system message.")
    harmful: str = _f("advbench", "Harmful prompts: advbench, harmbench, harmful-all, harmful-curated, or a .txt/.jsonl/.csv file.")
    harmless: str = _f("alpaca", "Harmless prompts: alpaca, alpaca-curated, or a .txt/.jsonl/.csv file.")
    n_train: int = _f(128, "Training prompts of each kind (difference in means).")
    n_val: int = _f(32, "Validation prompts of each kind (direction selection).")
    n_test: int = _f(64, "Held-out test prompts of each kind (validation by generation).")
    seed: int = _f(0, "Seed of the train/validation/test split.")
    filter_train: bool = _f(False, "Arditi's filter: drop harmful train prompts with refusal score <= 0 and harmless ones with score > 0.")
    batch_size: int = _f(64, "Prompts (rows) per forward pass.")
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Settings that change the analysis; a run directory refuses to mix them.
    def analysis_key(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("device", "batch_size", "evaluation", "run"):  # evaluation settings are checked per eval stage
            d.pop(k)
        return d


def _check_type(name: str, value: Any, typ: Any) -> Any:
    t = str(typ)
    if value is None and "None" in t:
        return None
    if value is None:
        raise UserError(f"setting {name} must not be empty; fix it in the config file or flag")
    if isinstance(value, (list, dict)):
        raise UserError(f"setting {name}={value!r} must be a single value; fix it in the config file or flag")
    try:
        if t.startswith("float") or typ is float:
            return float(value)
        if t.startswith("int") or typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("bool") or typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {name}={value!r} is not a valid {t}; fix it in the config file or flag") from None


def apply_settings(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in known:
            raise UserError(f"unknown setting {prefix}{key!r}; see `refusalkit config` for the valid ones")
        f = known[k]
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"setting {prefix}{key} must be a section (a mapping)")
            apply_settings(current, value, prefix=f"{prefix}{k}.")
        else:
            setattr(obj, k, _check_type(f"{prefix}{k}", value, f.type))


def validate(cfg: Config) -> Config:
    s = cfg.selection
    if s.mode not in ("fast", "full"):
        raise UserError(f"selection.mode must be fast or full, not {s.mode!r}")
    if s.fallback not in ("relative", "error"):
        raise UserError(f"selection.fallback must be relative or error, not {s.fallback!r}")
    if not 0.0 <= s.prune_layer_fraction < 1.0:
        raise UserError("selection.prune_layer_fraction must be in [0, 1)")
    if s.screen_prompts < 1 or s.screen_keep < 1:
        raise UserError("selection.screen_prompts and selection.screen_keep must be at least 1")
    if cfg.n_train < 1 or cfg.n_val < 1:
        raise UserError("n_train and n_val must be at least 1")
    if cfg.n_test < 1 and cfg.validation.enabled:
        raise UserError("n_test must be at least 1 when validation is enabled")
    if s.screen_prompts > cfg.n_val:
        s.screen_prompts = cfg.n_val
    if cfg.batch_size < 1 or cfg.validation.max_new_tokens < 1:
        raise UserError("batch_size and validation.max_new_tokens must be at least 1")
    validate_evaluation(cfg.evaluation)
    validate_run(cfg.run)
    return cfg


def run_scales(r: RunConfig) -> tuple[float, ...]:
    try:
        scales = tuple(float(x) for x in r.aird_scales.split(",") if x.strip())
    except ValueError:
        raise UserError(f"run.aird_scales must be comma-separated numbers, not {r.aird_scales!r}") from None
    if not scales or min(scales) <= 0:
        raise UserError("run.aird_scales must list positive numbers, e.g. 0.5,1,2,4")
    return scales


def validate_run(r: RunConfig) -> RunConfig:
    if not [v for v in r.variants.split(",") if v.strip()]:
        raise UserError("run.variants must name at least one compressed variant, e.g. wanda-0.5")
    if r.repair not in ("moved", "pruned", "all", "none"):
        raise UserError(f"run.repair must be moved, pruned, all or none, not {r.repair!r}")
    if r.aird_direction not in ("raw", "unit"):
        raise UserError(f"run.aird_direction must be raw or unit, not {r.aird_direction!r}")
    if r.aird_placement not in ("source", "previous"):
        raise UserError(f"run.aird_placement must be source or previous, not {r.aird_placement!r}")
    if r.aird_alpha_scale != "auto":
        try:
            ok = float(r.aird_alpha_scale) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"run.aird_alpha_scale must be a positive number or auto, not {r.aird_alpha_scale!r}")
    if r.attacks != "auto":
        validate_evaluation(EvaluationConfig(attacks=r.attacks))
    if not 0 < r.moved_cosine <= 1 or r.n_calibration < 1 or r.aird_search_prompts < 1:
        raise UserError("run.moved_cosine must be in (0, 1]; run.n_calibration and run.aird_search_prompts at least 1")
    run_scales(r)
    return r


ATTACKS = ("vanilla", "decoding", "suffix")
# Compression method families (``compress --method``): pruning, group-wise weight quantization, all quantization.
PRUNING = ("magnitude", "wanda", "sparsegpt")
GROUP_QUANT = ("awq", "rtn")
QUANTIZATION = ("llm-int8", *GROUP_QUANT)


def _auto_or_count(name: str, value: str, minimum: int) -> None:
    if value == "auto":
        return
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"evaluation.{name} must be auto or a whole number, not {value!r}") from None
    if n < minimum:
        raise UserError(f"evaluation.{name} must be at least {minimum}, not {n}")


def validate_evaluation(e: EvaluationConfig) -> EvaluationConfig:
    attacks = [a.strip() for a in e.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise UserError(f"unknown attack {', '.join(unknown) or '(none given)'}; use a comma-separated list of {', '.join(ATTACKS)}")
    if e.n_prompts < 1 or e.n_harmless < 0 or e.decoding_n_prompts < 0:
        raise UserError("evaluation.n_prompts must be at least 1 (n_harmless and decoding_n_prompts 0 or more)")
    for name, minimum in (("max_new_tokens", 1), ("gcg_prompts", 0), ("gcg_universal_prompts", 0), ("gcg_steps", 1),
                          ("gcg_search_width", 1)):
        _auto_or_count(name, str(getattr(e, name)), minimum)
    if e.gcg_topk < 1:
        raise UserError("evaluation.gcg_topk must be at least 1")
    if e.suffix_mode not in ("self", "transfer"):
        raise UserError(f"evaluation.suffix_mode must be self or transfer, not {e.suffix_mode!r}")
    if e.judge_format not in ("auto", "harmbench", "llamaguard", "chat"):
        raise UserError(f"evaluation.judge_format must be auto, harmbench, llamaguard or chat, not {e.judge_format!r}")
    if e.backend not in ("torch", "vllm"):
        raise UserError(f"evaluation.backend must be torch or vllm, not {e.backend!r}")
    systems = [s.strip() for s in e.decoding_system_prompts.split(",") if s.strip()]
    if not systems or any(s not in ("default", "none") for s in systems):
        raise UserError("evaluation.decoding_system_prompts must list default and/or none, comma-separated")
    if e.utility_limit < 0 or e.ppl_tokens < 0:
        raise UserError("evaluation.utility_limit and evaluation.ppl_tokens must be 0 or more")
    return e


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                profile: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``profile`` (dotted keys), then the YAML file at ``path``, then ``overrides`` (dotted keys)."""
    cfg = Config()
    _apply_dotted(cfg, profile or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist; give an existing YAML file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix it") from e
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must be a mapping of settings")
        apply_settings(cfg, data)
    _apply_dotted(cfg, overrides or {})
    return validate(cfg)


def _apply_dotted(cfg: Config, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        if value is None:
            continue
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        apply_settings(cfg, nested)


def commented_yaml(obj: Any = None, indent: int = 0) -> str:
    """The default configuration as YAML, each field preceded by its description."""
    obj = obj if obj is not None else Config()
    lines = [] if indent else ["# refusalkit configuration (defaults). Precedence: defaults < this file < command-line flags.", ""]
    pad = "  " * indent
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(commented_yaml(value, indent + 1))
            continue
        lines.append(f"{pad}# {f.metadata.get('help', '')}")
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True).strip()
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return "\n".join(lines)
