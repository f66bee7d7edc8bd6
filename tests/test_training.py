"""Training loop: determinism, exact resume after a crash, early stopping, budgets, files, tracking.

The model is a toy ``Trainable`` (embedding -> dropout -> linear next-item scorer) on synthetic
pairs ``x -> TARGET[x]`` with 20 % label noise, so the validation NDCG really improves. Randomness
comes from everywhere a real pipeline draws it: dropout (global torch RNG), negatives from a
generator the model owns (as ``Recommender`` does), label noise from a numpy generator the dataset
owns, input corruption in the collate function (global numpy and ``random``). A resume is exact
only if every one of these states is checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from mmrec.evaluation import metrics_from_ranks
from mmrec.tracking import JsonlTracker, MultiTracker, read_jsonl_run
from mmrec.training import (
    TrainConfig,
    Trainable,
    TrainResult,
    build_optimizer,
    epoch_batches,
    find_generators,
    lr_factor,
    train,
)
from tests.conftest import REPO

V = 40  # items
N_TRAIN = 300  # -> 10 batches of 32 per epoch (the last one holds 12)
TARGET = torch.randperm(V, generator=torch.Generator().manual_seed(123))


class Toy(nn.Module):
    """Next-item scorer with dropout, a sampled-negative loss part and an example counter buffer."""

    def __init__(self, init_seed: int = 0, d: int = 16):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.emb = nn.Embedding(V, d)
            self.drop = nn.Dropout(0.2)
            self.out = nn.Linear(d, V)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.generator = torch.Generator().manual_seed(0)  # negatives, like Recommender.generator
        self.calls = 0  # training_loss calls in this process (not state)

    def forward(self, x):
        return self.out(self.drop(self.emb(x)))  # (B, V)

    def training_loss(self, batch):
        self.calls += 1
        self.seen += batch["x"].shape[0]
        logits = self(batch["x"]).float()  # (B, V)
        y = batch["y"]
        ce = F.cross_entropy(logits, y)
        neg = torch.randint(0, V, y.shape, generator=self.generator)
        bpr = -F.logsigmoid(logits.gather(1, y[:, None]) - logits.gather(1, neg[:, None])).mean()
        return {"loss": ce + 0.1 * bpr, "ce": ce, "bpr": bpr}

    def param_groups(self):
        return [
            {"name": "encoders", "params": list(self.emb.parameters()), "weight_decay": 0.0},
            {"name": "recommender", "params": list(self.out.parameters())},  # takes cfg.weight_decay
        ]


class Pairs(Dataset):
    def __init__(self, n: int = N_TRAIN, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, V, (n,), generator=g)
        noisy = torch.rand(n, generator=g) < 0.2
        self.y = torch.where(noisy, torch.randint(0, V, (n,), generator=g), TARGET[self.x])
        self.rng = np.random.default_rng(0)  # fresh label noise at every visit

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        y = int(self.rng.integers(V)) if self.rng.random() < 0.05 else int(self.y[i])
        return int(self.x[i]), y


def collate(rows):
    x = torch.tensor([r[0] for r in rows])
    y = torch.tensor([r[1] for r in rows])
    if random.random() < 0.5:  # input corruption through the python and numpy RNGs
        x[int(np.random.randint(len(x)))] = int(np.random.randint(V))
    return {"x": x, "y": y}


PEAK = N_TRAIN  # the "peak" metric is best when the model has seen exactly one epoch of examples


def evaluate(model):
    """Full-ranking NDCG@10 / HR@10 of ``x -> TARGET[x]`` over all items, plus a metric that peaks
    after one epoch. It draws from every RNG on purpose: training must not notice."""
    torch.rand(3), np.random.rand(), random.random()
    x = torch.arange(V)
    scores = model(x)  # (V, V)
    target = scores.gather(1, TARGET[:, None])  # (V, 1)
    rank = 1 + (scores > target).sum(1)
    m = metrics_from_ranks(rank, ks=(10,))
    return {"NDCG@10": m["NDCG@10"], "HR@10": m["HR@10"], "peak": -abs(int(model.seen) - PEAK)}


def cfg_(**kw) -> TrainConfig:
    base = dict(
        epochs=3, batch_size=32, lr=0.03, scheduler="cosine", warmup_steps=3, patience=None, seed=7, progress=False, log_every=3
    )
    return TrainConfig(**{**base, **kw})


def killer(event: str, step: int, counter: list | None = None):
    """A hook raising ``KeyboardInterrupt`` right after ``event`` at ``step``."""

    def hook(ev, st):
        if counter is not None and ev == "step":
            counter.append(st)
        if ev == event and st == step:
            raise KeyboardInterrupt(f"killed after {event} at step {step}")

    return hook


def run(out: Path, cfg: TrainConfig, init_seed: int = 0, **kw) -> tuple[Toy, TrainResult]:
    model = Toy(init_seed)
    return model, train(model, Pairs(), collate, evaluate, cfg, out, **kw)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Weights at the last step (the final checkpoint), before the best ones are restored."""
    return load_file(out / "checkpoint" / "model.safetensors")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(ma: Toy, ra: TrainResult, out_a: Path, mb: Toy, rb: TrainResult, out_b: Path) -> None:
    assert ra.best_metrics == rb.best_metrics
    for attr in ("best_step", "steps", "epochs_run", "stopped_early"):
        assert getattr(ra, attr) == getattr(rb, attr), attr
    assert ra.history == rb.history
    assert_same_state(ma.state_dict(), mb.state_dict())  # best weights, restored
    assert_same_state(final_weights(out_a), final_weights(out_b))  # last-step weights
    best_a, best_b = ((o / "best" / "metrics.json").read_text() for o in (out_a, out_b))
    assert json.loads(best_a) == json.loads(best_b)


