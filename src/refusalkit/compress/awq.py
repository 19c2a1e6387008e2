"""AWQ (Lin et al. 2023): activation-aware weight scaling and clipping before group-wise quantization,
block by block on calibration data; the grid and its rounding are :mod:`refusalkit.compress.quant`'s."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refusalkit.compress.awq_groups import (  # noqa: F401  (ScaleGroup, _folding_preserves_the_block: tests)
    _NO_CLIP,
    ScaleGroup,
    _fold,
    _folding_preserves_the_block,
    _inspect_outputs,
    _leaf,
    _Trace,
    find_scale_groups,
)
from refusalkit.compress.blockwise import BlockInputs
from refusalkit.compress.methods import BlockStep, register
from refusalkit.compress.quant import check_group, group_quant_method, quantize_groupwise


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
    pre_round: dict[int, torch.Tensor] | None = None,
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
    every token (``-1``), which costs ``n_grid`` forwards of each parent module. ``pre_round`` (when
    given) receives each ``nn.Linear``'s weights just before rounding, by ``id`` of the module.

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
        if pre_round is not None:  # the scaled, clipped weights before rounding (refusalkit.compress.refusal_quant)
            pre_round[id(lin)] = lin.weight.data.clone()
        lin.weight.data.copy_(quantize_groupwise(lin.weight.data, bits, group_size))
    # the tokens the scale search of the linears above measures its loss on (batches differ in length)
    n_view_search = max(1, sum(h.shape[0] * h.shape[1] for h in inputs.hidden[:n_search]))
    view_info = {
        n: _awq_view(lin, view_x[n], bits, group_size, n_grid, max_shrink, clip, n_clip_tokens, n_view_search)
        for n, lin in views.items()
    }
    return outputs, _block_info(groups, clipped, n_search, view_info, trace)


def _block_info(
    groups: list[Any], clipped: list[str], n_search: int, view_info: dict[str, Any], trace: Any
) -> dict[str, Any]:
    """What :func:`awq_block` did on one block: each scale group's best ratio and losses, the clipped
    linears, the search batches, the views' searches and the tokens each linear was calibrated on."""
    return {
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
    outputs, info = awq_block(
        step.block,
        step.inputs,
        spec.bits,
        spec.group_size,
        search_tokens=spec.awq_search_tokens,
        pre_round=step.shared.get("pre_round"),
    )
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
