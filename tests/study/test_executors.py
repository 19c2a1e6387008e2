"""Sweep executors without a cluster: option checks, the missing-Ray message, the manifest lock under
parallel writers, and the cleanup of what a killed writer leaves. (The Ray executor end to end, with
a killed worker, is in test_sweep.py.)"""

from __future__ import annotations

import multiprocessing as mp
import sys

import pytest

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.core.manifest import update_manifest
from refusalkit.study.executors import LocalExecutor, RayExecutor, make_executor


def test_local_executor_runs_points_in_order_and_turns_user_errors_into_outcomes():
    def fn(x, *, fail):
        if x in fail:
            raise UserError(f"cannot make {x}")
        return {"x": x}

    ex = make_executor("local")
    assert isinstance(ex, LocalExecutor) and ex.describe() == {"kind": "local"}
    jobs = [(str(x), (x,), {"fail": {2}}) for x in (1, 2, 3)]
    assert list(ex.points(fn, jobs)) == [("1", {"x": 1}, None), ("2", None, "cannot make 2"), ("3", {"x": 3}, None)]

    def bug(x, *, fail):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):  # a bug is not a failed point: it surfaces
        list(ex.points(bug, jobs))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"workers": 0}, "--workers"),
        ({"cpus_per_point": 0}, "--cpus-per-point"),
        ({"gpus_per_point": -1}, "--gpus-per-point"),
        ({"max_retries": -1}, "--max-retries"),
    ],
)
def test_impossible_ray_options_are_one_line_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        make_executor("ray", **kwargs)


def test_executor_names_and_address(monkeypatch):
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("slurm")
    with pytest.raises(UserError, match="--address is for --executor ray"):
        make_executor("local", address="auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(UserError, match=r"pip install 'refusalkit\[cluster\]'"):
        RayExecutor()


def _record_stages(args):
    path, worker, n = args
    for i in range(n):
        update_manifest(path, 0, f"w{worker}/stage{i}", 0.1)


def test_parallel_manifest_updates_keep_every_stage(tmp_path):
    path = tmp_path / "manifest.json"
    update_manifest(path, 0, "base/extract", 1.0)
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_record_stages, [(path, w, 8) for w in range(4)])
    stages = artifacts.read_json(path)["stages"]
    assert len(stages) == 1 + 4 * 8 and "base/extract" in stages
    # the caller's older copy never drops what others recorded since
    update_manifest(path, 0, "late/stage", 2.0, existing={"stages": {"base/extract": {"seconds": 1.0}}})
    assert len(artifacts.read_json(path)["stages"]) == 2 + 4 * 8


def test_remove_partial_writes(tmp_path):
    v = tmp_path / "wanda-0.5"
    (v / "eval").mkdir(parents=True)
    keep = [v / "compression.json", v / "eval" / "asr.json", v / ".gitignore"]
    for f in keep:
        f.write_text("{}")
    left = [v / ".compression.json.ab12cd34.tmp", v / "eval" / ".vanilla.jsonl.zz9xx_01.tmp"]
    for f in left:
        f.write_text("half")
    (v / ".model.k3j2h1g0").mkdir()  # a half-saved model folder
    (v / ".model.k3j2h1g0" / "model.safetensors").write_bytes(b"\0" * 16)
    (v / ".model.old-1764500000").mkdir()  # a replaced model folder not yet removed
    removed = artifacts.remove_partial_writes(v)
    assert sorted(removed) == sorted([*left, v / ".model.k3j2h1g0", v / ".model.old-1764500000"])
    assert all(f.exists() for f in keep) and not (v / ".model.k3j2h1g0").exists()
    # with a prefix: only that variant's leftovers in a shared folder
    cmp = tmp_path / "compare"
    cmp.mkdir()
    (cmp / ".wanda-0.5.json.aaaaaaaa.tmp").write_text("x")
    (cmp / ".rtn-w4.json.bbbbbbbb.tmp").write_text("x")
    assert [p.name for p in artifacts.remove_partial_writes(cmp, prefix="wanda-0.5.json.")] == [
        ".wanda-0.5.json.aaaaaaaa.tmp"
    ]
    assert (cmp / ".rtn-w4.json.bbbbbbbb.tmp").exists()
    assert artifacts.remove_partial_writes(tmp_path / "missing") == []
