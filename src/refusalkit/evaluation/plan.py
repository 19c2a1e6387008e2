"""What an evaluation runs: its settings with every ``auto`` resolved for the machine (:class:`Plan`)
and the held-out prompts it runs on (:func:`held_out`). No model, no disk writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refusalkit.core.config import Config, EvaluationConfig
from refusalkit.core.errors import UserError
from refusalkit.data.prompts import load_prompts

if TYPE_CHECKING:
    from refusalkit.evaluation.sampling import Decoding

SYSTEM_NONE = ""  # "none": an empty system message (templates that inject a default system prompt otherwise)


@dataclass
class Plan:
    """Evaluation settings with every ``auto`` resolved (recorded with the results)."""

    max_new_tokens: int
    grid: str
    decodings: list[Decoding]
    systems: dict[str, str | None]
    gcg_prompts: int
    gcg_universal_prompts: int
    gcg_steps: int
    gcg_search_width: int
    gpu: bool


def _auto(value: str, gpu_value: int, cpu_value: int, gpu: bool) -> int:
    """``value`` as an int; ``auto`` is ``gpu_value`` on a GPU, else ``cpu_value``."""
    return (gpu_value if gpu else cpu_value) if str(value) == "auto" else int(value)


def _decoding(item: str) -> Decoding:
    """One ``temperature=X`` / ``top_p=X`` / ``top_k=N`` grid entry, named as in
    :func:`~refusalkit.evaluation.sampling.huang_grid`."""
    from refusalkit.evaluation.sampling import (
        temperature_config,
        top_k_config,
        top_p_config,
    )

    key, _, value = item.partition("=")
    try:
        if key == "temperature":
            d = temperature_config(float(value))
        elif key == "top_p":
            d = top_p_config(float(value))
        elif key == "top_k":
            d = top_k_config(int(value))
        else:
            raise ValueError
    except ValueError:
        raise UserError(
            f"decoding grid entry {item!r} is not temperature=X, top_p=X or top_k=N; "
            "use huang, small, auto or such a comma-separated list"
        ) from None
    if d.temperature < 0 or not 0 <= d.top_p <= 1 or d.top_k < 0:
        raise UserError(f"decoding grid entry {item!r} is out of range (temperature >= 0, top_p in [0, 1], top_k >= 0)")
    return d


def parse_grid(text: str) -> tuple[str, list[Decoding]]:
    """``huang`` / ``small`` or a list such as ``temperature=0.7,top_p=0.9,top_k=50`` (one config each):
    the grid's name (``huang``, ``small`` or ``custom``) and its decodings."""
    from refusalkit.evaluation.sampling import huang_grid, small_grid

    if text == "huang":
        return "huang", huang_grid()
    if text == "small":
        return "small", small_grid()
    out = [_decoding(item) for item in (t.strip() for t in text.split(",")) if item]
    if not out:
        raise UserError(
            "the decoding grid is empty; use huang, small, auto or a list of temperature=/top_p=/top_k= entries"
        )
    return "custom", out


def make_plan(e: EvaluationConfig, cfg: Config, gpu: bool) -> Plan:
    """The evaluation settings of ``e`` with ``auto`` resolved: on a GPU 256 new tokens, the
    Huang et al. grid and GCG with 250 steps of width 512 on 10 prompts (and a universal suffix
    over 10); on a CPU 64 tokens, the small grid and GCG with 20 steps of width 64 on 2 prompts
    (universal: over 2). ``systems`` maps ``default`` to the configured system prompt and
    ``none`` to :data:`SYSTEM_NONE`."""
    grid_name = e.decoding_grid if e.decoding_grid != "auto" else ("huang" if gpu else "small")
    grid_name, decodings = parse_grid(grid_name)
    systems = {}
    for s in e.decoding_system_prompts:
        systems[s] = cfg.system_prompt if s == "default" else SYSTEM_NONE
    return Plan(
        max_new_tokens=_auto(e.max_new_tokens, 256, 64, gpu),
        grid=grid_name,
        decodings=decodings,
        systems=systems,
        gcg_prompts=_auto(e.gcg_prompts, 10, 2, gpu),
        gcg_universal_prompts=_auto(e.gcg_universal_prompts, 10, 2, gpu),
        gcg_steps=_auto(e.gcg_steps, 250, 20, gpu),
        gcg_search_width=_auto(e.gcg_search_width, 512, 64, gpu),
        gpu=gpu,
    )


