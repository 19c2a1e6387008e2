"""The argument parser. Flags that set configuration fields are generated from the fields of
:class:`~refusalkit.core.config.Config` (their help text and default are the field's), so a
setting is described and defaulted in one place; the other flags say what a command does."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, NoReturn

from refusalkit import __version__
from refusalkit.core.config import Config

CONFIG_DEST = "cfg:"  # prefix of the argparse dest of a flag that sets a configuration field
PROFILE_CHOICES = ("auto", "full", "cpu", "quick")  # refusalkit.core.profiles, and auto


def config_fields(obj: Any = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every configuration field as (dotted name, field, default), sections included recursively."""
    obj = obj if obj is not None else Config()
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _help(f: dataclasses.Field, default: Any, dotted: str) -> str:
    """The field's help, its choices, its default and, where a profile changes it, the profile's value."""
    from refusalkit.core.profiles import PROFILES

    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices and "," not in text:
        text += f" One of: {', '.join(map(str, choices))}."
    shown = [f"default: {_show(default)}"]
    shown += [f"{name} profile: {_show(p[dotted])}" for name, p in PROFILES.items() if dotted in p]
    return f"{text} [{'; '.join(shown)}]".replace("%", "%%")


def add_config_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of every configuration field that ``command`` exposes (``None`` when not given)."""
    for dotted, f, default in config_fields():
        if command not in f.metadata.get("commands", ()):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        dest = CONFIG_DEST + dotted
        if str(f.type).startswith("bool"):
            p.add_argument(
                flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=_help(f, default, dotted)
            )
        else:
            p.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=_help(f, default, dotted))


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields set by flags (dotted keys), then ``--set KEY=VALUE`` items."""
    out = {k[len(CONFIG_DEST) :]: v for k, v in vars(args).items() if k.startswith(CONFIG_DEST) and v is not None}
    out.update(set_overrides(getattr(args, "set", None) or []))
    return out


