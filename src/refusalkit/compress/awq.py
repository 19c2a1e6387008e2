"""AWQ (Lin et al. 2023): activation-aware weight scaling and clipping before group-wise quantization,
block by block on calibration data; the grid and its rounding are :mod:`refusalkit.compress.quant`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusalkit.compress.blockwise import BlockInputs, _to, module_device
from refusalkit.compress.methods import BlockStep, register
from refusalkit.compress.quant import check_group, group_quant_method, quantize_groupwise

_NO_CLIP = ("q_proj", "k_proj", "query", "key", "wq", "wk", "q", "k")
_V_NAMES = ("v_proj", "value", "wv", "v")
_O_NAMES = ("o_proj", "out_proj", "dense", "wo", "o")


@dataclass
class ScaleGroup:
    """Linears sharing one input; ``prev`` produces that input and absorbs 1/s; ``inspect`` measures the loss."""

    linears: list[str]
    prev: str
    inspect: str  # a module name (a parent like the attention or the MLP, or the single linear)
    best_ratio: float = 0.0
    scales: torch.Tensor | None = None
    errors: list[float] = field(default_factory=list)


class _Trace:
    """One forward of a block that records what AWQ needs: every linear's inputs, which module
    produced them, and the inputs / outputs of candidate parent modules."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.modules = dict(block.named_modules())
        self.linears = {n: m for n, m in self.modules.items() if isinstance(m, nn.Linear)}
        self.x: dict[str, list[torch.Tensor]] = {n: [] for n in self.linears}
        self.producer: dict[str, str | None] = {}
        self.out_of: dict[str, Any] = {}
        self.in_of: dict[str, Any] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}
        self.outs: dict[str, list[torch.Tensor]] = {}

    def run(self, inputs: BlockInputs, parents: list[str]) -> list[torch.Tensor]:
        handles = []
        first = [True]

        def rec(name: str):
            def fn(mod: nn.Module, inp: tuple, out: Any) -> None:
                if first[0]:
                    self.out_of[name] = out
                    self.in_of[name] = inp[0] if inp else None
                if name in self.linears:
                    self.x[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

            return fn

        def pre(name: str):
            def fn(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                self.calls.setdefault(name, []).append((args, dict(kwargs)))

            return fn

        def post(name: str):
            def fn(mod: nn.Module, inp: tuple, out: Any) -> None:
                o = out[0] if isinstance(out, (tuple, list)) else out
                self.outs.setdefault(name, []).append(o.detach())

            return fn

        for n, m in self.modules.items():
            if n:
                handles.append(m.register_forward_hook(rec(n)))
        for n in parents:
            handles.append(self.modules[n].register_forward_pre_hook(pre(n), with_kwargs=True))
            handles.append(self.modules[n].register_forward_hook(post(n)))
        dev = module_device(self.block)
        outs = []
        try:
            for h, kw in zip(inputs.hidden, inputs.kwargs):
                out = self.block(h.to(dev), **_to(kw, dev))
                outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
                if first[0]:
                    self._resolve()
                    self.out_of.clear()
                    self.in_of.clear()
                first[0] = False
        finally:
            for hd in handles:
                hd.remove()
        return outs

    def _resolve(self) -> None:
        for ln in self.linears:
            x = self.in_of.get(ln)
            self.producer[ln] = next((n for n, o in self.out_of.items() if o is x and n != ln), None)
        self.act_input_producer = {
            n: next((p for p, o in self.out_of.items() if o is self.in_of.get(n)), None)
            for n, m in self.modules.items()
            if n and not list(m.children()) and not isinstance(m, nn.Linear) and not list(m.parameters(recurse=False))
        }


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common[: min(len(p) for p in parts) - 1]) if len(names) == 1 else ".".join(common)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def find_scale_groups(block: nn.Module, inputs: BlockInputs) -> tuple[list[ScaleGroup], _Trace]:
    """The AWQ scaling groups of a block, found by tracing one batch (not from names of models):

    * linears fed by a normalization layer (q/k/v after the input norm; gate/up after the
      post-attention norm): the norm absorbs 1/s; the loss is measured on their common parent;
    * a linear fed by the element-wise product of two MLP branches (down): the non-activated
      branch (up) absorbs 1/s on its output rows;
    * the attention output projection, when its input has the value projection's width: the
      value projection absorbs 1/s (skipped under grouped-query attention, as in AWQ).
    """
    probe = _Trace(block)
    probe.run(BlockInputs(inputs.hidden[:1], inputs.kwargs[:1]), parents=[])
    modules = probe.modules
    groups: list[ScaleGroup] = []
    by_input: dict[str, list[str]] = {}
    for ln, prod in probe.producer.items():
        if prod is not None and not isinstance(modules[prod], nn.Linear):
            by_input.setdefault(prod, []).append(ln)
    for prod, lns in by_input.items():
        norm = modules[prod]
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == probe.linears[lns[0]].in_features:
            parent = _common_parent(lns) if len(lns) > 1 else lns[0]
            groups.append(ScaleGroup(lns, prod, parent))
    grouped = {ln for g in groups for ln in g.linears}
    # down <- up: the MLP linear whose input no module produced, with an up branch of the same width
    for ln, lin in probe.linears.items():
        if ln in grouped or probe.producer.get(ln) is not None:
            continue
        parent = ln.rsplit(".", 1)[0] if "." in ln else ""
        siblings = [
            s
            for s, m in probe.linears.items()
            if s != ln and s.rsplit(".", 1)[0] == parent and m.out_features == lin.in_features
        ]
        activated = {p for p in probe.act_input_producer.values() if p}
        ups = [s for s in siblings if s not in activated]
        if len(siblings) == 2 and len(ups) == 1:
            groups.append(ScaleGroup([ln], ups[0], ln))
            continue
        if _leaf(ln) in _O_NAMES:
            vs = [s for s in siblings if _leaf(s) in _V_NAMES]
            if len(vs) == 1:
                groups.append(ScaleGroup([ln], vs[0], ln))
    from refusalkit.compress.blockwise import run_block

    first = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])
    ref = run_block(block, first)[0]
    return [g for g in groups if _folding_preserves_the_block(block, first, ref, g, modules)], probe


