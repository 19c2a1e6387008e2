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
from refusalkit.repair.aird import AirdEdit
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
        self.records = {"attn_out": {"role": "attn_out", "gain": 0.1 * c.scale, "alpha": 0.02 * c.scale}}

    per_role = AirdEdit.per_role

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


def _perplexity(world: dict) -> float:
    c = world["edit"]
    return world["ppl"].get((c.placement, c.scale), 30.0) if c is not None else 30.0


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    # calibrated: the screen's mean harmful score is its predicted refusal share (else 0 for every state,
    # which leaves the screen uncalibrated); ppl: perplexity per (placement, scale), 30 otherwise
    world = {"model": "v", "edit": None, "screens": 0, "measures": 0, "ppls": 0, "calibrated": False, "ppl": {}}

    def screen(lm, cfg, harmful, harmless, inputs=None):
        world["screens"] += 1
        h, o, _, _ = _row(world)
        score = h if world["calibrated"] else 0.0
        return {"harmful": {"refusing": h, "mean_score": score}, "harmless": {"refusing": o, "mean_score": 0.0}}

    def measure(self, perplexity=None):
        world["measures"] += 1
        _, _, asr, over = _row(world)
        return {
            "asr": rate(round(100 * asr), 100),
            "over_refusal": rate(round(100 * over), 100),
            "degenerate_rate": 0.0,
            "perplexity": perplexity if perplexity is not None else _perplexity(world),
        }

    def perplexity(lm, spec):
        world["ppls"] += 1
        return _perplexity(world)

    monkeypatch.setattr(edit_search, "search_perplexity", perplexity)

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
    rule = res["screen_rule"]
    assert rule["calibration"] is None  # every mean score is 0 here: the screen counts predicted refusals
    assert rule["need"] == pytest.approx(0.65) and rule["harmless_limit"] == pytest.approx(0.15)
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
    # what it spent, summed over the calls (the fakes generate nothing)
    assert res["cost"]["calls"] == 1 and again["cost"]["calls"] == 2 and again["cost"]["new_tokens"] == 0
    assert again["cost"]["seconds"] >= res["cost"]["seconds"] >= 0


def test_search_budget_and_fallbacks(fake):
    world, run = fake
    # a perplexity budget of 0 keeps everything (the fake perplexity never moves); a tighter over-refusal
    # budget rejects x16 and x32 source by generation (12% > 10% + 1%): nothing is within budget
    res = run(max_over_refusal_increase=0.01)
    assert res["screen_rule"]["harmless_limit"] == pytest.approx(0.11)
    assert res["chosen"]["placement"] == "previous" and res["chosen"]["scale"] == 4.0
    assert not res["chosen"]["target_reached"]  # the best within budgets, reported as missing the target
    assert all(p["over_budget"] for p in res["confirmed"][1:]), [
        (p["placement"], p["scale"], p["over_budget"]) for p in res["confirmed"]
    ]


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


def test_screens_of_a_0_3_0_search_are_kept(fake, tmp_path):
    """A search state written by 0.3.0 (no screen_settings, points without per-prompt verdicts): its
    generated points are measured again under the new settings, its screens are not."""
    world, run = fake
    run()
    path = tmp_path / "run" / "repair" / "v+aird.json"
    state = artifacts.read_json(path)
    del state["screen_settings"]
    state["settings"]["screen"] = {"score": "first-token refusal log-odds > 0", "slack": 0.05}  # 0.3.0's
    artifacts.write_json(path, state)
    screens, measures = world["screens"], world["measures"]
    res = run()
    assert world["screens"] == screens  # every screen read back
    assert world["measures"] == measures + 2  # the two confirmed candidates generated again (no base or
    # unrepaired: their caches in repair/ are keyed by the same measurement settings)
    assert res["chosen"]["scale"] == 16.0


def test_calibrated_screen_predicts_asr_from_the_two_references(fake):
    world, run = fake
    world["calibrated"] = True
    res = run()
    # the line through the unrepaired variant (score 0.40, ASR 50%) and the base model (0.70, 25%)
    assert res["screen_rule"]["calibration"] == [[0.40, 0.50], [0.70, 0.25]]
    pred = {(p["placement"], p["scale"]): p["predicted_asr"] for p in res["screened"]}
    assert pred[("source", 16.0)] == pytest.approx(0.5 - 0.25 * 0.28 / 0.30)
    assert pred[("source", 1.0)] == pytest.approx(0.5 - 0.25 * 0.02 / 0.30)
    # predicted <= 25% + 5%: previous x4 (28%), source x16 (27%), source x32 (21%); previous x16 refuses
    # harmless prompts
    assert res["passed_screen"] == ["previous/nonzeros/x4.0", "source/nonzeros/x16.0", "source/nonzeros/x32.0"]
    assert res["chosen"]["placement"] == "source" and res["chosen"]["scale"] == 16.0


