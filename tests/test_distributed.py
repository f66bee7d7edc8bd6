"""Data-parallel training (mmrec.distributed): 2 gloo processes reproduce one process with the same
global batch, a killed rank fails the run loudly and the rerun resumes exactly, the torchrun launch
gives the same run; the pieces (sharding, one process initialising nothing) on their own.

Tolerance of the 1-vs-2-process comparison: per-step training loss within 1e-5 (relative) and
validation metrics within 1e-4 (absolute). Measured here: the losses differ by at most 5e-7 (the
float32 summation order of batches of 7 vs 4 + 3 rows) and the metrics are equal.
"""

from __future__ import annotations

import json
import os
import shutil
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
    """The worker under the real launcher: ``python -m torch.distributed.run --standalone ...``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _rank_main(rank: int, size: int, port: int, fn, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    import torch

    torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1) and in this test process
    try:
        distributed.init_from_env()
        fn(*args)
    except BaseException as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        distributed.shutdown()


def _fit(out: Path, die_at: int | None = None) -> None:
    from tests.distributed_worker import run

    run(out, die_at)


def forked_ranks(out: Path, die_at: int | None = None, size: int = 2, fn=None, args: tuple | None = None,
                 start: str = "fork") -> tuple[list[int], dict[int, str]]:
    """``fn(*args)`` (default: the worker's tiny fit into ``out``) on ``size`` forked gloo ranks (what
    torchrun does, without starting and importing fresh interpreters: a few seconds instead of ~15
    on 2 busy cores); returns every rank's exit code and the errors ranks raised. ``start="spawn"``
    for work that runs a tokenizer: a forked copy of a process whose tokenizer pool already ran hangs."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context(start)
    errors = ctx.Queue()
    fn, args = (fn, args) if fn is not None else (_fit, (out, die_at))
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, fn, args, errors)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.exitcode is None:
            p.kill()
            p.join()
    found = {}
    while not errors.empty():
        rank, msg = errors.get()
        found[rank] = msg
    return [p.exitcode for p in procs], found


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny fit in this process (world size 1) and on 2 gloo ranks."""
    from tests.distributed_worker import run

    root = tmp_path_factory.mktemp("dist")
    one = run(root / "one")
    codes, errors = forked_ranks(root / "two")
    assert codes == [0, 0], errors
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


def test_a_killed_rank_fails_the_others_and_the_rerun_resumes_exactly(runs, tmp_path):
    out = tmp_path / "killed"
    codes, errors = forked_ranks(out, die_at=5)  # rank 1 is SIGKILLed after step 5; the last checkpoint is step 4
    assert codes[1] == -9 and codes[0] not in (0, None)  # rank 0 failed instead of hanging
    assert 0 in errors and errors[0]  # with an error of its own (the collective that lost its peer)
    assert not (out / "result.json").exists()
    assert json.loads((out / "run" / "checkpoint" / "state.json").read_text())["state"]["step"] == 4
    codes, errors = forked_ranks(out)
    assert codes == [0, 0], errors
    resumed, full = result(out), runs["two"]
    assert resumed["tags"] == {"resumed_from_step": "4"}
    assert resumed["weights"] == full["weights"]  # exact resume: bit-identical final weights
    assert resumed["history"] == full["history"]
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


@pytest.mark.slow
def test_torchrun_launch_gives_the_same_run(runs, tmp_path):
    """The documented launcher (what ``mmrec <stage> --nproc 2`` runs) trains bit-identically to the
    forked ranks above."""
    proc = torchrun(tmp_path / "tr")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(tmp_path / "tr")["weights"] == runs["two"]["weights"]


@pytest.mark.slow
def test_torchrun_fails_loudly_on_a_killed_rank_and_the_rerun_resumes(runs, tmp_path):
    out = tmp_path / "killed"
    died = torchrun(out, "--die-at", "5")
    assert died.returncode != 0
    assert "FAILED" in died.stderr and "Signal 9" in died.stderr, died.stderr[-3000:]
    again = torchrun(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert result(out)["tags"] == {"resumed_from_step": "4"}
    assert result(out)["weights"] == runs["two"]["weights"]


def test_a_distributed_checkpoint_does_not_resume_in_one_process(runs, tmp_path):
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


def test_item_features_stage_on_two_ranks_equals_one_process(tmp_path):
    """``mmrec item_features --nproc 2``: each rank encodes its shard, rank 0 merges and writes the
    artifact; the features equal a one-process build."""
    from safetensors.torch import load_file

    from mmrec import stages
    from mmrec.config import load_config
    from mmrec.data.synthetic import generate_demo
    from tests.orchestration.test_assets import write_tiny_project

    cfg = load_config(write_tiny_project(tmp_path))
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    stages.raw_catalog(cfg, "books", progress=False)
    stages.validated_catalog(cfg, "books", progress=False)
    one = stages.item_features(cfg, "books", progress=False)
    expected = load_file(one.path / "features.safetensors")
    shutil.rmtree(one.path)
    shutil.rmtree(cfg.resolve(cfg.features().cache_dir))
    codes, errors = forked_ranks(tmp_path, fn=stages.item_features, args=(cfg, "books", False), start="spawn")
    assert codes == [0, 0], errors
    got = load_file(one.path / "features.safetensors")
    assert got.keys() == expected.keys()
    for k, t in expected.items():  # float16 encoder outputs of another process: equal up to float16 rounding
        if t.is_floating_point():
            torch.testing.assert_close(got[k].float(), t.float(), rtol=1e-2, atol=1e-3, msg=k)
        else:
            assert torch.equal(got[k], t), k
    assert not (cfg.resolve(cfg.features().cache_dir) / "shards").exists()  # merged and cleaned
