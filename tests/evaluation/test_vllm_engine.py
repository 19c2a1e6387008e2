"""The vLLM back end builds its engine once per model (vLLM needs a GPU: a stand-in engine that counts
its constructions and answers with a fixed text takes its place in ``vllm.LLM``)."""

from __future__ import annotations

import os
import types

import pytest

from refusalkit.evaluation import vllm_backend
from refusalkit.evaluation.sampling import GREEDY, Decoding


class _Engine:
    built = 0

    def __init__(self, model, **kwargs):
        type(self).built += 1
        self.model = model

    def get_tokenizer(self):
        return lambda text, add_special_tokens=False: {"input_ids": [ord(c) % 50 for c in text]}

    def generate(self, requests, params, use_tqdm=False):
        return [
            types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" done {p.kwargs['seed']} ")]) for p in params
        ]


class _Params:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    _Engine.built = 0
    module = types.SimpleNamespace(LLM=_Engine, SamplingParams=_Params)
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: module)
    vllm_backend.release_engine()
    yield module
    vllm_backend.release_engine()


def test_one_engine_per_model_across_chunks(fake_vllm, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    decodings = [GREEDY, Decoding("temperature=0.7", temperature=0.7)]
    for chunk in range(5):  # Huang's grid: one chunk per prompt
        out = vllm_backend.sample_vllm(str(model), [f"prompt {chunk}"], decodings, max_new_tokens=4, seed=0)
        assert len(out) == 1 and len(out[0]) == 2 and out[0][0].startswith("done")
    assert _Engine.built == 1
    # a replaced checkpoint at the same path (a variant compressed again with --force) is a new engine
    (model / "model.safetensors").write_bytes(b"xy")
    os.utime(model / "model.safetensors", ns=(1, 1))
    vllm_backend.sample_vllm(str(model), ["p"], [GREEDY], max_new_tokens=4, seed=0)
    assert _Engine.built == 2
    other = tmp_path / "n"
    other.mkdir()
    vllm_backend.sample_vllm(str(other), ["p"], [GREEDY], max_new_tokens=4, seed=0)
    assert _Engine.built == 3  # another model
    vllm_backend.sample_vllm(str(other), ["p"], [GREEDY], max_new_tokens=4, seed=0, gpu_memory_utilization=0.5)
    assert _Engine.built == 4  # other engine settings
    vllm_backend.release_engine()
    vllm_backend.sample_vllm(str(other), ["p"], [GREEDY], max_new_tokens=4, seed=0, gpu_memory_utilization=0.5)
    assert _Engine.built == 5  # released: built again
