"""Devices: ``compute.device`` resolution and errors, placement of the model's content, popularity
and random generator, exact resume of a real ``Recommender`` with generator-drawn randomness, and
(``gpu`` marker, skipped without CUDA) the same runs on CUDA matching the CPU.

CUDA against CPU, what "match" means here: the random streams of a CUDA generator are not a CPU
one's, so the GPU comparisons train without random draws (dropout 0, no NID/RCL corruption,
softmax objectives, data order from a CPU generator, bf16 off, TF32 off). What is left is float
rounding of other kernels: per-step training losses agree within ``LOSS_RTOL`` and the validation
/ test metrics within ``METRIC_ATOL`` (absolute). The exact-resume test on CUDA runs with
deterministic kernels (``CUBLAS_WORKSPACE_CONFIG`` is set below, before CUDA starts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from mmrec.config import ComputeConfig, ConfigError, load_config
from mmrec.models.recommender import ModelConfig, Recommender
from mmrec.models.towers import ItemContent
from tests.conftest import REPO

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (must precede CUDA start)

LOSS_RTOL = 2e-3
"""Relative tolerance of each logged training loss, CUDA vs CPU (fp32 both, TF32 off)."""
METRIC_ATOL = 0.02
"""Absolute tolerance of NDCG@10 / HR@10, CUDA vs CPU."""

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def write_config(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


# -- compute.device ------------------------------------------------------------------------------
def minimal(tmp_path: Path, **extra) -> Path:
    spec = {"root": ".", "domains": [{"name": "d", "source": {"format": "tabular", "path": "raw"}}], **extra}
    return write_config(tmp_path / "configs" / "c.yaml", spec)


def test_cpu_and_auto_resolve(tmp_path):
    assert load_config(minimal(tmp_path)).device() == torch.device("cpu")  # the default
    assert load_config(minimal(tmp_path, compute={"device": "cpu"})).device() == torch.device("cpu")
    auto = load_config(minimal(tmp_path, compute={"device": "auto"})).device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ComputeConfig(device=" CPU ").device == "cpu"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "mps", "", 0])
def test_an_invalid_device_is_a_config_error_naming_the_file_and_the_choices(tmp_path, name):
    path = minimal(tmp_path, compute={"device": name})
    with pytest.raises(ConfigError, match=r"c\.yaml: compute: device must be one of auto \| cpu \| cuda \| cuda:N"):
        load_config(path)


def test_a_gpu_this_machine_lacks_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(minimal(tmp_path, compute={"device": "cuda:1"}))
    with pytest.raises(ConfigError, match=r"c\.yaml: compute\.device 'cuda:1': torch sees no CUDA device"):
        cfg.device()
    assert cfg.with_device("auto").device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"this machine has 1 CUDA device\(s\), cuda:0..cuda:0"):
        cfg.device()
    assert cfg.with_device("cuda:0").device() == torch.device("cuda", 0)


def test_device_override_and_threads_validation(tmp_path):
    cfg = load_config(minimal(tmp_path, compute={"device": "cpu", "threads": 2}))
    assert cfg.with_device("auto").compute == ComputeConfig(device="auto", threads=2)
    assert cfg.with_seed(3).compute == cfg.compute
    with pytest.raises(ConfigError, match="--device: device must be one of"):
        cfg.with_device("tpu")
    with pytest.raises(ConfigError, match=r"compute: threads must be a positive integer or None, got 0"):
        load_config(minimal(tmp_path, compute={"threads": 0}))
    with pytest.raises(ConfigError, match=r"compute: unknown key\(s\) \['devices'\]"):
        load_config(minimal(tmp_path, compute={"devices": "cpu"}))


def test_dagster_compute_resource_sets_the_device_or_fails_the_step(tmp_path, monkeypatch):
    import dagster as dg

    from orchestration.resources import ComputeResource

    cfg = load_config(minimal(tmp_path, compute={"device": "cpu"}))
    threads = torch.get_num_threads()
    try:
        assert ComputeResource(threads=1).apply(cfg).compute.device == "cpu"  # None: the config's
        assert ComputeResource(device="auto", threads=1).apply(cfg).compute.device == "auto"
        with pytest.raises(dg.Failure, match="device must be one of"):
            ComputeResource(device="gpu").apply(cfg)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(dg.Failure, match="torch sees no CUDA device"):
            ComputeResource(device="cuda").apply(cfg)
    finally:
        torch.set_num_threads(threads)


# -- placement -------------------------------------------------------------------------------------
N_ITEMS = 30


def id_content(n: int = N_ITEMS) -> ItemContent:
    return ItemContent(n, torch.zeros(n + 1, dtype=torch.bool), torch.zeros(n + 1, dtype=torch.bool))


def tiny_cfg(**objective) -> ModelConfig:
    """An ID-tower SASRec whose training draws from the model's generator (BCE negatives, NID/RCL
    corruption) and from the global RNG (dropout)."""
    obj = {"name": "bce", "bce_negatives": 3, "nicl_enabled": False, "nid_weight": 0.1, "rcl_weight": 0.1, **objective}
    return ModelConfig.from_dict({"dim": 16, "max_len": 8, "item_tower": {"name": "id", "dropout": 0.1},
                                  "user_encoder": {"name": "sasrec", "n_layers": 1, "n_heads": 2, "dropout": 0.1},
                                  "objective": obj})


def test_content_moves_to_a_device_and_stays_when_already_there():
    content = id_content()
    content.text = {"hidden": torch.zeros(N_ITEMS + 1, 4, 8, dtype=torch.float16), "mask": torch.ones(N_ITEMS + 1, 4, dtype=torch.bool)}
    assert content.to("cpu") is content
    meta = content.to("meta")
    tensors = [meta.has_text, meta.has_image, *meta.text.values()]
    assert all(t.device.type == "meta" for t in tensors) and meta.image is None
    assert meta.text["hidden"].dtype == torch.float16 and content.has_text.device.type == "cpu"


def test_attach_puts_content_popularity_and_the_generator_on_the_models_device(monkeypatch):
    """On the 'meta' device (no CPU-only machine has another): every piece ``attach`` creates must
    follow the model, the generator of negatives and corruption included."""
    asked = []
    real = torch.Generator

    class Recording:  # a meta generator cannot exist; record where it was asked for
        def __new__(cls, device=None):
            asked.append(torch.device(device) if device is not None else None)
            return real()

    model = Recommender(tiny_cfg(), n_items=N_ITEMS).to("meta")
    monkeypatch.setattr(torch, "Generator", Recording)
    model.attach(id_content(), torch.randint(1, N_ITEMS + 1, (5, 9)), seed=3)
    assert asked == [torch.device("meta")]
    assert model.content.has_text.device.type == "meta" and model.log_pop.device.type == "meta"
    model.attach(id_content())  # no training sequences: the zero popularity too
    assert model.log_pop.device.type == "meta"


def sequences(n_users: int = 24, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, N_ITEMS + 1, (n_users, length), generator=g)
    seqs[: n_users // 3, :3] = 0  # some left padding
    return seqs


class Rows(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def collate(rows):
    return {"seq": torch.stack(rows)}


def mean_score(model) -> dict:
    vecs = model.all_item_vectors()
    return {"score": float(model.score(sequences(8, 8, seed=1), vecs).mean())}


def train_tiny(device: str, out: Path, hook=None, **train_kw):
    from mmrec.training import TrainConfig, train

    torch.manual_seed(0)
    model = Recommender(tiny_cfg(), n_items=N_ITEMS).to(device)
    seqs = sequences()
    model.attach(id_content(), seqs, seed=0)
    cfg = TrainConfig(**{"epochs": 4, "batch_size": 8, "lr": 0.01, "eval_every": 3, "checkpoint_every": 2,
                         "patience": None, "monitor": "score", "progress": False, "log_every": 2, **train_kw})
    res = train(model, Rows(seqs), collate, mean_score, cfg, out, hook=hook)
    return model, res


def killed_at(step: int):
    def hook(event, s):
        if event == "step" and s == step:
            raise KeyboardInterrupt(step)

    return hook


def assert_resume_is_exact(device: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, ref = train_tiny(device, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        train_tiny(device, tmp_path / "run", hook=killed_at(7))
    _, res = train_tiny(device, tmp_path / "run")
    assert res.history == ref.history and res.steps == ref.steps == 12
    a, b = (load_file(p / "checkpoint" / "model.safetensors") for p in (tmp_path / "ref", tmp_path / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["device"] == torch.device(device).type


def test_a_recommender_resumes_exactly_with_its_generator_on_the_device(tmp_path):
    assert_resume_is_exact("cpu", tmp_path)


# -- CUDA (marker gpu; skipped without a GPU) -------------------------------------------------------
@pytest.fixture
def strict_cuda():
    """fp32 matmuls and convolutions without TF32, deterministic kernels; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))  # the CPU reference runs: the GPU check has 8 minutes
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    torch.set_num_threads(threads)


