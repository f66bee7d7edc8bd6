"""Data-parallel training (mmrec.distributed): 2 gloo processes under torchrun reproduce one
process with the same global batch, a killed rank fails the run loudly and the rerun resumes
exactly; the pieces (sharding, the gathered gradient) checked on their own.

Tolerance of the 1-vs-2-process comparison: per-step training loss within 1e-5 (relative) and
validation metrics within 1e-4 (absolute). Measured here: the losses differ by at most 5e-7 (the
float32 summation order of batches of 7 vs 4 + 3 rows) and the metrics are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrec import distributed
from mmrec.distributed import gather_rows, local_rows, shard, shard_bounds, torchrun_command
from tests.conftest import REPO

WORKER = REPO / "tests" / "distributed_worker.py"
LOSS_RTOL, METRIC_ATOL = 1e-5, 1e-4


def torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny fit in this process (world size 1) and under torchrun with 2 processes."""
    from tests.distributed_worker import run

    root = tmp_path_factory.mktemp("dist")
    one = run(root / "one")
    proc = torchrun(root / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"one": one, "two": result(root / "two"), "root": root}


def test_two_gloo_processes_reproduce_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["steps"] == two["steps"] == 9
    assert one["losses"].keys() == two["losses"].keys()
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]]
    for a, b in zip(one["history"], two["history"]):
        for k, v in a["metrics"].items():
            if isinstance(v, float):
                assert b["metrics"][k] == pytest.approx(v, abs=METRIC_ATOL), (a["step"], k)
    assert one["best_step"] == two["best_step"]
    # the checkpoint of the 2-process run holds both ranks' RNG states and its world size
    state = json.loads((runs["root"] / "two" / "run" / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert (runs["root"] / "two" / "run" / "checkpoint" / "ranks.pt").is_file()


def test_a_killed_rank_fails_the_run_and_the_rerun_resumes_exactly(runs, tmp_path):
    out = tmp_path / "killed"
    died = torchrun(out, "--die-at", "5")  # rank 1 is SIGKILLed after step 5; the last checkpoint is step 4
    assert died.returncode != 0
    assert "FAILED" in died.stderr or "failed" in died.stderr.lower()
    assert not (out / "result.json").exists()
    assert json.loads((out / "run" / "checkpoint" / "state.json").read_text())["state"]["step"] == 4
    again = torchrun(out)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, full = result(out), runs["two"]
    assert resumed["tags"] == {"resumed_from_step": "4"}
    assert resumed["weights"] == full["weights"]  # exact resume: bit-identical final weights
    assert resumed["history"] == full["history"]
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


def test_a_distributed_checkpoint_does_not_resume_in_one_process(runs, tmp_path):
    import shutil

    from tests.distributed_worker import run

    shutil.copytree(runs["root"] / "two" / "run", tmp_path / "run")
    with pytest.raises(ValueError, match="trained by 2 process"):
        run(tmp_path)


def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one_row():
    batch = list(range(100, 107))
    parts = [shard(batch, r, 3) for r in range(3)]
    assert parts == [[100, 101, 102], [103, 104], [105, 106]]
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert sum(parts, []) == batch


def test_one_process_initialises_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert distributed.world() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(x, [3]) is x and local_rows([3]) == slice(0, 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is not set"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.init_from_env()


def test_torchrun_command_and_bad_nproc():
    cmd = torchrun_command(2, ["mmrec", "pretrained_model", "--config", "c.yaml"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mmrec",
                   "pretrained_model", "--config", "c.yaml"]
    with pytest.raises(ValueError, match="positive integer"):
        torchrun_command(0, ["mmrec"])


def test_cli_rejects_a_bad_nproc(capsys):
    from mmrec.cli import main

    assert main(["pretrained_model", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
