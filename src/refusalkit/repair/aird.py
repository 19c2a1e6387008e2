"""AIRD — Artificially Inducing the Refusal Direction (Chhabra & Khalili 2025, §5, Eq. 4).

At the original model's source layer ``l``, the matrices that write to the residual stream —
the attention output projection ``W_O`` and the MLP down projection ``W_down`` — become

    W ← W + α · r rᵀ · W            (α = 0.02 for W_O, 0.01 for W_down)

with ``r`` the *original* (uncompressed) model's refusal direction. For any input ``x`` the
block then writes ``W x + α r (rᵀ W x)``: the component of its output along ``r`` is scaled by
``1 + α‖r‖²`` and nothing else changes. The update ``ΔW = α r (rᵀ W)`` has rank one.

Two details the paper leaves open are options here (the README says which default we chose and
why, with measurements):

* ``r`` raw (the difference in means, as stored; effective gain ``α‖r‖²``) or unit-norm
  (gain ``α``);
* which block counts as "the source layer": our direction at layer ``l`` is read at the *input*
  of block ``l``; ``placement="source"`` edits block ``l`` (the paper's index read literally),
  ``placement="previous"`` edits block ``l − 1``, whose output is the stream ``r`` was read from.

Beyond the paper:

* Other block layouts (:func:`refusalkit.models.structure.block_writers`): in a mixture of experts
  every expert's down projection and a shared expert's get the MLP's α (each expert's output along
  ``r`` is scaled by the same ``1 + α‖r‖²``, so the block's is too, whatever the router chooses;
  the router is left alone: editing it would change which experts run, not what they write); a
  state-space block's output projection gets the attention output's α (it is the block's sequence
  mixer). GPT-2's ``Conv1D`` is edited as the ``[out, in]`` matrix it applies.

* ``keep_zeros`` (sparsity-preserving AIRD): ``ΔW`` is restricted to the non-zero pattern of
  ``W`` (``ΔW ⊙ 1[W ≠ 0]``), so a pruned model keeps its exact sparsity. No longer rank one.
* Quantized models: an int8 (LLM.int8) matrix is dequantized, edited and requantized row-wise;
  a fake-quantized (AWQ / RTN) matrix is requantized on its group grid with the variant's bits
  and group size. :func:`survival` reports how much of the edit the grid keeps.

:class:`AirdEdit` keeps what it replaced, so :meth:`AirdEdit.remove` restores the model bit for
bit (α sweeps apply and remove edits on one loaded model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusalkit.core.errors import UserError
from refusalkit.models.structure import Writer, block_writers, decoder_layers

PAPER_ALPHAS = {"attn_out": 0.02, "mlp_down": 0.01}
PLACEMENTS = ("source", "previous")


def aird_delta(w: torch.Tensor, r: torch.Tensor, alpha: float, keep_zeros: bool = False) -> torch.Tensor:
    """``ΔW = α r (rᵀ W)`` (Eq. 4) in float64, ``w [d_model, d_in]``, ``r [d_model]``.

    ``keep_zeros`` masks it to the non-zeros of ``w`` (sparsity-preserving AIRD).
    """
    w64, r64 = w.double(), r.double().to(w.device)
    delta = alpha * torch.outer(r64, r64 @ w64)
    if keep_zeros:
        delta = delta * (w64 != 0)
    return delta


def survival(before: torch.Tensor, after: torch.Tensor, intended: torch.Tensor) -> dict[str, float]:
    """How much of an intended edit a quantization grid kept.

    ``realized = after − before``; ``survival = ⟨realized, intended⟩ / ‖intended‖²`` (1: all of
    the edit along its own direction; 0: rounded away), ``residual = ‖realized − intended‖ /
    ‖intended‖`` and ``changed`` = the share of weights whose stored value changed.
    """
    realized = after.double() - before.double()
    n2 = float((intended.double() ** 2).sum())
    if n2 == 0:
        return {"survival": 0.0, "residual": 0.0, "changed": float((realized != 0).double().mean())}
    return {
        "survival": float((realized * intended.double()).sum()) / n2,
        "residual": float((realized - intended.double()).norm()) / n2**0.5,
        "changed": float((realized != 0).double().mean()),
    }


# ------------------------------------------------------------------------------------------------
# Matrices in their storage formats
# ------------------------------------------------------------------------------------------------


def _is_bnb_int8(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Linear8bitLt"


def _int8_parts(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB float32 [out]) of our Int8Linear or a bitsandbytes Linear8bitLt."""
    from refusalkit.models.int8 import Int8Linear

    if isinstance(mod, Int8Linear):
        return mod.weight, mod.SCB
    w = mod.weight
    cb = w.data if w.data.dtype == torch.int8 else getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(mod.state, "SCB", None)
    if cb is None or scb is None or cb.dtype != torch.int8:
        raise UserError("cannot read this bitsandbytes 8-bit layer's int8 weights; reload the variant and retry")
    return cb, scb