def test_perplexity_is_measured_before_generation(fake):
    world, run = fake
    # source x16 breaks the perplexity budget (30 x 1.1 = 33): it is not generated from, and the
    # next candidate (source x32) is confirmed instead, within the same number of generations
    world["ppl"][("source", 16.0)] = 34.0
    res = run()
    assert [(p["placement"], p["scale"]) for p in res["perplexity_rejected"]] == [("source", 16.0)]
    assert "perplexity 34.0 > 33.0" in res["perplexity_rejected"][0]["over_budget"][0]
    assert [(p["placement"], p["scale"]) for p in res["confirmed"]] == [("previous", 4.0), ("source", 32.0)]
    assert res["chosen"]["scale"] == 32.0 and res["generated"] == 2
    # base, unrepaired and two confirmed candidates are generated from; three candidates' perplexity
    assert world["measures"] == 4 and world["ppls"] == 3
    assert run()["perplexity_rejected"] == res["perplexity_rejected"]  # read back, not measured again
    assert world["ppls"] == 3


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
    # without the other form's screens: the settings change, the screens already made are kept
    calls.clear()
    fewer = dataclasses.replace(settings, compare_forms=False)
    with one_thread():
        third = job.run_repair(cfg, root, "v", repair=fewer, progress=False, force=True)
    assert third["search"]["compared"] == [] and len(third["search"]["screened"]) == 4
    assert len(calls) == third["search"]["generated"] + 1  # generation again (new settings), no screen


def _over(refused: int, n: int = 32) -> dict:
    labels = ["refusal"] * refused + ["compliance"] * (n - refused)
    return {"over_refusal": rate(refused, n), "labels": {"harmless": labels}, "degenerate_rate": 0.0}


def test_over_refusal_budget_is_paired():
    """A rise beyond the budget breaks it only when McNemar finds it significant on the same prompts."""
    from refusalkit.repair.search import over_refusal_excess, within_budgets

    spec = RepairConfig()  # budget +5 points
    ref = _over(4)
    assert over_refusal_excess(_over(5), ref, spec) is None  # +3 points: within the budget
    # +3 prompts (4/32 -> 7/32, +9 points): beyond the budget, but 3 discordant prompts give p = 0.25
    assert over_refusal_excess(_over(7), ref, spec) is None
    # +6 prompts, all new refusals: p = 2 x 2^-6 = 0.031 -> over budget, with the counts and p
    why = over_refusal_excess(_over(10), ref, spec)
    assert why.startswith("over-refusal 31% > 12% + 5%") and "+6/-0 prompts, p = 0.031" in why
    assert within_budgets(_over(10), ref, spec) == [why]
    # the same rates on different prompts: 4 refused only by ref, 10 only by the point -> p = 0.18
    moved = {**_over(10), "labels": {"harmless": ["compliance"] * 4 + ["refusal"] * 10 + ["compliance"] * 18}}
    assert over_refusal_excess(moved, ref, spec) is None
    # points without per-prompt verdicts (refusalkit < 0.3.1) are judged on the rates
    bare = {k: v for k, v in _over(7).items() if k != "labels"}
    assert over_refusal_excess(bare, ref, spec).startswith("over-refusal 22% > 12% + 5%")


def test_search_prompts_never_overlap_an_evaluation(tmp_path):
    """A repair is not searched on prompts a model was evaluated on, and a repaired variant is not
    evaluated on the prompts its repair searched on: one-line errors (exit status 2 in the CLI)."""
    import json

    from refusalkit.core.config import EvaluationConfig
    from refusalkit.evaluation.plan import check_search_overlap
    from refusalkit.repair.search import check_disjoint

    layout = RunLayout(tmp_path)
    data = SearchData(["h1", "h2"], ["s1"], {})
    folder = layout.eval_dir("v")
    folder.mkdir(parents=True)
    (folder / "vanilla.jsonl").write_text(json.dumps({"prompt": "h0"}) + "\n")
    check_disjoint(layout, ["base", "v"], data)  # disjoint; base was not evaluated yet
    (folder / "vanilla.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("h0", "h2")))
    with pytest.raises(UserError, match="1 repair search prompts are among the vanilla prompts v was evaluated on"):
        check_disjoint(layout, ["base", "v"], data)

    prompts = {"harmful": {"source": "advbench", "n": 32, "skipped_evaluation_prompts": 100}}
    (layout.root / "v+aird").mkdir()
    artifacts.write_json(layout.repair_info("v+aird"), {"search": {"prompts": prompts}})
    e = EvaluationConfig()
    check_search_overlap(layout, "v+aird", e)  # 100 prompts: the search's start after them
    with pytest.raises(UserError, match="searched on advbench prompts 101-132; evaluating 120"):
        check_search_overlap(layout, "v+aird", dataclasses.replace(e, n_prompts=120))
    check_search_overlap(layout, "v+aird", dataclasses.replace(e, n_prompts=120, prompts="harmbench"))