# -- uninterrupted references, computed once per config ------------------------------------------
RESUME_CFGS = {
    "per_epoch_eval": cfg_(checkpoint_every=4),
    "ckpt_at_eval": cfg_(eval_every=5, checkpoint_every=None),
    "misaligned": cfg_(eval_every=6, checkpoint_every=4, scheduler="linear", max_steps=27),
    "early_stop": cfg_(epochs=20, eval_every=2, checkpoint_every=3, monitor="peak", patience=3),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"ref_{name}")
            cache[name] = (*run(out, RESUME_CFGS[name]), out)
        return cache[name]

    return get


# -- pure pieces ------------------------------------------------------------------------------------
def test_toy_model_satisfies_the_protocol_and_learns(tmp_path, references):
    assert isinstance(Toy(), Trainable)
    untrained = evaluate(Toy().eval())["NDCG@10"]
    model, res, _ = references("per_epoch_eval")
    assert res.best_metrics["NDCG@10"] > untrained + 0.3
    assert [h["step"] for h in res.history] == [10, 20, 30]
    assert res.history[-1]["train"]["loss"] < res.history[0]["train"]["loss"]


def test_config_validation():
    with pytest.raises(ValueError, match="valid: \\['constant', 'cosine', 'linear'\\]"):
        TrainConfig(scheduler="step")
    bad = dict(patience=0, max_steps=0, epochs=0, lr=0.0, grad_clip=0.0, monitor_mode="up", batch_size=1.5, seed=-1)
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            TrainConfig(**{key: value})
    assert TrainConfig(patience=None, grad_clip=None).patience is None


def test_epoch_order_depends_on_seed_and_epoch_only():
    b = epoch_batches(N_TRAIN, 32, seed=7, epoch=2)
    assert len(b) == 10 and [len(x) for x in b] == [32] * 9 + [12]
    assert sorted(i for x in b for i in x) == list(range(N_TRAIN))
    torch.manual_seed(999)  # the global RNG plays no part
    assert epoch_batches(N_TRAIN, 32, seed=7, epoch=2) == b
    assert epoch_batches(N_TRAIN, 32, seed=7, epoch=3) != b
    assert epoch_batches(N_TRAIN, 32, seed=8, epoch=2) != b
    assert [len(x) for x in epoch_batches(N_TRAIN, 32, 7, 2, drop_last=True)] == [32] * 9


def test_lr_schedule_hand_values():
    c = cfg_(scheduler="cosine", warmup_steps=2)
    assert [lr_factor(s, c, 10) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, c, 10) == pytest.approx(0.5)  # progress (6-2)/(10-2) = 0.5
    assert lr_factor(6, cfg_(scheduler="linear", warmup_steps=2), 10) == pytest.approx(0.5)
    assert lr_factor(9, cfg_(scheduler="linear", warmup_steps=2), 10) == pytest.approx(1 / 8)  # last update still learns
    assert lr_factor(9, cfg_(scheduler="constant", warmup_steps=0), 10) == 1.0