@torch.no_grad()
def _folding_preserves_the_block(
    block: nn.Module, first: BlockInputs, ref: torch.Tensor, g: ScaleGroup, modules: dict
) -> bool:
    """Whether scaling the group's linears by ``s`` and folding ``1/s`` into ``g.prev`` leaves the
    block's output ``ref`` on the batch ``first`` unchanged, tried with a random ``s`` in [1, 2) and
    undone exactly. It fails when something else also reads ``prev``'s output (a mixture of experts'
    router and experts reading the norm before a shared expert) or when the norm does not scale its
    output by its weight (Gemma's ``1 + w``); such a group is dropped, and its linears are clipped and
    quantized without a scale, like any linear in no group."""
    from refusalkit.compress.blockwise import run_block

    prev = modules[g.prev]
    touched = [prev.weight] + ([prev.bias] if getattr(prev, "bias", None) is not None else [])
    touched += [modules[n].weight for n in g.linears]
    saved = [t.data.clone() for t in touched]
    s = 1 + torch.rand(modules[g.linears[0]].in_features, generator=torch.Generator().manual_seed(0))
    try:
        _fold(prev, [modules[n] for n in g.linears], s)
        out = run_block(block, first)[0]
    finally:
        for t, v in zip(touched, saved):
            t.data.copy_(v)
    return bool(torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-4 * float(ref.abs().max())))


@torch.no_grad()
def _inspect_outputs(
    module: nn.Module, calls: list[tuple[tuple, dict]] | None, xs: list[torch.Tensor] | None, linear: nn.Linear | None
) -> list[torch.Tensor]:
    if linear is not None:
        return [nn.functional.linear(x, linear.weight, linear.bias) for x in xs]
    outs = []
    for args, kw in calls:
        o = module(*args, **kw)
        outs.append(o[0] if isinstance(o, (tuple, list)) else o)
    return outs


