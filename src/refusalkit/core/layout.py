"""The run directory: every path in it (:class:`RunLayout`) and opening it (:func:`prepare`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.settings import apply_settings


class RunLayout:
    """Every path of a run directory; no other module builds one.

    ::

        DIR/
          config.yaml                  resolved configuration (written by :func:`prepare`)
          manifest.json                package versions, hardware, seed, git revision, stage timings
          run.json                     ``refusalkit run``: stage status, times, recorded failures
          data/splits.json             the prompts of every split (shared by all variants)
          <V>/model/                   a variant's checkpoint (``base`` has none: it is the configured model)
          <V>/compression.json         how a compressed variant was made (written last: marks it finished)
          <V>/repair.json              how a repaired variant was made (written last: marks it finished)
          <V>/direction/               candidates, the selected direction, scores, selection plots,
                                       validation and its completions (``refusalkit extract``)
          <V>/eval/                    per-attack records (``<attack>.jsonl`` + ``.settings.json``), asr.json,
                                       over_refusal.json, utility.json, suffixes.json (``refusalkit evaluate``)
          compare/<V>.json             the variant's direction against the base's (``refusalkit compare``)
          repair/base.json             the base model measured on the α-search prompts
          repair/<V>.unrepaired.json   the unrepaired variant measured on them
          repair/<R>.search.json       the search over edits that made repaired variant R (screen, confirmations)
          repair/<V>.<placement>-<raw|unit>[-sp].curve.json   one α curve per kind of edit
          report.md, report.html       the report; report_files/ holds the Markdown report's PNGs
          results.json, results.csv    the report as data (results.schema.json) and the variants' table
    """

    FILES_DIR = "report_files"
    SKIPPED = ("data", "compare", "repair", FILES_DIR)  # run subfolders that are never variants

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- the run -----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def run_state(self) -> Path:
        return self.root / "run.json"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def report_files(self) -> Path:
        return self.root / self.FILES_DIR

    # -- a variant ---------------------------------------------------------------------------------
    def variant(self, name: str) -> Path:
        return self.root / name

    def model(self, name: str) -> Path:
        return self.root / name / "model"

    def has_model(self, name: str) -> bool:
        return (self.model(name) / "config.json").exists()

    def compression(self, name: str) -> Path:
        return self.root / name / "compression.json"

    def view_scales(self, name: str) -> Path:
        """``<V>/awq_view_scales.safetensors``: AWQ's scale of each weight view (an expert of a fused
        tensor, a Conv1D), whose stored weight is ``Q(W s) / s``; keyed ``<block>.<view>``."""
        return self.root / name / "awq_view_scales.safetensors"

    def repair_info(self, name: str) -> Path:
        return self.root / name / "repair.json"

    def direction_dir(self, name: str) -> Path:
        return self.root / name / "direction"

    def direction(self, name: str, file: str) -> Path:
        """``file`` of ``<V>/direction/``: candidates.safetensors / .json, direction.safetensors / .json,
        scores.json, validation.json, completions.jsonl, selection_pos<k>.png."""
        return self.direction_dir(name) / file

    def eval_dir(self, name: str) -> Path:
        return self.root / name / "eval"

    def eval(self, name: str, file: str) -> Path:
        """``file`` of ``<V>/eval/``: asr.json, over_refusal.json, utility.json, suffixes.json, <attack>.jsonl."""
        return self.eval_dir(name) / file

    def compare(self, name: str) -> Path:
        return self.root / "compare" / f"{name}.json"

    def variants(self) -> list[str]:
        """Compressed and repaired variants present (finished ones: their record exists), sorted."""
        if not self.root.is_dir():
            return []
        return [
            p.name
            for p in sorted(self.root.iterdir())
            if p.is_dir()
            and p.name not in self.SKIPPED
            and p.name != "base"
            and (self.compression(p.name).is_file() or self.repair_info(p.name).is_file())
        ]

    def discard_analyses(self, name: str) -> None:
        """Remove what was computed on a variant's model (direction, evaluation, comparison) when the
        model is replaced; the next stages recompute it."""
        for stale in (self.direction_dir(name), self.eval_dir(name)):
            if stale.exists():
                shutil.rmtree(stale)
        self.compare(name).unlink(missing_ok=True)

    # -- the α search ------------------------------------------------------------------------------
    def search_point(self, name: str) -> Path:
        """``repair/<name>.json``: one measured model state (``base``, ``<V>.unrepaired``)."""
        return self.root / "repair" / f"{name}.json"

    def edit_search(self, name: str) -> Path:
        """``repair/<name>.search.json``: the search over edits that made repaired variant ``name``
        (the screen of every candidate, the confirmed points)."""
        return self.root / "repair" / f"{name}.search.json"

    def curve(self, variant: str, unit: bool, placement: str, keep_zeros: bool) -> Path:
        """One cache per kind of edit, so measuring another placement or mode keeps the points measured."""
        kind = f"{placement}-{'unit' if unit else 'raw'}{'-sp' if keep_zeros else ''}"
        return self.root / "repair" / f"{variant}.{kind}.curve.json"


def prepare(cfg: Config, root: Path, force: bool, keep_existing: bool = False) -> dict[str, Any]:
    """Check and write ``config.yaml``; refuse to mix analysis settings in one run directory; return
    the manifest. ``keep_existing``: an existing ``config.yaml`` is checked but not rewritten (the
    settings of one ``compress`` / ``evaluate`` call are recorded in what that call writes)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {root}: {e.strerror}; choose a writable --run") from e
    layout = RunLayout(root)
    if layout.config.exists() and not force:
        check_same_analysis(cfg, layout)
    if not (keep_existing and layout.config.exists()):
        artifacts.write_text(
            layout.config, "# resolved configuration of this run\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        )
    return artifacts.read_json(layout.manifest) if layout.manifest.exists() else {}


def recorded_config(layout: RunLayout) -> Config:
    """The configuration recorded in ``config.yaml`` (a corrupt or unknown one is a UserError)."""
    try:
        old = yaml.safe_load(layout.config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"{layout.config} is corrupt; delete it or re-run with --force") from None
    cfg = Config()
    try:
        apply_settings(cfg, old)
    except UserError:
        raise UserError(
            f"{layout.config} holds settings this version does not know; use a new --run or --force"
        ) from None
    return cfg


def check_same_analysis(cfg: Config, layout: RunLayout) -> None:
    """Refuse ``cfg`` when it changes a setting the run's analyses depend on."""
    old = recorded_config(layout).analysis_key()
    diff = {k for k, v in cfg.analysis_key().items() if old.get(k) != v}
    if diff:
        raise UserError(
            f"run directory {layout.root} was made with other settings ({', '.join(sorted(diff))}); "
            "use a new --run, the same settings, or --force to recompute everything"
        )
