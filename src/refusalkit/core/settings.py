"""Reading settings: a value checked against its field (types, lists, fixed choices), YAML files
layered over the defaults (older releases' settings migrated by :mod:`refusalkit.core.migrate`), and
the commented default file."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from refusalkit.core.config import Config, validate
from refusalkit.core.errors import UserError
from refusalkit.core.migrate import migrate_settings


def _scalar(name: str, value: Any, t: str) -> Any:
    if isinstance(value, (list, dict)):
        raise UserError(f"setting {name}={value!r} must be a single value; fix it in the config file or flag")
    try:
        if t.startswith("float"):
            return float(value)
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {name}={value!r} is not a valid {t}; fix it in the config file or flag") from None


def _check_type(name: str, value: Any, typ: Any, choices: tuple[Any, ...] | None = None) -> Any:
    """``value`` as the field's type (a comma string is read as a list for list fields); fixed
    ``choices`` are enforced here, the one place every setting passes through."""
    t = str(typ)
    if value is None and "None" in t:
        return None
    if value is None:
        raise UserError(f"setting {name} must not be empty; fix it in the config file or flag")
    if t.startswith("list["):
        if isinstance(value, str):
            items = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, dict):
            raise UserError(f"setting {name}={value!r} must be a list (or a comma-separated string)")
        else:
            items = [value]  # one value: a list of one (e.g. --set repair.scales=4)
        out = [_scalar(name, x, t[5:-1]) for x in items]
    else:
        out = _scalar(name, value, t)
    if choices is not None:
        bad = [x for x in (out if isinstance(out, list) else [out]) if x not in choices]
        if bad:
            raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, not {bad[0]!r}")
    return out


def apply_settings(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not prefix:
        data = migrate_settings(data)
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
            setattr(obj, k, _check_type(f"{prefix}{k}", value, f.type, f.metadata.get("choices")))


def shipped(kind: str = "run") -> dict[str, Path]:
    """The configurations shipped in the package, by name: ``run`` (``refusalkit run --config NAME``)
    or ``sweep`` (``refusalkit sweep --grid NAME``)."""
    from importlib import resources

    folder = resources.files("refusalkit").joinpath("configs", *(["sweeps"] if kind == "sweep" else []))
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def describe(path: Path) -> str:
    """A shipped configuration's first comment line (its description)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config_path(path: str | Path, what: str = "config file") -> Path:
    """``path`` itself when it is a file, else the shipped configuration of that name (``llama2-7b-chat``);
    an unknown name or a missing file is a one-line error that lists the shipped names."""
    p = Path(path)
    if p.is_file():
        return p
    kind = "sweep" if what == "sweep file" else "run"
    named = shipped(kind)
    if p.stem in named and p.parent == Path(".") and p.suffix in ("", ".yaml"):
        return named[p.stem]
    listing = "refusalkit sweep --list" if kind == "sweep" else "refusalkit config --list"
    raise UserError(
        f"{what} {path} does not exist and is not a shipped configuration ({', '.join(sorted(named))}); "
        f"give an existing YAML file or a name from `{listing}`"
    )


def read_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file of settings as a mapping, by path or shipped name (a missing, unreadable or non-mapping
    file is a UserError naming it as ``what``: a config file, a sweep file)."""
    p = resolve_config_path(path, what)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML ({str(e).splitlines()[0]}); fix it") from e
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of settings")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
    files: list[str | Path] | None = None,
) -> Config:
    """Defaults < ``profile`` (dotted keys) < the YAML ``files`` in order (``path`` first) < ``overrides``
    (dotted keys; ``None`` values are ignored)."""
    cfg = Config()
    apply_dotted(cfg, profile or {})
    for f in ([path] if path else []) + list(files or []):
        apply_settings(cfg, read_config_file(f))
    apply_dotted(cfg, overrides or {})
    return validate(cfg)


def apply_dotted(cfg: Config, settings: dict[str, Any]) -> None:
    """Apply settings with dotted keys (``{"evaluation.n_harmless": 0}``) to ``cfg``; None is skipped."""
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
    lines = (
        []
        if indent
        else [
            "# refusalkit configuration (defaults). Precedence: defaults < the run directory's config.yaml "
            "< --config FILE < command-line flags and --set.",
            "",
        ]
    )
    pad = "  " * indent
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(commented_yaml(value, indent + 1))
            continue
        lines.append(f"{pad}# {f.metadata.get('help', '')}")
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return "\n".join(lines)


def default_config_text() -> str:
    """What ``refusalkit config`` prints and ``configs/default.yaml`` holds."""
    return commented_yaml() + "\n"