@torch.no_grad()
def awq_block(
    block: nn.Module,
    inputs: BlockInputs,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    clip: bool = True,
    n_clip_tokens: int = 512,
    search_tokens: int = -1,
) -> tuple[list[torch.Tensor], dict]:
    """AWQ on one decoder block; returns the block's full-precision outputs (next block's inputs).

    Lin et al. 2023, Sec. 3.2: for each group of linears sharing an input X, search
    ``s = mean|X|^alpha`` (alpha on a grid of ``n_grid`` in [0, 1), normalized by
    sqrt(max s * min s)) minimizing ``|| f(Q(W diag(s)) diag(s)^-1 X) - f(W X) ||^2`` (Eq. 4-5)
    with the output ``f`` of the group's parent module; scale the weights by ``s`` and fold
    ``1/s`` into the producing module. Then, as in the reference implementation, search a
    per-group clipping range (shrinking the max by up to ``max_shrink``) minimizing each
    linear's group-partial output error on ``n_clip_tokens`` tokens (not for query/key), and
    quantize group-wise (asymmetric, ``group_size``). Statistics come from the full-precision
    block, whose outputs feed the next block, as in the reference implementation.

    ``search_tokens > 0`` measures the scale-search loss on the first calibration batches that
    hold at least that many tokens (``mean|X|`` always uses every token); the reference uses
    every token (``-1``), which costs ``n_grid`` forwards of each parent module.

    Weights that are not ``nn.Linear`` layers — each expert of a fused expert tensor, calibrated on
    the tokens routed to it, and GPT-2's ``Conv1D`` — get the same search on their own output
    (:func:`_awq_view`), with the scale kept inside the stored weight, ``Q(W·diag(s))·diag(s)⁻¹``,
    instead of folded into the operation before them: the previous operation of an expert is the
    norm shared by every expert and the router. The variant stores dequantized weights, where the
    two forms are the same function.
    """
    from refusalkit.compress.blockwise import AliasLinear, functional_inputs, linear_layers

    groups, probe = find_scale_groups(block, inputs)
    parents = sorted({g.inspect for g in groups if g.inspect not in probe.linears})
    trace = _Trace(block)
    views = {n: m for n, m in linear_layers(block).items() if isinstance(m, AliasLinear)}
    view_x: dict[str, list[torch.Tensor]] = {n: [] for n in views}

    def record(n: str, x: torch.Tensor) -> None:  # routed expert inputs, Conv1D inputs, W @ X inputs
        (view_x[n] if n in views else trace.x[n]).append(x.detach().reshape(-1, x.shape[-1]))

    handles = [m.source.register_forward_hook(lambda _m, i, _o, n=n: record(n, i[0])) for n, m in views.items() if m.source is not None]  # fmt: skip
    try:
        with functional_inputs({**trace.linears, **views}, record):
            outputs = trace.run(inputs, parents)
    finally:
        for h in handles:
            h.remove()
    for name, lin in {**trace.linears, **views}.items():
        check_group(lin.in_features, group_size, name)
    n_search = _search_batches(inputs, search_tokens)
    for g in groups:
        _search_scale(g, trace, n_search, bits, group_size, n_grid)
    for g in groups:  # apply every scale (function-preserving in full precision), divide the recorded inputs
        _apply_scale(g, trace)
    clipped = []
    if clip:
        for n, lin in trace.linears.items():
            if _leaf(n) in _NO_CLIP:
                continue
            _clip_linear(lin, trace.x[n], bits, group_size, n_grid, max_shrink, n_clip_tokens)
            clipped.append(n)
    for lin in trace.linears.values():
        lin.weight.data.copy_(quantize_groupwise(lin.weight.data, bits, group_size))
    # the tokens the scale search of the linears above measures its loss on (batches differ in length)
    n_view_search = max(1, sum(h.shape[0] * h.shape[1] for h in inputs.hidden[:n_search]))
    view_info = {
        n: _awq_view(lin, view_x[n], bits, group_size, n_grid, max_shrink, clip, n_clip_tokens, n_view_search)
        for n, lin in views.items()
    }
    info = {
        "groups": [
            {
                "linears": g.linears,
                "prev": g.prev,
                "inspect": g.inspect,
                "best_ratio": g.best_ratio,
                "loss_at_ratio_0": g.errors[0],
                "best_loss": min(g.errors),
            }
            for g in groups
        ],
        "clipped": clipped,
        "search_batches": n_search,
        "views": view_info,
        "tokens": {
            **{n: sum(x.shape[0] for x in xs) for n, xs in trace.x.items()},
            **{n: v["tokens"] for n, v in view_info.items()},
        },
    }
    return outputs, info