def set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as config overrides (VALUE read as YAML)."""
    import yaml

    from refusalkit.core.errors import UserError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


PROFILE_HELP = (
    "the settings a new run directory starts from, under the config file, flags and --set: full (the "
    "configured defaults: paper-sized prompt counts, four variants), cpu (the default model's study in about "
    "25 minutes on 2 AVX-512 cores), quick (a smoke run); auto (default): cpu without a GPU, else full. "
    "An existing run keeps the settings it was made with"
)


def _common(
    p: argparse.ArgumentParser,
    *,
    run_required: bool = True,
    variant: str | None = "base",
    force: str,
    set_example: str = "device=cpu",
    profile: bool = False,
    run_help: str = "run directory",
    config_help: str | None = None,
) -> None:
    """The flags every command that reads or writes a run shares, with one meaning: ``--run DIR``,
    ``--config FILE`` (over the run's config.yaml), ``--set KEY=VALUE`` (over both), ``--force``
    (redo what exists), and, where the command may create the run, ``--profile``."""
    p.add_argument("--run", required=run_required, help=run_help)
    if variant is not None:
        p.add_argument(
            "--variant",
            default=variant,
            required=variant == "",
            help="model variant under DIR/<variant>/" + (f" (default: {variant})" if variant else ""),
        )
    p.add_argument(
        "--config",
        help=config_help
        or "YAML configuration layered over the run directory's config.yaml: a file, or the name of a shipped "
        "one (refusalkit config --list); precedence: defaults < profile < config.yaml < --config < flags and --set",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any setting (see `refusalkit config`), e.g. {set_example}",
    )
    p.add_argument("--force", action="store_true", help=force)
    if profile:
        p.add_argument("--profile", choices=PROFILE_CHOICES, default="auto", help=PROFILE_HELP)


def _extract(sub: Any) -> None:
    e = sub.add_parser(
        "extract",
        help="extract, select and validate the refusal direction",
        description="Creates the run directory if needed; writes DIR/<variant>/direction/.",
    )
    _common(e, force="recompute stages whose outputs exist", set_example="selection.screen_keep=20", profile=True)
    e.add_argument("--no-validation", action="store_true", help="skip validation by generation in this extraction")
    add_config_flags(e, "extract")


def _orthogonalize(sub: Any) -> None:
    o = sub.add_parser(
        "orthogonalize", help="save a copy of the model with the run's direction projected out of its weights"
    )
    _common(o, force="replace --out when it holds a model already (any other non-empty folder is refused)")
    o.add_argument("--out", required=True, help="output folder for the orthogonalized model (new or empty)")


def _compress(sub: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="compress the run's base model into a named variant DIR/<variant>/",
        description="Prune or quantize the run's base model (or, with --from, import a compressed copy of it); "
        "the variant is saved under DIR/<variant>/model with DIR/<variant>/compression.json. An existing "
        "variant is reused unless --force. "
        "A new run directory is created only when --model or --config is given.",
    )
    _common(
        c,
        variant=None,
        force="redo an existing variant (its old analyses are discarded)",
        set_example="compress.n_calibration=64",
        profile=True,
    )
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--method",
        help="magnitude, wanda, sparsegpt, llm-int8, awq, rtn, or a full name: "
        "wanda-0.5, wanda-2:4, awq-w8, rtn-w4 (see `refusalkit sources`)",
    )
    how.add_argument(
        "--from",
        dest="from_",
        metavar="PATH_OR_HUB_ID",
        help="import a model compressed elsewhere as the variant instead: a .gguf file, a compressed-tensors, "
        "LLM.int8 or dense safetensors folder, or a hub id (owner/name, owner/name:FILE.gguf); it must be the "
        "base model's architecture, tokenizer and chat template",
    )
    c.add_argument("--sparsity", help="pruning: a ratio in [0, 1) or N:M such as 2:4 (default 0.5)")
    c.add_argument("--bits", type=int, help="awq / rtn: bits per weight, 2-8 (default 4)")
    c.add_argument("--name", help="variant name (default: derived from the method, e.g. wanda-0.5)")
    add_config_flags(c, "compress")


def _export(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="write a variant in the format it is served in (GGUF, safetensors) with a model card",
        description="Writes --out (a new folder): the model file(s), README.md (a model card with the Hub's "
        "metadata and the run's verdicts) and reproduce.json. A repaired variant's export reports how much of "
        "the edit the type keeps. Nothing leaves the machine without --push-to-hub.",
    )
    _common(e, variant="", force="replace a non-empty --out", set_example="seed=0")
    e.add_argument("--format", required=True, help="gguf, safetensors or compressed-tensors")
    e.add_argument(
        "--type",
        help="gguf: f16 (default), bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1; with llama-cpp-python the k-quants q2_k, "
        "q3_k_s/m/l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k; or source (the type it was imported from)",
    )
    e.add_argument("--out", required=True, help="output folder (new or empty)")
    e.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub repository (token: HF_TOKEN)")
    e.add_argument(
        "--check",
        action="store_true",
        help="gguf: read the file back (transformers' GGUF loader) as variant <variant>.<type>, and with "
        "llama-cpp-python in llama.cpp too; evaluate it and compare it pairwise with the variant (vanilla ASR, "
        "over-refusal; minutes)",
    )


def _evaluate(sub: Any) -> None:
    v = sub.add_parser(
        "evaluate",
        help="attack success rates, over-refusal and utility of a variant",
        description="Safety (ASR under vanilla, decoding-based and GCG suffix attacks, judged), over-refusal "
        "and (with --utility) zero-shot accuracy and perplexity of DIR/<variant>, written "
        "to DIR/<variant>/eval/. Finished work is skipped; an interrupted run resumes. "
        "A new run directory is created only when --model or --config is given.",
    )
    _common(v, force="redo finished evaluations", set_example="evaluation.gcg_topk=128", profile=True)
    v.add_argument("--utility", action="store_true", help="also zero-shot accuracy (lm-eval) and perplexity")
    add_config_flags(v, "evaluate")


def _compare(sub: Any) -> None:
    m = sub.add_parser(
        "compare",
        help="compare a variant's refusal direction with the base model's",
        description="Writes DIR/compare/<variant>.json: both sources, whether the source shifted, "
        "cosines (selected, at the base source, by layer, layer x layer) and the direction's "
        "quality on the variant. Both directions must have been extracted.",
    )
    _common(m, variant="", force="recompute an existing comparison", set_example="noise_resamples=100")
    m.add_argument("--no-quality", action="store_true", help="skip scoring the base direction on the variant model")


def _repair(sub: Any) -> None:
    a = sub.add_parser(
        "repair",
        help="AIRD: induce the base model's refusal direction in a compressed variant",
        description="AIRD (Chhabra & Khalili 2025, Eq. 4): W <- W + alpha r r^T W on the attention output "
        "and MLP down projections of one block. By default (repair.alpha_scale auto) a search over the block "
        "(the direction's source or the one before), the alpha scale and the form chooses the smallest edit that "
        "brings the ASR back to the base model's within the budgets, keeping a pruned variant's zeros; "
        "--alpha-scale 1 --placement source --no-keep-zeros is the paper's literal edit (alpha 0.02 / 0.01 at "
        "the source block). Writes variant <variant>+aird with repair.json.",
    )
    _common(a, variant="", force="redo an existing repair", set_example="repair.asr_tolerance=0.02")
    a.add_argument("--name", help="name of the repaired variant (default <variant>+aird)")
    add_config_flags(a, "repair")


def _run(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="the whole study: extract, compress, compare, evaluate, repair, report",
        description="Takes the configured model from nothing to DIR/report.html. Every stage skips what "
        "is done, so an interrupted run resumes. Exits 1 when a stage failed (listed).",
    )
    _common(
        r,
        run_required=False,
        variant=None,
        force="redo every stage, replacing what exists (without it, finished stages are kept and a run resumes)",
        set_example="run.repair=all",
        profile=True,
        run_help="run directory (default runs/<config name>, or runs/default; with --profile P: runs/<name>-P)",
        config_help="YAML configuration: a file, or the name of a shipped one (refusalkit config --list); "
        "default: the built-in defaults and the embedded default model",
    )
    r.add_argument("--quick", action="store_true", help="the same as --profile quick")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (stages, models, prompt counts, extras, estimated time and disk) and write nothing",
    )
    add_config_flags(r, "run")


def _sweep(sub: Any) -> None:
    w = sub.add_parser(
        "sweep",
        help="the dose-response: compress, compare and evaluate a grid of compression points",
        description="Every point (method x sparsity or bits x calibration source x calibration seed) becomes an "
        "ordinary variant DIR/<point>/: compressed, its candidate directions compared with the base direction at the base "
        "source against the noise floor, evaluated (vanilla ASR paired with the base model's, over-refusal, "
        "perplexity), optionally repaired. Finished stages are reused, so an interrupted sweep resumes. "
        "Writes DIR/sweep/<name>.json, .md and plots.",
    )
    _common(
        w,
        run_required=False,
        variant=None,
        force="redo every point's stages (compression, direction, comparison, evaluation, repair) and replace "
        "the sweep's record, even one made with another grid",
        set_example="evaluation.n_prompts=100",
        profile=True,
    )
    w.add_argument("--list", action="store_true", help="the shipped sweep files (--grid NAME), one a line")
    w.add_argument(
        "--grid", help="a sweep file (YAML: method, sparsity, bits, calibration, name, ...; configs/sweeps/)"
    )
    w.add_argument("--method", help="one or more methods, comma-separated: wanda,magnitude or rtn,awq")
    w.add_argument("--sparsity", help="pruning: ratios in [0, 1) and/or N:M, comma-separated, e.g. 0.1,0.25,0.5,2:4")
    w.add_argument("--bits", help="awq / rtn: bit widths, comma-separated, e.g. 8,6,4,3")
    w.add_argument(
        "--calibration",
        help="calibration sources, comma-separated (default: compress.calibration), e.g. wikipedia,alpaca",
    )
    w.add_argument(
        "--seeds",
        help="calibration seeds, comma-separated, e.g. 0,1,2,3,4: one point per seed for the methods that "
        "calibrate, and Cochran's Q on their ASRs (the compression's own noise)",
    )
    w.add_argument("--attacks", help="attacks evaluated at every point (default vanilla)")
    w.add_argument("--name", help="the sweep's name (default <methods>-<axis>), DIR/sweep/<name>.json")
    w.add_argument("--select", action="store_true", help="also select each point's own direction (source shift)")
    w.add_argument("--repair", action="store_true", help="also repair each point with the configured AIRD repair")
    w.add_argument(
        "--drop-models",
        action="store_true",
        help="delete the model folder of each point this sweep made once it is evaluated (disk)",
    )
    x = w.add_argument_group("executor (where the points run)")
    x.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: the points in turn here (default); ray: one Ray task per point, in parallel",
    )
    x.add_argument(
        "--address",
        help="ray: join this cluster ('auto' for the one this machine belongs to, or ray://host:10001); "
        "default: start Ray on this machine",
    )
    x.add_argument("--workers", type=int, default=2, help="ray on this machine: points at once (default 2)")
    x.add_argument("--cpus-per-point", type=float, default=1.0, help="ray: CPUs each point asks for (default 1)")
    x.add_argument(
        "--gpus-per-point",
        type=float,
        help="ray: GPUs each point asks for (default 1 when the cluster has GPUs, else 0; "
        "a model larger than one GPU: several, spread with device_map within the point)",
    )
    x.add_argument("--max-retries", type=int, default=2, help="ray: re-runs of a point whose worker died (default 2)")
    add_config_flags(w, "sweep")


def _verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    """``-q`` (no progress bars, warnings only) and ``-v`` (debug logging), on the top-level parser and on
    every command's (``default`` SUPPRESS there, so that a flag given before the command is kept)."""
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars; warnings only")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit status 2), as every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="refusalkit",
        description="Refusal directions in chat LLMs and their compressed "
        "variants. Bad input exits 2, an interrupt 130.",
    )
    p.add_argument("--version", action="version", version=f"refusalkit {__version__}")
    _verbosity(p, False)
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        sp = _add_parser(name, **kwargs)
        _verbosity(sp, argparse.SUPPRESS)  # -q / -v after the command too; before it, the top level's
        return sp

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for add in (_extract, _orthogonalize, _compress, _export, _evaluate, _compare, _repair, _run, _sweep):
        add(sub)
    rp = sub.add_parser(
        "report",
        help="write DIR/report.md, a self-contained DIR/report.html and DIR/results.json",
        description="Tables, plots, verdicts and the paper's findings from what the other stages wrote; "
        "DIR/results.json (the report as data, results.schema.json) and DIR/results.csv (the variants' table).",
    )
    _common(
        rp,
        variant=None,
        force="accepted so that every command takes it; the report is always rebuilt from what the stages wrote",
        set_example="verdict.asr_margin=0.03",
    )
    rp.add_argument("--json", action="store_true", help="print results.json instead of the summary")
    cp = sub.add_parser(
        "config",
        help="print the commented default configuration (every section)",
        description="Alone: every setting with its default and its description, as YAML. --list: the shipped "
        "run configurations (refusalkit run --config NAME). --show --run DIR: a run's resolved configuration.",
    )
    cp.add_argument("--list", action="store_true", help="the shipped run configurations, one a line: name, description")
    cp.add_argument("--show", action="store_true", help="print the resolved configuration of --run DIR")
    cp.add_argument("--run", help="run directory (with --show)")
    sp = sub.add_parser(
        "sources",
        help="list the named prompt sources, model short names and compression methods",
        description="With --check: every package file refusalkit reads (models, prompts, corpus, utility "
        "items), each checked against its pinned version and sha256; exit 2 when a required one fails.",
    )
    sp.add_argument(
        "--check", action="store_true", help="check every external artifact on this machine (pinned sha256)"
    )
    return p
