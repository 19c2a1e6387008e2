"""Plain PyTorch hooks for reading and steering the residual stream.

Every intervention is a list of ``(module, fn)`` pairs passed to :func:`add_hooks`, a context
manager that always removes them, also after an exception.

Notation (Arditi et al. 2024, §2.4): ``r`` is a difference-in-means direction and
``r̂ = r / ‖r‖``.

* Directional ablation (their Eq. 4): ``x' = x − r̂ r̂ᵀ x`` applied to the input of every
  decoder block and to the outputs of every attention and MLP module, so no component along
  ``r̂`` is ever written to the residual stream.
* Activation addition (their Eq. 5): ``x' = x + α r`` at the input of the source block only,
  at every token position, with the raw (un-normalized) ``r`` and ``α = 1`` by default.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .models import attn_module, decoder_layers, mlp_module

Hook = tuple[nn.Module, Callable]


@contextlib.contextmanager
def add_hooks(pre_hooks: Sequence[Hook] = (), fwd_hooks: Sequence[Hook] = ()) -> Iterator[None]:
    """Register forward pre-hooks and forward hooks for the duration of the block."""
    handles = []
    try:
        for module, fn in pre_hooks:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in fwd_hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


class _OnDevice:
    """A direction cached per (device, dtype), so a model spread over GPUs needs no copies per call."""

    def __init__(self, v: torch.Tensor):
        self.v = v.detach()
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=like.device, dtype=like.dtype)
        return self._cache[key]


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``x − (x·r̂) r̂`` along the last dimension (``unit`` must have norm 1)."""
    return x - (x @ unit).unsqueeze(-1) * unit


def _first(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def _ablate_input_pre_hook(unit: _OnDevice) -> Callable:
    def hook(module, args, kwargs):
        x, positional = _first(args, kwargs)
        x = project_out(x, unit(x))
        if positional:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def _ablate_output_hook(unit: _OnDevice) -> Callable:
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (project_out(output[0], unit(output[0])), *output[1:])
        return project_out(output, unit(output))

    return hook


def _add_input_pre_hook(vector: _OnDevice, coeff: float) -> Callable:
    def hook(module, args, kwargs):
        x, positional = _first(args, kwargs)
        x = x + coeff * vector(x)
        if positional:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def ablation_hooks(model: nn.Module, direction: torch.Tensor) -> tuple[list[Hook], list[Hook]]:
    """Hooks that ablate ``direction`` everywhere (Eq. 4): ``(pre_hooks, fwd_hooks)``."""
    unit = _OnDevice(direction.float() / direction.float().norm())
    blocks = decoder_layers(model)
    pre = [(b, _ablate_input_pre_hook(unit)) for b in blocks]
    fwd = [(attn_module(b), _ablate_output_hook(unit)) for b in blocks]
    fwd += [(mlp_module(b), _ablate_output_hook(unit)) for b in blocks]
    return pre, fwd


def addition_hooks(model: nn.Module, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> tuple[list[Hook], list[Hook]]:
    """Hooks that add ``coeff · direction`` at the input of block ``layer`` (Eq. 5)."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1}")
    return [(blocks[layer], _add_input_pre_hook(_OnDevice(direction.float()), coeff))], []


def merge(*hook_sets: tuple[list[Hook], list[Hook]]) -> tuple[list[Hook], list[Hook]]:
    pre: list[Hook] = []
    fwd: list[Hook] = []
    for p, f in hook_sets:
        pre += p
        fwd += f
    return pre, fwd


# ------------------------------------------------------------------------------------------------
# Grouped hooks: several directions in one batch, one per group of rows. The batched forward
# (forward.forward_last with ``groups=``) sets ``RowGroups.index`` (group of each row) before
# every model call. Scoring many candidates per forward gives large matmuls on a CPU.
# ------------------------------------------------------------------------------------------------


class RowGroups:
    """The group (candidate) index of every row of the batch being run; set by forward_last."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of ``table [groups, d]`` for the current batch, as ``[batch, 1, d]``."""
        assert self.index is not None, "RowGroups.index is set by forward_last(groups=...)"
        return table[self.index.to(table.device)].unsqueeze(1)


def _grouped_ablate_pre(units: _OnDevice, rows: RowGroups) -> Callable:
    def hook(module, args, kwargs):
        x, positional = _first(args, kwargs)
        u = rows.pick(units(x))
        x = x - (x * u).sum(-1, keepdim=True) * u
        return ((x, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": x})

    return hook


def _grouped_ablate_out(units: _OnDevice, rows: RowGroups) -> Callable:
    def proj(x: torch.Tensor) -> torch.Tensor:
        u = rows.pick(units(x))
        return x - (x * u).sum(-1, keepdim=True) * u

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (proj(output[0]), *output[1:])
        return proj(output)

    return hook


def grouped_ablation_hooks(model: nn.Module, directions: torch.Tensor, rows: RowGroups) -> tuple[list[Hook], list[Hook]]:
    """Like :func:`ablation_hooks`, with direction ``directions[g]`` for the rows of group ``g``."""
    d = directions.float()
    units = _OnDevice(d / d.norm(dim=-1, keepdim=True))
    blocks = decoder_layers(model)
    pre = [(b, _grouped_ablate_pre(units, rows)) for b in blocks]
    fwd = [(attn_module(b), _grouped_ablate_out(units, rows)) for b in blocks]
    fwd += [(mlp_module(b), _grouped_ablate_out(units, rows)) for b in blocks]
    return pre, fwd


def grouped_addition_hooks(model: nn.Module, directions: torch.Tensor, layers: Sequence[int], rows: RowGroups,
                           coeff: float = 1.0) -> tuple[list[Hook], list[Hook]]:
    """Like :func:`addition_hooks`: group ``g`` gets ``coeff · directions[g]`` at block ``layers[g]``."""
    blocks = decoder_layers(model)
    pre = []
    for j, block in enumerate(blocks):
        mask = torch.tensor([float(layer == j) for layer in layers]).unsqueeze(-1)
        if mask.any():
            table = _OnDevice(directions.float() * mask * coeff)

            def hook(module, args, kwargs, table=table):
                x, positional = _first(args, kwargs)
                x = x + rows.pick(table(x))
                return ((x, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": x})

            pre.append((block, hook))
    return pre, []
