"""Where a decoder's parts are: its blocks, their attention and MLP, and the projections that write to
the residual stream — found from the modules and their shapes, never from a model's name."""

from __future__ import annotations

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


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise UserError(f"cannot find the {what} of block {type(block).__name__} (looked for {', '.join(names)})")


def attn_module(block: nn.Module) -> nn.Module:
    return _child(block, _ATTN_NAMES, "attention module")


def mlp_module(block: nn.Module) -> nn.Module:
    return _child(block, _MLP_NAMES, "MLP module")


def _is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' layers subclass it) or refusalkit's own ``Int8Linear``."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Int8Linear"


def _out_proj(module: nn.Module, d_model: int, what: str) -> nn.Linear:
    linears = {name: m for name, m in module.named_modules() if _is_linear(m) and m.out_features == d_model}
    for name in _OUT_PROJ_NAMES:
        if name in linears:
            return linears[name]
    if len(linears) == 1:
        return next(iter(linears.values()))
    raise UserError(f"cannot find the {what} writing to the residual stream in {type(module).__name__}")


def attn_out_proj(block: nn.Module, d_model: int) -> nn.Linear:
    """The attention output projection (writes to the residual stream), e.g. ``o_proj``."""
    return _out_proj(attn_module(block), d_model, "attention output projection")


def mlp_down_proj(block: nn.Module, d_model: int) -> nn.Linear:
    """The MLP output projection (writes to the residual stream), e.g. ``down_proj``."""
    return _out_proj(mlp_module(block), d_model, "MLP down projection")


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")


_MLP_NAMES = ("mlp", "feed_forward", "ffn")


_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h")