def test_optimizer_groups_take_config_defaults_and_check_coverage():
    model = Toy()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    got = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups}
    assert got == {"encoders": (1e-3, 0.0, 1), "recommender": (1e-3, 0.1, 2)}

    model.emb.weight.requires_grad_(False)  # frozen parameters are left out, empty groups dropped
    assert [g["name"] for g in build_optimizer(model, TrainConfig()).param_groups] == ["recommender"]

    model = Toy()
    model.param_groups = lambda: [{"name": "rec", "params": list(model.out.parameters())}]
    with pytest.raises(ValueError, match="emb.weight"):
        build_optimizer(model, TrainConfig())
    stray = nn.Parameter(torch.zeros(2))
    model.param_groups = lambda: [{"params": list(model.parameters()) + [stray]}]
    with pytest.raises(ValueError, match="not registered"):
        build_optimizer(model, TrainConfig())


def test_generators_owned_by_model_dataset_and_collate_are_found():
    class Sampler:
        def __init__(self):
            self.rand = random.Random(0)

        def collate(self, rows):
            return rows

    model, data, sampler = Toy(), Pairs(), Sampler()
    model.out.extra = torch.Generator()  # on a submodule
    model.alias = model.generator  # the same generator twice is listed once
    found = find_generators(model=model, dataset=data, collate=sampler.collate)
    assert found == {
        "model.generator": model.generator,
        "model.out.extra": model.out.extra,
        "dataset.rng": data.rng,
        "collate.rand": sampler.rand,
    }


# -- determinism ------------------------------------------------------------------------------------
def test_same_seed_same_weights_other_seed_other_weights(tmp_path, references):
    ma, ra, out_a = references("per_epoch_eval")
    torch.manual_seed(12345), np.random.seed(1), random.seed(2)  # global state before the call is irrelevant
    mb, rb = run(tmp_path / "b", RESUME_CFGS["per_epoch_eval"])
    assert_same_run(ma, ra, out_a, mb, rb, tmp_path / "b")

    mc, rc = run(tmp_path / "c", cfg_(checkpoint_every=4, seed=8))
    assert not torch.equal(final_weights(out_a)["out.weight"], final_weights(tmp_path / "c")["out.weight"])
    assert rc.history != ra.history
    # the seed also re-seeds the generators the model and the dataset own
    assert not torch.equal(ma.generator.get_state(), mc.generator.get_state())
    assert torch.equal(ma.generator.get_state(), mb.generator.get_state())


def test_evaluation_does_not_change_the_trajectory(tmp_path):
    # evaluate() draws from every RNG; evaluating at every step or once must give the same last-step weights
    _, r1 = run(tmp_path / "a", cfg_(max_steps=12, eval_every=1))
    _, r2 = run(tmp_path / "b", cfg_(max_steps=12))
    assert len(r1.history) == 12 and [h["step"] for h in r2.history] == [10, 12]
    assert_same_state(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


# -- exact resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, event, step, ckpt_step, best_ahead",
    [
        ("per_epoch_eval", "step", 15, 12, False),  # mid-epoch (epoch 1, batch 5): 3 batches to skip
        ("per_epoch_eval", "checkpoint", 8, 8, False),  # right after a checkpoint
        ("ckpt_at_eval", "eval", 20, 15, True),  # after an improving eval wrote best/, before its checkpoint
        ("misaligned", "step", 19, 16, True),  # the eval at 18 came after the last checkpoint (16)
        ("early_stop", "step", 13, 12, False),  # the patience counter and best so far are restored
    ],
)
def test_killed_run_resumes_to_the_same_result(tmp_path, references, name, event, step, ckpt_step, best_ahead):
    cfg = RESUME_CFGS[name]
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(out, cfg, hook=killer(event, step))
    state = json.loads((out / "checkpoint" / "state.json").read_text())["state"]
    assert state["step"] == ckpt_step
    # best/ written after the checkpoint belongs to the part of the run that will be redone
    best_file = out / "best" / "metrics.json"
    best_step_on_disk = json.loads(best_file.read_text())["step"] if best_file.exists() else -1
    assert (best_step_on_disk > state["best_step"]) == best_ahead

    resumed_steps: list[int] = []
    # another init: the weights must come from the checkpoint
    model, res = run(out, cfg, init_seed=99, hook=killer("never", -1, resumed_steps))
    ref_model, ref, ref_out = references(name)
    assert resumed_steps == list(range(ckpt_step + 1, ref.steps + 1))  # continued, not restarted
    assert_same_run(ref_model, ref, ref_out, model, res, out)
    if name == "early_stop":
        assert res.stopped_early


