"""Refusal-preserving compression: the residual stream's component along the refusal direction kept.

Arditi et al. (2024) show refusal is mediated by one direction ``r`` of the residual stream, and the
refusal-compression paper (arXiv 2504.04215) shows pruning rotates and weakens it. Plain Wanda,
SparseGPT, RTN and AWQ reconstruct each matrix's output on generic calibration data and are blind
to ``r``. The refusal-preserving methods (:mod:`refusalkit.compress.refusal_pruning`,
:mod:`refusalkit.compress.refusal_quant`) compress a block with the plain method, then correct each
matrix writing to the residual stream (attention output, MLP down projection, a mixer's output;
not a routed expert's slice) within what the plain method allows, so that the block's output along
``r`` on chat-formatted harmful and harmless instructions stays the dense model's.

The objective, for a writer ``Ŵ`` (``[d_model, d_in]``) after the plain method, is

    min_u   (1/N_R) Σ_t∈R (f_t · (s ⊙ u)ᵀ x_t − e_t)²  +  μ · (1/N_C) · uᵀ (H ⊙ K) u          (1)

over updates of the form ``Δ = (r̂ uᵀ) ⊙ M`` (each kept weight of row ``i`` moves by ``r̂_i u_j``):

* ``e_t = rᵀ(h_dense,t − h_t)``: the block output's error along the unit direction ``r`` at refusal
  token ``t`` (the dense model's block on the dense model's stream, minus the compressed block on
  the compressed model's stream, so errors of earlier blocks are absorbed too); ``x_t`` the
  writer's input there;
* ``M`` the kept weights (pruning; all ones for quantization), ``s_j = Σ_i r̂_i² M_ij``, and
  ``r̂ = g ⊙ r / ||g ⊙ r||`` (``g`` a post-norm's gain; ``r̂ = r`` without one): ``f_t (s ⊙ u)ᵀ x_t``
  is the first-order effect of ``Δ`` on ``rᵀ h``, with ``f_t = 1`` when the writer's output is
  added to the stream and, through a post-norm ``g ⊙ y / ρ(y)``, ``f_t = (c − (rᵀ(g ⊙ y_t))
  (y_tᵀ r̂) / (d ρ_t²)) / ρ_t`` with ``c = ||g ⊙ r||`` (:func:`_norm_factor`);
* ``H = Σ_t∈C x_t x_tᵀ`` on the calibration tokens and ``K = Mᵀ diag(r̂²) M``: ``uᵀ (H ⊙ K) u`` is
  exactly ``Σ_t∈C ||Δ x_t||²``, what the change costs the layer-wise reconstruction that Wanda
  and SparseGPT minimize (Sun et al. 2023, Eq. 1; Frantar & Alistarh 2023, Eq. 1).

``μ = 1 / refusal_weight``. (1) is a ridge regression in ``u`` (``d_in`` unknowns), solved in
closed form in float64 (:func:`solve_update`; on the block's accelerator when it has room,
:func:`solve_device`; about 2.7 ``d_in x d_in`` float64 matrices of memory). Writers are
corrected in the block's forward order, each on the error left after the ones before it
(re-measured), so the last writer of the block (the MLP's) fits what the first could not.
Quantization rounds the corrected weights back onto the group grid
(:func:`refusalkit.compress.refusal_quant.balanced_round`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusalkit.compress.blockwise import (
    AliasLinear,
    BlockInputs,
    _to,
    advance,
    capture_inputs,
    module_device,
    run_block,
)
from refusalkit.core.errors import UserError
from refusalkit.models.structure import block_writers, branches, norm_gain, post_norms

# settings of every refusal-preserving method (compression.json records them)
DEFAULT_REFUSAL_WEIGHT = 1.0
DEFAULT_N_REFUSAL = 32
CALIBRATION_TOKENS = 4096  # calibration tokens of the penalty's Gram matrix H, at most


@dataclass
class RefusalTarget:
    """What a refusal-preserving method preserves: the unit direction and the refusal prompts' two
    streams (the dense model's and the compressed model's block inputs)."""

    direction: torch.Tensor  # [d_model], unit
    layer: int  # the direction's source layer (recorded)
    samples: list[list[int]]  # chat-formatted harmful and harmless instructions, token ids
    prefix: int  # tokens every sample shares at its start (the template's prefix): counted once in the loss
    info: dict[str, Any] = field(default_factory=dict)
    dense: BlockInputs | None = None
    compressed: BlockInputs | None = None


def check_direction(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    r = direction.detach().double().flatten()
    if r.numel() != d_model or not torch.isfinite(r).all() or float(r.norm()) == 0:
        raise UserError(
            f"the base refusal direction has {r.numel()} entries (the model's residual width is {d_model}) or is "
            "zero; re-run refusalkit extract on this run"
        )
    return r / r.norm()


def common_prefix(samples: list[list[int]]) -> int:
    """Tokens at the start of every sample that are the same in all (at most the shortest minus one)."""
    n = min(len(s) for s in samples) - 1
    first = samples[0]
    for i in range(n):
        if any(s[i] != first[i] for s in samples):
            return i
    return max(n, 0)


def start_streams(model: nn.Module, target: RefusalTarget, batch_size: int, dtype: torch.dtype | None) -> None:
    """Capture the refusal prompts' inputs of block 0; dense and compressed streams start equal."""
    target.dense = capture_inputs(model, target.samples, batch_size, dtype)
    target.compressed = BlockInputs(list(target.dense.hidden), target.dense.kwargs)