@torch.no_grad()
def _awq_view(
    lin: nn.Linear,
    xs: list[torch.Tensor],
    bits: int,
    group_size: int,
    n_grid: int,
    max_shrink: float,
    clip: bool,
    n_clip_tokens: int,
    n_search_tokens: int,
) -> dict[str, Any]:
    """AWQ on one weight view (an expert's slice, a ``Conv1D``) from its own inputs ``xs``: the scale
    ``s = mean|X|^ratio`` (normalized) minimizing ``||X (Q(W s)/s)ᵀ − X Wᵀ||²`` over the ratio grid
    (Eq. 4–5 with the linear itself as the inspected output), the clipping search on ``W s`` with
    inputs ``X / s``, then the stored weight ``Q(clip(W s)) / s``. Without inputs (an expert no
    calibration token reached): round-to-nearest on the group grid, reported."""
    w = lin.weight.data
    tokens = sum(x.shape[0] for x in xs)
    if not tokens:
        w.copy_(quantize_groupwise(w, bits, group_size))
        return {"tokens": 0, "best_ratio": None}
    x_mean = sum(x.abs().float().sum(0) for x in xs) / tokens
    x = _sample_rows(xs, min(tokens, n_search_tokens))
    w0 = w.detach().float().clone()
    ref = x @ w0.t()
    best, best_err, best_ratio, errors = None, float("inf"), 0.0, []
    for i in range(n_grid):
        ratio = i / n_grid
        sc = x_mean.pow(ratio).clamp(min=1e-4)
        sc = sc / (sc.max() * sc.min()).sqrt()
        wq = quantize_groupwise(w0 * sc, bits, group_size) / sc
        err = (x @ wq.t() - ref).pow(2).mean().item()
        errors.append(err)
        if err < best_err:
            best, best_err, best_ratio = sc, err, ratio
    w.mul_(best.to(w.dtype).unsqueeze(0))
    if clip:
        _clip_linear(lin, [xx / best.to(xx.dtype) for xx in xs], bits, group_size, n_grid, max_shrink, n_clip_tokens)
    w.copy_(quantize_groupwise(w, bits, group_size))
    w.div_(best.to(w.dtype).unsqueeze(0))
    return {
        "tokens": tokens,
        "best_ratio": best_ratio,
        "loss_at_ratio_0": errors[0],
        "best_loss": best_err,
        "scale": best.detach().float().cpu(),
    }


def _search_batches(inputs: BlockInputs, search_tokens: int) -> int:
    """The calibration batches the scale search measures its loss on (all when ``search_tokens <= 0``)."""
    if search_tokens > 0:
        seen = 0
        for i, h in enumerate(inputs.hidden, start=1):
            seen += h.shape[0] * h.shape[1]
            if seen >= search_tokens:
                return i
    return len(inputs.hidden)


def _search_scale(g: ScaleGroup, trace: _Trace, n_search: int, bits: int, group_size: int, n_grid: int) -> None:
    """Eq. 4-5 of Lin et al.: the scale ``s = mean|X|^ratio`` (normalized) on a grid of ratios that
    minimizes the group's parent-output error after quantization; sets ``g.scales``, ``g.best_ratio``."""
    modules, linears = trace.modules, trace.linears
    xs_all = trace.x[g.linears[0]]
    x_mean = sum(x.abs().float().sum(0) for x in xs_all) / sum(x.shape[0] for x in xs_all)
    xs = xs_all[:n_search]
    calls = (trace.calls.get(g.inspect) or [])[:n_search]
    lin_only = linears[g.inspect] if g.inspect in linears else None
    ref = _inspect_outputs(modules[g.inspect], calls, xs, lin_only)
    originals = {n: linears[n].weight.data for n in g.linears}  # never written during the search
    best, best_err = None, float("inf")
    for i in range(n_grid):
        ratio = i / n_grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for n in g.linears:
            w = originals[n]
            linears[n].weight.data = (quantize_groupwise(w * s.to(w.dtype), bits, group_size) / s.to(w.dtype)).to(
                w.dtype
            )
        outs = _inspect_outputs(modules[g.inspect], calls, xs, lin_only)
        err = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outs, ref)) / sum(r.numel() for r in ref)
        g.errors.append(err)
        if err < best_err:
            best, best_err, g.best_ratio = s.clone(), err, ratio
    for n in g.linears:
        linears[n].weight.data = originals[n]
    g.scales = best


