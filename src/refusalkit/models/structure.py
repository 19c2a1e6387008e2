"""Where a decoder's parts are: its blocks, the branches of each block that add to the residual
stream, and the weights that write to it — found from the modules and their shapes, never from a
model's name.

A block adds one or more **branches** to its residual stream: attention, an MLP (dense or a
mixture of experts), or a state-space mixer (Mamba's ``mixer``, a hybrid's ``mamba``). A branch's
output may pass through a **post-norm** before the addition (Gemma 2/3, OLMo 2): an RMS norm that
rescales each coordinate by its gain ``g``. The branches' **writers** are the matrices whose
outputs make up the branch output: the attention output projection, the MLP down projection,
every expert's down projection (one slice of a fused ``[experts, d_model, d_ff]`` tensor, or one
``nn.Linear`` per expert), a shared expert's down projection, the SSM block's output projection.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from refusalkit.core.errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList whose length is ``config.num_hidden_layers``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}; this architecture is not supported")
    return best


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MIXER_NAMES = ("mixer", "mamba", "ssm")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h")


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise UserError(f"cannot find the {what} of block {type(block).__name__} (looked for {', '.join(names)})")


def attn_module(block: nn.Module) -> nn.Module:
    return _child(block, _ATTN_NAMES, "attention module")


def mlp_module(block: nn.Module) -> nn.Module:
    return _child(block, _MLP_NAMES, "MLP module")


def _residual_width(block: nn.Module) -> int | None:
    """The residual width of a block: the size of its norms' gains (every pre- or post-norm of a
    block normalizes the residual stream), None when it has no such norm."""
    sizes = [
        m.weight.numel()
        for _, m in block.named_children()
        if not list(m.children()) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 1
    ]
    return max(set(sizes), key=sizes.count) if sizes else None


def branches(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's residual branches in order: ``(kind, module)`` with kind ``attn``, ``mixer``
    (a state-space or other sequence mixer) or ``mlp``. A block with none of them is a one-line
    error naming it."""
    found: list[tuple[str, nn.Module]] = []
    for kind, names in (("attn", _ATTN_NAMES), ("mixer", _MIXER_NAMES), ("mlp", _MLP_NAMES)):
        for name in names:
            mod = getattr(block, name, None)
            if isinstance(mod, nn.Module) and mod not in [m for _, m in found]:
                found.append((kind, mod))
                break
    # a further child that holds a matrix writing residual-width outputs is a branch too (Granite 4's
    # shared_mlp beside its mixture of experts): an MLP unless it is named as one of the above
    d_model = _residual_width(block)
    if d_model is not None:
        for _, mod in block.named_children():
            if mod in [m for _, m in found]:
                continue
            if any(_is_linear(m) and _out_features(m) == d_model for m in mod.modules()):
                found.append(("mlp", mod))
    if not found:
        children = ", ".join(n for n, _ in block.named_children()) or "none"
        raise UserError(
            f"cannot place the parts of block {type(block).__name__} (children: {children}): refusalkit finds "
            f"attention ({'/'.join(_ATTN_NAMES)}), sequence mixers ({'/'.join(_MIXER_NAMES)}) and MLPs "
            f"({'/'.join(_MLP_NAMES)}); this architecture is not supported"
        )
    return found


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer storing its weight ``[in, out]`` (``y = x W + b``)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2


def _is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' layers subclass it), refusalkit's own ``Int8Linear`` or a ``Conv1D``."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Int8Linear" or is_conv1d(m)


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[1] if is_conv1d(m) else m.out_features


@dataclass
class Writer:
    """One matrix that writes to the residual stream: ``weight()`` is ``[d_model, d_in]``.

    ``expert`` is the index into a fused ``[experts, d_model, d_in]`` parameter (``param``), or
    None for an ``nn.Linear`` (then ``param`` is ``"weight"`` and ``bias`` may be set)."""

    name: str  # qualified within the block, e.g. "mlp.experts.down_proj[3]"
    kind: str  # the branch: attn, mixer, mlp
    module: nn.Module
    param: str = "weight"
    expert: int | None = None

    def weight(self) -> torch.Tensor:
        """The ``[d_model, d_in]`` matrix, a view of the stored one (edits through it land in place)."""
        p = getattr(self.module, self.param)
        if is_conv1d(self.module):
            return p.data.t()
        return p.data if self.expert is None else p.data[self.expert]

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None) if self.expert is None else None
        return None if b is None else b.data

    @property
    def fused(self) -> bool:
        return self.expert is not None


def branch_writers(kind: str, branch: nn.Module, d_model: int, prefix: str = "") -> list[Writer]:
    """The writers inside one branch: every ``nn.Linear`` named like an output projection whose
    output is the residual width (nested ones too: each expert's, a shared expert's), and every
    fused 3-D parameter so named whose middle axis is the residual width (one writer per expert).
    Without a named one, the only linear layer of the residual width; else a one-line error."""
    out: list[Writer] = []
    linears: list[tuple[str, nn.Module]] = []
    for name, m in branch.named_modules():
        last = name.rsplit(".", 1)[-1]
        if _is_linear(m) and _out_features(m) == d_model:
            linears.append((name, m))
            if last in _OUT_PROJ_NAMES:
                out.append(Writer(f"{prefix}{name}", kind, m))
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim == 3 and p.shape[1] == d_model and pname in _OUT_PROJ_NAMES:
                full = f"{prefix}{name + '.' if name else ''}{pname}"
                out += [Writer(f"{full}[{e}]", kind, m, pname, e) for e in range(p.shape[0])]
    if not out and len(linears) == 1:
        name, m = linears[0]
        out.append(Writer(f"{prefix}{name}", kind, m))
    if not out:
        raise UserError(
            f"cannot find the projection writing to the residual stream in {type(branch).__name__} "
            f"({prefix.rstrip('.') or kind}); this architecture is not supported"
        )
    return out