@pytest.mark.gpu
@needs_cuda
def test_cuda_resume_is_exact_and_draws_on_the_gpu(tmp_path, strict_cuda):
    model, _ = train_tiny("cuda", tmp_path / "one", max_steps=2)
    assert model.generator.device.type == "cuda" and model.content.has_text.device.type == "cuda"
    from mmrec.objectives import CorruptionConfig, corrupt_sequences, sample_negatives

    seqs = sequences(4).cuda()
    neg = sample_negatives(N_ITEMS, (4, 3), model.generator, exclude=seqs)
    noisy, noise = corrupt_sequences(seqs[:, :-1], CorruptionConfig(), N_ITEMS, generator=model.generator, exclude=seqs)
    assert neg.device.type == noisy.device.type == noise.device.type == "cuda"
    assert_resume_is_exact("cuda", tmp_path)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_autocast_is_the_default_and_trains(tmp_path):
    model, res = train_tiny("cuda", tmp_path, max_steps=6)
    assert res.history and all(torch.isfinite(torch.tensor(h["train"]["loss"])) for h in res.history)
    assert next(model.parameters()).dtype == torch.float32


# the pipeline runs: CPU and CUDA side by side, without random draws (see the module docstring)
NO_RANDOM_DRAWS = {"item_tower": {"dropout": 0.0}, "user_encoder": {"dropout": 0.0},
                   "objective": {"nid_weight": 0.0, "rcl_weight": 0.0}}


