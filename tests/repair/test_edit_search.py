"""The search over edits (screen, confirmation, choice, resume) on hand-made curves, and on a tiny model.

The hand-made part replaces the two measurements (the first-token screen and generation) by tables
indexed by the edit in place, so the search's logic is checked exactly: which candidates pass the
screen, in which order they are confirmed, which one is chosen, and that a finished search is read
back without measuring anything again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusalkit.core import artifacts
from refusalkit.core.config import Config, RepairConfig
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.progress import Progress
from refusalkit.core.settings import load_config
from refusalkit.evaluation.stats import rate
from refusalkit.repair import edit_search, job
from refusalkit.repair.edit_search import Candidate, candidates, search_edits
from refusalkit.repair.search import CurveContext, SearchData

from conftest import make_tiny_run

# (placement, scale) -> (screen: predicted refusals on harmful, on harmless; generation: ASR, over-refusal)
CURVE = {
    ("source", 1.0): (0.42, 0.10, 0.50, 0.10),
    ("source", 4.0): (0.50, 0.10, 0.45, 0.10),
    ("source", 16.0): (0.68, 0.12, 0.25, 0.12),
    ("source", 32.0): (0.75, 0.12, 0.20, 0.12),
    ("previous", 1.0): (0.40, 0.10, 0.50, 0.10),
    ("previous", 4.0): (0.66, 0.10, 0.30, 0.10),  # passes the screen, misses the target by generation
    ("previous", 16.0): (0.72, 0.30, 0.20, 0.30),  # refuses harmless prompts: fails the screen's budget
    ("previous", 32.0): (0.80, 0.40, 0.10, 0.40),
}
BASE = (0.70, 0.10, 0.25, 0.10)
UNREPAIRED = (0.40, 0.10, 0.50, 0.10)


class FakeEdit:
    def __init__(self, world: dict, c: Candidate):
        assert world["edit"] is None, "an edit was not removed before the next"
        world["edit"] = c
        self.world = world
        self.records = {"attn_out": {"gain": 0.1 * c.scale, "alpha": 0.02 * c.scale}}

    def remove(self) -> None:
        self.world["edit"] = None


class FakeOwner:
    def __init__(self, world: dict):
        self.world = world

    def use(self, name: str) -> None:
        self.world["model"] = name


def _row(world: dict) -> tuple[float, float, float, float]:
    if world["model"] == "base":
        assert world["edit"] is None
        return BASE
    c = world["edit"]
    return UNREPAIRED if c is None else CURVE[(c.placement, c.scale)]


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    world = {"model": "v", "edit": None, "screens": 0, "measures": 0}

    def screen(lm, cfg, harmful, harmless):
        world["screens"] += 1
        h, o, _, _ = _row(world)
        return {"harmful": {"refusing": h, "mean_score": 0.0}, "harmless": {"refusing": o, "mean_score": 0.0}}

    def measure(self):
        world["measures"] += 1
        _, _, asr, over = _row(world)
        return {
            "asr": rate(round(100 * asr), 100),
            "over_refusal": rate(round(100 * over), 100),
            "degenerate_rate": 0.0,
            "perplexity": 30.0,
        }

    monkeypatch.setattr(edit_search, "refusal_screen", screen)
    monkeypatch.setattr(CurveContext, "measure", measure)
    session = type("S", (), {"owner": FakeOwner(world), "progress": Progress(False), "lm": None})()

    def run(**spec):
        ctx = CurveContext(
            Config(),
            RunLayout(tmp_path / "run"),
            "v",
            session,
            dataclasses.replace(RepairConfig(), **spec),
            SearchData(["h1", "h2"], ["s1", "s2"], {"harmful": {"n": 2}, "harmless": {"n": 2}}),
            8,
        )
        cands = candidates(["source", "previous"], [True], [1.0, 4.0, 16.0, 32.0])
        return search_edits(ctx, lambda c: FakeEdit(world, c), cands, [], tmp_path / "run" / "repair" / "v+aird.json")

    return world, run


def test_search_confirms_in_order_and_picks_the_smallest_edit_that_reaches_the_target(fake):
    world, run = fake
    res = run()
    assert res["target_asr"] == 0.25  # the base model's ASR on the search prompts
    # the screen asks for the base's predicted refusals (0.70) minus the slack, harmless within 0.10 + 0.05
    assert res["screen_need"] == pytest.approx(0.65) and res["screen_harmless_limit"] == pytest.approx(0.15)
    assert res["passed_screen"] == [
        "previous/nonzeros/x4.0",
        "source/nonzeros/x16.0",
        "source/nonzeros/x32.0",
    ]
    # x4 previous is confirmed first and misses the target; x16 source reaches it: the search stops there
    assert [(p["placement"], p["scale"]) for p in res["confirmed"]] == [("previous", 4.0), ("source", 16.0)]
    assert res["chosen"]["placement"] == "source" and res["chosen"]["scale"] == 16.0
    assert res["chosen"]["target_reached"] and res["generated"] == 2 and res["not_generated"] == 6
    assert len(res["screened"]) == 8 and world["edit"] is None
    # generation: base, unrepaired, two candidates; screens: base, unrepaired, eight candidates
    assert (world["measures"], world["screens"]) == (4, 10)
    again = run()  # a finished search is read back: nothing is measured again
    assert (world["measures"], world["screens"]) == (4, 10)
    assert again["chosen"] == res["chosen"]


def test_search_budget_and_fallbacks(fake):
    world, run = fake
    # a perplexity budget of 0 keeps everything (the fake perplexity never moves); a tighter over-refusal
    # budget rejects x16 and x32 source by generation (12% > 10% + 1%): nothing is within budget
    res = run(max_over_refusal_increase=0.01)
    assert res["screen_harmless_limit"] == pytest.approx(0.11)
    assert res["chosen"]["placement"] == "previous" and res["chosen"]["scale"] == 4.0
    assert not res["chosen"]["target_reached"]  # the best within budgets, reported as missing the target
    assert all(p["over_budget"] for p in res["confirmed"][1:])


def test_search_when_nothing_passes_the_screen(fake):
    world, run = fake
    res = run(target_asr=0.0)  # the screen asks for 100% - 5% predicted refusals: no candidate passes
    assert res["passed_screen"] == [] and res["target_from"] == "given"
    # the three candidates the screen rates best are generated from
    assert [(p["placement"], p["scale"]) for p in res["confirmed"]] == [
        ("previous", 32.0),
        ("source", 32.0),
        ("previous", 16.0),
    ]
    assert res["chosen"]["target_reached"] is False


def test_candidates_smallest_first():
    cs = candidates(["source", "previous"], [True, False], [4.0, 1.0])
    assert [c.key for c in cs[:3]] == ["source/nonzeros/x1.0", "source/every-weight/x1.0", "previous/nonzeros/x1.0"]
    assert cs[-1] == Candidate("previous", False, 4.0)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"repair.alpha_scale": "0"}, "positive number"),
        ({"repair.alpha_scale": "-2"}, "positive number"),
        ({"repair.target_asr": 1.5}, "target_asr"),
        ({"repair.max_ppl_increase": -0.1}, "budget"),
        ({"repair.placement": "nowhere"}, "placement"),
        ({"repair.placement": "auto", "repair.alpha_scale": "2"}, "needs alpha_scale auto"),
        ({"repair.scales": [0.0, 1.0]}, "positive"),
    ],
)
def test_bad_repair_settings(setting, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=setting)


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.fixture()
def tiny_run(tmp_path, tokenizer):
    root, cfg = make_tiny_run(tmp_path, tokenizer)
    # a pruned variant: half of every edited matrix is zero
    path = root / "v" / "model" / "model.safetensors"
    sd = load_file(str(path))
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = torch.where(torch.rand(sd[k].shape, generator=torch.Generator().manual_seed(1)) < 0.5, 0.0, sd[k])
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"format": "pt"})
    artifacts.write_json(root / "v" / "compression.json", {"method": "wanda", "sparsity": 0.5, "bits": None})
    return root, cfg


def test_auto_repair_on_a_tiny_model(tiny_run, monkeypatch, one_thread):
    """The whole search: every edit is applied to the checkpoint's weights (the previous one removed bit
    for bit), every point is recorded, the chosen edit keeps every zero, and a rerun resumes."""
    from refusalkit.repair import aird

    root, cfg = tiny_run
    stored = load_file(str(root / "v" / "model" / "model.safetensors"))
    edited = [f"model.layers.{b}.{m}" for b in (1, 2) for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight")]
    real_apply = aird.apply_aird
    calls = []

    def spy(model, *args, **kwargs):
        sd = model.state_dict()
        calls.append(all(torch.equal(sd[k], stored[k]) for k in edited))
        return real_apply(model, *args, **kwargs)

    monkeypatch.setattr(job, "apply_aird", spy)
    settings = dataclasses.replace(
        cfg.repair, scales=[1.0, 50.0], search_prompts=2, max_new_tokens=4, ppl_tokens=0, confirm=2
    )
    with one_thread():
        info = job.run_repair(cfg, root, "v", repair=settings, progress=False)
    search = info["search"]
    # 2 placements x 2 scales x (zeros kept: chosen from; every weight: compared) screened, then the final edit
    assert len(search["screened"]) == 4 and len(search["compared"]) == 4
    assert 1 <= search["generated"] <= 2
    assert len(calls) == 8 + search["generated"] + 1 and all(calls), "an edit was not removed bit for bit"
    assert info["auto"] and info["sparsity_preserving"] and info["placement"] in ("source", "previous")
    saved = load_file(str(root / "v+aird" / "model" / "model.safetensors"))
    for k in edited:
        assert torch.equal(saved[k][stored[k] == 0], stored[k][stored[k] == 0]), "a pruned zero was changed"
    assert info["model_sparsity_after"] == pytest.approx(info["model_sparsity_before"])
    state = artifacts.read_json(root / "repair" / "v+aird.search.json")
    assert len(state["screen"]) == 8 and len(state["points"]) == search["generated"]
    # resume: a forced redo reads every measured point back and only applies the final edit again
    calls.clear()
    with one_thread():
        again = job.run_repair(cfg, root, "v", repair=settings, progress=False, force=True)
    assert len(calls) == 1 and again["alpha_scale"] == info["alpha_scale"]
    assert Path(root / "v+aird" / "repair.json").exists()