def test_killed_twice_then_resumed(tmp_path, references):
    cfg, out = RESUME_CFGS["misaligned"], tmp_path / "run"
    for init_seed, event, step in ((0, "step", 7), (5, "eval", 24)):  # the first run starts from the reference init
        with pytest.raises(KeyboardInterrupt):
            run(out, cfg, init_seed=init_seed, hook=killer(event, step))
    assert_same_run(*references("misaligned")[:2], references("misaligned")[2], *run(out, cfg, init_seed=6), out)


def test_resume_after_a_failed_checkpoint_write(tmp_path, references, monkeypatch):
    import mmrec.training as training

    cfg, out = RESUME_CFGS["per_epoch_eval"], tmp_path / "run"
    real, calls = training._write_trainer_state, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the third checkpoint (step 12) dies half-written
            raise OSError("disk full")
        real(*a, **k)

    monkeypatch.setattr(training, "_write_trainer_state", failing)
    with pytest.raises(OSError, match="disk full"):
        run(out, cfg)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["best", "checkpoint"]  # no temporary folder left behind
    assert json.loads((out / "checkpoint" / "state.json").read_text())["state"]["step"] == 8

    # a hard kill between atomic_dir's two renames leaves the old version aside and a stray temp folder
    (out / "checkpoint").rename(out / ".checkpoint.old-4242")
    (out / ".checkpoint.tmp-partial").mkdir()
    assert_same_run(*references("per_epoch_eval")[:2], references("per_epoch_eval")[2], *run(out, cfg), out)
    assert sorted(os.listdir(out)) == ["best", "checkpoint"]


KILL_SCRIPT = """
import os, signal, sys
import mmrec.training as training
from tests.test_training import RESUME_CFGS, run
real, calls = training._write_trainer_state, []
def dying(*a, **k):
    calls.append(1)
    real(*a, **k)
    if len(calls) == 4:  # SIGKILL inside the 4th checkpoint write: no cleanup code runs
        os.kill(os.getpid(), signal.SIGKILL)
training._write_trainer_state = dying
run(sys.argv[1], RESUME_CFGS["per_epoch_eval"])
"""


def test_resume_after_sigkill_in_a_subprocess(tmp_path, references):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(p.name.startswith(".checkpoint.tmp-") for p in out.iterdir())  # the half-written one
    model, res = run(out, RESUME_CFGS["per_epoch_eval"])
    assert_same_run(*references("per_epoch_eval")[:2], references("per_epoch_eval")[2], model, res, out)
    assert sorted(os.listdir(out)) == ["best", "checkpoint"]


def test_resuming_a_finished_run_does_nothing(tmp_path, references):
    ref_model, ref, ref_out = references("per_epoch_eval")
    steps: list[int] = []
    model = Toy(3)
    no_eval = lambda m: pytest.fail("evaluated again")  # noqa: E731
    res = train(model, Pairs(), collate, no_eval, RESUME_CFGS["per_epoch_eval"], ref_out, hook=killer("never", -1, steps))
    assert steps == []
    assert res.as_dict() == ref.as_dict()
    assert_same_state(model.state_dict(), ref_model.state_dict())


def test_resume_refuses_a_changed_trajectory_and_resume_false_starts_over(tmp_path, references):
    cfg, out = RESUME_CFGS["per_epoch_eval"], tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(out, cfg, hook=killer("step", 15))
    with pytest.raises(ValueError, match="seed"):
        run(out, cfg_(checkpoint_every=4, seed=8))
    with pytest.raises(ValueError, match="len\\(dataset\\)"):
        train(Toy(), Pairs(n=100), collate, evaluate, cfg, out)
    extra = Toy()
    extra.noise = torch.Generator()
    with pytest.raises(ValueError, match="model.noise"):
        train(extra, Pairs(), collate, evaluate, cfg, out)
    steps: list[int] = []
    model, res = run(out, cfg, resume=False, hook=killer("never", -1, steps))
    assert steps[0] == 1
    assert_same_run(*references("per_epoch_eval")[:2], references("per_epoch_eval")[2], model, res, out)