def pipeline_spec(root: Path, device: str, model: dict, train: dict, domains: dict[str, str], baselines: list[str],
                  **demo_sizes) -> dict:
    """The demo pipeline (``configs/demo.yaml``'s data, validation and preprocessing, the cpu
    preset's model with ``model`` on top) over ``domains`` (name -> role) on ``device``."""
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    source = {"format": "tabular", "options": {"text": ["title", "description"], "image": "image", "image_root": "."}}
    spec = {
        "preset": str(REPO / "configs" / "presets" / "cpu.yaml"),
        "root": str(root),
        "artifacts": "artifacts",
        "compute": {"device": device},
        "demo": {**demo["demo"], "domains": list(domains), **demo_sizes},
        "validation": demo["validation"],
        "preprocess": demo["preprocess"],
        "domains": {d: {"role": role, "source": {**source, "path": f"data/demo/{d}"}} for d, role in domains.items()},
        "model": _merge(NO_RANDOM_DRAWS, model),
        "pretrain": {**train, "progress": False, "bf16": False},
        "finetune": {**train, "progress": False, "bf16": False},
        "evaluation": {"baselines": baselines, "gate_against": [b for b in baselines if b == "scratch"]},
    }
    if "source" not in domains.values():
        spec["transfer"] = {"part": "none"}
    return spec


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_pipeline(root: Path, spec: dict, until: str = "evaluation"):
    from mmrec import stages
    from mmrec.data.synthetic import generate_demo

    cfg = load_config(write_config(root / "pipeline.yaml", spec))
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    out = {}
    for stage in stages.STAGES[: stages.STAGES.index(until) + 1]:
        for d in stages.stage_domains(cfg, stage):
            fn = stages.STAGE_FUNCTIONS[stage]
            out[(stage, d)] = fn(cfg, progress=False) if d is None else fn(cfg, d, progress=False)
    return cfg, out


def train_losses(run_dir: str) -> list[float]:
    from mmrec.tracking import read_jsonl_run

    return [v for _, v in read_jsonl_run(Path(run_dir) / "log").series("train/loss")]


