"""A sweep's grid: its points (method x sparsity or bits x calibration source x calibration seed),
read from flags or a sweep file, checked before any work, and each point's compression spec
(:mod:`refusalkit.study.sweep` runs them)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.core.config import Config
from refusalkit.core.errors import UserError

# the CompressSpec fields a finished point must share with the sweep's (else: made with other settings)
SPEC_KEYS = (
    "method", "sparsity", "bits", "group_size", "threshold", "damp", "blocksize", "calibration",
    "n_calibration", "seq_len", "calibration_chat", "seed", "awq_search_tokens", "calibration_dtype", "refusal_weight", "n_refusal",
)  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One compression setting of the grid, and the variant it makes."""

    method: str
    sparsity: str | None
    bits: int | None
    calibration: str | None  # None: the method needs no calibration data
    name: str
    seed: int | None = None  # the calibration seed, when the grid has a seed axis (else compress.calibration_seed)

    def strength(self) -> float:
        """The x axis of the plots: the sparsity ratio (N:M as N / M zeros … as the share pruned) or the bits."""
        if self.sparsity is not None:
            if ":" in self.sparsity:
                n, m = (int(x) for x in self.sparsity.split(":"))
                return (m - n) / m
            return float(self.sparsity)
        return float(self.bits) if self.bits is not None else float("nan")


def parse_items(text: str | None, what: str) -> list[str]:
    """A comma-separated list (None or empty: ``[]``); an empty item is a one-line error."""
    if text is None or not str(text).strip():
        return []
    items = [t.strip() for t in str(text).split(",")]
    if any(not t for t in items):
        raise UserError(f"--{what} {text!r} has an empty item; give a comma-separated list such as 0.25,0.5")
    return items


GRID_KEYS = ("name", "method", "sparsity", "bits", "calibration", "seeds", "attacks", "select", "repair")


def read_grid(path: str | Path) -> dict[str, Any]:
    """A sweep file (YAML): the grid and options of ``refusalkit sweep`` (``configs/sweeps/``); list
    values become the comma-separated strings the flags take. Unknown keys are one-line errors."""
    from refusalkit.core.settings import read_config_file

    data = read_config_file(path, what="sweep file")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; use {', '.join(GRID_KEYS)}")
    return {
        k: (",".join(str(x) for x in v) if isinstance(v, list) else v if isinstance(v, bool) else str(v))
        for k, v in data.items()
        if v is not None
    }


def _calibration_tag(source: str) -> str:
    """A short, name-safe tag of a calibration source (a file: its stem; a mixture: mix-A-B-SHARE)."""
    if source.startswith("mix:"):
        return re.sub(r"[^A-Za-z0-9.-]+", "-", source)
    stem = Path(source.removeprefix("text:")).stem if ("/" in source or "." in source) else source
    return re.sub(r"[^A-Za-z0-9.-]+", "-", stem).strip("-") or "file"


def check_calibration(source: str) -> None:
    """A one-line error for a calibration source that does not exist (before any model is loaded)."""
    from refusalkit.compress.calibration import sources_help
    from refusalkit.data.corpus import TEXT_CORPORA
    from refusalkit.data.prompts import NAMED_SOURCES

    if source in NAMED_SOURCES or source in TEXT_CORPORA:
        return
    if source.startswith("mix:"):
        from refusalkit.compress.calibration import parse_mixture

        a, b, _ = parse_mixture(source)
        check_calibration(a)
        check_calibration(b)
        return
    path = Path(source.removeprefix("text:"))
    if not path.is_file():
        raise UserError(f"unknown calibration source {source!r}; use {sources_help()}")


def parse_seeds(items: list[str]) -> list[int]:
    """Calibration seeds: whole numbers >= 0, no repeats (one-line errors)."""
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise UserError(f"--seeds {','.join(items)!r}: give whole numbers such as 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {','.join(items)!r}: give distinct whole numbers >= 0, such as 0,1,2")
    return seeds


def build_points(
    cfg: Config,
    methods: list[str],
    sparsities: list[str],
    bits: list[str],
    calibrations: list[str],
    seeds: list[str] | None = None,
) -> list[Point]:
    """The grid, validated before any work: every spec is built (an impossible sparsity, N:M or bit
    width fails here) and every calibration source checked. ``seeds``: calibration seeds, one point
    each for the methods that calibrate (a method without calibration data gets one point; the seed
    would not change it); the configured seed keeps the plain name, another adds ``_seed<N>``."""
    from refusalkit.compress.job import CompressSpec
    from refusalkit.compress.methods import parse_method

    if not methods:
        raise UserError("give --method, e.g. --method wanda (several: --method wanda,magnitude)")
    for c in calibrations:
        check_calibration(c)
    try:
        bit_values = [int(b) for b in bits]
    except ValueError:
        raise UserError(f"--bits {','.join(bits)!r}: give whole numbers such as 8,6,4") from None
    default_cal = cfg.compress.calibration
    seed_values: list[int | None] = [*parse_seeds(seeds or [])] or [None]
    points: list[Point] = []
    for text in methods:
        method, fixed = parse_method(text)
        if "sparsity" in fixed or "bits" in fixed:
            raise UserError(f"--method {text!r}: give the bare method and the grid in --sparsity / --bits")
        if method.family == "pruning":
            if bit_values:
                raise UserError(f"{method.name} prunes: give --sparsity, not --bits")
            if not sparsities:
                raise UserError(f"{method.name} prunes: give --sparsity, e.g. 0.25,0.5,0.75 or 2:4")
            grid: list[tuple[str | None, int | None]] = [(s, None) for s in sparsities]
        else:
            if sparsities:
                raise UserError(f"{method.name} quantizes: give --bits, not --sparsity")
            grid = [(None, b) for b in bit_values] or [(None, None)]
        cals = (calibrations or [default_cal]) if method.needs_calibration else [None]
        for sparsity, b in grid:
            for cal in cals:
                c = cfg.compress if cal is None else dataclasses.replace(cfg.compress, calibration=cal)
                spec = CompressSpec.from_config(method.name, c, sparsity=sparsity, bits=b)
                name = spec.variant
                if cal is not None and cal != default_cal:  # the default keeps the plain name (run's variant)
                    name = f"{name}_{_calibration_tag(cal)}"
                sp = spec.sparsity
                label = None if sp is None else sp.label() if hasattr(sp, "label") else str(sp)
                for seed in seed_values if method.needs_calibration else [None]:
                    suffix = f"_seed{seed}" if seed is not None and seed != cfg.compress.calibration_seed else ""
                    points.append(Point(method.name, label, spec.bits, cal, name + suffix, seed))
    if seed_values != [None] and all(p.seed is None for p in points):
        raise UserError("--seeds is the calibration seed; none of --method calibrates (wanda, sparsegpt, awq do)")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"the grid repeats a point ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return points


def point_spec(cfg: Config, p: Point) -> Any:
    from refusalkit.compress.job import CompressSpec

    c = cfg.compress if p.calibration is None else dataclasses.replace(cfg.compress, calibration=p.calibration)
    if p.seed is not None:
        c = dataclasses.replace(c, calibration_seed=p.seed)
    return CompressSpec.from_config(p.method, c, sparsity=p.sparsity, bits=p.bits, name=p.name)