def block_writers(block: nn.Module, d_model: int) -> list[Writer]:
    """Every writer of every branch of ``block``."""
    out: list[Writer] = []
    for kind, mod in branches(block):
        name = next(n for n, m in block.named_children() if m is mod)
        out += branch_writers(kind, mod, d_model, f"{name}.")
    return out


def _out_proj(kind: str, branch: nn.Module, d_model: int, what: str) -> nn.Module:
    writers = branch_writers(kind, branch, d_model)
    if any(w.fused for w in writers) or len(writers) > 1:
        raise UserError(
            f"the {what} of {type(branch).__name__} is not one matrix ({len(writers)} writers: "
            f"{', '.join(w.name for w in writers[:3])}{', …' if len(writers) > 3 else ''}); "
            "this operation supports dense blocks only so far"
        )
    return writers[0].module


def attn_out_proj(block: nn.Module, d_model: int) -> nn.Linear:
    """The attention output projection (writes to the residual stream), e.g. ``o_proj``."""
    return _out_proj("attn", attn_module(block), d_model, "attention output projection")


def mlp_down_proj(block: nn.Module, d_model: int) -> nn.Linear:
    """The MLP output projection (writes to the residual stream), e.g. ``down_proj``."""
    return _out_proj("mlp", mlp_module(block), d_model, "MLP down projection")


def fused_expert_params(block: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(qualified name, module, parameter)`` of every parameter of ``block`` with more than two
    axes outside convolutions: experts fused into one tensor (``[experts, out, in]``)."""
    return [
        (f"{mn + '.' if mn else ''}{pn}", m, p)
        for mn, m in block.named_modules()
        if not isinstance(m, (nn.Conv1d, nn.Conv2d))
        for pn, p in m.named_parameters(recurse=False)
        if p.ndim >= 3
    ]


def fused_weights(block: nn.Module) -> list[str]:
    """The names of :func:`fused_expert_params`: what ``nn.Linear``-based code would silently skip."""
    return [q for q, _, _ in fused_expert_params(block)]


# ------------------------------------------------------------------------------------------------
# post-norms: found by running the model once and seeing which norm reads a branch's output
# ------------------------------------------------------------------------------------------------

_POST_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_like(m: nn.Module, d_model: int) -> bool:
    w = getattr(m, "weight", None)
    return (
        not list(m.children()) and isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == d_model
    ) and not _is_linear(m)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def post_norms(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(branch module): norm}`` for every branch whose output passes through a norm before
    it is added to the residual stream (Gemma 2/3, OLMo 2). Found by one forward pass of four
    tokens: a norm of the block whose input is the very tensor a branch returned. Cached per model."""
    if model in _POST_NORMS:
        return _POST_NORMS[model]
    d_model = model.get_input_embeddings().weight.shape[1]
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    mods: dict[int, nn.Module] = {}
    handles = []
    # hooks already on the model (a capture, an intervention) must not see the probe: set aside
    # and put back (the same dicts, so their handles still remove them)
    stashed = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in stashed:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        for block in decoder_layers(model):
            for _, br in branches(block):
                mods[id(br)] = br
                handles.append(br.register_forward_hook(lambda m, a, o: outputs.__setitem__(id(m), _first(o))))
            for _, m in block.named_children():
                if _norm_like(m, d_model):
                    mods[id(m)] = m
                    handles.append(m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(id(m), _first(a))))
        emb = model.get_input_embeddings()
        ids = torch.arange(min(4, emb.weight.shape[0]), device=emb.weight.device).unsqueeze(0)
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for m, fwd, pre in stashed:
            m._forward_hooks, m._forward_pre_hooks = fwd, pre
    found: dict[int, nn.Module] = {}
    for nid, x in inputs.items():
        for bid, y in outputs.items():
            if x is y or (x.shape == y.shape and torch.equal(x, y)):
                found[bid] = mods[nid]
    _POST_NORMS[model] = found
    return found


def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The per-coordinate gain ``g`` of an RMS-type norm, ``norm(y) = g ⊙ y / rms(y)`` (float64,
    up to a positive scale), measured on two random vectors; a norm that is not of that form
    (LayerNorm's centring, say) is a one-line error naming it."""
    p = next(norm.parameters())
    gen = torch.Generator().manual_seed(0)
    ys = torch.randn(2, 1, d_model, generator=gen, dtype=torch.float64) + 0.5
    with torch.no_grad():
        outs = _first(norm(ys.to(p.device, p.dtype))).double().cpu().reshape(2, d_model)
    ys = ys.reshape(2, d_model)
    rms = ys.pow(2).mean(-1, keepdim=True).sqrt()
    gains = outs * rms / ys
    if not torch.allclose(gains[0], gains[1], rtol=1e-2, atol=1e-4 * float(gains.abs().max())):
        raise UserError(
            f"the post-norm {type(norm).__name__} is not an RMS norm (g ⊙ y / rms(y)); refusalkit cannot "
            "edit the weights before it exactly"
        )
    return gains.mean(0)