# -- stopping, budget, best weights -----------------------------------------------------------------
def test_early_stopping_restores_the_best_weights(tmp_path, references):
    model, res, out = references("early_stop")
    # one epoch is 10 steps (300 examples): "peak" is best at step 10, then 3 evaluations without improvement
    assert res.stopped_early and res.best_step == 10 and res.steps == 16
    assert [h["improved"] for h in res.history] == [True] * 5 + [False] * 3
    assert res.best_metrics["peak"] == 0
    assert evaluate(model.eval()) == res.best_metrics  # the returned model is the best one
    assert res.history[-1]["metrics"]["NDCG@10"] != res.best_metrics["NDCG@10"]  # ... and not the last one
    assert_same_state(model.state_dict(), load_file(res.best_path))
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["step"] == 10 and best["metrics"] == res.best_metrics and best["monitor"] == "peak"


def test_max_steps_budget_is_exact(tmp_path):
    model, res = run(tmp_path, cfg_(epochs=10, max_steps=13, scheduler="constant"))
    assert res.steps == 13 and model.calls == 13 and res.epochs_run == pytest.approx(1.3)
    assert [h["step"] for h in res.history] == [10, 13]  # end of epoch 1, then the final step
    assert int(load_file(tmp_path / "checkpoint" / "model.safetensors")["seen"]) == 9 * 32 + 12 + 3 * 32
    assert not res.stopped_early


def test_freed_memory_is_released_every_log_every_steps_and_after_each_evaluation(tmp_path, monkeypatch):
    import mmrec.training as training

    calls: list[int] = []
    monkeypatch.setattr(training, "release_freed_memory", lambda: calls.append(1))
    cfg = cfg_(epochs=2, log_every=3, scheduler="constant")  # 10 steps an epoch
    model_on, res_on = run(tmp_path / "on", cfg)
    assert res_on.steps == 20 and len(calls) == 20 // 3 + 2  # steps 3, 6, ..., 18 and two evaluations
    calls.clear()
    model_off, res_off = run(tmp_path / "off", dataclasses.replace(cfg, release_memory=False))
    assert calls == []
    assert_same_state(model_on.state_dict(), model_off.state_dict())  # memory only, never the weights
    with pytest.raises(ValueError, match="release_memory"):
        TrainConfig(release_memory="yes")


def test_monitor_missing_from_metrics_fails_loudly(tmp_path):
    with pytest.raises(KeyError, match="MRR@10"):
        run(tmp_path, cfg_(max_steps=3, monitor="MRR@10"))