def compare_runs(cpu: dict, cuda: dict) -> None:
    """``cpu`` / ``cuda``: the metadata of one trained variant on each device."""
    assert cpu["steps"] == cuda["steps"]
    a, b = train_losses(cpu["run_dir"]), train_losses(cuda["run_dir"])
    assert len(a) == len(b) > 0
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=LOSS_RTOL, atol=1e-5)
    for m in ("NDCG@10", "HR@10"):
        assert abs(cpu["valid_metrics"][m] - cuda["valid_metrics"][m]) <= METRIC_ATOL, m


@pytest.mark.gpu
@needs_cuda
def test_tiny_pipeline_on_cuda_matches_the_cpu(tmp_path, strict_cuda):
    compare_tiny_pipeline(tmp_path, "cuda")


def compare_tiny_pipeline(tmp_path: Path, device: str) -> None:
    model = {"dim": 32, "text_encoder": {"random_init": True, "max_length": 24, "overrides": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}},
        "image_encoder": {"random_init": True, "image_size": 32}}
    train = {"epochs": 8, "patience": None, "lr": 0.001, "weight_decay": 0.01, "batch_size": 64, "log_every": 2}
    runs = {}
    domains = {"books": "source", "music": "source", "films": "target"}
    for name, dev in (("cpu", "cpu"), ("other", device)):
        runs[name] = run_pipeline(tmp_path / name, pipeline_spec(tmp_path / name, dev, model, train, domains, ["scratch"]))
    (_, cpu), (_, cuda) = runs["cpu"], runs["other"]
    ft_cpu, ft_cuda = (r[("finetuned_model", "films")].metadata["variants"] for r in (cpu, cuda))
    for name in ("model", "scratch"):
        compare_runs(ft_cpu[name], ft_cuda[name])
    compare_runs(cpu[("pretrained_model", None)].metadata, cuda[("pretrained_model", None)].metadata)
    test_cpu, test_cuda = (r[("evaluation", "films")].metadata["models"] for r in (cpu, cuda))
    for name in test_cpu:
        assert abs(test_cpu[name]["NDCG@10"] - test_cuda[name]["NDCG@10"]) <= METRIC_ATOL, name


def packaged(text_layers: int, image_blocks: int) -> dict:
    """The cpu preset's packaged encoders (pretrained MiniLM, EfficientNet-Lite0) with the top
    ``text_layers`` / ``image_blocks`` trained end to end (0: everything frozen and cached)."""
    return {"text_encoder": {"trainable_layers": text_layers}, "image_encoder": {"trainable_blocks": image_blocks}}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("text_layers, image_blocks, steps", [(0, 0, 20), (2, 2, 12)], ids=["cpu_preset", "top2_end_to_end"])
def test_packaged_encoder_finetune_on_cuda_matches_the_cpu(tmp_path, strict_cuda, text_layers, image_blocks, steps):
    compare_packaged_finetune(tmp_path, "cuda", text_layers, image_blocks, steps)


def compare_packaged_finetune(tmp_path: Path, device: str, text_layers: int, image_blocks: int, steps: int) -> None:
    train = {"epochs": 10, "max_steps": steps, "eval_every": steps // 2, "patience": None, "lr": 0.001,
             "batch_size": 32, "log_every": 2}
    results = {}
    for name, dev in (("cpu", "cpu"), ("other", device)):
        spec = pipeline_spec(tmp_path / name, dev, packaged(text_layers, image_blocks), train, {"films": "target"}, [],
                             n_users=120, n_items=80)
        _, out = run_pipeline(tmp_path / name, spec, until="finetuned_model")
        results[name] = out[("finetuned_model", "films")].metadata["variants"]["model"]
        assert set(out[("item_features", "films")].metadata["modalities"]) == {"text", "image"}
    compare_runs(results["cpu"], results["other"])
    assert results["other"]["steps"] == steps


def test_gpu_marker_is_registered_and_the_default_run_still_selects_gpu_tests(pytestconfig):
    """``pytest -m gpu`` selects the GPU tests; the default selection (``not slow``) keeps them, and
    they skip without CUDA."""
    assert any(line.startswith("gpu:") for line in pytestconfig.getini("markers"))
    assert "-m 'not slow'" in (REPO / "pyproject.toml").read_text()
