"""The float64 calibration (refusalkit.compress.precision): the same mask whatever the kernels sum in
which order, and the same function as the model's own float32 forward on every architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from refusalkit.compress.blockwise import eager_experts
from refusalkit.compress.precision import Float64, calibration_precision, resolve
from refusalkit.core.errors import UserError

from families import FAMILIES, make


class _Float32Habits(nn.Module):
    """What model code written for float32 does: an RMSNorm that computes in float32, a softmax with
    ``dtype=torch.float32``, ``type_as``, a float32 weight and a float32 buffer written in place."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, 8, generator=g), requires_grad=False)
        self.gain = nn.Parameter(torch.rand(8, generator=g) + 0.5, requires_grad=False)
        self.register_buffer("buffer", torch.zeros(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.gain * h.to(x.dtype)
        a = nn.functional.softmax(h @ self.weight.t(), dim=-1, dtype=torch.float32).type_as(x)
        self.buffer.copy_(a)
        return nn.functional.linear(a.float(), self.weight) + self.buffer


def test_float64_mode_keeps_float64_through_float32_habits():
    m = _Float32Habits()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with Float64():
        out = m(x)
    assert out.dtype == torch.float64
    assert m.buffer.dtype == torch.float32  # written in place: keeps its own dtype

    w, g = m.weight.double(), m.gain.double()  # the same function, written in float64 by hand
    h = g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    a = torch.softmax(h @ w.t(), dim=-1)
    ref = a @ w.t() + a.float().double()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    plain = m(x.float()).double()  # without the mode the same code computes in float32
    assert torch.allclose(plain, ref, rtol=0, atol=1e-5) and not torch.allclose(plain, ref, rtol=0, atol=1e-12)


def test_setting_resolves_per_device_and_refuses_unknown_values():
    assert resolve("auto", "cpu") == torch.float64
    assert resolve("auto", "cuda") is None
    assert resolve("model", "cpu") is None
    assert resolve("float64", "cuda") == torch.float64
    with pytest.raises(UserError, match="calibration_dtype"):
        resolve("float16", "cpu")
    with pytest.raises(ValueError):
        with calibration_precision(torch.float32):
            pass


@pytest.mark.parametrize("family", ["llama", "qwen2", *FAMILIES])
def test_float64_forward_is_the_model_function_on_every_architecture(family, tokenizer, llama_lm, qwen_lm):
    model = {"llama": llama_lm.model, "qwen2": qwen_lm.model}.get(family) or make(family, tokenizer)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        emb = model.get_input_embeddings()(ids).double()
        with eager_experts(model), Float64():  # as in compression: experts run their eager loop
            out = model(inputs_embeds=emb, use_cache=False).logits
    assert out.dtype == torch.float64
    err = (out - ref.double()).abs().max() / ref.abs().max()
    assert err < 2e-5, f"{family}: float64 logits differ from float32 by {err:.2e} of their scale"


CHILD = textwrap.dedent(
    """
    import json, sys, types, torch
    from transformers import AutoModelForCausalLM
    from refusalkit.compress.job import CompressSpec, compress_model
    from refusalkit.models.structure import decoder_layers
    from refusalkit.compress import blockwise
    model_dir, samples, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    res = {"capability": torch.backends.cpu.get_cpu_capability()}
    for method in ("wanda-0.5", "sparsegpt-0.5"):
        for dtype in ("float64", "model"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            hidden = []
            orig = blockwise.run_block
            blockwise.run_block = lambda layer, inputs: hidden.append(orig(layer, inputs)) or hidden[-1]
            spec = CompressSpec(method=method, calibration_dtype=dtype, n_calibration=len(samples))
            compress_model(types.SimpleNamespace(model=model), spec, types.SimpleNamespace(samples=samples))
            blockwise.run_block = orig
            res[f"{method}/{dtype}"] = {
                "masks": [[int(v) for v in (m.weight == 0).flatten().nonzero().flatten()]
                          for b in decoder_layers(model) for m in b.modules() if isinstance(m, torch.nn.Linear)],
                "hidden": [h.double().flatten().tolist()[:2000] for hs in hidden for h in hs],
            }
    json.dump(res, open(out, "w"))
    """
)


@pytest.mark.integration
def test_same_mask_under_two_kernel_sets(llama_lm, tmp_path):
    """The same seed, once with the machine's kernels and once with ATen's scalar kernels and MKL's
    SSE4.2 path: the float64 calibration gives identical masks (Wanda and SparseGPT) while the
    float32 calibration's activations differ (the two kernel sets really sum differently)."""
    llama_lm.model.save_pretrained(tmp_path / "model")
    samples = torch.randint(3, 290, (8, 48), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    (tmp_path / "child.py").write_text(CHILD)
    runs = {}
    for name, env in {
        "defaults": {},
        "sse": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    }.items():
        out = tmp_path / f"{name}.json"
        cmd = [
            sys.executable,
            str(tmp_path / "child.py"),
            str(tmp_path / "model"),
            str(tmp_path / "samples.json"),
            str(out),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, **env}, capture_output=True)
        runs[name] = json.loads(out.read_text())
    a, b = runs["defaults"], runs["sse"]
    for method in ("wanda-0.5", "sparsegpt-0.5"):
        assert a[f"{method}/float64"]["masks"] == b[f"{method}/float64"]["masks"], method
        h64a, h64b = (torch.tensor(r[f"{method}/float64"]["hidden"]) for r in (a, b))
        assert (h64a - h64b).abs().max() <= 1e-12 * h64a.abs().max()
    if a["capability"] == b["capability"]:
        pytest.skip(f"this machine's default kernels are already {a['capability']}: nothing to compare against")
    h32a, h32b = (torch.tensor(r["wanda-0.5/model"]["hidden"]) for r in (a, b))
    assert not torch.equal(h32a, h32b), "the two kernel sets gave bit-identical float32 activations"