def _outputs(block: nn.Module, inputs: BlockInputs, hooks: dict[nn.Module, Any] | None = None) -> list[torch.Tensor]:
    """The block's outputs on every batch; ``hooks`` maps a module to a pre-hook ``fn(batch, x)``."""
    dev = module_device(block)
    outs, handles = [], []
    batch = [0]
    for mod, fn in (hooks or {}).items():
        handles.append(mod.register_forward_pre_hook(lambda _m, a, fn=fn: fn(batch[0], a[0])))
    try:
        with torch.no_grad():
            for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                batch[0] = i
                out = block(h.to(dev), **_to(kw, dev))
                outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    finally:
        for hd in handles:
            hd.remove()
    return outs


@dataclass
class _Writer:
    name: str
    linear: nn.Module  # nn.Linear, or the AliasLinear view of a Conv1D
    hook_on: nn.Module  # the module whose pre-hook sees its input
    norm: nn.Module | None  # a post-norm between the branch and the residual stream


def correctable_writers(block: nn.Module, linears: dict[str, nn.Module], model: nn.Module) -> list[_Writer]:
    """The block's residual writers this correction can move: every ``nn.Linear`` (or ``Conv1D``) writer;
    a routed expert's slice of a fused tensor is left as the plain method made it (its tokens differ
    between the dense and the compressed stream)."""
    d_model = model.get_input_embeddings().weight.shape[1]
    norms = post_norms(model)
    branch_of = {}
    for _, br in branches(block):
        for m in br.modules():
            branch_of[id(m)] = br
    out = []
    by_module = {id(lin.source if isinstance(lin, AliasLinear) else lin): (n, lin) for n, lin in linears.items()}
    for w in block_writers(block, d_model):
        if w.fused or id(w.module) not in by_module:
            continue
        name, lin = by_module[id(w.module)]
        br = branch_of.get(id(w.module))
        out.append(_Writer(name, lin, w.module, norms.get(id(br)) if br is not None else None))
    return out