def _unused(source: str, splits: dict[str, Any] | None, kind: str) -> tuple[list[str], int]:
    """The prompts of ``source`` in source order that the run did not use to train or select its
    direction (``splits[kind]``'s train and val prompts, wherever they appear: a source that contains the
    split's, such as harmful-all, leaves them out too), and how many of its prompts were left out."""
    prompts = load_prompts(source)
    used: set[str] = set()
    if splits and kind in splits:
        used = set(splits[kind].get("train", [])) | set(splits[kind].get("val", []))
    kept = [p for p in prompts if p not in used]
    return kept, len(prompts) - len(kept)


def held_out(source: str, n: int, splits: dict[str, Any] | None, kind: str) -> tuple[list[str], dict[str, Any]]:
    """The first ``n`` prompts of ``source`` (in source order) that the run did not use to train or
    select its direction, and a description of them. Raises :class:`UserError` when fewer than ``n`` are left."""
    kept, used = _unused(source, splits, kind)
    if n > len(kept):
        raise UserError(
            f"{source} has {len(kept)} prompts left after the {used} used for the direction, "
            f"but {n} were asked for; lower the number or give a larger prompt source"
        )
    return kept[:n], {"source": source, "n": n, "excluded_direction_prompts": used, "order": "source order"}


def held_out_after(
    source: str, skip: int, n: int, splits: dict[str, Any] | None, kind: str
) -> tuple[list[str], dict[str, Any]]:
    """``n`` held-out prompts that follow the first ``skip`` (the evaluation's, :func:`held_out`) in
    source order, leaving out every prompt that paraphrases one of those ``skip``
    (:func:`refusalkit.data.prompts.drop_near_duplicates`), so that prompts chosen on are never
    judged on, even reworded. Raises :class:`UserError` when fewer than ``n`` are left."""
    from refusalkit.data.prompts import NEAR_DUPLICATE_JACCARD, drop_near_duplicates

    kept, used = _unused(source, splits, kind)
    after, dropped = drop_near_duplicates(kept[skip:], kept[:skip])
    if n > len(after):
        raise UserError(
            f"{source} has {len(after)} prompts left after the {used} used for the direction, the {skip} of the "
            f"evaluation and {len(dropped)} that paraphrase those, but {n} were asked for; lower the number or give "
            "a larger prompt source"
        )
    taken = after[:n]
    last = kept.index(taken[-1]) + 1 if taken else skip
    info = {
        "source": source,
        "n": n,
        "skipped_evaluation_prompts": skip,
        "near_duplicates_skipped": [p for p in dropped if kept.index(p) < last],
        "near_duplicate_rule": f"word-set Jaccard >= {NEAR_DUPLICATE_JACCARD} with an evaluation prompt",
    }
    return taken, info


def check_search_overlap(layout: Any, variant: str, e: EvaluationConfig) -> None:
    """Raise :class:`UserError` when evaluating repaired ``variant`` with the evaluation settings ``e``
    would include the held-out prompts its repair searched on (recorded in its ``repair.json``)."""
    from refusalkit.core import artifacts

    path = layout.repair_info(variant)
    if not path.exists():
        return
    info = artifacts.read_json(path)
    record = info.get("search") or info.get("curve")
    prompts = record.get("prompts") if isinstance(record, dict) else None
    for kind, source, n, flag in (
        ("harmful", e.prompts, e.n_prompts, "--n"),
        ("harmless", e.harmless, e.n_harmless, "--n-harmless"),
    ):
        p = (prompts or {}).get(kind)
        if p and p.get("source") == source and n > p.get("skipped_evaluation_prompts", n):
            raise UserError(
                f"{variant}'s repair was searched on {source} prompts {p['skipped_evaluation_prompts'] + 1}-"
                f"{p['skipped_evaluation_prompts'] + p['n']}; evaluating {n} would judge it on them: "
                f"use {flag} {p['skipped_evaluation_prompts']} or fewer (or repair again with the same setting)"
            )
