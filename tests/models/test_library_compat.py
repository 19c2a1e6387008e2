"""Library drift: the tested torch / transformers ranges (pyproject.toml) and the KV-cache keyword.

transformers 5.x renamed the forward keyword ``past_key_values`` to ``cache`` (the old name warns
and is removed in 5.40). Every cached forward of refusalkit must pass the cache under the name the
installed version expects (:mod:`refusalkit.models.kv_cache`): these tests turn the deprecation
into an error around each cached path, on the tiny Llama and Qwen2 models.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from refusalkit.models.kv_cache import NEW_KEYWORD, OLD_KEYWORD, cache_keyword, cache_kwargs, library_keyword, new_cache

from conftest import HARMFUL

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
DEPRECATED = r"past_key_values|cache_params"


def _declared(name: str) -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == name]
    assert len(reqs) == 1, f"pyproject.toml should declare {name} once"
    return reqs[0]


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_installed_version_is_in_the_tested_range(name):
    """An untested torch or transformers fails here, loudly, not somewhere deep in a model call."""
    req = _declared(name)
    installed = Version(importlib.metadata.version(name))
    assert req.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is installed, but refusalkit is tested with {name}{req.specifier} (pyproject.toml). "
        f"Failures in this run may be library drift, not bugs: install a tested version "
        f"(pip install '{name}{req.specifier}'), or test refusalkit on {installed} and then widen the range."
    )
    lowest = min(Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~="))
    assert installed.major == lowest.major, f"{name} {installed}: an untested major version (tested: {lowest.major}.x)"


# ------------------------------------------------------------------------------------------------
# The cache keyword
# ------------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_cache_deprecation():
    """Raise on transformers' ``past_key_values`` deprecation warning (a ``FutureWarning``), and fail
    on the once-per-process log line it writes when an output's ``past_key_values`` is read."""
    from transformers.utils import logging as hf_logging

    records = _Records()
    root = logging.getLogger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    clear = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()  # an lru_cache: forget what earlier tests already triggered
    root.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=f".*({DEPRECATED})")
            yield
    finally:
        root.removeHandler(records)
        hf_logging.set_verbosity(verbosity)
    said = [m for m in records.messages if "past_key_values" in m or "cache_params" in m]
    assert not said, f"a cached forward used a deprecated cache name: {said}"


def test_keyword_is_read_from_the_forward_signature(tiny_lm):
    import inspect

    params = inspect.signature(tiny_lm.model.forward).parameters
    expected = NEW_KEYWORD if NEW_KEYWORD in params else OLD_KEYWORD
    assert cache_keyword(tiny_lm.model) == expected
    assert library_keyword() in (NEW_KEYWORD, OLD_KEYWORD)

    def only_kwargs(**kwargs):
        return kwargs

    def old_style(input_ids=None, past_key_values=None, use_cache=None):
        return input_ids

    assert cache_keyword(only_kwargs) == library_keyword()  # no named parameter: the library decides
    assert cache_keyword(old_style) == OLD_KEYWORD  # e.g. remote code written before the rename


def test_the_guard_catches_the_deprecated_keyword(llama_lm):
    """The guard below is not vacuous: the old keyword fails it where the model takes ``cache``."""
    model = llama_lm.model
    if cache_keyword(model) != NEW_KEYWORD:
        pytest.skip("this transformers takes past_key_values: nothing is deprecated")
    x = torch.tensor([[1, 2, 3]])
    with (
        pytest.raises((FutureWarning, AssertionError), match=DEPRECATED),
        no_cache_deprecation(),
        torch.inference_mode(),
    ):
        model(input_ids=x, past_key_values=new_cache(model), use_cache=True)


def test_cached_forward_keeps_the_cache_it_was_given(tiny_lm):
    """A cache passed in is filled in place, so no caller reads one back from the output."""
    model = tiny_lm.model
    cache = new_cache(model)
    with no_cache_deprecation(), torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), **cache_kwargs(cache, cache_keyword(model)))
        assert cache.get_seq_length() == 4
        step = model(input_ids=torch.tensor([[5]]), logits_to_keep=1, **cache_kwargs(cache, cache_keyword(model)))
        full = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits[:, -1]
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_no_cached_path_uses_a_deprecated_keyword(tiny_lm, harmful_ids, harmless_ids, rand_dir):
    """forward_last (shared prefix), generation (prefill, decode steps, compaction), greedy
    ``generate`` under hooks, and GCG's cached losses and gradient."""
    from refusalkit.direction.forward import forward_last
    from refusalkit.direction.generate import generate
    from refusalkit.direction.hooks import addition_hooks
    from refusalkit.evaluation.gcg import GCGConfig, GCGObjective, default_target
    from refusalkit.evaluation.sampling import GREEDY, Decoding, sample_ids

    ids = harmful_ids[:3] + harmless_ids[:3]
    pad = tiny_lm.tokenizer.pad_token_id
    decodings = [GREEDY, Decoding("temperature=1", temperature=1.0), Decoding("top_k=5", top_k=5)]
    with no_cache_deprecation():
        assert forward_last(tiny_lm.model, ids, pad_id=pad, batch_size=4, share_prefix=True) is not None
        sample_ids(tiny_lm, ids, decodings, max_new_tokens=4, batch_size=4)
        generate(tiny_lm, ids, max_new_tokens=3, hooks=addition_hooks(tiny_lm.model, rand_dir(seed=2), layer=1))
        obj = GCGObjective(tiny_lm, HARMFUL[:1], [default_target(HARMFUL[0])])
        suffix = obj.suffix_ids(GCGConfig().suffix_init)
        obj.losses(torch.stack([suffix, suffix]), [0], batch_size=2)
        obj.gradient(suffix, [0])