def loss_rows(xs: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """The loss's token rows of per-batch ``[B, L, d]`` tensors, as ``[N, d]`` float64 on the CPU:
    the shared prefix's positions once (from the first sample), then every sample's positions after
    it. The prefix is the same in every prompt (the template's start), so it counts as one prompt."""
    head = [xs[0][0, :prefix].double().cpu()] if prefix and xs else []
    return torch.cat(head + [x[:, prefix:].reshape(-1, x.shape[-1]).double().cpu() for x in xs])


def block_error(target: RefusalTarget, dense_out: list[torch.Tensor], out: list[torch.Tensor]) -> torch.Tensor:
    """``e_t = rᵀ(h_dense,t − h_t)`` over the loss's refusal tokens (:func:`loss_rows`), float64."""
    return (loss_rows(dense_out, target.prefix) - loss_rows(out, target.prefix)) @ target.direction


def calibration_grams(block: nn.Module, inputs: BlockInputs, writers: list[_Writer]) -> dict[str, torch.Tensor]:
    """Per writer, ``H / N_C``: the Gram matrix of its inputs on the first calibration batches holding
    ``CALIBRATION_TOKENS`` tokens, in one pass of the compressed block before any correction (float32
    products, float64 result). A later writer's inputs move a little once an earlier one is corrected;
    ``H`` only weighs the penalty, so the pass is not repeated."""
    from refusalkit.compress.awq import _search_batches

    k = _search_batches(inputs, CALIBRATION_TOKENS)
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        g = x.t() @ x
        grams[name] = grams[name] + g if name in grams else g
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = {w.hook_on: (lambda _b, x, name=w.name: add(name, x)) for w in writers}
    _outputs(block, BlockInputs(inputs.hidden[:k], inputs.kwargs[:k]), hooks)
    return {k: (g.double() / max(counts[k], 1)).cpu() for k, g in grams.items()}


SLAB = 1024  # rows of H ⊙ K formed at a time


def _hk_slabs(h: torch.Tensor, k: torch.Tensor | float, dev: torch.device) -> Any:
    """``(i, j, (H ⊙ K)[i:j])`` in float64, ``SLAB`` rows at a time (``k`` a float32 matrix, or a scalar
    when every weight may move), so that the whole product is never held."""
    for i in range(0, h.shape[0], SLAB):
        j = min(i + SLAB, h.shape[0])
        hs = h[i:j].to(dev, torch.float64)
        yield i, j, (hs * float(k) if isinstance(k, float) else k[i:j].double() * hs)


def solve_update(
    xr: torch.Tensor,
    e: torch.Tensor,
    h: torch.Tensor,
    keep: torch.Tensor | None,
    rhat: torch.Tensor,
    c: float = 1.0,
    refusal_weight: float = DEFAULT_REFUSAL_WEIGHT,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The update ``Δ = (r̂ uᵀ) ⊙ M`` minimizing (1) (``xr`` the refusal rows already scaled by a
    post-norm's factor; ``h`` the calibration Gram matrix ``H / N_C``; ``keep`` the mask M, None for all
    weights), float64 on ``device`` (default: ``h``'s), and the fit's figures.

    Memory beside ``h``: the normal matrix (``d_in x d_in``, float64, factored in place), ``K`` in
    float32, and the factorization's and the solve's workspace of one more float64 matrix."""
    dev = torch.device(device) if device is not None else h.device
    xr, e, rhat = xr.to(dev, torch.float64), e.to(dev, torch.float64), rhat.to(dev, torch.float64)
    d_in = xr.shape[1]
    r2 = rhat.pow(2)
    if keep is None:
        s = torch.full((d_in,), float(r2.sum()), dtype=torch.float64, device=dev)
        k: torch.Tensor | float = float(r2.sum())
    else:
        m = keep.to(dev, torch.float32)
        s = (r2.float() @ m).double()
        k = m.t() @ (r2.float().unsqueeze(1) * m)  # K = Mᵀ diag(r̂²) M
        del m
    a = (c * xr) * s.unsqueeze(0)  # design in u
    lhs = a.t() @ a
    lhs.div_(len(e))
    for i, j, hk in _hk_slabs(h, k, dev):  # + (H ⊙ K) / refusal_weight
        lhs[i:j].add_(hk / refusal_weight)
    lhs.diagonal().add_(1e-8 * float(lhs.diagonal().mean()) + 1e-30)
    torch.linalg.cholesky(lhs, out=lhs)  # in place: the normal matrix is not needed again
    u = torch.cholesky_solve((a.t() @ e / len(e)).unsqueeze(1), lhs).squeeze(1)
    del lhs
    delta = rhat.unsqueeze(1) * u.unsqueeze(0)
    if keep is not None:
        delta = delta * keep.to(dev, torch.float64)
    left = e - a @ u
    change = sum(float(u[i:j] @ (hk @ u)) for i, j, hk in _hk_slabs(h, k, dev))  # uᵀ (H ⊙ K) u
    info = {
        "error_rms_before": float(e.pow(2).mean().sqrt()),
        "error_rms_fit": float(left.pow(2).mean().sqrt()),
        "calibration_change_rms": max(change, 0.0) ** 0.5,  # sqrt(mean_t ||Δ x_t||²)
    }
    return delta, info


def solve_device(block_device: torch.device, d_in: int) -> torch.device:
    """Where a writer's solve runs: the block's accelerator when it has room for three ``d_in x d_in``
    float64 matrices (the normal matrix, the factorization's workspace, ``K`` and the slabs), else the
    CPU (a 70B model's MLP down projection, ``d_in`` 28,672, needs about 20 GB)."""
    if block_device.type != "cuda":
        return torch.device("cpu")
    free, _total = torch.cuda.mem_get_info(block_device)
    return block_device if free > 3 * d_in * d_in * 8 else torch.device("cpu")


def _norm_factor(y: torch.Tensor, r: torch.Tensor, rhat: torch.Tensor, c: float, g: torch.Tensor) -> torch.Tensor:
    """Per token, the first-order change of ``rᵀ norm(y)`` per unit of ``δy`` along ``r̂``, where
    ``norm(y) = g ⊙ y / ρ(y)``: ``f = (c − (rᵀ(g ⊙ y)) (yᵀ r̂) / (d ρ²)) / ρ`` (the second term is the
    change of ``ρ``). Returned as ``[..., 1]``."""
    y = y.double().cpu()
    d = y.shape[-1]
    rho2 = y.pow(2).mean(-1, keepdim=True)
    f = (c - ((y * g) @ r).unsqueeze(-1) * (y @ rhat).unsqueeze(-1) / (d * rho2)) / rho2.sqrt()
    return f


def _scale_of(writer: _Writer, d: int, r: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(r̂, c, g)`` of the writer: the direction as it must leave the writer to move ``rᵀ h``, its
    gain, and the post-norm's gain ``g`` (None without a post-norm)."""
    if writer.norm is None:
        return r, 1.0, None
    g = norm_gain(writer.norm, d).double().cpu()
    a = g * r
    return a / a.norm(), float(a.norm()), g


def _measure(
    block: nn.Module, target: RefusalTarget, w: _Writer, dense_out: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One pass of the compressed block over the refusal prompts: the writer's loss rows (scaled by a
    post-norm's first-order factor ``f_t / c``), the block errors ``e_t``, and ``(r̂, c)``."""
    r = target.direction
    xs: list[torch.Tensor] = []
    factors: list[torch.Tensor] = []
    shapes = [h.shape[:2] for h in target.compressed.hidden]  # a branch may flatten [B, L] to tokens
    hooks = {w.hook_on: lambda b, x: xs.append(x.reshape(*shapes[b], x.shape[-1]))}
    rhat, c, g = _scale_of(w, r.numel(), r)
    if g is not None:
        hooks[w.norm] = lambda b, y: factors.append(_norm_factor(y.reshape(*shapes[b], y.shape[-1]), r, rhat, c, g))
    out = _outputs(block, target.compressed, hooks)
    xr = loss_rows(xs, target.prefix)
    if factors:
        xr = xr * loss_rows(factors, target.prefix) / c
    return xr, block_error(target, dense_out, out), rhat, c


def correct_block(
    step: Any, target: RefusalTarget, dense_out: list[torch.Tensor], calibration: BlockInputs, apply: Any, state: dict
) -> dict:
    """Correct every correctable writer of the compressed ``block`` in forward order. ``apply(writer,
    delta, rhat, state)`` lands ``delta`` ([out, in], float64) in the writer (on its support or grid)
    and may return figures. Returns the block's record: the error along ``r`` before and after, per
    writer."""
    r, block = target.direction, step.block
    record: dict[str, Any] = {"writers": {}}
    writers = correctable_writers(block, step.linears, step.shared["model"])
    grams = calibration_grams(block, calibration, writers)
    for w in writers:
        xr, e, rhat, c = _measure(block, target, w, dense_out)
        keep = w.linear.weight.detach().cpu() != 0 if step.spec.registered.family == "pruning" else None
        dev = solve_device(module_device(block), xr.shape[1])
        delta, info = solve_update(xr, e, grams.pop(w.name), keep, rhat, c, step.spec.refusal_weight, dev)
        info.update(apply(w, delta, rhat, state) or {})
        record["writers"][w.name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in info.items()}
    out = run_block(block, target.compressed)
    e = block_error(target, dense_out, out)
    record["error_rms_after"] = round(float(e.pow(2).mean().sqrt()), 6)
    record["target_rms"] = round(float((loss_rows(dense_out, target.prefix) @ r).pow(2).mean().sqrt()), 6)
    target.compressed = advance(target.compressed, out)
    target.dense = advance(target.dense, dense_out)
    return record


def preserving_step(base_block: Any, apply: Any, next_inputs: str, before: Any = None) -> Any:
    """A method's ``compress_block``: the plain method's block step, then :func:`correct_block`.
    ``next_inputs``: ``"compressed"`` (the next block calibrates on this block's outputs after the
    correction: pruning, RTN) or ``"plain"`` (what the plain method returned: AWQ's full-precision
    outputs). ``before(step)`` (optional) runs before the plain method and returns the state
    ``apply`` reads (e.g. the weights before rounding)."""

    def step_fn(step: Any) -> Any:
        target: RefusalTarget = step.shared["refusal"]
        if target.dense is None:
            raise ValueError("the refusal streams were not started (refusalkit.compress.job starts them)")
        dense_out = run_block(step.block, target.dense)  # the dense block, before the plain method
        calibration = step.inputs
        state = before(step) if before else {}  # filled by the plain method (AWQ's weights before rounding)
        state["spec"] = step.spec
        # the next block's inputs are recomputed after the correction: the plain method need not make them
        returned = base_block(dataclasses.replace(step, last=True) if next_inputs == "compressed" else step)
        step.shared.pop("pre_round", None)
        rec = correct_block(step, target, dense_out, calibration, apply, state)
        step.notes.setdefault("refusal_preservation", {"blocks": {}})["blocks"][str(step.index)] = rec
        if next_inputs == "plain" or step.last:
            return returned
        return advance(calibration, run_block(step.block, calibration))

    return step_fn


def preserving_parameters(spec: Any) -> dict[str, Any]:
    return {
        "preserves": "refusal",
        "plain_method": spec.registered.plain,
        "refusal_weight": spec.refusal_weight,
        "n_refusal": spec.n_refusal,
        "objective": "block output along the base refusal direction on refusal prompts (refusalkit.compress.refusal, Eq. 1)",
    }


def require_direction(layout: Any, method: str) -> None:
    """A one-line error, before any work, when the run has no base direction or no prompt split."""
    files = (
        layout.direction("base", "direction.json"),
        layout.direction("base", "direction.safetensors"),
        layout.splits,
    )
    if not all(f.exists() for f in files):
        raise UserError(
            f"{method} preserves the base model's refusal direction, and {layout.root} has none yet; "
            f"run refusalkit extract --run {layout.root} first"
        )


def load_target(layout: Any, cfg: Any, lm: Any, spec: Any) -> RefusalTarget:
    """The run's base refusal direction and the first ``spec.n_refusal`` harmful and harmless training
    prompts of its split (chat-formatted as the direction saw them); a one-line error without them."""
    from refusalkit.core import artifacts
    from refusalkit.models.chat import tokenize_instructions

    require_direction(layout, spec.method)
    info_path, tensors = layout.direction("base", "direction.json"), layout.direction("base", "direction.safetensors")
    info = artifacts.read_json(info_path)
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    r = check_direction(artifacts.load_tensors(tensors)["direction"], d_model)
    splits = artifacts.read_json(layout.splits)
    have = min(len(splits[k]["train"]) for k in ("harmful", "harmless"))
    if spec.n_refusal > have:
        raise UserError(
            f"--n-refusal {spec.n_refusal} asks for more than the run's {have} training prompts of each kind; "
            f"lower it, or extract in a run with n_train at least {spec.n_refusal}"
        )
    prompts = {k: splits[k]["train"][: spec.n_refusal] for k in ("harmful", "harmless")}
    samples = tokenize_instructions(lm.tokenizer, prompts["harmful"] + prompts["harmless"], cfg.system_prompt)
    prefix = common_prefix(samples)
    n_tokens = sum(len(s) - prefix for s in samples)
    return RefusalTarget(
        r,
        int(info["layer"]),
        samples,
        prefix,
        {
            "direction_layer": int(info["layer"]),
            "direction_position": info.get("position"),
            "prompts": {k: len(v) for k, v in prompts.items()},
            "sources": {k: splits[k].get("source") for k in ("harmful", "harmless")},
            "shared_prefix_tokens": prefix,
            "loss_tokens": n_tokens,
        },
    )
