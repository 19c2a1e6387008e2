"""Reading what older refusalkit releases wrote: every compatibility rule for an old run directory,
in one place.

Each function takes a record in the form an older release wrote it and returns what this version
reads (or says that the record is to be redone); the modules that read a run directory call them and
know nothing of the old forms. The rules, by the release that wrote the old form:

1. **config.yaml of 0.1.0: settings renamed in 0.2.0** (:data:`LEGACY_KEYS`, :func:`migrate_settings`).
   ``run.calibration``, ``run.n_calibration`` move to the ``compress`` section and
   ``run.aird_alpha_scale``, ``run.aird_direction``, ``run.aird_placement``, ``run.aird_scales``,
   ``run.aird_search_prompts`` to the ``repair`` section (without the ``aird_`` prefix).
2. **config.yaml of 0.1.0 / 0.2.0: settings removed in 0.3.0** (:data:`REMOVED_KEYS`,
   :func:`migrate_settings`). ``run.aird_sparse`` and ``run.aird_curve`` are read, logged and
   dropped. A configuration that holds ``run.aird_sparse`` was repaired on every weight by those
   releases, so it reads as ``repair.keep_zeros: false`` unless it sets ``repair.keep_zeros``.
3. **repair.json of 0.1.0: an α curve measured on an unedited model** (the bug fixed in 0.2.0;
   :func:`stale_repair_curve`). Its ``curve`` lacks this version's ``measures``; the repair, and an
   automatic α chosen from that curve, is redone rather than reused.
4. **repair.json of 0.2.0 and earlier: no ``asked`` record** (:func:`repair_asked`). The settings a
   repair was made with are read from the file's own top-level keys (``source_variant``,
   ``direction``, ``placement``, ``sparsity_preserving`` for ``keep_zeros``, ``auto`` and, for a
   fixed α, the parsed ``alpha_scale``), and the request is put in those keys to compare.
5. **repair/<name>.search.json of 0.3.0: no ``screen_settings``** (:func:`search_screens_made_on`).
   Its screens were made on the prompts and system prompt its ``settings`` name, with the score of
   this version; they are kept when those match (its generated points are measured again: their
   settings differ).
6. **sweep/<name>.json of 0.7.3 and earlier: grid points without ``seed``** (:func:`migrate_sweep_state`;
   the calibration seed came in 0.7.4). They read as ``seed: null``, the grid of a sweep without
   ``--seeds``, so the sweep resumes as the same grid.

Not here, because nothing is read in an old form: caches keyed by the settings they were measured
with (``repair/*.json`` points and curves; ``search.per_prompt``, ``measures``) are measured again
when an older release keyed them otherwise, and records an older release did not write (a noise
floor, control records, per-prompt selection scores, borderline prompts) are computed on demand or
reported as missing, as for a run configured without them.

This module imports nothing from refusalkit (``core.settings`` and the jobs import it).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# 1. Settings renamed in 0.2.0: a run directory written by 0.1.0 still loads (dotted old -> dotted new).
LEGACY_KEYS = {
    "run.calibration": "compress.calibration",
    "run.n_calibration": "compress.n_calibration",
    "run.aird_alpha_scale": "repair.alpha_scale",
    "run.aird_direction": "repair.direction",
    "run.aird_placement": "repair.placement",
    "run.aird_scales": "repair.scales",
    "run.aird_search_prompts": "repair.search_prompts",
}

# 2. Settings removed in 0.3.0: read from older config files and run directories, then ignored.
REMOVED_KEYS = {
    "run.aird_sparse": "the automatic repair of a pruned variant keeps its zeros (repair.keep_zeros)",
    "run.aird_curve": "an automatic repair records its whole search; repair.curve measures a curve",
}


def migrate_settings(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested mapping of settings) with the keys of :data:`LEGACY_KEYS` moved to their new
    places and those of :data:`REMOVED_KEYS` dropped (rules 1 and 2); ``data`` itself is not changed."""
    run = data.get("run")
    if not isinstance(run, dict):
        return data
    data = {**data, "run": dict(run)}
    if "aird_sparse" in data["run"]:  # written by 0.1.0 / 0.2.0: their <V>+aird changed every weight
        data["repair"] = {"keep_zeros": False, **(data.get("repair") or {})}
    for old, why in REMOVED_KEYS.items():
        if data["run"].pop(old.split(".", 1)[1], None) is not None:
            log.info("setting %s is no longer used: %s", old, why)
    for old, new in LEGACY_KEYS.items():
        key = old.split(".", 1)[1]
        if key in data["run"]:
            section, name = new.split(".")
            data[section] = {**(data.get(section) or {}), name: data["run"].pop(key)}
    return data


def stale_repair_curve(info: dict[str, Any], curve_measures: str) -> str | None:
    """Why the finished repair ``info`` (its ``repair.json``) is not to be reused, or None (rule 3): a
    curve whose ``measures`` is not ``curve_measures`` (this version's
    :data:`refusalkit.repair.search.CURVE_MEASURES`) was measured by refusalkit 0.1.0 on an unedited
    model; its figures, and an automatic α chosen from them, are wrong."""
    c = info.get("curve")
    if bool(c) and c.get("measures") != curve_measures:
        return "was made by refusalkit 0.1.0 from an alpha curve that measured an unedited model"
    return None


def repair_asked(
    old: dict[str, Any], asked: dict[str, Any], scale: float | str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings the finished repair ``old`` (its ``repair.json``) was made with and those asked now,
    comparable key by key: a key whose values differ is a setting that differs. ``asked`` is this
    version's ``asked`` record of the request (``source_variant``, ``alpha_scale``, ``placement``,
    ``direction``, ``keep_zeros``) and ``scale`` its ``repair.alpha_scale`` parsed (a float or
    ``"auto"``). A ``repair.json`` written by refusalkit 0.2.0 or earlier has no ``asked`` (rule 4): the
    request is put in that file's top-level keys, and the file itself is the record."""
    if "asked" in old:
        return old["asked"], asked
    requested = {
        "source_variant": asked["source_variant"],
        "direction": asked["direction"],
        "placement": asked["placement"],
        "sparsity_preserving": asked["keep_zeros"],
        "auto": scale == "auto",
    }
    if scale != "auto":
        requested["alpha_scale"] = scale
    return old, requested


def search_screens_made_on(state: dict[str, Any], score: str) -> dict[str, Any] | None:
    """What the screens of a saved search state were made on (``prompts``, ``system_prompt``, ``score``),
    or None when it holds none. A state written by 0.3.0 has no ``screen_settings`` (rule 5): its screens
    were made on the prompts and the system prompt its ``settings`` name, and hold ``score`` (this
    version's screen score: 0.3.0 scored the same way and only ruled on the score otherwise)."""
    if state.get("screen_settings"):
        return state["screen_settings"]
    old = state.get("settings", {})
    if "prompts" not in old:
        return None
    return {"prompts": old.get("prompts"), "system_prompt": old.get("system_prompt"), "score": score}


def migrate_sweep_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a sweep's saved state) with every grid point of its ``settings`` given a ``seed`` (rule 6:
    points recorded by 0.7.3 and earlier have none; ``None`` is the grid of a sweep without ``--seeds``).
    Changed in place, and returned."""
    for point in (state.get("settings") or {}).get("points") or []:
        point.setdefault("seed", None)
    return state
