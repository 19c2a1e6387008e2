"""Refusal-preserving quantization: ``rp-rtn`` and ``rp-awq``, at 2 to 8 bits.

Each block is quantized by the plain method (RTN; or AWQ's scales, clipping and rounding), then every
residual writer gets the update of :mod:`refusalkit.compress.refusal` (Eq. 1, all weights free) and
is rounded back onto a group grid by :func:`balanced_round`: each weight goes to the nearest grid
point, except that in every input column the fewest, cheapest weights go to the other neighbour
so that ``r̂ᵀ Q`` (the writer's output along the refusal direction, for *any* input) matches
``r̂ᵀ (W + Δ)``. Plain rounding leaves ``r̂ᵀ (Q − W)`` a random error of about a third of a grid
step per column; the balanced rounding removes it at a small cost in squared error, and the
variant stays a group-wise asymmetric quantization with ``2^bits`` levels per group (its grid is the
one plain rounding of ``W + Δ`` has, so packing and export read it back).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from refusalkit.compress.awq import _awq_step
from refusalkit.compress.methods import register
from refusalkit.compress.quant import _rtn_block, group_quant_method
from refusalkit.compress.refusal import preserving_parameters, preserving_step


def _grid(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per group of ``g`` inputs of each row: (scale, zero) as :func:`refusalkit.compress.quant.quantize_groupwise`
    computes them (asymmetric), broadcast to ``w``'s shape, and ``qmax``."""
    qmax = 2**bits - 1
    rows, cols = w.shape
    wg = w.reshape(rows, cols // g, g)
    mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    scale = (mx - mn).clamp(min=1e-5) / qmax
    zero = (-torch.round(mn / scale)).clamp(0, qmax)
    return scale.expand_as(wg).reshape(rows, cols), zero.expand_as(wg).reshape(rows, cols), qmax


@torch.no_grad()
def balanced_round(target: torch.Tensor, rhat: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, dict]:
    """Round ``target`` ([out, in]) group-wise so that every column's ``r̂``-weighted sum stays as close
    to ``r̂ᵀ target`` as single-step changes allow.

    Start from round-to-nearest ``q``; per column ``j`` the residual is ``c_j = Σ_i r̂_i (Q_ij − T_ij)``.
    Moving weight ``(i, j)`` to its other neighbouring grid point changes ``c_j`` by ``b_ij = ±r̂_i·scale``
    and costs ``scale²·(1 − 2|y − q|)`` more squared error (``y`` its grid coordinate). Among the moves
    that shrink ``|c_j|``, take them in increasing cost per unit of ``|b|`` while the total stays at most
    ``|c_j|``, then the next one if it lands closer. A group's largest and smallest weights never move
    (they fix the grid). Returns the dequantized weights and the residuals' RMS before and after.
    """
    t = target.double()
    r = rhat.double().to(t.device)
    rows, cols = t.shape
    g = cols if group_size <= 0 else group_size
    scale, zero, qmax = _grid(t, bits, g)
    y = t / scale + zero
    q = torch.round(y).clamp(0, qmax)
    resid = (r.unsqueeze(1) * ((q - zero) * scale - t)).sum(0)  # c_j
    step = torch.where(y >= q, 1.0, -1.0).to(t.dtype)
    alt = q + step
    tg = t.reshape(rows, cols // g, g)
    extreme = ((tg == tg.amax(-1, keepdim=True)) | (tg == tg.amin(-1, keepdim=True))).reshape(rows, cols)
    benefit = r.unsqueeze(1) * step * scale  # change of c_j
    helps = (benefit * resid.unsqueeze(0) < 0) & (alt >= 0) & (alt <= qmax) & ~extreme
    cost = scale.pow(2) * (1 - 2 * (y - q).abs())
    gain = benefit.abs()
    ratio = torch.where(helps & (gain > 0), cost / gain.clamp(min=1e-300), torch.inf)
    order = torch.argsort(ratio, dim=0)
    allowed = torch.gather(torch.isfinite(ratio), 0, order)  # a move that does not help is never taken
    g_sorted = torch.where(allowed, torch.gather(gain, 0, order), 0.0)
    total = torch.cumsum(g_sorted, 0)
    need = resid.abs().unsqueeze(0)
    take = (total <= need) & allowed
    # the first move past |c_j| is taken when it lands closer to zero than stopping before it
    before = total - g_sorted
    first_over = (total > need) & (before <= need) & (g_sorted > 0)
    take |= first_over & ((total - need) < (need - before))
    move = torch.zeros_like(take)
    move.scatter_(0, order, take)
    q = torch.where(move, alt, q)
    out = (q - zero) * scale
    after = (r.unsqueeze(1) * (out - t)).sum(0)
    info = {
        "column_residual_rms_nearest": float(resid.pow(2).mean().sqrt()),
        "column_residual_rms_balanced": float(after.pow(2).mean().sqrt()),
        "moved_fraction": float(move.double().mean()),
    }
    return out, info


def _requantizer() -> Any:
    """``apply(writer, delta)`` of :func:`~refusalkit.compress.refusal.preserving_step`: round the
    writer's weights before rounding, plus ``delta``, with :func:`balanced_round`."""

    def apply(writer: Any, delta: torch.Tensor, rhat: torch.Tensor, state: dict) -> dict | None:
        lin = writer.linear
        before = state.get(id(lin))
        if before is None:  # an AWQ view (a Conv1D): its grid is of W·s, kept as the plain method left it
            return {"skipped": "no weights before rounding (an AWQ view); left as quantized"}
        spec = state["spec"]
        w, info = balanced_round(before.double().cpu() + delta, rhat, spec.bits, spec.group_size)
        lin.weight.data.copy_(w.to(lin.weight.device, lin.weight.dtype))
        return info

    return apply


def _rtn_before(step: Any) -> dict:
    """RTN rounds the weights as they are: keep them."""
    return {id(lin): lin.weight.detach().clone() for lin in step.linears.values()}


def _awq_before(step: Any) -> dict:
    """AWQ rounds its scaled, clipped weights: :func:`refusalkit.compress.awq.awq_block` fills this."""
    state: dict = {}
    step.shared["pre_round"] = state
    return state


for _plain, _base, _before, _next, _rank in (
    ("rtn", _rtn_block, _rtn_before, "compressed", 12),
    ("awq", _awq_step, _awq_before, "plain", 13),
):
    _m = group_quant_method(
        f"rp-{_plain}",
        True,
        preserving_step(_base, _requantizer(), _next, before=_before),
        f"refusal-preserving {_plain}: {_plain}, then each residual writer corrected and rounded so that its "
        "output along the refusal direction stays the dense model's (needs extract)",
        f"refusal-preserving {_plain.upper()} quantization",
        rank=_rank,
        covers_views=True,
    )
    register(
        dataclasses.replace(
            _m, parameters=lambda spec, f=_m.parameters: {**f(spec), **preserving_parameters(spec)}, preserves=_plain
        )
    )
