"""Run calibration data through a decoder one block at a time.

The inputs of decoder block 0 are captured once (a pre-hook stops the forward there); then
each block runs on the stored hidden states, its linear layers' input statistics are gathered
with hooks, the block is compressed, and its outputs become the next block's inputs. Peak
memory is the model plus one block's calibration activations, never a second copy of the
model; with ``device_map='auto'`` each block runs on its own device.

Weights that are not ``nn.Linear`` layers reach the methods as :class:`AliasLinear` views of the
same storage, so every in-place edit lands in the model: each expert's slice of a fused
``[experts, out, in]`` tensor (a mixture of experts in transformers 5), and GPT-2's ``Conv1D``
(``[in, out]``). An expert's inputs are the tokens the router sent to it, caught where its slice
enters ``F.linear`` (:func:`functional_inputs`); the experts run their eager loop meanwhile
(:func:`eager_experts`), whose per-expert calls are what makes the routing visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from refusalkit.core.errors import UserError
from refusalkit.models.structure import decoder_layers, fused_expert_params, is_conv1d


class _Stop(Exception):
    pass


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class BlockInputs:
    """Hidden states entering the current block, in batches of equal-length samples."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _batches(samples: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of samples with equal length (no padding ever enters the statistics)."""
    by_len: dict[int, list[list[int]]] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for n in sorted(by_len):
        group = by_len[n]
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