def _fold(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """``W diag(s)`` on ``linears`` and ``1/s`` folded into ``prev``, the module producing their input
    (a linear's output rows, or a norm's gain and bias)."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.to(prev.weight.dtype).unsqueeze(1))
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.data.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def _apply_scale(g: ScaleGroup, trace: _Trace) -> None:
    """``W diag(s)`` on the group's linears and ``1/s`` folded into the module that produces their input."""
    _fold(trace.modules[g.prev], [trace.linears[n] for n in g.linears], g.scales)
    for n in g.linears:
        trace.x[n] = [x / g.scales.to(x.dtype) for x in trace.x[n]]


def _sample_rows(xs: list[torch.Tensor], n: int) -> torch.Tensor:
    """Every k-th token over all batches (k = total // n), at most ``n`` of them, as float32."""
    total = sum(x.shape[0] for x in xs)
    step = max(1, total // n)
    picked, offset = [], 0
    for x in xs:
        start = (-offset) % step
        picked.append(x[start::step].float())
        offset += x.shape[0]
    return torch.cat(picked)[:n]


@torch.no_grad()
def _clip_linear(
    lin: nn.Linear, xs: list[torch.Tensor], bits: int, group_size: int, n_grid: int, max_shrink: float, n_tokens: int
) -> None:
    """AWQ's clipping search: per (row, group), the max |w| shrink that minimizes the group-partial output error."""
    x = _sample_rows(xs, n_tokens)
    w = lin.weight.data.float()
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    ng = in_f // g
    xg = x.reshape(-1, ng, g).transpose(0, 1)  # [ng, T, g]
    rows = max(1, (1 << 25) // max(1, x.shape[0] * ng))
    best_max = torch.empty(out_f, ng, 1, device=w.device)
    for r0 in range(0, out_f, rows):
        wr = w[r0 : r0 + rows].reshape(-1, ng, g)  # [R, ng, g]
        org_max = wr.abs().amax(dim=-1, keepdim=True)
        org_out = torch.einsum("ntg,rng->rtn", xg, wr)
        best_err = torch.full((wr.shape[0], ng), float("inf"), device=w.device)
        bm = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            mv = org_max * (1 - i / n_grid)
            q = quantize_groupwise(torch.clamp(wr, -mv, mv).reshape(wr.shape[0], -1), bits, g).reshape(wr.shape)
            err = (torch.einsum("ntg,rng->rtn", xg, q) - org_out).pow(2).mean(dim=1)
            better = err < best_err
            best_err[better] = err[better]
            bm[better] = mv[better]
        best_max[r0 : r0 + rows] = bm
    wg = w.reshape(out_f, ng, g)
    lin.weight.data.copy_(torch.clamp(wg, -best_max, best_max).reshape(out_f, in_f))


def _awq_step(step: BlockStep) -> Any:
    from refusalkit.compress.blockwise import advance, expert_tokens

    spec = step.spec
    outputs, info = awq_block(step.block, step.inputs, spec.bits, spec.group_size, search_tokens=spec.awq_search_tokens)
    step.notes.setdefault("awq_groups", {})[str(step.index)] = info["groups"]
    if info["views"]:
        scales = step.notes.setdefault(VIEW_SCALES, {})  # tensors: the compress job saves them beside the variant
        for n, v in info["views"].items():
            if "scale" in v:
                scales[f"{step.index}.{n}"] = v.pop("scale")
        step.notes.setdefault("awq_views", {})[str(step.index)] = {
            n: v for n, v in info["views"].items() if v["tokens"]
        }
    expert_tokens(step, info["tokens"], AWQ_UNCALIBRATED)
    return advance(step.inputs, outputs)


# notes key of the per-view scales s (a view's stored weight is Q(W s) / s): saved by the compress job as
# <V>/awq_view_scales.safetensors, keyed "<block>.<view>", and read by AIRD to requantize a view on its grid
VIEW_SCALES = "_awq_view_scales"

AWQ_UNCALIBRATED = (
    "no calibration token was routed to these experts: quantized by round-to-nearest on the same "
    "group grid, without activation-aware scales or clipping"
)


register(
    group_quant_method(
        "awq",
        True,
        _awq_step,
        "AWQ: activation-aware scales + clipping, group-wise asymmetric quantization (default 4 bits, group 128)",
        "AWQ quantization",
        rank=4,
        covers_views=True,
    )
)
