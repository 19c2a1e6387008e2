"""``refusalkit`` command line. Bad input: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

# Flags that map onto configuration fields (dest -> dotted config key).
_CONFIG_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "model": ("model", {"help": "hub id, HF folder, .gguf file, or default / smollm2-135m"}),
    "dtype": ("dtype", {"help": "auto, float32, bfloat16, float16"}),
    "device": ("device", {"help": "auto, cpu, cuda, cuda:N"}),
    "chat_template": ("chat_template", {"help": "Jinja chat template (file) for tokenizers without one"}),
    "system_prompt": ("system_prompt", {"help": "system message (default: the template's own)"}),
    "harmful": ("harmful", {"help": "harmful prompt source or file"}),
    "harmless": ("harmless", {"help": "harmless prompt source or file"}),
    "n_train": ("n_train", {"type": int}),
    "n_val": ("n_val", {"type": int}),
    "n_test": ("n_test", {"type": int}),
    "seed": ("seed", {"type": int}),
    "batch_size": ("batch_size", {"type": int}),
    "selection_mode": ("selection.mode", {"choices": ["fast", "full"]}),
    "kl_threshold": ("selection.kl_threshold", {"type": float}),
    "induce_refusal_threshold": ("selection.induce_refusal_threshold", {"type": float}),
    "max_new_tokens": ("validation.max_new_tokens", {"type": int}),
    "refusal_phrases": ("validation.refusal_phrases", {"help": "a .txt file of refusal substrings for the judge"}),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refusalkit", description="Refusal directions in chat LLMs and their compressed variants.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("extract", help="extract, select and validate the refusal direction")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--variant", default="base", help="model variant under DIR/<variant>/ (default: base)")
    e.add_argument("--config", help="YAML configuration for a new run directory (an existing one keeps its config.yaml)")
    e.add_argument("--force", action="store_true", help="recompute stages whose outputs exist")
    e.add_argument("--filter-train", action="store_true", default=None, help="Arditi's refusal-score filter on training prompts")
    e.add_argument("--no-validation", action="store_true", help="skip validation by generation")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. selection.screen_keep=20")
    for dest, (_, kw) in _CONFIG_FLAGS.items():
        e.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **kw)

    o = sub.add_parser("orthogonalize", help="save a copy of the model with the run's direction projected out of its weights")
    o.add_argument("--run", required=True)
    o.add_argument("--variant", default="base")
    o.add_argument("--out", required=True, help="output folder for the orthogonalized model")

    c = sub.add_parser("compress", help="compress the run's base model into a named variant DIR/<variant>/",
                       description="Prune or quantize the run's base model; the variant is saved under DIR/<variant>/model "
                                   "with DIR/<variant>/compression.json. An existing variant is reused unless --force.")
    c.add_argument("--run", required=True, help="run directory (its config.yaml names the base model)")
    c.add_argument("--method", required=True,
                   help="magnitude, wanda, sparsegpt, llm-int8, awq, rtn, or a full name: wanda-0.5, wanda-2:4, awq-w8, rtn-w4")
    c.add_argument("--sparsity", help="pruning: a ratio in [0, 1) or N:M such as 2:4 (default 0.5)")
    c.add_argument("--bits", type=int, help="awq / rtn: bits per weight, 2-8 (default 4)")
    c.add_argument("--group-size", type=int, default=128, help="awq / rtn: inputs per quantization group (-1: one per row)")
    c.add_argument("--threshold", type=float, default=6.0, help="llm-int8: outlier feature threshold")
    c.add_argument("--backend", default="auto", choices=["auto", "bitsandbytes", "torch"], help="llm-int8 implementation")
    c.add_argument("--damp", type=float, default=0.01, help="sparsegpt: Hessian dampening (fraction of its mean diagonal)")
    c.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per block")
    c.add_argument("--awq-search-tokens", type=int, default=2048,
                   help="awq: calibration tokens on which the scale search measures its loss (-1: all, as the reference)")
    c.add_argument("--calibration", default=None, help="calibration data: wikipedia (default), alpaca, advbench, "
                                                        "any prompt source or .txt/.jsonl/.csv file, or text:FILE")
    c.add_argument("--n-calibration", type=int, default=32, help="calibration samples")
    c.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sample (text: window length; instructions: cut)")
    chat = c.add_mutually_exclusive_group()
    chat.add_argument("--calibration-chat", dest="calibration_chat", action="store_true", default=None,
                      help="apply the chat template to calibration samples (default for instruction sources)")
    chat.add_argument("--no-calibration-chat", dest="calibration_chat", action="store_false",
                      help="raw calibration text without the chat template (default for text corpora)")
    c.add_argument("--calibration-seed", type=int, default=0)
    c.add_argument("--calibration-batch-size", type=int, default=8, help="calibration samples per block forward")
    c.add_argument("--name", help="variant name (default: derived from the method, e.g. wanda-0.5)")
    c.add_argument("--config", help="YAML configuration for a new run directory (an existing one keeps its config.yaml)")
    c.add_argument("--force", action="store_true", help="redo an existing variant (its old analyses are discarded)")
    for dest in ("model", "dtype", "device", "chat_template"):
        c.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **_CONFIG_FLAGS[dest][1])

    v = sub.add_parser("evaluate", help="attack success rates, over-refusal and utility of a variant",
                       description="Safety (ASR under vanilla, decoding-based and GCG suffix attacks, judged), over-refusal "
                                   "and (with --utility) zero-shot accuracy and perplexity of DIR/<variant>, written "
                                   "to DIR/<variant>/eval/. Finished work is skipped; an interrupted run resumes.")
    v.add_argument("--run", required=True, help="run directory")
    v.add_argument("--variant", default="base", help="base or a compressed variant (default: base)")
    v.add_argument("--attacks", help="comma-separated: vanilla, decoding, suffix (default: all three)")
    v.add_argument("--utility", action="store_true", help="also zero-shot accuracy (lm-eval) and perplexity")
    v.add_argument("--prompts", help="harmful prompts: advbench (default), another source or a .txt/.jsonl/.csv file")
    v.add_argument("--n", type=int, help="harmful prompts per attack (default 100)")
    v.add_argument("--n-harmless", type=int, help="harmless prompts for over-refusal (default 100; 0: skip)")
    v.add_argument("--max-new-tokens", help="tokens per completion: auto (256 GPU, 64 CPU) or a number")
    v.add_argument("--decoding-grid", help="huang, small, auto, or e.g. temperature=0.7,top_k=50")
    v.add_argument("--suffix-mode", choices=["self", "transfer"], help="GCG: optimize on this variant or apply --suffix-source's suffixes")
    v.add_argument("--suffix-source", help="transfer mode: the variant whose suffixes are applied (default base)")
    v.add_argument("--gcg-steps", help="GCG steps (auto: 250 GPU, 20 CPU)")
    v.add_argument("--gcg-prompts", help="prompts with their own GCG suffix (auto: 10 GPU, 2 CPU)")
    v.add_argument("--judge-model", help="model-based judge: hub id or folder (HarmBench / LlamaGuard classifier or a chat model)")
    v.add_argument("--judge-format", choices=["auto", "harmbench", "llamaguard", "chat"])
    v.add_argument("--tasks", help="utility tasks: offline, paper, all, or a comma-separated list")
    v.add_argument("--limit", type=int, help="items per utility task (0: all)")
    v.add_argument("--backend", choices=["torch", "vllm"], help="generation back end (vllm: GPU machines)")
    v.add_argument("--seed", type=int, help="seed of sampled completions and GCG")
    v.add_argument("--config", help="YAML configuration for a new run directory (an existing one keeps its config.yaml)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. evaluation.gcg_topk=128")
    v.add_argument("--force", action="store_true", help="redo finished evaluations")
    for dest in ("model", "dtype", "device", "chat_template"):
        v.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **_CONFIG_FLAGS[dest][1])

    m = sub.add_parser("compare", help="compare a variant's refusal direction with the base model's",
                       description="Writes DIR/compare/<variant>.json: both sources, whether the source shifted, "
                                   "cosines (selected, at the base source, by layer, layer x layer) and the direction's "
                                   "quality on the variant. Both directions must have been extracted.")
    m.add_argument("--run", required=True, help="run directory")
    m.add_argument("--variant", required=True, help="the compressed (or repaired) variant")
    m.add_argument("--no-quality", action="store_true", help="skip scoring the base direction on the variant model")
    m.add_argument("--force", action="store_true", help="recompute an existing comparison")

    a = sub.add_parser("repair", help="AIRD: induce the base model's refusal direction in a compressed variant",
                       description="W <- W + alpha r r^T W on the attention output (alpha 0.02) and MLP down (0.01) "
                                   "projections at the base direction's source layer (Chhabra & Khalili 2025, Eq. 4). "
                                   "Writes variant <variant>+aird (or +aird-sp) with repair.json.")
    a.add_argument("--run", required=True, help="run directory")
    a.add_argument("--variant", required=True, help="the compressed variant to repair")
    a.add_argument("--alpha-scale", default="1.0", help="multiple of the paper's alphas, or auto (default 1.0)")
    a.add_argument("--direction", choices=["raw", "unit"], default="raw", help="r as the raw difference in means (default) or unit-norm")
    a.add_argument("--placement", choices=["source", "previous"], default="source",
                   help="source: block `layer` (the paper's index, default); previous: block layer-1, whose output is the stream read")
    a.add_argument("--keep-zeros", action="store_true", help="sparsity-preserving AIRD: no pruned zero is changed")
    a.add_argument("--no-requantize", action="store_true", help="AWQ / RTN variants: keep the edit off the quantization grid")
    a.add_argument("--curve", action="store_true", help="also measure the alpha curve (always with --alpha-scale auto)")
    a.add_argument("--scales", help="alpha scales of the curve, comma-separated (default 0.25,0.5,1,2,4,8,16)")
    a.add_argument("--search-prompts", type=int, default=32, help="harmful and harmless prompts per curve point")
    a.add_argument("--ppl-tokens", type=int, default=2048, help="held-out Wikipedia tokens of each curve point's perplexity (0: none)")
    a.add_argument("--target-asr", type=float, help="auto: the ASR to reach (default: the base model's on the same prompts)")
    a.add_argument("--max-over-refusal-increase", type=float, default=0.05, help="auto: budget, absolute (default 0.05)")
    a.add_argument("--max-degenerate-increase", type=float, default=0.05, help="auto: budget, absolute (default 0.05)")
    a.add_argument("--max-ppl-increase", type=float, default=0.10, help="auto: perplexity budget, relative (default 0.10)")
    a.add_argument("--max-utility-drop", type=float, help="auto: zero-shot accuracy budget (fraction); measured per point when given")
    a.add_argument("--name", help="name of the repaired variant (default <variant>+aird, +aird-sp with --keep-zeros)")
    a.add_argument("--force", action="store_true", help="redo an existing repair")

    r = sub.add_parser("run", help="the whole study: extract, compress, compare, evaluate, repair, report",
                       description="Takes the configured model from nothing to DIR/report.html. Every stage skips what "
                                   "is done, so an interrupted run resumes. Settings: the `run` section of the config.")
    r.add_argument("--config", help="YAML configuration (default: the built-in defaults, the embedded default model)")
    r.add_argument("--run", default=None, help="run directory (default runs/<config name> or runs/default)")
    r.add_argument("--profile", choices=("auto", "full", "cpu", "quick"), default="auto",
                   help="settings under the config file and --set: full (the configured defaults: four variants, "
                        "paper-sized prompt counts), cpu (about 20 minutes on 2 cores for the default model), "
                        "quick (a smoke run); auto (default): cpu without a GPU, else full")
    r.add_argument("--quick", action="store_true", help="the same as --profile quick")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. run.repair=all")
    for dest in ("model", "dtype", "device"):
        r.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **_CONFIG_FLAGS[dest][1])

    rp = sub.add_parser("report", help="write DIR/report.md and a self-contained DIR/report.html",
                        description="Tables, plots and the paper's findings from what the other stages wrote.")
    rp.add_argument("--run", required=True, help="run directory")

    sub.add_parser("config", help="print the commented default configuration")
    sub.add_parser("sources", help="list the named prompt sources and model short names")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {key: getattr(args, dest) for dest, (key, _) in _CONFIG_FLAGS.items() if getattr(args, dest) is not None}
    if args.filter_train:
        out["filter_train"] = True
    if args.no_validation:
        out["validation.enabled"] = False
    out.update(_set_overrides(args.set))
    return out


def _set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as config overrides (VALUE read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _summary_table(res: dict[str, Any]) -> str:
    d, v = res["direction"], res.get("validation")
    lines = [
        f"refusal direction of {d['model']} [{d['variant']}]",
        f"  source          layer {d['layer']} of {d['n_layers']}, position {d['position']} ({d['token']!r}), norm {d['norm']:.2f}",
        f"  ablation score  {d['ablation_score']:+.2f}   (harmful baseline {d['baseline']['harmful_score']:+.2f})",
        f"  addition score  {d['addition_score']:+.2f}   (harmless baseline {d['baseline']['harmless_score']:+.2f})",
        f"  KL (harmless)   {d['kl']:.3f}",
    ]
    if d.get("fallback"):
        lines.append(f"  FALLBACK        {d['fallback']}")
    if v:
        c = v["conditions"]
        lines += [
            f"  validation by generation ({v['n_test']['harmful']} harmful, {v['n_test']['harmless']} harmless test prompts, {v['max_new_tokens']} tokens)",
            f"    {'':22s}{'refusal':>9s}{'degenerate':>12s}",
        ]
        for name in ("harmful_baseline", "harmful_ablated", "harmless_baseline", "harmless_added"):
            lines.append(f"    {name:22s}{c[name]['refusal_rate']:9.1%}{c[name]['degenerate_rate']:12.1%}")
    lines.append(f"  artifacts in {res['run']}/{res['variant']}/direction/ ({res['seconds']:.0f} s)")
    return "\n".join(lines)


def _cmd_extract(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import run_extract

    overrides = _overrides(args)
    existing = (Path(args.run) / "config.yaml").exists()
    if existing and args.no_validation:  # a run directory keeps its data splits; skip this extraction's validation
        overrides["validation.enabled"] = _run_config(args.run).validation.enabled
    # an existing run directory keeps its settings (as evaluate, compare and repair do); flags still override
    cfg = load_config(args.config or (str(Path(args.run) / "config.yaml") if existing else None), overrides)
    res = run_extract(cfg, args.run, variant=args.variant, force=args.force, progress=not args.quiet,
                      validate=not args.no_validation)
    if res["direction"].get("fallback"):
        print(f"warning: no candidate passed Arditi's filters; fallback used: {res['direction']['fallback']}", file=sys.stderr)
    print(_summary_table(res))
    return 0


def _cmd_orthogonalize(args: argparse.Namespace) -> int:
    from . import artifacts
    from .orthogonalize import orthogonalize
    from .pipeline import RunDir, Session, Progress

    cfg = _run_config(args.run)
    run = RunDir(Path(args.run), args.variant)
    direction = artifacts.load_tensors(run.f("direction.safetensors"))["direction"]
    s = Session(cfg=cfg, run=run, progress=Progress(False))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out")
    model = orthogonalize(s.lm.model, direction)
    import shutil

    tmp = artifacts.make_temp_dir(out)
    try:
        model.save_pretrained(str(tmp))
        s.lm.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"orthogonalized model written to {out}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress.job import DEFAULT_CALIBRATION, CompressSpec, run_compress
    from .config import load_config

    spec = CompressSpec(method=args.method, sparsity=args.sparsity, bits=args.bits, group_size=args.group_size,
                        threshold=args.threshold, backend=args.backend, damp=args.damp, blocksize=args.blocksize,
                        calibration=args.calibration or DEFAULT_CALIBRATION, n_calibration=args.n_calibration,
                        seq_len=args.seq_len, calibration_chat=args.calibration_chat, seed=args.calibration_seed,
                        batch_size=args.calibration_batch_size, name=args.name,
                        awq_search_tokens=args.awq_search_tokens)
    root = Path(args.run)
    existing = root / "config.yaml"
    overrides = {k: getattr(args, k) for k in ("model", "dtype", "device", "chat_template") if getattr(args, k) is not None}
    cfg = load_config(str(existing) if existing.exists() else args.config, overrides)
    info = run_compress(cfg, root, spec, force=args.force, progress=not args.quiet)
    if info["reused"]:
        print(f"variant {info['variant']} exists in {root}; reused (use --force to redo it)")
    cal = info.get("calibration")
    lines = [
        f"variant {info['variant']} of {info['base_model']['spec']}: {METHOD_LINE.get(info['method'], info['method'])}",
        f"  sparsity        {info['sparsity']:.2%} of {info['n_compressed_params']:,} weights in decoder linears",
    ]
    if info.get("bits"):
        lines.append(f"  bits            {info['bits']}" + (f" (group {info['parameters'].get('group_size')})" if info['method'] != 'llm-int8' else ""))
    if cal:
        lines.append(f"  calibration     {cal['source']}: {cal['n_samples']} samples, {cal['n_tokens']} tokens, "
                     f"chat template {'on' if cal['chat_template'] else 'off'}")
    lines += [
        f"  size on disk    {info['size_on_disk_bytes'] / 2**20:.0f} MiB",
        f"  time, peak RSS  {info['wall_seconds']:.0f} s, {info['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"  saved in        {root / info['variant']}/model (use --variant {info['variant']})",
    ]
    print("\n".join(lines))
    return 0


_EVAL_FLAGS = {"attacks": "attacks", "prompts": "prompts", "n": "n_prompts", "n_harmless": "n_harmless",
               "max_new_tokens": "max_new_tokens", "decoding_grid": "decoding_grid", "suffix_mode": "suffix_mode",
               "suffix_source": "suffix_source", "gcg_steps": "gcg_steps", "gcg_prompts": "gcg_prompts",
               "judge_model": "judge_model", "judge_format": "judge_format", "tasks": "utility_tasks",
               "limit": "utility_limit", "backend": "backend", "seed": "seed"}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluation.job import run_evaluate
    from .pipeline import prepare

    root = Path(args.run)
    existing = root / "config.yaml"
    overrides: dict[str, Any] = {k: getattr(args, k) for k in ("model", "dtype", "device", "chat_template")
                                 if getattr(args, k) is not None}
    if existing.exists() and any(k in overrides for k in ("model", "chat_template")):
        raise UserError(f"{root} already has a model (config.yaml); drop --model / --chat-template or use a new --run")
    for dest, key in _EVAL_FLAGS.items():
        if getattr(args, dest) is not None:
            overrides[f"evaluation.{key}"] = getattr(args, dest)
    overrides.update(_set_overrides(args.set))
    cfg = load_config(str(existing) if existing.exists() else args.config, overrides)
    if not existing.exists():
        prepare(cfg, root, force=False)
    res = run_evaluate(cfg, root, args.variant, utility_eval=args.utility, force=args.force, progress=not args.quiet)
    print(_eval_table(res))
    return 0


def _pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:6.1%}  [{lo:.1%}, {hi:.1%}]  ({r['k']}/{r['n']})"


def _eval_table(res: dict[str, Any]) -> str:
    p = res["plan"]
    lines = [f"evaluation of {res['variant']} ({p['max_new_tokens']} new tokens; decoding grid {p['grid']}, "
             f"{p['n_decodings']} configurations x {len(p['systems'])} system prompt settings)"]
    for attack, s in res["asr"].items():
        lines.append(f"  ASR {attack:9s} {_pct(s['asr'])}   judge {s['judge']}; degenerate "
                     f"{s['judges'][s['judge']]['verdicts']['degenerate']['rate']:.1%} of completions")
        if attack == "suffix" and "universal" in s:
            lines.append(f"      universal   {_pct(s['universal']['asr'])}")
        for pair, a in (s.get("agreement") or {}).items():
            lines.append(f"      agreement {pair}: {a['agreement']:.1%}, kappa {a['kappa']:.2f}")
    if "over_refusal" in res:
        lines.append(f"  over-refusal  {_pct(res['over_refusal']['refusal_rate'])} of harmless prompts refused")
    u = res.get("utility")
    if u:
        for name, t in u["tasks"].items():
            lines.append(f"  {name:22s} acc {t['acc']:.3f} ± {t['acc_stderr']:.3f} (n={t['n']})")
        if "perplexity" in u:
            lines.append(f"  perplexity (held-out Wikipedia) {u['perplexity']['perplexity']:.2f}")
        for name, why in (u.get("skipped") or {}).items():
            lines.append(f"  {name}: skipped ({why})")
    lines.append(f"  results in {res.get('out', '')}  ({res['seconds']:.0f} s)")
    return "\n".join(lines)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    cfg = _run_config(args.run)
    res = run_compare(cfg, args.run, args.variant, quality=not args.no_quality, force=args.force)
    b, v = res["base_source"], res["variant_source"]
    q = res["quality"]
    lines = [f"{args.variant} vs base",
             f"  source          base L{b['layer']}/pos {b['position']}  ->  variant L{v['layer']}/pos {v['position']}"
             f"  ({'shifted' if res['source_shifted'] else 'same'})",
             f"  cosine          selected {res['cosine_selected']:.3f}, at the base source {res['cosine_at_base_source']:.3f}",
             "  by layer        " + " ".join(f"{c:.2f}" for c in res["cosine_by_layer"]),
             f"  single direction mediates refusal: {'yes' if res['single_direction'] else 'no'} "
             f"({res['single_direction_evidence']['basis']})"]
    if q.get("base_direction_on_variant"):
        o = q["base_direction_on_variant"]
        lines.append(f"  base direction on the variant: ablation {o['ablation_score']:+.2f} (baseline "
                     f"{o['baseline']['harmful_score']:+.2f}), addition {o['addition_score']:+.2f} (baseline "
                     f"{o['baseline']['harmless_score']:+.2f}), KL {o['kl']:.3f}")
    lines.append(f"  written to {Path(args.run) / 'compare' / (args.variant + '.json')}")
    print("\n".join(lines))
    return 0


def _run_config(run: str) -> Any:
    from .config import load_config

    path = Path(run) / "config.yaml"
    if not path.exists():
        raise UserError(f"{run} is not a run directory (no config.yaml); run refusalkit extract --run {run} first")
    return load_config(str(path))


def _cmd_repair(args: argparse.Namespace) -> int:
    from .repair import DEFAULT_SCALES, SearchSpec, run_repair

    cfg = _run_config(args.run)
    scales = DEFAULT_SCALES
    if args.scales:
        try:
            scales = tuple(float(x) for x in args.scales.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--scales must be comma-separated numbers, not {args.scales!r}") from None
    search = SearchSpec(scales=scales, n_prompts=args.search_prompts, n_harmless=args.search_prompts,
                        ppl_tokens=args.ppl_tokens,
                        target_asr=args.target_asr, max_over_refusal_increase=args.max_over_refusal_increase,
                        max_degenerate_increase=args.max_degenerate_increase, max_ppl_increase=args.max_ppl_increase,
                        max_utility_drop=args.max_utility_drop)
    info = run_repair(cfg, args.run, args.variant, alpha_scale=args.alpha_scale, unit=args.direction == "unit",
                      placement=args.placement, keep_zeros=args.keep_zeros, requantize=not args.no_requantize,
                      curve=args.curve, search=search, name=args.name, force=args.force, progress=not args.quiet)
    if info.get("reused"):
        print(f"variant {info['variant']} exists; reused (use --force to redo it)")
    lines = [f"{info['variant']}: AIRD on {info['source_variant']} at block {info['layer']} "
             f"(direction layer {info['direction_layer']}, placement {info['placement']}, r {info['direction']}, "
             f"norm {info['direction_norm']:.2f})",
             "  alphas          " + ", ".join(f"{k} {a:.4g} (gain {info['gain'][k]:.3g})" for k, a in info["alphas"].items()),
             f"  model sparsity  {info['model_sparsity_before']:.2%} -> {info['model_sparsity_after']:.2%}"]
    for k, m in info["matrices"].items():
        lines.append(f"  {k:15s} |dW| {m['delta_norm']:.4g} ({m['rel_delta']:.2%} of |W|), zeros "
                     f"{m['sparsity_before']:.2%} -> {m['sparsity_after']:.2%}")
    w = info.get("writes_along_r") or {}
    if all(isinstance(w.get(k), dict) and "harmless" in w[k] for k in ("attn_out", "mlp_down")):
        lines.append("  writes along r  " + ", ".join(f"{k} {w[k]['harmful']:+.3f} harmful / {w[k]['harmless']:+.3f} harmless"
                                                      for k in ("attn_out", "mlp_down"))
                     + f"; gap change {info['predicted_gap_change']:+.3f} (first order)")
    if info.get("quantization"):
        lines.append(f"  requantized     {info['quantization']['survival']:.0%} of the edit survives")
    c = info.get("curve")
    if c:
        lines.append(f"  alpha curve     target ASR {c['target_asr']:.0%} ({c['target_from']}); unrepaired ASR "
                     f"{c['unrepaired']['asr']['rate']:.0%}")
        for p in c["points"]:
            lines.append(f"    x{p['alpha_scale']:<6g} ASR {p['asr']['rate']:5.0%}  over-refusal "
                         f"{p.get('over_refusal', {}).get('rate', float('nan')):5.0%}  degenerate {p['degenerate_rate']:5.0%}"
                         f"  ppl {p.get('perplexity', float('nan')):7.2f}" + (f"  over budget: {'; '.join(p['over_budget'])}"
                                                                              if p["over_budget"] else ""))
        if info["auto"]:
            lines.append(f"  chosen          x{info['alpha_scale']:g}" +
                         ("" if c["chosen"]["target_reached"] else " (target not reached within the budgets)"))
    lines.append(f"  saved in        {Path(args.run) / info['variant']}/model (use --variant {info['variant']})")
    print("\n".join(lines))
    return 0


def _report_summary(rep: dict[str, Any]) -> str:
    """The report's variant table (Markdown) and one line per finding, then the two paths."""
    md = Path(rep["md"]).read_text(encoding="utf-8")
    table = []
    if "## Variants" in md:
        for line in md.split("## Variants", 1)[1].strip().splitlines():
            if not line.startswith("|"):
                break
            table.append(line)
    lines = table + [""] if table else []
    lines += [f"{f['id']} {f['verdict']:13s} {f['claim']}" for f in rep["findings"]]
    lines.append(f"report: {rep['md']}\n        {rep['html']}")
    return "\n".join(lines)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(_report_summary(write_report(args.run)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import PROFILES, resolve_profile, run_all

    named = "quick" if args.quick else args.profile
    overrides: dict[str, Any] = {k: getattr(args, k) for k in ("model", "dtype", "device") if getattr(args, k) is not None}
    overrides.update(_set_overrides(args.set))
    root = Path(args.run) if args.run else Path("runs") / ((Path(args.config).stem if args.config else "default")
                                                            + ("" if named == "auto" else f"-{named}"))
    existing = root / "config.yaml"
    if existing.exists():  # resume: the run directory's resolved settings, whatever the profile
        profile, cfg = "as recorded", load_config(args.config or str(existing), overrides)
    else:
        probe = load_config(args.config, overrides)
        profile = resolve_profile(named, probe.device)
        cfg = load_config(args.config, overrides, profile=PROFILES[profile])
    print(f"[run] {root}: profile {profile}" + (" (no GPU; --profile full for the paper-sized settings)"
                                               if profile == "cpu" and named == "auto" else ""), file=sys.stderr)
    res = run_all(cfg, root, progress=not args.quiet, echo=lambda m: print(m, file=sys.stderr), profile=profile)
    failed = {k: v["why"] for k, v in res["state"]["stages"].items() if v["status"] == "failed"}
    for k, why in failed.items():
        print(f"note: {k} did not complete: {why}", file=sys.stderr)
    print(_report_summary(res["report"]))
    return 0


METHOD_LINE = {"magnitude": "magnitude pruning", "wanda": "Wanda pruning", "sparsegpt": "SparseGPT pruning",
               "llm-int8": "LLM.int8", "awq": "AWQ quantization", "rtn": "round-to-nearest quantization"}


def _cmd_config(args: argparse.Namespace) -> int:
    from .pipeline import default_config_text

    print(default_config_text(), end="")
    return 0


def _cmd_sources(args: argparse.Namespace) -> int:
    from .compress.calibration import TEXT_CORPORA
    from .compress.job import METHODS
    from .models import SHORT_NAMES
    from .prompts import NAMED_SOURCES

    for k, v in {**NAMED_SOURCES, **SHORT_NAMES}.items():
        print(f"{k:18s} {v}")
    for k, v in TEXT_CORPORA.items():
        print(f"{k:18s} text corpus (calibration, perplexity): {v[3]}")
    for k, v in METHODS.items():
        print(f"{k:18s} compression method: {v}")
    return 0


COMMANDS = {"extract": _cmd_extract, "orthogonalize": _cmd_orthogonalize, "compress": _cmd_compress,
            "evaluate": _cmd_evaluate, "compare": _cmd_compare, "repair": _cmd_repair, "run": _cmd_run,
            "report": _cmd_report, "config": _cmd_config, "sources": _cmd_sources}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub", "accelerate", "bitsandbytes", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # no retry chatter when a hub id cannot be reached
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept — re-run the same command to resume", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