def test_checkpoint_files(tmp_path, references):
    _, res, out = references("per_epoch_eval")
    assert sorted(os.listdir(out)) == ["best", "checkpoint"]
    assert sorted(os.listdir(out / "checkpoint")) == ["best_model.safetensors", "model.safetensors", "state.json", "trainer.pt"]
    assert sorted(os.listdir(out / "best")) == ["metrics.json", "model.safetensors"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["state"]["step"] == 30 and state["config"]["seed"] == 7
    assert set(state["rng"]) == {"numpy", "python", "generators"}
    assert set(state["rng"]["generators"]) == {"dataset.rng"}  # numpy generator states go to JSON
    trainer = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert set(trainer) == {"optimizer", "scheduler", "rng"}
    assert set(trainer["rng"]["generators"]) == {"model.generator"}  # torch generator states as tensors
    # the checkpoint's best copy is the best model (a hard link: no extra disk)
    assert_same_state(load_file(out / "checkpoint" / "best_model.safetensors"), load_file(res.best_path))


# -- bf16, tracking, progress -----------------------------------------------------------------------
def test_bf16_autocast_trains_with_finite_loss(tmp_path):
    model, res = run(tmp_path, cfg_(max_steps=10, bf16=True))
    losses = [h["train"]["loss"] for h in res.history]
    assert losses and all(math.isfinite(v) for v in losses)
    assert not torch.equal(model.out.weight, Toy().out.weight)
    assert model.out.weight.dtype == torch.float32  # autocast leaves the master weights in fp32


class Recorder:
    def __init__(self):
        self.params, self.metrics, self.tags, self.artifacts = {}, [], {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, name=None):
        self.artifacts.append(name or Path(path).name)

    def set_tags(self, tags):
        self.tags.update(tags)


def test_tracker_receives_params_losses_and_metrics(tmp_path):
    rec = Recorder()
    cfg = cfg_(max_steps=12, eval_every=4, log_every=5)
    _, res = run(tmp_path / "run", cfg, tracker=MultiTracker(rec, JsonlTracker(tmp_path / "track")))
    assert (rec.params["train.lr"], rec.params["train.monitor"], rec.params["train.max_steps"]) == (0.03, "NDCG@10", 12)
    train_logs = [(s, m) for s, m in rec.metrics if "train/loss" in m]
    assert [s for s, _ in train_logs] == [5, 10]
    expected = {"train/loss", "train/ce", "train/bpr", "train/grad_norm", "train/lr/encoders", "train/lr/recommender"}
    assert expected <= set(train_logs[0][1])
    val = [(s, m["val/NDCG@10"]) for s, m in rec.metrics if "val/NDCG@10" in m]
    assert val == [(h["step"], h["metrics"]["NDCG@10"]) for h in res.history] and [s for s, _ in val] == [4, 8, 12]
    assert any(m.get("best/NDCG@10") == res.best_metrics["NDCG@10"] for _, m in rec.metrics)
    assert rec.artifacts == ["best_metrics.json"]

    saved = read_jsonl_run(tmp_path / "track")
    assert saved.params == rec.params and saved.series("val/NDCG@10") == val
    assert saved.artifacts == ["best_metrics.json"]

    # a resumed run says so
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run2", cfg_(max_steps=12, checkpoint_every=3), hook=killer("step", 7))
    rec2 = Recorder()
    run(tmp_path / "run2", cfg_(max_steps=12, checkpoint_every=3), tracker=rec2)
    assert rec2.tags == {"resumed_from_step": "6"}


def test_progress_bar_shows_loss_and_metric(tmp_path, capsys):
    run(tmp_path / "a", cfg_(max_steps=11, log_every=1, progress=True))
    err = capsys.readouterr().err
    assert "loss=" in err and "NDCG@10=" in err
    run(tmp_path / "b", cfg_(max_steps=11, progress=False))
    assert capsys.readouterr().err == ""


# -- frozen parameters stay out of weight files ---------------------------------------------------------
def frozen_toy(init_seed: int = 0, frozen_seed: int = 5) -> Toy:
    """A Toy whose embedding is frozen (a pretrained encoder's stand-in), set by ``frozen_seed``."""
    model = Toy(init_seed)
    model.emb.load_state_dict(Toy(frozen_seed).emb.state_dict())
    model.emb.requires_grad_(False)
    return model


def test_weight_files_hold_the_trained_tensors_and_a_digest_of_the_frozen_ones(tmp_path):
    from safetensors import safe_open

    cfg = cfg_(max_steps=12, eval_every=4, checkpoint_every=4)
    model = frozen_toy()
    res = train(model, Pairs(), collate, evaluate, cfg, tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoint" / "model.safetensors", res.best_path):
        assert sorted(load_file(path)) == ["out.bias", "out.weight", "seen"]
        with safe_open(str(path), framework="pt") as f:
            assert len(f.metadata()["mmrec.frozen_sha256"]) == 64
    assert torch.equal(model.emb.weight, Toy(5).emb.weight)  # never trained

    # uninterrupted vs killed + resumed into a fresh model with the same frozen part: same end
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(frozen_toy(), Pairs(), collate, evaluate, cfg, out, hook=killer("step", 10))
    resumed = frozen_toy(init_seed=99)
    train(resumed, Pairs(), collate, evaluate, cfg, out)
    assert_same_state(resumed.state_dict(), model.state_dict())

    # other frozen weights than those trained with: refused, nothing loaded silently
    with pytest.raises(ValueError, match="frozen weights are not those this file was trained with"):
        train(frozen_toy(frozen_seed=6), Pairs(), collate, evaluate, cfg, out)
    # another freezing (the embedding now trains): the file lacks trained tensors
    with pytest.raises(ValueError, match=r"missing and trained: \['emb.weight'\]"):
        train(Toy(), Pairs(), collate, evaluate, cfg, out)


def test_full_state_files_from_before_still_load(tmp_path):
    from safetensors.torch import save_model

    from mmrec.training import _load_weights

    src, dst = frozen_toy(init_seed=1), frozen_toy(init_seed=2)
    save_model(src, str(tmp_path / "full.safetensors"))
    _load_weights(dst, tmp_path / "full.safetensors", torch.device("cpu"))
    assert_same_state(dst.state_dict(), src.state_dict())
    save_model(nn.Linear(2, 2), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="tensors the model does not have"):
        _load_weights(dst, tmp_path / "other.safetensors", torch.device("cpu"))


# -- devices: resume on the same device type, no per-step host round trip, deferred checks -----------
def test_resume_refuses_a_checkpoint_from_another_device_type(tmp_path):
    cfg, out = cfg_(max_steps=12, checkpoint_every=4), tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(out, cfg, hook=killer("step", 6))
    state_path = out / "checkpoint" / "state.json"
    meta = json.loads(state_path.read_text())
    assert meta["device"] == "cpu"
    state_path.write_text(json.dumps({**meta, "device": "cuda"}))  # as if written on a GPU
    with pytest.raises(ValueError, match="trained on cuda, the model is on cpu"):
        run(out, cfg)


def test_bf16_default_is_on_for_cuda_only():
    from mmrec.training import use_bf16

    assert TrainConfig().bf16 is None
    assert not use_bf16(TrainConfig(), torch.device("cpu")) and use_bf16(TrainConfig(), torch.device("cuda"))
    assert use_bf16(TrainConfig(bf16=True), torch.device("cpu")) and not use_bf16(TrainConfig(bf16=False), torch.device("cuda"))
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="yes")


class TensorPairs(Dataset):
    """Pairs as tensors (no per-example ``int(tensor)``, which would read a tensor per step)."""

    def __init__(self, n: int):
        self.x = torch.arange(n) % V
        self.y = TARGET[self.x]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def stack(rows):
    return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}


