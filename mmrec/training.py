"""Training loop: seeded, resumable to the bit, early-stopped on validation.

Hyper-parameters follow PMMRec: AdamW, lr 1e-4, weight decay 0.1 on the recommender and 0 on
the encoders (the model's ``param_groups`` says which is which), early stopping on a validation
metric. The loop knows nothing about the model beyond the ``Trainable`` protocol.

Determinism and exact resume
----------------------------
- ``train`` seeds ``torch``, ``numpy`` and ``random`` from ``cfg.seed`` when a run starts, and
  every random generator that the model (or a submodule), the dataset or the collate function
  keeps as an attribute (``self.generator = torch.Generator()``; numpy ``Generator`` and
  ``random.Random`` too; ``find_generators``) from ``(seed, its name)``.
- The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)`` only
  (``epoch_batches``), so it does not depend on anything that happened before. A run resumed in the
  middle of an epoch rebuilds that epoch's batch list and skips the batches already consumed
  (without loading them).
- A checkpoint holds everything the rest of the run depends on: weights, optimizer and scheduler
  state, the step / epoch / batch counters, the global RNG states (``torch``, which drives dropout;
  CUDA when present; ``numpy``; ``random``), the states of those owned generators, the best metric
  so far, the patience counter, the evaluation history and the running loss sums.
  Nothing that happened after the last checkpoint is trusted: a resumed run redoes those steps and
  evaluations (and may log them to the tracker a second time).
- Evaluation runs under saved-and-restored RNG states, so evaluating (or how often) never changes
  the training trajectory.
- The model's device is the run's: batches go there (from pinned memory on CUDA), the forward
  runs under bf16 autocast on CUDA (``TrainConfig.bf16``), and a step never waits for the device
  (loss parts are summed there and read every ``log_every`` steps, ``StepSums``). A checkpoint
  records its device type and resumes only on that type: a CUDA generator's state and stream are
  not a CPU one's. On CUDA, bit-exact resume also needs deterministic kernels
  (``torch.use_deterministic_algorithms``; ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).
- Distributed (``torchrun``, ``mmrec.distributed``): every rank draws the same global batch list
  and takes its own contiguous rows of each batch (``distributed.shard``); the model is wrapped in
  DistributedDataParallel; rank 0 alone evaluates (its metrics, or its error, broadcast so every
  rank takes the same early-stopping decision), writes checkpoints, ``best/`` and logs. Ranks above
  0 seed their own dropout stream; the owned generators (the global batch's draws) are shared. A
  checkpoint also holds every rank's torch / CUDA / numpy / random state (``ranks.pt``,
  ``state.json``'s ``ranks``) and resumes only with the same number of processes.
- Exactness holds with ``num_workers=0``. With worker processes, randomness *inside* the dataset
  or collate function happens in the workers (seeded per epoch, not per batch), so it is not exact
  after a mid-epoch resume; randomness in the model stays exact.

Files under ``out_dir`` (one writer at a time)::

    checkpoint/            the latest checkpoint, replaced atomically (written to a temporary
      model.safetensors    sibling folder, then renamed); the weights being trained and every
                           buffer, not the frozen parameters (pretrained encoders: the bulk of
                           the model), whose sha256 is recorded instead and checked on loading
      trainer.pt           optimizer + scheduler state, torch / CUDA / torch-generator RNG states
                           (loads with torch.load(weights_only=True))
      state.json           counters, best so far, patience, history, numpy / random RNG states, config
      best_model.safetensors  hard link to the best weights as of this checkpoint (no extra disk)
    best/                  the best weights by ``cfg.monitor``, replaced atomically on improvement
      model.safetensors
      metrics.json         {"step", "epoch", "monitor", "value", "metrics"}

If a crash leaves ``best/`` ahead of the checkpoint (an improvement after the last checkpoint), a
resume puts back the best weights recorded in the checkpoint, so the two always agree.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
import random
import shutil
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmrec import distributed
from mmrec.io import atomic_dir, tensor_digest, write_json
from mmrec.memory import release_freed_memory
from mmrec.tracking import NullTracker, Tracker, code_version, flatten, numeric_metrics

LOADED_CODE = code_version()
"""The code this process runs: the checkout's commit (and whether ``mmrec/`` differed from it) when
this module was imported. A commit made while a long run goes on is not the code that run executes."""
CHECKPOINT = "checkpoint"
BEST = "best"
STATE_FORMAT = 1
RANKS_FILE = "ranks.pt"
"""In a distributed run's checkpoint: every rank's torch (and CUDA) RNG state."""


@runtime_checkable
class Trainable(Protocol):
    """What ``train`` needs from a model (an ``nn.Module``)."""

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss": scalar to minimise, **other named scalar parts, logged only}``."""

    def param_groups(self) -> list[dict]:
        """``[{"params": [...], "weight_decay": float, "name": str}, ...]``; a group may also set
        ``lr``. Keys a group leaves out take ``TrainConfig``'s value."""


