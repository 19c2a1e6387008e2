"""Plain PyTorch hooks for reading and steering the residual stream.

Every intervention is a list of ``(module, fn)`` pairs passed to :func:`add_hooks`, a context
manager that always removes them, also after an exception.

Notation (Arditi et al. 2024, §2.4): ``r`` is a difference-in-means direction and
``r̂ = r / ‖r‖``.

* Directional ablation (their Eq. 4): ``x' = x − r̂ r̂ᵀ x`` applied to the input of every
  decoder block and to every output added to the residual stream — of each attention, MLP (or
  mixture of experts) and state-space mixer, after its post-norm where a block has one — so no
  component along ``r̂`` is ever written to the residual stream.
* Activation addition (their Eq. 5): ``x' = x + α r`` at the input of the source block only,
  at every token position, with the raw (un-normalized) ``r`` and ``α = 1`` by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from refusalkit.models.structure import branches, decoder_layers, post_norms

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


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``x − (x·r̂) r̂`` along the last dimension. ``unit`` (norm 1) is ``[d]``, or ``[batch, 1, d]``
    for one direction per row."""
    return x - (x * unit).sum(-1, keepdim=True) * unit


class RowGroups:
    """The group (candidate) index of every row of the batch being run; set by forward_last.

    Grouped hooks apply direction ``g`` to the rows of group ``g``, so several candidates are
    scored in one batched forward (large matmuls on a CPU).
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of ``table [groups, d]`` for the current batch, as ``[batch, 1, d]``."""
        assert self.index is not None, "RowGroups.index is set by forward_last(groups=...)"
        return table[self.index.to(table.device)].unsqueeze(1)


def _vectors(table: torch.Tensor, rows: RowGroups | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``like -> vector(s)`` on ``like``'s device and dtype: ``table [d]``, or ``table [groups, d]``
    picked per row through ``rows``. Copies are cached per (device, dtype), so a model spread
    over several GPUs needs no copy per call."""
    table = table.detach()
    cache: dict[tuple, torch.Tensor] = {}

    def get(like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = table.to(device=like.device, dtype=like.dtype)
        return cache[key] if rows is None else rows.pick(cache[key])

    return get


def _edit_input(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) that replaces a block's hidden-states input."""

    def hook(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return hook


def _edit_output(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A forward hook that replaces a module's output (or the first element of a tuple output)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


def residual_outputs(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are added to the residual stream: each branch of each block
    (attention, MLP or mixture of experts, state-space mixer), or its post-norm where it has one."""
    norms = post_norms(model)
    return [norms.get(id(br), br) for b in decoder_layers(model) for _, br in branches(b)]


def _ablation(model: nn.Module, units: Callable) -> tuple[list[Hook], list[Hook]]:
    ablate = lambda x: project_out(x, units(x))  # noqa: E731
    pre = [(b, _edit_input(ablate)) for b in decoder_layers(model)]
    fwd = [(m, _edit_output(ablate)) for m in residual_outputs(model)]
    return pre, fwd


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    return v / v.norm(dim=-1, keepdim=True)


def ablation_hooks(model: nn.Module, direction: torch.Tensor) -> tuple[list[Hook], list[Hook]]:
    """Hooks that ablate ``direction`` everywhere (Eq. 4): ``(pre_hooks, fwd_hooks)``."""
    return _ablation(model, _vectors(_unit(direction), None))


def grouped_ablation_hooks(
    model: nn.Module, directions: torch.Tensor, rows: RowGroups
) -> tuple[list[Hook], list[Hook]]:
    """Like :func:`ablation_hooks`, with direction ``directions[g]`` for the rows of group ``g``."""
    return _ablation(model, _vectors(_unit(directions), rows))


def addition_hooks(
    model: nn.Module, direction: torch.Tensor, layer: int, coeff: float = 1.0
) -> tuple[list[Hook], list[Hook]]:
    """Hooks that add ``coeff · direction`` at the input of block ``layer`` (Eq. 5)."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1}")
    vec = _vectors(direction.float() * coeff, None)
    return [(blocks[layer], _edit_input(lambda x: x + vec(x)))], []


def grouped_addition_hooks(
    model: nn.Module, directions: torch.Tensor, layers: Sequence[int], rows: RowGroups, coeff: float = 1.0
) -> tuple[list[Hook], list[Hook]]:
    """Like :func:`addition_hooks`: group ``g`` gets ``coeff · directions[g]`` at block ``layers[g]``."""
    pre = []
    for j, block in enumerate(decoder_layers(model)):
        mask = torch.tensor([float(layer == j) for layer in layers]).unsqueeze(-1)
        if mask.any():
            vec = _vectors(directions.float() * mask * coeff, rows)
            pre.append((block, _edit_input(lambda x, vec=vec: x + vec(x))))
    return pre, []


def intervention_hooks(
    model: nn.Module,
    interventions: Sequence[tuple[torch.Tensor | None, tuple[torch.Tensor, int] | None]],
    rows: RowGroups,
) -> tuple[list[Hook], list[Hook]]:
    """Hooks for groups of rows under different interventions in one batch: group ``g``'s
    ``(ablate, add)`` is a direction ablated everywhere (Eq. 4) or None, and ``(direction, layer)``
    added at the input of that block (Eq. 5) or None. A group without an ablation projects out a zero
    vector and one without an addition adds zeros: exact no-ops (``x − (x·0)·0 = x``, ``x + 0 = x``)."""
    ab = [a for a, _ in interventions if a is not None]
    ad = [a for _, a in interventions if a is not None]
    d = (ab or [a[0] for a in ad] or [torch.zeros(1)])[0].shape[-1]
    hook_sets = []
    if ab:
        units = torch.stack([torch.zeros(d) if a is None else _unit(a) for a, _ in interventions])
        hook_sets.append(_ablation(model, _vectors(units, rows)))
    if ad:
        vecs = torch.stack([torch.zeros(d) if a is None else a[0].float() for _, a in interventions])
        layers = [0 if a is None else int(a[1]) for _, a in interventions]
        n = len(decoder_layers(model))
        if any(not 0 <= layer < n for layer in layers):
            raise ValueError(f"an addition layer is outside 0..{n - 1}")
        hook_sets.append(grouped_addition_hooks(model, vecs, layers, rows))
    return merge(*hook_sets)


def merge(*hook_sets: tuple[list[Hook], list[Hook]]) -> tuple[list[Hook], list[Hook]]:
    pre: list[Hook] = []
    fwd: list[Hook] = []
    for p, f in hook_sets:
        pre += p
        fwd += f
    return pre, fwd