@torch.no_grad()
def capture_inputs(
    model: nn.Module, samples: list[list[int]], batch_size: int = 8, dtype: torch.dtype | None = None
) -> BlockInputs:
    """The hidden states and keyword arguments with which the model calls decoder block 0 (the hidden
    states cast to ``dtype`` when given: float64 for :mod:`~refusalkit.compress.precision`)."""
    layers = decoder_layers(model)
    store = BlockInputs([], [])

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
        store.hidden.append(hidden.detach() if dtype is None else hidden.detach().to(dtype))
        store.kwargs.append(kw)
        raise _Stop

    dev = model.get_input_embeddings().weight.device
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in _batches(samples, batch_size):
            try:
                model(input_ids=torch.tensor(batch, device=dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return store


@torch.no_grad()
def run_block(layer: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every stored batch (on the block's device)."""
    dev = module_device(layer)
    outs = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        out = layer(h.to(dev), **_to(kw, dev))
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


class AliasLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a view of another module's storage: edits through it land in
    the model. ``fused`` is ``(parameter, expert)`` for one expert's slice of a fused expert tensor;
    ``source`` the module whose forward sees its inputs (a ``Conv1D``), None for a fused slice."""

    def __init__(self, weight: torch.Tensor, source: nn.Module | None = None, fused: tuple | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None
        object.__setattr__(self, "source", source)  # not a submodule: the alias owns nothing
        object.__setattr__(self, "fused", fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # only for tests; the model calls its own module
        return F.linear(x, self.weight)


def linear_layers(block: nn.Module, aliases: bool = True) -> dict[str, nn.Linear]:
    """Every linear map inside a decoder block, by qualified name (what compression touches): the
    ``nn.Linear`` layers and, with ``aliases``, :class:`AliasLinear` views of ``Conv1D`` layers and of
    each expert of a fused expert tensor (named ``<tensor>.<expert>``, e.g. ``mlp.experts.down_proj.3``).
    A fused tensor the experts apply transposed (``is_transposed``) is viewed ``[out, in]`` too."""
    out: dict[str, nn.Linear] = {}
    for n, m in block.named_modules():
        if isinstance(m, nn.Linear):
            out[n] = m
        elif aliases and is_conv1d(m):
            out[n] = AliasLinear(m.weight.data.t(), source=m)
    if aliases:
        for qual, m, p in fused_expert_params(block):
            transposed = bool(getattr(m, "is_transposed", False))
            for e in range(p.shape[0]):
                w = p.data[e].t() if transposed else p.data[e]
                out[f"{qual}.{e}"] = AliasLinear(w, fused=(p, e))
    return out


@contextlib.contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Run a transformers mixture of experts with its eager per-expert loop (``grouped_mm`` and other
    kernels hide which tokens each expert gets); the model's own setting is restored after."""
    get = getattr(model, "get_experts_implementation", None)
    if get is None or not any(fused_expert_params(b) for b in decoder_layers(model)):
        yield
        return
    before = get()
    try:
        model.set_experts_implementation("eager")
    except (ValueError, RuntimeError, ImportError):  # locked at load time: the routing check says so in one line
        yield
        return
    try:
        yield
    finally:
        model.set_experts_implementation(before)


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _Functional(TorchFunctionMode):
    """Inputs that reach a weight without a module's forward. Calls ``record(name, x)``

    * when a slice of a fused expert tensor enters ``F.linear``: ``x`` is exactly the tokens routed
      to that expert (after the gate's activation, for a down projection);
    * when an ``nn.Linear``'s weight is applied directly as ``W @ X`` (a state-space block's time-step
      projection): ``x`` is ``Xᵀ``, one row per token."""

    def __init__(self, linears: dict[str, nn.Linear], record: Callable[[str, torch.Tensor], None]):
        super().__init__()
        self.record = record
        self.slices: dict[tuple[int, tuple[int, ...]], str] = {}
        self.weights: dict[int, str] = {}
        for name, lin in linears.items():
            if isinstance(lin, AliasLinear):
                if lin.fused is not None:
                    p, e = lin.fused
                    w = p.data[e]
                    self.slices[(w.data_ptr(), tuple(w.shape))] = name
            else:
                self.weights[id(lin.weight)] = name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.slices:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.slices.get((w.data_ptr(), tuple(w.shape))) if isinstance(w, torch.Tensor) else None
            if name is not None:
                self.record(name, args[0] if args else kwargs["input"])
        elif func in _MATMULS and len(args) == 2 and id(args[0]) in self.weights:
            self.record(self.weights[id(args[0])], args[1].transpose(-1, -2))
        return func(*args, **kwargs)


@contextlib.contextmanager
def functional_inputs(linears: dict[str, nn.Linear], record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While inside, the inputs :class:`_Functional` sees go to ``record``."""
    with _Functional(linears, record):
        yield


class InputStats:
    """Per-linear statistics of the inputs a block's linears see, gathered by forward pre-hooks (on the
    ``Conv1D`` behind an alias) and, for fused experts and weights applied without their module, by :func:`functional_inputs`.

    ``update(name, x)`` is called with the 2-D input ``[tokens, in_features]`` (float32).
    Linears that receive the very same input tensor (q/k/v, gate/up) share one statistic:
    ``owner[name]`` is the linear whose statistic is used. ``tokens[name]`` counts the rows seen; an
    expert the router never chose has none.

    Per batch, ``order`` lists the linears whose own module saw an input (its pre-hook), once per
    call, and ``functional`` counts the inputs :func:`functional_inputs` saw; ``stop_at`` names the
    linear whose pre-hook ends the batch (:func:`gather`).
    """

    def __init__(self, linears: dict[str, nn.Linear], update: Callable[[str, torch.Tensor], None]):
        self.linears = linears
        self.update = update
        self.owner: dict[str, str] = {}
        self.tokens: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self.order: list[str] = []
        self.functional = 0
        self.stop_at: str | None = None

    def record(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            owner = next((n for t, n in self._seen if t is x), name)
            self.owner[name] = owner
        self._seen.append((x, name))  # keeps x alive for the batch: identity checks stay valid
        rows = x.detach().reshape(-1, x.shape[-1])
        self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
        if self.owner[name] == name and rows.shape[0]:
            self.update(name, rows.float())

    def record_functional(self, name: str, x: torch.Tensor) -> None:
        self.functional += 1
        self.record(name, x)

    def _hook(self, name: str) -> Callable:
        def fn(_mod: nn.Module, args: tuple) -> None:
            self.record(name, args[0])
            self.order.append(name)
            if name == self.stop_at:
                raise _Stop

        return fn

    def hooks(self) -> Iterator[Any]:
        for n, m in self.linears.items():
            if isinstance(m, AliasLinear):
                if m.source is not None:
                    yield m.source.register_forward_pre_hook(self._hook(n))
            else:
                yield m.register_forward_pre_hook(self._hook(n))

    def last_if_each_once(self) -> str | None:
        """After a whole pass over one batch: the linear called last, if every linear of the block
        was called exactly once and by its own module (then nothing after that call feeds a
        statistic); else None."""
        once = self.functional == 0 and sorted(self.order) == sorted(self.linears)
        return self.order[-1] if once else None

    def end_batch(self) -> None:
        self._seen.clear()
        self.order.clear()
        self.functional = 0


def signature(layer: nn.Module, linears: dict[str, nn.Linear]) -> tuple:
    """What fixes the order in which a block calls its linears: its class and its linears' names,
    kinds and shapes (blocks of one model that agree on these run the same forward code)."""
    return (type(layer).__module__, type(layer).__qualname__) + tuple(
        (n, type(m).__name__, tuple(m.weight.shape)) for n, m in linears.items()
    )


@torch.no_grad()
def gather(
    layer: nn.Module, inputs: BlockInputs, stats: InputStats, plans: dict[tuple, str | None] | None = None
) -> None:
    """Run the block on every batch with the statistics hooks attached (outputs discarded).

    Only the linears' inputs are wanted, so with ``plans`` (one dict shared by the blocks of one
    model) a batch ends at the pre-hook of the block's last linear: that linear and everything
    after it are skipped (in a Llama-style block the MLP's down projection, 29% of the block's
    matmul FLOPs on the default model). This is done only once a whole pass over a batch (this
    block's first, or one of an earlier block with the same :func:`signature`) saw every linear
    called exactly once by its own module (:meth:`InputStats.last_if_each_once`); a block that
    calls a linear twice, routes tokens to fused experts or applies a weight without its module
    always runs whole. The statistics are the same bit for bit either way (tested)."""
    handles = list(stats.hooks())
    dev = module_device(layer)
    sig = signature(layer, stats.linears) if plans is not None else None
    try:
        with functional_inputs(stats.linears, stats.record_functional):
            for h, kw in zip(inputs.hidden, inputs.kwargs):
                stats.stop_at = plans.get(sig) if plans is not None else None
                try:
                    layer(h.to(dev), **_to(kw, dev))
                except _Stop:
                    if set(stats.order) != set(stats.linears):  # the learned order did not hold for this batch
                        raise RuntimeError(
                            f"calibration stopped {type(layer).__name__} before each of its linears saw its input"
                        ) from None
                if plans is not None and sig not in plans:
                    plans[sig] = stats.last_if_each_once()
                stats.end_batch()
    finally:
        stats.stop_at = None
        for hd in handles:
            hd.remove()


def expert_tokens(step: Any, tokens: dict[str, int], rule: str) -> list[str]:
    """Record, per fused expert tensor of the block, how many calibration tokens reached each expert
    (``step.notes["experts"]``, with ``rule``: what was done to an expert that received none); return
    the experts that received none. A linear that is not an expert and saw no input, or a fused
    tensor none of whose experts was ever seen although the block ran, is an error: its layout hides
    the routing, and compressing it blindly would be silent."""
    by_tensor: dict[str, list[int]] = {}
    missing: list[str] = []
    for n, lin in step.linears.items():
        seen = tokens.get(n, 0)
        if isinstance(lin, AliasLinear) and lin.fused is not None:
            by_tensor.setdefault(n.rsplit(".", 1)[0], []).append(seen)
            if not seen:
                missing.append(n)
        elif not seen:
            raise UserError(
                f"layer {step.index} {n} received no calibration input, so {step.spec.method} cannot calibrate "
                "it; this block's layout is not supported"
            )
    for qual, counts in by_tensor.items():
        if not any(counts):
            raise UserError(
                f"cannot see which calibration tokens reach the experts of layer {step.index} {qual} (they do not "
                f"run through F.linear); {step.spec.method} cannot calibrate them: use magnitude or rtn"
            )
        rec = step.notes.setdefault("experts", {"uncalibrated_rule": rule, "tensors": {}})
        rec["tensors"][f"{step.index}.{qual}"] = {
            "tokens": counts,
            "uncalibrated": [int(n.rsplit(".", 1)[1]) for n in missing if n.rsplit(".", 1)[0] == qual],
        }
    return missing


def advance(inputs: BlockInputs, outputs: list[torch.Tensor]) -> BlockInputs:
    return BlockInputs(outputs, inputs.kwargs)