def test_a_training_step_does_not_read_tensors_back(tmp_path, monkeypatch):
    """On CUDA every read of a tensor's value (``float(t)``, ``t.item()``, ``if t:``) waits for the
    GPU. The number of reads of a run with one evaluation must not grow with its number of steps.
    (AdamW reads its step counters, which it keeps on the CPU on every device: not counted.)"""
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if "/torch/optim/" not in caller:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(steps: int) -> int:
        reads.clear()
        cfg = cfg_(epochs=1, batch_size=4, scheduler="constant", warmup_steps=0, log_every=1000)
        train(Toy(), TensorPairs(4 * steps), stack, evaluate, cfg, tmp_path / str(steps))
        return len(reads)

    assert count(3) == count(12)


def test_a_non_finite_loss_names_its_step_and_is_never_checkpointed(tmp_path):
    class Exploding(Toy):
        def training_loss(self, batch):
            out = super().training_loss(batch)
            if int(self.seen) > 5 * 32:  # from step 6 on
                out["loss"] = out["loss"] * float("inf")
            return out

    cfg = cfg_(max_steps=20, checkpoint_every=4, log_every=4)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 6"):
        train(Exploding(), Pairs(), collate, evaluate, cfg, tmp_path)
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert saved["state"]["step"] == 4  # the checkpoint due at step 8 was refused


def test_the_code_that_takes_steps_is_recorded_and_a_finished_run_keeps_it(tmp_path, monkeypatch):
    import mmrec.training as training

    assert training.LOADED_CODE["commit"] is None or len(training.LOADED_CODE["commit"]) == 40  # this checkout's
    monkeypatch.setattr(training, "LOADED_CODE", {"commit": "a" * 40, "dirty": False})  # what a process imported
    cfg = cfg_(epochs=2, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cfg, hook=killer("checkpoint", 3))
    monkeypatch.setattr(training, "LOADED_CODE", {"commit": "b" * 40, "dirty": True})
    _, res = run(tmp_path, cfg)  # resumed by other code: both are named, from the step each took over
    assert res.code == [{"from_step": 0, "commit": "a" * 40, "dirty": False},
                        {"from_step": 3, "commit": "b" * 40, "dirty": True}]
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]["code"]
    assert saved == res.code
    monkeypatch.setattr(training, "LOADED_CODE", {"commit": "c" * 40, "dirty": False})
    _, again = run(tmp_path, cfg)  # a finished run read back takes no step: nothing added
    assert again.code == res.code
