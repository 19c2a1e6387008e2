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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Settings that change the analysis; a run directory refuses to mix them.
    def analysis_key(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("device", "batch_size"):
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
    return cfg


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (dotted keys allowed)."""
    cfg = Config()
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
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        apply_settings(cfg, nested)
    return validate(cfg)


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
