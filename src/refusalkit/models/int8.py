"""LLM.int8 (Dettmers et al. 2022): vector-wise int8 matmul with 16-bit outlier features.

Weights are stored row-wise (vector-wise) absmax int8: ``CB = round(127 W / SCB)``, ``SCB`` the
absmax of every output row. At run time (Eq. 5-6 of the paper) the input's outlier feature
dimensions ``O = {j : max_t |X_tj| >= threshold}`` are multiplied in 16-bit, the rest is
quantized per token (row-wise absmax) and multiplied in int8:

    Y = X[:, O] W[:, O]^T + (1 / (127^2)) * (c_X c_W^T) o (Q(X[:, ~O]) Q(W[:, ~O])^T)

The checkpoint uses the layout of ``transformers``' bitsandbytes 8-bit serialization (``weight``
int8, ``SCB`` float32, ``quantization_config`` in ``config.json``), so ``transformers`` with
bitsandbytes loads it; without bitsandbytes refusalkit runs it with :class:`Int8Linear`. As in
bitsandbytes' int8 inference, the weight columns of outlier features are the dequantized int8
weights (the paper keeps them in 16-bit; see the README).

This module holds the storage (:class:`Int8Linear`) and loading; the compression method is
:mod:`refusalkit.compress.int8`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusalkit.core.errors import UserError


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken native library
        return False
    return True


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise absmax int8 of a weight matrix: (CB int8 [out, in], SCB float32 [out])."""
    scb = w.detach().float().abs().amax(dim=1)
    cb = torch.round(w.detach().float() * (127.0 / scb.clamp(min=1e-12)).unsqueeze(1)).to(torch.int8)
    return cb, scb


# Products summed in one float32 partial sum stay exact while the sum stays below 2^24.
_EXACT_F32_TERMS = 2**24 // (127 * 127)  # 1040 products of two int8 codes


def _int_mm_is_fast() -> bool:
    """Whether ``torch._int_mm`` beats float32 on this CPU: with AVX-512 (VNNI) kernels it was 2-4x
    faster than the float path; with AVX2 only it was about 25x slower (measured; see the README)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap.startswith("AVX512") or cap.startswith("AMX")


def int8_matmul(
    qa: torch.Tensor, cb: torch.Tensor, use_int_mm: bool | None = None, cb_float: torch.Tensor | None = None
) -> torch.Tensor:
    """``qa @ cb.T`` summed exactly, as float32: ``qa`` holds integers in [-127, 127] (any float dtype),
    ``cb`` is int8 ``[out, in]``.

    ``use_int_mm`` None: ``torch._int_mm`` (int8 products, int32 sums) on a CPU where it is fast
    (AVX-512/AMX kernels), else one float32 matmul where every row's codes are small enough for it
    to be exact (:func:`_one_product_is_exact`), otherwise float32 matmuls over slices of at most
    1040 inputs, each exact (``1040 * 127² < 2^24``), summed in float64. Either way the result is the exact integer sum
    rounded once to float32, so every path gives identical outputs (tested). ``cb_float``: ``cb`` as
    float32, made once by the caller, for the float path (converting the codes on every call read and
    wrote every weight once more per forward).
    """
    if use_int_mm is None:
        use_int_mm = qa.device.type == "cpu" and _int_mm_is_fast()
    if use_int_mm and qa.device.type == "cpu" and hasattr(torch, "_int_mm") and qa.shape[0] > 0:
        try:
            return torch._int_mm(qa.to(torch.int8), cb.t()).float()
        except RuntimeError:  # a shape or build without int8 matmul support
            pass
    k = qa.shape[1]
    a = qa.float()
    w = cb.float() if cb_float is None else cb_float
    if k <= _EXACT_F32_TERMS or _one_product_is_exact(a):
        return a @ w.t()
    out = None
    for s in range(0, k, _EXACT_F32_TERMS):
        part = (a[:, s : s + _EXACT_F32_TERMS] @ w[:, s : s + _EXACT_F32_TERMS].t()).double()
        out = part if out is None else out.add_(part)
    return out.float()


def _one_product_is_exact(a: torch.Tensor) -> bool:
    """Whether one float32 product ``a @ w.T`` (``|w| <= 127``) is exact whatever order the kernel
    sums in: every partial sum of row ``t`` is an integer of magnitude at most
    ``127 * sum_k |a_tk|``; below ``2^24`` each is representable, so every addition is exact.
    Quantized activations are small on average (the absmax code 127 is one value per row), so this
    holds for almost every row; the slices above are for the rest."""
    if a.shape[0] == 0:
        return True
    return torch.linalg.vector_norm(a, ord=1, dim=1).max().item() * 127.0 < 2.0**24


class _LastInput:
    """The last quantized input, for the layers that read the same tensor (q/k/v, gate/up). It
    holds the input itself, so the identity test cannot match a new tensor at a reused address; an
    in-place change of the input changes its version and is quantized again (an inference-mode
    tensor has no version: sibling projections read it unchanged, as no hook sits between them)."""

    key: tuple | None = None
    value: tuple | None = None


def _quantized_input(
    x: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(a, qa, cx, cols)`` of Eq. 5-6: ``a`` the input as [tokens, features] float32, ``cols`` the
    outlier features (any token with ``|x| >= threshold``; None when there are none), ``cx`` each
    token's absmax over the other features and ``qa = round(127 a / cx)`` with outliers zeroed.
    One pass per step, no [tokens, features] temporary beyond ``|a|`` and ``qa``: the plainer form's
    temporaries cost as much as the matmul at prefill sizes. Made once for the layers that share an
    input (see :class:`_LastInput`)."""
    key = (x, -1 if x.is_inference() else x._version, threshold, torch.is_grad_enabled())
    if _LastInput.key is not None and _LastInput.key[0] is x and _LastInput.key[1:] == key[1:]:
        return _LastInput.value  # type: ignore[return-value]
    a = x.reshape(-1, x.shape[-1]).float()
    absa = a.abs()
    cols = None
    if threshold > 0:
        hit = absa.amax(dim=0) >= threshold
        cols = hit if bool(hit.any()) else None
    rest = a
    if cols is not None:
        rest = a.masked_fill(cols.unsqueeze(0), 0.0)
        absa.masked_fill_(cols.unsqueeze(0), 0.0)
    cx = absa.amax(dim=1).clamp_(min=1e-12)  # per-token absmax over non-outlier features
    del absa
    qa = torch.mul(rest, (127.0 / cx).unsqueeze(1)).round_()
    _LastInput.key, _LastInput.value = key, (a, qa, cx, cols)
    return a, qa, cx, cols