# -- learning-rate schedules: factor of the base lr as a function of progress in [0, 1) -----------
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run (pretraining or fine-tuning)."""

    epochs: int = 10
    """Passes over the training examples; training stops at ``epochs`` or ``max_steps``, whichever comes first."""
    batch_size: int = 64
    """Training examples per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate of every parameter group that does not set its own ``lr`` (PMMRec: 1e-4 for all)."""
    weight_decay: float = 0.1
    """AdamW weight decay of every group that does not set its own (PMMRec: 0.1 recommender, 0 encoders)."""
    scheduler: str = "constant"
    """Learning-rate schedule after warm-up, one of ``SCHEDULES``: ``constant``, ``linear`` or
    ``cosine`` (both decay to 0 at the last step)."""
    warmup_steps: int = 0
    """Linear warm-up: update ``s < warmup_steps`` uses ``lr * (s + 1) / warmup_steps``."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; ``None``: no clipping."""
    max_steps: int | None = None
    """Budget in optimizer steps (equal-budget comparisons); ``None``: ``epochs`` alone decides."""
    eval_every: int | None = None
    """Evaluate every this many steps; ``None``: at the end of each epoch. The last step is always evaluated."""
    checkpoint_every: int | None = None
    """Checkpoint every this many steps; ``None``: after each evaluation. The end of training is always checkpointed."""
    patience: int | None = 3
    """Stop after this many evaluations in a row without improvement of ``monitor``; ``None``: never stop early."""
    monitor: str = "NDCG@10"
    """Validation metric (a key of what ``evaluate`` returns) that picks the best model and drives early stopping."""
    monitor_mode: str = "max"
    """``max``: higher ``monitor`` is better; ``min``: lower is better (e.g. a validation loss)."""
    min_delta: float = 0.0
    """An evaluation improves only if it beats the best so far by more than this."""
    seed: int = 0
    """Seeds torch / numpy / random at the start and the data order of every epoch."""
    drop_last: bool = False
    """Drop each epoch's last incomplete batch (in-batch negatives then always come from full batches)."""
    bf16: bool | None = None
    """Run the model's forward under ``torch.autocast(<model device>, dtype=torch.bfloat16)``;
    ``None``: on when the model is on CUDA (``compute.device``), off elsewhere."""
    num_workers: int = 0
    """DataLoader worker processes (exact resume needs 0 when the data pipeline draws random numbers)."""
    log_every: int = 10
    """Send the mean training loss (and its parts) to the tracker every this many steps."""
    release_memory: bool = True
    """Every ``log_every`` steps and after each evaluation, hand the heap memory the allocator holds
    free back to the operating system (glibc ``malloc_trim``, ``mmrec.memory``); without it a long CPU
    run's resident memory grows with heap fragmentation (``benchmarks/bench_memory.py`` measures both)."""
    progress: bool = True
    """Show a tqdm progress bar with the running loss and the last ``monitor`` value."""

    def __post_init__(self):
        def positive(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {v!r}")

        for name in ("epochs", "batch_size", "log_every"):
            positive(name)
        for name in ("max_steps", "eval_every", "checkpoint_every", "patience"):
            positive(name, optional=True)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: {sorted(SCHEDULES)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not self.monitor:
            raise ValueError("monitor must name a validation metric")
        if self.monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor_mode must be 'max' or 'min', got {self.monitor_mode!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be true, false or null (on for CUDA only), got {self.bf16!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.release_memory, bool):
            raise ValueError(f"release_memory must be true or false, got {self.release_memory!r}")


# Fields that change the trajectory of a run: a checkpoint resumes only under the same values.
_TRAJECTORY_FIELDS = (
    "seed", "batch_size", "drop_last", "lr", "weight_decay", "scheduler", "warmup_steps", "grad_clip", "bf16",
)


@dataclass
class TrainResult:
    """What ``train`` returns; the model itself holds the best weights."""

    best_metrics: dict
    """Validation metrics of the best evaluation (empty if ``monitor`` was never finite)."""
    best_step: int
    """Step of the best evaluation; -1 if there was none."""
    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    epochs_run: float
    """Epochs completed, fractional when training stopped mid-epoch."""
    stopped_early: bool
    """Whether ``patience`` ended the run."""
    history: list[dict]
    """One record per evaluation: ``{"step", "epoch", "metrics", "train": mean losses since the
    previous evaluation, "improved"}``."""
    best_path: Path | None
    """``out_dir/best/model.safetensors``, or None without a best evaluation."""
    code: list[dict] = field(default_factory=list)
    """``TrainState.code``: the commits that trained the run (empty: trained before they were recorded)."""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best_path"] = None if self.best_path is None else str(self.best_path)
        return d


@dataclass
class TrainState:
    """The loop's counters and records: everything besides tensors that a checkpoint restores."""

    n_examples: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of ``epoch`` already consumed (0 at an epoch boundary)."""
    best_value: float | None = None
    best_step: int = -1
    best_metrics: dict = field(default_factory=dict)
    bad_evals: int = 0
    """Evaluations in a row without improvement (the patience counter)."""
    last_eval_step: int = -1
    history: list[dict] = field(default_factory=list)
    log_sums: dict[str, float] = field(default_factory=dict)
    log_count: int = 0
    eval_sums: dict[str, float] = field(default_factory=dict)
    eval_count: int = 0
    code: list[dict] = field(default_factory=list)
    """The code that trained the run: ``{"from_step", "commit", "dirty"}`` (``mmrec.tracking.code_version``),
    one entry per start or resume that took steps with code other than the previous entry's. Empty
    for runs checkpointed before this was recorded: their code is unknown."""

    def add(self, sums: Mapping[str, float], count: int = 1) -> None:
        """Add the loss parts of ``count`` steps (``sums``: their totals)."""
        for own in (self.log_sums, self.eval_sums):
            for k, v in sums.items():
                own[k] = own.get(k, 0.0) + v
        self.log_count += count
        self.eval_count += count

    @staticmethod
    def means(sums: Mapping[str, float], count: int) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()} if count else {}


# -- pure pieces ------------------------------------------------------------------------------------
def _derived_seed(*keys: int) -> int:
    """A 63-bit seed derived from ``keys`` (independent streams for different keys)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def n_batches(n_examples: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch."""
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Example indices of every batch of ``epoch``, a function of ``(seed, epoch)`` only."""
    g = torch.Generator().manual_seed(_derived_seed(seed, epoch))
    perm = torch.randperm(n_examples, generator=g).tolist()
    nb = n_batches(n_examples, batch_size, drop_last)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a run that is not stopped early."""
    total = cfg.epochs * batches_per_epoch
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def lr_factor(update: int, cfg: TrainConfig, total: int) -> float:
    """Multiplier of the base lr for 0-based optimizer update ``update`` of a ``total``-step run."""
    if update < cfg.warmup_steps:
        return (update + 1) / cfg.warmup_steps
    progress = (update - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return SCHEDULES[cfg.scheduler](min(progress, 1.0))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups()`` (or one group of all parameters when the model has no
    such method). Frozen parameters are left out, groups left empty dropped; every trainable
    parameter of the model must be in exactly one group and every listed parameter must belong to
    the model (else it would be trained but never checkpointed)."""
    raw = model.param_groups() if hasattr(model, "param_groups") else [{"params": list(model.parameters())}]
    names = {id(p): n for n, p in model.named_parameters()}
    groups, seen = [], {}
    for i, g in enumerate(raw):
        if not isinstance(g, Mapping) or "params" not in g:
            raise ValueError(f"param group {i} must be a mapping with 'params', got {g!r:.200}")
        gname = str(g.get("name", f"group{i}"))
        params = []
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError(f"param group {gname!r} holds a parameter that is not registered in the model")
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]!r} is in groups {seen[id(p)]!r} and {gname!r}")
            seen[id(p)] = gname
            if p.requires_grad:
                params.append(p)
        if params:
            lr, wd = g.get("lr", cfg.lr), g.get("weight_decay", cfg.weight_decay)
            groups.append({**g, "params": params, "name": gname, "lr": lr, "weight_decay": wd})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no param group (they would never be updated): {missing[:10]}")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total))


def _improved(value: Any, best: float | None, cfg: TrainConfig) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + cfg.min_delta if cfg.monitor_mode == "max" else value < best - cfg.min_delta


def _stopped_early(state: TrainState, cfg: TrainConfig) -> bool:
    return cfg.patience is not None and state.bad_evals >= cfg.patience


def _finished(state: TrainState, cfg: TrainConfig) -> bool:
    return (
        _stopped_early(state, cfg)
        or state.epoch >= cfg.epochs
        or (cfg.max_steps is not None and state.step >= cfg.max_steps)
    )


# -- RNG states -------------------------------------------------------------------------------------
AnyGenerator = torch.Generator | np.random.Generator | random.Random
_GENERATOR_TYPES = (torch.Generator, np.random.Generator, random.Random)


def seed_everything(seed: int, generators: Mapping[str, AnyGenerator] | None = None) -> None:
    """Seed the global torch / numpy / random RNGs, and each of ``generators`` from ``(seed, name)``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for name, g in (generators or {}).items():
        s = _derived_seed(seed, 2, zlib.crc32(name.encode()))
        if isinstance(g, torch.Generator):
            g.manual_seed(s)
        elif isinstance(g, np.random.Generator):
            g.bit_generator.state = type(g.bit_generator)(s).state
        else:
            g.seed(s)


def _seed_globals(seed: int) -> None:
    """Seed the global torch / numpy / random RNGs only (a rank's own dropout stream)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _global_rng() -> dict[str, Any]:
    """This process's global RNG states (one entry of a distributed checkpoint's ``ranks``)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_global_rng(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def find_generators(**owners: Any) -> dict[str, AnyGenerator]:
    """Random generators an object keeps as attributes (``self.generator = torch.Generator()``),
    searched on each owner and, for an ``nn.Module``, on every submodule: ``{"model.generator": g}``.
    A bound method is searched on its object. Each generator is listed once, under the first name
    found (attributes in assignment order)."""
    found: dict[str, AnyGenerator] = {}
    seen: set[int] = set()
    for prefix, owner in owners.items():
        owner = getattr(owner, "__self__", owner)
        objs = owner.named_modules() if isinstance(owner, nn.Module) else [("", owner)]
        for path, obj in objs:
            for attr, v in list(getattr(obj, "__dict__", {}).items()):
                if isinstance(v, _GENERATOR_TYPES) and id(v) not in seen:
                    seen.add(id(v))
                    found[".".join(x for x in (prefix, path, attr) if x)] = v
    return found


def _capture_rng(generators: Mapping[str, AnyGenerator]) -> dict[str, Any]:
    own = {}
    for name, g in generators.items():
        if isinstance(g, torch.Generator):
            own[name] = g.get_state()
        elif isinstance(g, np.random.Generator):
            own[name] = copy.deepcopy(g.bit_generator.state)
        else:
            own[name] = g.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": own,
    }


def _restore_rng(rng: Mapping[str, Any], generators: Mapping[str, AnyGenerator]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    for name, g in generators.items():
        state = rng["generators"][name]
        if isinstance(g, torch.Generator):
            g.set_state(state)
        elif isinstance(g, np.random.Generator):
            g.bit_generator.state = state
        else:
            g.setstate(state)


def _to_json(x: Any) -> Any:
    """RNG states as JSON: arrays and tuples tagged so that ``_from_json`` gives them back."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_json(x: Any) -> Any:
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def _split_rng(rng: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor states for ``trainer.pt``, the rest as JSON for ``state.json``)."""
    own = rng["generators"]
    own_tensors = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
    own_rest = {k: v for k, v in own.items() if not isinstance(v, torch.Tensor)}
    tensors = {"torch": rng["torch"], "cuda": rng["cuda"], "generators": own_tensors}
    rest = {"numpy": rng["numpy"], "python": rng["python"], "generators": own_rest}
    return tensors, _to_json(rest)


def _join_rng(tensors: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, Any]:
    rest = _from_json(rest)
    own = {**rest["generators"], **tensors["generators"]}
    return {**rest, "torch": tensors["torch"], "cuda": tensors["cuda"], "generators": own}


# -- files ------------------------------------------------------------------------------------------
FROZEN_DIGEST = "mmrec.frozen_sha256"
"""safetensors metadata key: sha256 of the frozen parameters left out of a weights file."""


def _frozen_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train (tied parameters under every name)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _frozen_digest(state: Mapping[str, torch.Tensor], names: set[str]) -> str:
    return tensor_digest((name, state[name]) for name in sorted(names))


def _save_weights(model: nn.Module, path: Path) -> None:
    """The trained parameters and all buffers to ``path``; the frozen ones only as a digest.

    A frozen pretrained text encoder is ~90% of a CPU model's bytes and never changes during
    training, so checkpoints and best-model files stay small; ``_load_weights`` checks that the
    model it loads into holds the same frozen weights.
    """
    state = model.state_dict()
    frozen = _frozen_names(model)
    kept = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k not in frozen}
    save_file(kept, str(path), metadata={FROZEN_DIGEST: _frozen_digest(state, frozen), "frozen_tensors": str(len(frozen))})


def _load_weights(model: nn.Module, path: Path, device: torch.device) -> None:
    """Load a file of ``_save_weights`` (or a full state dict): every key must fit the model, the
    left-out ones must be exactly its frozen parameters, with the digest recorded at saving."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    saved = load_file(str(path), device=str(device))
    own = model.state_dict()
    unexpected, missing = sorted(set(saved) - set(own)), set(own) - set(saved)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors the model does not have (first: {unexpected[:5]})")
    if FROZEN_DIGEST in meta:
        frozen = _frozen_names(model)
        if missing != frozen:
            raise ValueError(f"{path}: left out {len(missing)} tensors but the model has {len(frozen)} frozen ones; "
                             f"missing and trained: {sorted(missing - frozen)[:5]}, frozen but stored: "
                             f"{sorted(frozen - missing)[:5]}")
        if _frozen_digest(own, frozen) != meta[FROZEN_DIGEST]:
            raise ValueError(f"{path}: the model's frozen weights are not those this file was trained with "
                             "(another pretrained encoder or checkpoint?); start a new run")
    elif missing:
        raise ValueError(f"{path}: {len(missing)} tensors missing (first: {sorted(missing)[:5]})")
    model.load_state_dict(saved, strict=False)


def _recover(out_dir: Path) -> None:
    """Undo what a hard kill inside ``atomic_dir`` can leave: a half-written temporary folder, or
    (killed between its two renames) the previous version moved aside and no current one."""
    for name in (CHECKPOINT, BEST):
        target = out_dir / name
        olds = sorted(out_dir.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if not target.exists() and olds:
            olds[-1].rename(target)
        for p in [*out_dir.glob(f".{name}.old-*"), *out_dir.glob(f".{name}.tmp-*")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _best_meta(state: TrainState, cfg: TrainConfig) -> dict:
    epoch = next(h["epoch"] for h in state.history if h["step"] == state.best_step)
    return {
        "step": state.best_step,
        "epoch": epoch,
        "monitor": cfg.monitor,
        "value": state.best_value,
        "metrics": state.best_metrics,
    }


def _save_best(out_dir: Path, model: nn.Module, state: TrainState, cfg: TrainConfig) -> None:
    with atomic_dir(out_dir / BEST) as tmp:
        _save_weights(model, tmp / "model.safetensors")
        write_json(tmp / "metrics.json", _best_meta(state, cfg))


def _read_best_meta(out_dir: Path) -> dict | None:
    p = out_dir / BEST / "metrics.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _write_trainer_state(path: Path, optimizer, scheduler, rng_tensors: Mapping[str, Any]) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_tensors}, path)


def _save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    state: TrainState,
    cfg: TrainConfig,
    generators: Mapping[str, AnyGenerator],
    device: torch.device,
    ranks: list[dict[str, Any]] | None = None,
) -> None:
    """``ranks``: every rank's ``_global_rng`` in a distributed run (``ranks.pt`` + ``state.json``'s
    ``ranks`` and ``world_size``); a single process's checkpoint has none of these."""
    rng_tensors, rng_json = _split_rng(_capture_rng(generators))
    extra = {}
    with atomic_dir(out_dir / CHECKPOINT) as tmp:
        _save_weights(model, tmp / "model.safetensors")
        _write_trainer_state(tmp / "trainer.pt", optimizer, scheduler, rng_tensors)
        if ranks is not None:
            torch.save({"torch": [r["torch"] for r in ranks], "cuda": [r["cuda"] for r in ranks]}, tmp / RANKS_FILE)
            extra = {"world_size": len(ranks), "ranks": _to_json([{"numpy": r["numpy"], "python": r["python"]} for r in ranks])}
        if state.best_step >= 0:
            meta = _read_best_meta(out_dir)
            if meta is None or meta["step"] != state.best_step:
                raise RuntimeError(f"{out_dir / BEST} does not hold the best model of step {state.best_step}: {meta}")
            _link_or_copy(out_dir / BEST / "model.safetensors", tmp / "best_model.safetensors")
        write_json(
            tmp / "state.json",
            {
                "format": STATE_FORMAT,
                "state": dataclasses.asdict(state),
                "config": dataclasses.asdict(cfg),
                "device": device.type,
                "rng": rng_json,
                **extra,
            },
        )


def _check_resumable(saved_cfg: Mapping[str, Any], cfg: TrainConfig, saved_n: int, n: int, where: Path) -> None:
    fields = list(_TRAJECTORY_FIELDS)
    if cfg.scheduler != "constant":  # a decaying schedule depends on the planned length
        fields += ["epochs", "max_steps"]
    diff = {f: (saved_cfg.get(f), getattr(cfg, f)) for f in fields if saved_cfg.get(f) != getattr(cfg, f)}
    if saved_n != n:
        diff["len(dataset)"] = (saved_n, n)
    if diff:
        raise ValueError(
            f"cannot resume {where}: settings differ from the checkpoint's (saved, now): {diff}; "
            "use resume=False or another out_dir to start a new run"
        )


def _load_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    n: int,
    device: torch.device,
    generators: Mapping[str, AnyGenerator],
    writer: bool = True,
) -> TrainState:
    """Restore everything from ``out_dir/checkpoint``; only the ``writer`` (rank 0) repairs ``best/``."""
    ckpt = out_dir / CHECKPOINT
    meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    rank, size = distributed.world()
    saved_size = meta.get("world_size", 1)
    if saved_size != size:
        raise ValueError(f"cannot resume {ckpt}: it was trained by {saved_size} process(es), this run has {size}; "
                         f"resume with {saved_size}, or use resume=False or another out_dir to start a new run")
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{ckpt}: unsupported checkpoint format {meta.get('format')!r} (expected {STATE_FORMAT})")
    state = TrainState(**meta["state"])
    saved_device = meta.get("device", "cpu")  # checkpoints from before devices were CPU ones
    if saved_device != device.type:
        # the random streams (a CUDA generator's state is not a CPU one's) and the kernels differ
        raise ValueError(f"cannot resume {ckpt}: it was trained on {saved_device}, the model is on {device.type}; "
                         f"resume on {saved_device}, or use resume=False or another out_dir to start a new run")
    _check_resumable(meta["config"], cfg, state.n_examples, n, ckpt)
    _load_weights(model, ckpt / "model.safetensors", device)
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng = _join_rng(trainer["rng"], meta["rng"])
    if set(rng["generators"]) != set(generators):
        raise ValueError(
            f"cannot resume {ckpt}: the checkpoint holds the states of generators {sorted(rng['generators'])}, "
            f"the model, dataset and collate function now have {sorted(generators)}"
        )
    _restore_rng(rng, generators)
    if size > 1:  # this rank's own dropout stream
        own = torch.load(ckpt / RANKS_FILE, map_location="cpu", weights_only=True)
        _set_global_rng({"torch": own["torch"][rank], "cuda": own["cuda"][rank], **_from_json(meta["ranks"][rank])})
    if not writer:
        return state
    # best/ may be ahead of the checkpoint (an improvement after it, then a crash): put back the
    # checkpoint's own best so that the two agree
    best_meta = _read_best_meta(out_dir)
    if state.best_step < 0:
        shutil.rmtree(out_dir / BEST, ignore_errors=True)
    elif best_meta is None or best_meta["step"] != state.best_step:
        with atomic_dir(out_dir / BEST) as tmp:
            _link_or_copy(ckpt / "best_model.safetensors", tmp / "model.safetensors")
            write_json(tmp / "metrics.json", _best_meta(state, cfg))
    return state


# -- the loop ---------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _scalar(name: str, v: Any) -> torch.Tensor | float:
    """A loss part as a float64 scalar, left on its device (reading it would wait for the GPU)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"training_loss()[{name!r}] must be a scalar, got shape {tuple(v.shape)}")
        return v.detach().reshape(()).to(torch.float64)
    return float(v)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast: ``cfg.bf16``, or on CUDA only when it is None."""
    return device.type == "cuda" if cfg.bf16 is None else cfg.bf16


class StepSums:
    """The loss parts of the steps since the last read, summed where they were computed.

    Reading a CUDA scalar makes the host wait for the GPU, so a step reads nothing: its parts are
    added on the device and the non-finite checks become a device-side record of the first bad
    step. ``flush`` (every ``log_every`` steps, before an evaluation and before a checkpoint) moves
    the sums into the ``TrainState`` with one transfer and raises ``FloatingPointError`` for a
    non-finite loss or gradient norm, naming the step. A bad step is thus reported up to
    ``log_every`` steps late, but before anything after it is evaluated or checkpointed. Sums are
    float64, as the Python floats they replace, so logged means do not change.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.bad = torch.zeros(2, dtype=torch.long, device=device)  # first step with a bad (loss, grad norm); 0: none

    def add(self, parts: Mapping[str, torch.Tensor | float], finite: torch.Tensor, step: int) -> None:
        """``finite``: (2,) bool, whether this step's loss and gradient norm are finite."""
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.bad = torch.where((self.bad == 0) & ~finite, step, self.bad)

    def flush(self, state: TrainState) -> None:
        if not self.count:
            return
        names = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        values = torch.cat([torch.stack([self.sums[k].to(self.device) for k in names] or [self.bad.new_zeros((), dtype=torch.float64)]),
                            self.bad.to(torch.float64)]).tolist()  # the one wait for the device
        bad_loss, bad_grad = int(values[-2]), int(values[-1])
        if bad_loss and (not bad_grad or bad_loss <= bad_grad):
            raise FloatingPointError(f"non-finite training loss at step {bad_loss}")
        if bad_grad:
            raise FloatingPointError(f"non-finite gradient norm at step {bad_grad}")
        sums = {k: (values[names.index(k)] if k in names else v) for k, v in self.sums.items()}
        state.add(sums, self.count)
        self.sums, self.count = {}, 0


def _train_step(
    model: nn.Module, batch: Any, optimizer, scheduler, cfg: TrainConfig, device: torch.device, step: int,
    sums: StepSums, forward: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
) -> list[float]:
    """One optimizer step, with no host-device synchronisation of its own; adds the loss parts (and
    gradient norm) to ``sums`` and returns the lr each group used. ``forward``: what computes the
    loss parts (the DistributedDataParallel wrapper under torchrun), ``model.training_loss`` by default."""
    model.train()
    batch = _to_device(batch, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device)):
        out = (forward or model.training_loss)(batch)
    if "loss" not in out:
        raise KeyError(f"training_loss() must return a 'loss' entry, got {sorted(out)}")
    loss = out["loss"].float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts = {k: _scalar(k, v) for k, v in out.items()}
    finite = torch.isfinite(loss.detach())
    if cfg.grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        parts["grad_norm"] = norm.detach().to(torch.float64)
        finite = torch.stack([finite, torch.isfinite(norm)])
    else:
        finite = torch.stack([finite, torch.ones_like(finite)])
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.step()
    scheduler.step()
    sums.add(parts, finite.to(device), step + 1)
    return lrs


def _evaluate(
    model: nn.Module, evaluate: Callable[[nn.Module], Mapping[str, Any]], generators: Mapping[str, AnyGenerator]
) -> dict[str, Any]:
    """``evaluate(model)`` in eval mode, without gradients, leaving every RNG as it found it."""
    rng = _capture_rng(generators)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = evaluate(model)
    finally:
        _restore_rng(rng, generators)
        model.train(was_training)
    if not isinstance(metrics, Mapping):
        raise TypeError(f"evaluate() must return a mapping of metric name -> value, got {type(metrics).__name__}")
    return {str(k): (float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v) for k, v in metrics.items()}


def _evaluate_on_rank0(
    model: nn.Module, evaluate: Callable[[nn.Module], Mapping[str, Any]], generators: Mapping[str, AnyGenerator]
) -> dict[str, Any]:
    """``_evaluate`` on rank 0, its metrics (or its error) broadcast: every rank takes the same
    decisions (best, patience, stop) from the same numbers, and none waits forever for a failed one."""
    error: BaseException | None = None
    payload: tuple[str, Any]
    if distributed.world()[0] == 0:
        try:
            payload = ("ok", _evaluate(model, evaluate, generators))
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error, payload = exc, ("error", f"{type(exc).__name__}: {exc}")
    else:
        payload = ("", None)
    kind, value = distributed.broadcast_object(payload)
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"the evaluation on rank 0 failed: {value}")
    return value


def train(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any] | None,
    evaluate: Callable[[nn.Module], Mapping[str, Any]],
    cfg: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    resume: bool = True,
    *,
    hook: Callable[[str, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` and leave it holding its best weights (by ``cfg.monitor``).

    ``evaluate(model)`` returns validation metrics; it runs in eval mode under ``torch.no_grad``.
    With ``resume`` and a checkpoint in ``out_dir``, training continues from it (the passed model's
    weights are replaced) and ends exactly as an uninterrupted run would; without, any previous
    checkpoint and best model in ``out_dir`` are removed first. ``hook(event, step)`` is called
    after each ``"step"``, ``"eval"`` and ``"checkpoint"``; an exception it raises ends the run
    like a crash would (tests use it). The model is left in eval mode.
    """
    out_dir = Path(out_dir)
    rank, size = distributed.world()  # (0, 1) unless launched by torchrun (mmrec.distributed)
    writer = rank == 0  # the one process that writes files and logs
    tracker = tracker if tracker is not None and writer else NullTracker()
    n = len(dataset)
    per_epoch = n_batches(n, cfg.batch_size, cfg.drop_last)
    if per_epoch == 0:
        raise ValueError(f"no training batch: {n} examples, batch_size {cfg.batch_size}, drop_last {cfg.drop_last}")
    smallest = cfg.batch_size if cfg.drop_last or n % cfg.batch_size == 0 else n % cfg.batch_size
    if smallest < size:
        raise ValueError(f"the last batch of each epoch holds {smallest} examples, fewer than the {size} processes "
                         "(each needs a row): set drop_last, or another batch_size")
    total = total_steps(cfg, per_epoch)
    device = _model_device(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    generators = find_generators(model=model, dataset=dataset, collate=collate_fn)
    out_dir.mkdir(parents=True, exist_ok=True)
    if writer:
        _recover(out_dir)
    distributed.barrier()

    if distributed.broadcast_object(resume and (out_dir / CHECKPOINT / "state.json").exists()):
        state = _load_checkpoint(out_dir, model, optimizer, scheduler, cfg, n, device, generators, writer=writer)
        tracker.set_tags({"resumed_from_step": str(state.step)})
    else:
        if writer:
            for name in (CHECKPOINT, BEST):
                shutil.rmtree(out_dir / name, ignore_errors=True)
        seed_everything(cfg.seed, generators)
        if rank > 0:  # dropout differs per rank; the owned generators (id draws for the global batch) do not
            _seed_globals(_derived_seed(cfg.seed, 3, rank))
        state = TrainState(n_examples=n)
    distributed.barrier()  # rank 0's clean-up and best/ repair are done before anyone reads or writes
    ddp = distributed.wrap(model) if size > 1 else None
    tracker.log_params(flatten(cfg, "train"))
    group_names = [g["name"] for g in optimizer.param_groups]

    def epochs_run() -> float:
        return state.epoch + state.batch_in_epoch / per_epoch

    def notify(event: str) -> None:
        if hook is not None:
            hook(event, state.step)

    shown_loss: list[float] = []  # the last logged mean loss, for the progress bar

    def postfix() -> dict[str, str]:
        pf = {}
        if shown_loss:
            pf["loss"] = f"{shown_loss[-1]:.4f}"
        if state.history:
            v = state.history[-1]["metrics"].get(cfg.monitor)
            pf[cfg.monitor] = f"{v:.4f}" if isinstance(v, float) else str(v)
        return pf

    def run_eval() -> None:
        pending.flush(state)
        metrics = _evaluate(model, evaluate, generators) if size == 1 else _evaluate_on_rank0(model, evaluate, generators)
        if cfg.monitor not in metrics:
            raise KeyError(f"monitor {cfg.monitor!r} is not among the metrics evaluate() returned: {sorted(metrics)}")
        improved = _improved(metrics[cfg.monitor], state.best_value, cfg)
        train_means = TrainState.means(state.eval_sums, state.eval_count)
        record = {"step": state.step, "epoch": epochs_run(), "metrics": metrics, "train": train_means, "improved": improved}
        state.history.append(record)
        state.eval_sums, state.eval_count = {}, 0
        state.last_eval_step = state.step
        if improved:
            state.best_value, state.best_step = float(metrics[cfg.monitor]), state.step
            state.best_metrics, state.bad_evals = metrics, 0
            if writer:
                _save_best(out_dir, model, state, cfg)
        else:
            state.bad_evals += 1
        tracker.log_metrics(numeric_metrics(metrics, "val/"), step=state.step)
        pbar.set_postfix(postfix(), refresh=False)
        if cfg.release_memory:  # evaluation frees its score buffers and every item vector
            release_freed_memory()
        notify("eval")

    def run_checkpoint() -> None:
        pending.flush(state)
        ranks = distributed.gather_objects(_global_rng()) if size > 1 else None  # every rank's dropout stream
        if writer:
            _save_checkpoint(out_dir, model, optimizer, scheduler, state, cfg, generators, device, ranks)
        notify("checkpoint")

    dirty = False  # something happened since the last checkpoint
    pending = StepSums(device)  # loss parts not yet read from the device
    pbar = tqdm(total=total, initial=state.step, disable=not (cfg.progress and writer), desc="train", dynamic_ncols=True)
    try:
        if not _finished(state, cfg):  # this call takes steps: note the code that takes them
            version = LOADED_CODE
            if not state.code or {k: state.code[-1].get(k) for k in version} != version:
                state.code.append({"from_step": state.step, **version})
        while not _finished(state, cfg):
            batches = epoch_batches(n, cfg.batch_size, cfg.seed, state.epoch, cfg.drop_last)[state.batch_in_epoch :]
            if size > 1:  # the distributed sampler: this rank's rows of each global batch
                batches = [distributed.shard(b, rank, size) for b in batches]
            loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collate_fn,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                # the loader draws its worker base seed from this generator, not from the global RNG
                generator=torch.Generator().manual_seed(_derived_seed(cfg.seed, state.epoch, 1)),
            )
            for batch in loader:
                lrs = _train_step(model, batch, optimizer, scheduler, cfg, device, state.step, pending, ddp)
                state.step += 1
                state.batch_in_epoch += 1
                epoch_done = state.batch_in_epoch == per_epoch
                if epoch_done:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                dirty = True
                if state.step % cfg.log_every == 0:
                    pending.flush(state)
                    logged = {f"train/{k}": v for k, v in TrainState.means(state.log_sums, state.log_count).items()}
                    logged.update({f"train/lr/{name}": lr for name, lr in zip(group_names, lrs)})
                    tracker.log_metrics(logged, step=state.step)
                    shown_loss[:] = [logged["train/loss"]]
                    pbar.set_postfix(postfix(), refresh=False)
                    state.log_sums, state.log_count = {}, 0
                    if cfg.release_memory:
                        release_freed_memory()
                pbar.update(1)
                notify("step")
                eval_due = epoch_done if cfg.eval_every is None else state.step % cfg.eval_every == 0
                if eval_due:
                    run_eval()
                if _finished(state, cfg):
                    break  # the last evaluation and checkpoint happen below
                if cfg.checkpoint_every is None:
                    checkpoint_due = state.last_eval_step == state.step
                else:
                    checkpoint_due = state.step % cfg.checkpoint_every == 0
                if checkpoint_due:
                    run_checkpoint()
                    dirty = False
        if state.last_eval_step != state.step:
            run_eval()
            dirty = True
        if dirty:
            run_checkpoint()
    finally:
        pbar.close()

    distributed.barrier()  # rank 0 has written best/ before anyone loads it
    best_path = out_dir / BEST / "model.safetensors"
    if state.best_step >= 0:
        _load_weights(model, best_path, device)
        tracker.log_metrics(numeric_metrics(state.best_metrics, "best/"), step=state.step)
        tracker.log_artifact(out_dir / BEST / "metrics.json", "best_metrics.json")
    model.eval()
    return TrainResult(
        best_metrics=dict(state.best_metrics),
        best_step=state.best_step,
        steps=state.step,
        epochs_run=epochs_run(),
        stopped_early=_stopped_early(state, cfg),
        history=list(state.history),
        best_path=best_path if state.best_step >= 0 else None,
        code=list(state.code),
    )
