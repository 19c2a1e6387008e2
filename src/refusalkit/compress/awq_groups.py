"""AWQ's scaling groups (Lin et al. 2023): which linears share an input, and the module whose output
scale folds into them, found by tracing one block's forward on calibration data
(:func:`find_scale_groups`); and the checks that a fold leaves the block's function unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusalkit.compress.blockwise import BlockInputs, _to, module_device

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