def forget_last_input() -> None:
    """Drop the cached quantized input (its memory) once a forward is over."""
    _LastInput.key = _LastInput.value = None


class Int8Linear(nn.Module):
    """A pure-PyTorch LLM.int8 linear layer (same state-dict layout as bitsandbytes' Linear8bitLt)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_format", torch.tensor(0, dtype=torch.uint8, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, lin: nn.Linear, threshold: float = 6.0) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, threshold, lin.weight.dtype, lin.weight.device)
        m.weight, m.SCB = quantize_rows(lin.weight)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.data)
        return m

    def _float_codes(self) -> torch.Tensor | None:
        """The codes as float32 for the float path, made once per weight (remade when the codes are
        replaced or edited in place); None where ``torch._int_mm`` runs. Not part of the state dict: in
        memory the layer then holds float32 weights as a float model does, within the run's budget."""
        if self.weight.device.type == "cpu" and _int_mm_is_fast() and hasattr(torch, "_int_mm"):
            return None
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if getattr(self, "_codes_key", None) != key:
            self._codes_f32, self._codes_key = self.weight.float(), key
        return self._codes_f32

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * (self.SCB / 127.0).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a, qa, cx, cols = _quantized_input(x, self.threshold)
        y = int8_matmul(qa, self.weight, cb_float=self._float_codes())
        y.mul_(torch.outer(cx, self.SCB)).div_(127.0 * 127.0)
        if cols is not None:  # outlier features: the dequantized int8 weights of those columns only
            y.add_(a[:, cols] @ (self.weight[:, cols].float() * (self.SCB / 127.0).unsqueeze(1)).t())
        if self.bias is not None:
            y.add_(self.bias.float())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


def is_int8_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_8bit"))


def load_int8_torch(path: str | Path, dtype: torch.dtype, device: str) -> nn.Module:
    """Load an LLM.int8 checkpoint with :class:`Int8Linear` layers (no bitsandbytes needed)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    q = getattr(config, "quantization_config", None) or {}
    q = q if isinstance(q, dict) else q.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from accelerate import init_empty_weights

    # Parameters on the meta device: no float copy of the int8 matrices is ever allocated, so the
    # peak is the checkpoint's size, not the float model's plus the checkpoint's.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(
        model,
        float(q.get("llm_int8_threshold", 6.0)),
        list(q.get("llm_int8_skip_modules") or ["lm_head"]),
        from_weights=False,
    )
    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no .safetensors weights; re-create the variant with --force")
    for f in files:
        state.update(load_file(str(f)))
    missing, _unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    head = [n for n, _ in model.named_parameters() if n.startswith("lm_head")]
    if [m for m in missing if m not in head] or (
        set(head) & set(missing) and not getattr(config, "tie_word_embeddings", False)
    ):
        raise UserError(f"{path} is missing weights ({', '.join(missing[:3])} ...); re-create the variant with --force")
    if set(head) & set(missing):
        model.tie_weights()
    for m in model.modules():  # the checkpoint's float tensors in the model's dtype; int8 weights and SCB as stored
        if isinstance(m, Int8Linear):
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        else:
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
    model.to(device)
    return model


def skip_modules(model: nn.Module) -> list[str]:
    """Modules left in 16-bit: the output head (as transformers does for bitsandbytes)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if m is head] or ["lm_head"]


def replace_linears(model: nn.Module, threshold: float, skip: list[str], from_weights: bool = True) -> int:
    """Swap every ``nn.Linear`` (except ``skip``) for :class:`Int8Linear`; returns how many."""
    count = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full == s or full.endswith("." + s) for s in skip):
                new = (
                    Int8Linear.from_linear(child, threshold)
                    if from_weights
                    else Int8Linear(
                        child.in_features,
                        child.out_features,
                        child.bias is not None,
                        threshold,
                        child.weight.dtype,
                        child.weight.device,
                    )
                )
                setattr(mod, child_name, new)
                count += 1
    if count and not getattr(model, "_int8_forgets_input", False):
        # the last layer's quantized input is not kept (its memory) once the model's forward is over
        model.register_forward_hook(lambda *_: forget_last_input())
        model._int8_forgets_input = True
    return count