def _is_int8(mod: nn.Module) -> bool:
    from refusalkit.models.int8 import Int8Linear

    return isinstance(mod, Int8Linear) or _is_bnb_int8(mod)


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The matrix a linear layer applies, in float32 (dequantized for int8 layers)."""
    if _is_int8(mod):
        cb, scb = _int8_parts(mod)
        return cb.float() * (scb.float() / 127.0).unsqueeze(1)
    return mod.weight.detach().to(torch.float32, copy=True)


def _stored_zeros(mod: nn.Module) -> float:
    w = _int8_parts(mod)[0] if _is_int8(mod) else mod.weight
    return float((w == 0).double().mean())


@dataclass
class Requantize:
    """How an edited fake-quantized matrix returns to its grid (the variant's ``compression.json``).

    ``view_scales`` (AWQ): the scale ``s`` of each weight view (an expert of a fused tensor, a
    ``Conv1D``), whose stored weight is ``Q(W s) / s``, keyed ``<block>.<view>``; such a matrix
    returns to its own grid as ``Q(W' s) / s``."""

    method: str  # awq | rtn
    bits: int
    group_size: int
    view_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_compression(
        cls, info: dict[str, Any] | None, view_scales: dict[str, torch.Tensor] | None = None
    ) -> Requantize | None:
        from refusalkit.compress.methods import plain_method

        method = plain_method((info or {}).get("method"))  # a refusal-preserving rp-awq / rp-rtn: the same grid
        if method not in ("awq", "rtn"):
            return None
        return cls(method, int(info["bits"]), int(info["parameters"].get("group_size", 128)), view_scales or {})

    def __call__(self, w: torch.Tensor, key: str | None = None) -> torch.Tensor:
        from refusalkit.compress.quant import quantize_groupwise

        s = self.view_scales.get(key) if key is not None else None
        if s is None:
            return quantize_groupwise(w, self.bits, self.group_size)
        s = s.to(w.device, torch.float32)
        return (quantize_groupwise(w.float() * s, self.bits, self.group_size) / s).to(w.dtype)

    def describe(self) -> dict[str, Any]:
        how = "round-to-nearest on the same group grid" + (
            " (AWQ's activation scales are already folded into the weights; the scale search is not re-run)"
            if self.method == "awq"
            else ""
        )
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "requantized_with": how}


# ------------------------------------------------------------------------------------------------
# The edit
# ------------------------------------------------------------------------------------------------


@dataclass
class FusedSlice:
    """One expert's slice of a fused ``[experts, out, in]`` tensor, before and after an edit (CPU)."""

    tensor: str  # the fused parameter's qualified name, e.g. model.layers.3.mlp.experts.down_proj
    expert: int
    block_prefix: str  # the decoder block's qualified name and a dot, e.g. model.layers.3.
    before: torch.Tensor
    after: torch.Tensor


@dataclass
class AirdEdit:
    """An applied AIRD edit: per-matrix records, and how to undo it exactly."""

    block: int
    # one record per edited matrix, keyed by its role (attn_out, mlp_down) when the role has one
    # matrix, else by "<role>:<matrix>" (e.g. "mlp_down:mlp.experts.down_proj[3]")
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module name -> stored tensors
    # slices of fused expert tensors: a checkpoint may store each expert as its own tensor, under
    # other names (see repair.checkpoint)
    slices: list[FusedSlice] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def per_role(self, key: str) -> dict[str, Any]:
        """``{role: record[key]}`` (the same for every matrix of a role: ``alpha``, ``gain``)."""
        out: dict[str, Any] = {}
        for rec in self.records.values():
            out.setdefault(rec["role"], rec[key])
        return out

    def remove(self) -> None:
        """Restore every edited matrix bit for bit (idempotent)."""
        while self._undo:
            self._undo.pop()()


def _module_name(model: nn.Module, mod: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is mod:
            return name
    raise UserError("the edited projection is not a named module of the model")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def edit_block_index(direction_layer: int, placement: str, n_layers: int) -> int:
    """The decoder block AIRD edits for a direction read at the input of block ``direction_layer``."""
    if placement not in PLACEMENTS:
        raise UserError(f"unknown AIRD placement {placement!r}; use source or previous")
    block = direction_layer if placement == "source" else direction_layer - 1
    if not 0 <= block < n_layers:
        where = "the embedding writes that stream" if block < 0 else "there is no block after the last"
        raise UserError(
            f"placement {placement!r} puts AIRD at block {block} for a direction at layer "
            f"{direction_layer}, but {where}; use the other placement"
        )
    return block


def _edit_int8(
    model: nn.Module, name: str, mod: nn.Module, target: torch.Tensor, keep_zeros: bool, edit: AirdEdit
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Replace the int8 layer ``name`` by an :class:`Int8Linear` holding ``target`` requantized
    (row-wise absmax); the original layer is put back on removal."""
    from refusalkit.models.int8 import Int8Linear, quantize_rows

    w = dense_weight(mod)
    cb, scb = quantize_rows(target.float())
    if keep_zeros:  # a zero int8 weight stays zero
        cb = torch.where(_int8_parts(mod)[0] == 0, torch.zeros_like(cb), cb)
    threshold = float(getattr(getattr(mod, "state", None), "threshold", getattr(mod, "threshold", 6.0)))
    new = Int8Linear(
        mod.in_features,
        mod.out_features,
        mod.bias is not None,
        threshold,
        dtype=mod.bias.dtype if mod.bias is not None else torch.float32,
        device=cb.device,
    )
    new.weight, new.SCB = cb.to(w.device), scb.to(w.device)
    if mod.bias is not None:
        new.bias.data.copy_(mod.bias.data)
    parent, child = _parent(model, name)
    setattr(parent, child, new)
    edit._undo.append(lambda p=parent, c=child, m=mod: setattr(p, c, m))
    edit.tensors[name] = {"weight": new.weight.detach().cpu(), "SCB": new.SCB.detach().cpu()}
    return new.dequantized(), {
        "storage": "int8 (LLM.int8 row-wise absmax), requantized",
        "sparsity_after": float((new.weight == 0).double().mean()),
    }


def _edit_view(
    name: str,
    stored: torch.Tensor,
    target: torch.Tensor,
    keep_zeros: bool,
    requantize: Requantize | None,
    edit: AirdEdit,
    view_key: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Write ``target`` (back on the quantization grid with ``requantize``; an AWQ view's own grid by
    ``view_key``, ``<block>.<view>``) into ``stored`` — a layer's
    weight, a transposed view of a ``Conv1D``'s, or one expert's slice of a fused tensor — in place;
    the original is kept on the CPU for removal."""
    original = stored.detach().to("cpu", copy=True)
    new_w = target.to(stored.dtype)
    if requantize is not None:
        new_w = requantize(new_w, view_key)
        if keep_zeros:
            new_w = torch.where(stored == 0, torch.zeros_like(new_w), new_w)
    stored.copy_(new_w.to(stored.device))
    edit._undo.append(lambda s=stored, o=original: s.copy_(o.to(s.device)))
    storage = "dense" + (f", requantized ({requantize.method}, {requantize.bits} bits)" if requantize else "")
    return stored.float(), {"storage": storage, "sparsity_after": float((stored == 0).double().mean())}


def _role(writer: Writer) -> str:
    """Which of the paper's two α a writer gets: the MLP's (``mlp_down``) for an MLP, an expert or
    a shared expert; the attention output's (``attn_out``) for attention and a state-space mixer."""
    return "mlp_down" if writer.kind == "mlp" else "attn_out"


@torch.no_grad()
def apply_aird(
    model: nn.Module,
    direction: torch.Tensor,
    block: int,
    *,
    alphas: dict[str, float] | None = None,
    unit: bool = False,
    keep_zeros: bool = False,
    requantize: Requantize | None = None,
) -> AirdEdit:
    """Apply Eq. 4, ``W <- W + alpha r r^T W``, to every matrix of decoder block ``block`` that writes
    to the residual stream: the attention-output and MLP-down projections (``alphas["attn_out"]``,
    ``alphas["mlp_down"]``), and in other layouts every expert's and a shared expert's down
    projection (the MLP's α) or a state-space mixer's output projection (attention's α).

    Dense layers are edited in place (their original weights kept on the CPU for
    :meth:`AirdEdit.remove`); int8 layers are replaced by a pure-PyTorch
    :class:`~refusalkit.models.int8.Int8Linear` holding the requantized edit, and put back on
    removal. ``requantize`` returns fake-quantized (AWQ / RTN) matrices to their grid.
    """
    alphas = dict(PAPER_ALPHAS if alphas is None else alphas)
    r = direction.detach().double().flatten()
    if unit:
        r = r / r.norm()
    writers = block_writers(decoder_layers(model)[block], r.numel())
    per_role: dict[str, int] = {}
    for wr in writers:
        per_role[_role(wr)] = per_role.get(_role(wr), 0) + 1
    edit = AirdEdit(block=block)
    fused: dict[str, torch.Tensor] = {}  # qualified name -> the whole fused parameter
    try:
        for wr in writers:
            rec = _edit_writer(model, wr, r, float(alphas[_role(wr)]), keep_zeros, requantize, edit, block, fused)
            role = _role(wr)
            edit.records[role if per_role[role] == 1 else f"{role}:{wr.name}"] = rec
        for qual, p in fused.items():
            mname, _, pname = qual.rpartition(".")
            edit.tensors.setdefault(mname, {})[pname] = p.detach().cpu().clone()
    except BaseException:
        edit.remove()
        raise
    return edit


def _edit_writer(
    model: nn.Module,
    wr: Any,
    r: torch.Tensor,
    alpha: float,
    keep_zeros: bool,
    requantize: Requantize | None,
    edit: AirdEdit,
    block: int,
    fused: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Eq. 4 on one writer ``wr`` of block ``block`` (its original kept in ``edit``; a fused expert
    tensor's whole parameter noted in ``fused``); the writer's record: shape, zeros, the intended and
    realized change, the gain, and what survives requantization."""
    mod = wr.module
    mname = _module_name(model, mod)
    name = mname if not wr.fused else f"{mname}.{wr.param}[{wr.expert}]"
    w = dense_weight(mod) if _is_int8(mod) else wr.weight().detach().to(torch.float32, copy=True)
    intended = aird_delta(w, r, alpha, keep_zeros)
    rec: dict[str, Any] = {
        "module": name,
        "role": _role(wr),
        "alpha": alpha,
        "shape": list(w.shape),
        "sparsity_before": _stored_zeros(mod) if _is_int8(mod) else float((wr.weight() == 0).double().mean()),
    }
    if _is_int8(mod):
        after, more = _edit_int8(model, mname, mod, w.double() + intended, keep_zeros, edit)
    else:
        before = wr.weight().detach().to("cpu", copy=True) if wr.fused else None
        view = wr.name.replace("[", ".").rstrip("]")  # as compression names it: mlp.experts.down_proj.3
        after, more = _edit_view(
            name, wr.weight(), w.double() + intended, keep_zeros, requantize, edit, f"{block}.{view}"
        )
        if wr.fused:
            qual = f"{mname}.{wr.param}"
            fused[qual] = getattr(mod, wr.param)
            after_w = wr.weight().detach().to("cpu", copy=True)
            block_prefix = f"{_module_name(model, decoder_layers(model))}.{block}."
            edit.slices.append(FusedSlice(qual, int(wr.expert), block_prefix, before, after_w))
        else:
            edit.tensors[mname] = {"weight": mod.weight.detach().cpu().clone()}
    rec.update(more)
    if _is_int8(mod) or requantize is not None:
        rec["quantization"] = survival(w, after, intended)
    realized = after.double() - w.double()
    rec.update(
        delta_norm=float(realized.norm()),
        intended_delta_norm=float(intended.norm()),
        rel_delta=float(realized.norm() / w.double().norm().clamp(min=1e-30)),
        gain=alpha * float(r @ r),
    )
    return rec
