"""Typed pipeline configuration loaded from YAML.

The YAML files under ``configs/`` are the only source of parameters. Each component receives its
own section (``cfg.validation``, ``cfg.preprocess``), never the whole file. Unknown keys are errors,
so a typo cannot silently fall back to a default.

Each component owns its section, a frozen dataclass beside its code (``ValidationConfig`` in
``mmrec.data.validation``, ``PreprocessConfig`` in ``mmrec.data.preprocess``, ``DemoConfig`` in
``mmrec.data.synthetic``, ``ModelConfig`` in ``mmrec.models.recommender``, ``TrainConfig`` in
``mmrec.training``, ``TransferConfig`` in ``mmrec.transfer``). This module holds the pipeline's
own sections (domains, compute, features, evaluation) and assembles them all with the generic
parser of the leaf ``mmrec.configbase`` (``from_dict``, ``ConfigError``), which the components use
for their nested sections. The arrows point one way: no component imports this module
(``tests/test_config_imports.py``). The model-side sections are parsed on first use, so loading a
config (and the CLI) does not import torch.

Paths in a config file are relative to its ``root`` key, which is itself relative to the folder
holding the config file (``root: ..`` for files in ``configs/``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mmrec.configbase import ConfigError, from_dict
from mmrec.data.preprocess import PreprocessConfig
from mmrec.data.validation import ValidationConfig

if TYPE_CHECKING:
    from mmrec.data.synthetic import DemoConfig

# the sections defined elsewhere are re-exported: `from mmrec.config import PreprocessConfig` works
__all__ = [
    "BASELINES", "DEVICE_CHOICES", "HISTORY_MODES", "MODEL_SECTIONS", "TRAINED_BASELINES", "ComputeConfig",
    "ConfigError", "DomainConfig", "EvaluationConfig", "FeaturesConfig", "PipelineConfig", "PreprocessConfig",
    "SASRecBaselineConfig", "SourceConfig", "ValidationConfig", "from_dict", "load_config",
]


@dataclass(frozen=True)
class SourceConfig:
    """Where a domain's raw data comes from."""

    format: str
    """Importer name: one of ``mmrec.data.importers.IMPORTERS`` (ninerec, movielens, tabular)."""
    path: str
    """Folder holding the raw files, relative to the config root (absolute paths allowed)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Importer-specific options (file names, column mapping, image folder); see each importer."""

    def __post_init__(self):
        if not self.format:
            raise ValueError("source.format is required")
        if not self.path:
            raise ValueError("source.path is required")


@dataclass(frozen=True)
class DomainConfig:
    """One domain (platform) of the pipeline."""

    name: str
    """Domain name: the partition key and the folder name of its artifacts."""
    source: SourceConfig
    role: str = "target"
    """``source`` domains feed pretraining; ``target`` domains are fine-tuned and evaluated."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """This domain's validation thresholds (the top-level section merged with the domain's own)."""
    user_fraction: float = 1.0
    """Share of the domain's users kept by preprocessing, in (0, 1]: a fixed-seed sample of the users
    the length filter kept, nested across shares (``mmrec.data.preprocess.sample_users``). For
    data-size studies (``make experiments``); 1.0 keeps every user."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.replace("-", "_").replace(".", "_").isidentifier():
            raise ValueError(f"domain name must be a simple identifier-like name, got {self.name!r}")
        if self.role not in ("source", "target"):
            raise ValueError(f"domain {self.name!r}: role must be 'source' or 'target', got {self.role!r}")
        f = self.user_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"domain {self.name!r}: user_fraction must be in (0, 1], got {f!r}")
        object.__setattr__(self, "user_fraction", float(f))


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


@dataclass(frozen=True)
class ComputeConfig:
    """Where torch runs (section ``compute``; ``mmrec --device`` and the Dagster compute resource
    override ``device``). Not a hyper-parameter: the same run on another device gives the same
    model up to floating-point and random-stream differences (a CUDA generator draws other numbers
    than a CPU one), which is why a training checkpoint only resumes on the device type it was
    written on."""

    device: str = "cpu"
    """``cpu``, ``cuda`` (the current CUDA device), ``cuda:N``, or ``auto`` (``cuda`` when torch sees
    a GPU, else ``cpu``). The model, the item content, the feature reads, the sampled negatives,
    the corruption and the model's random generator all live there; training runs its forward
    under bf16 autocast on CUDA unless ``train.bf16`` says otherwise."""
    threads: int | None = None
    """``torch.set_num_threads`` for CPU work (``mmrec --threads`` overrides; ``None``: torch's default)."""

    def __post_init__(self):
        device = self.device.strip().lower() if isinstance(self.device, str) else self.device
        if not isinstance(device, str) or not _valid_device(device):
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        object.__setattr__(self, "device", device)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")

    def torch_device(self):
        """The ``torch.device`` to run on: ``auto`` resolved; a CUDA device torch cannot see is a
        ``ConfigError`` (imports torch)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError(f"compute.device {self.device!r}: torch sees no CUDA device on this machine "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use cpu or auto")
        index = int(self.device.split(":")[1]) if ":" in self.device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"compute.device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit() and str(int(index)) == index


@dataclass(frozen=True)
class FeaturesConfig:
    """The ``item_features`` stage: frozen encoder outputs cached per item."""

    cache_dir: str = "artifacts/feature_cache"
    """Feature cache folder (relative to ``root``), shared by domains and runs; entries are keyed
    by item content and encoder fingerprint, so a stale entry is never reused."""
    text_batch_size: int = 64
    image_batch_size: int = 32
    num_workers: int = 0
    """DataLoader workers decoding images (0: in-process; keep 0 inside Dagster step processes)."""

    def __post_init__(self):
        if self.text_batch_size < 1 or self.image_batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch sizes must be >= 1 and num_workers >= 0")


BASELINES = ("scratch", "sasrec", "id_tower", "zero_shot")
TRAINED_BASELINES = ("scratch", "sasrec", "id_tower")
HISTORY_MODES = ("masked", "keep_all")
FINETUNE_MODEL_KEYS = ("objective", "item_tower", "user_encoder")
"""Mappings of the ``finetune`` section merged onto the ``model`` section's for fine-tuning only."""
FINETUNE_USER_ENCODER_KEYS = ("dropout",)
"""What ``finetune.user_encoder`` may set: keys that leave the pretrained encoder's parameters loadable."""


@dataclass(frozen=True)
class SASRecBaselineConfig:
    """The standard ID SASRec baseline (``evaluation.sasrec``): ID embeddings, cross-entropy over
    every item, dropout on the embedded sequence and in the blocks (RecBole's recipe). Its own lr,
    weight decay and dropout, chosen on the validation split; the rest of the fine-tuning section
    (epochs, batch size, patience, seed) is shared with the other models."""

    dropout: float = 0.5
    """Dropout of the user encoder (embedding, attention and FFN; RecBole's default 0.5)."""
    lr: float = 0.001
    """Adam(W) learning rate (RecBole's default 0.001)."""
    weight_decay: float = 0.0
    """Weight decay (RecBole's default 0)."""

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"sasrec.lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


@dataclass(frozen=True)
class EvaluationConfig:
    """The ``finetuned_model`` comparisons and the ``evaluation`` stage."""

    ks: tuple[int, ...] = (5, 10, 20)
    """Cut-offs of HR@k, NDCG@k and MRR@k."""
    batch_size: int = 1024
    """Users scored at once against the full catalog (bounds memory)."""
    history: str = "masked"
    """How a user's history is treated in the ranking, on validation and test alike:
    ``masked`` (every history item removed, the target included when re-consumed: the papers' and
    the usual protocol) or ``keep_all`` (nothing removed: repeat-aware evaluation). See
    ``mmrec.evaluation``; ``preprocess.repeats`` decides whether re-consumed targets exist."""
    baselines: tuple[str, ...] = ("scratch", "zero_shot")
    """Compared with the fine-tuned model: ``scratch`` (same model, no pretraining), ``sasrec``
    (standard ID SASRec, ``sasrec`` section), ``id_tower`` (our model with an ID tower instead of
    content, trained with our objectives), ``zero_shot`` (pretrained, no fine-tuning)."""
    sasrec: SASRecBaselineConfig = field(default_factory=SASRecBaselineConfig)
    """Settings of the ``sasrec`` baseline."""
    gate_metric: str = "NDCG@10"
    """Metric of the quality gate before registration (read on the validation split)."""
    gate_margin: float = 0.0
    """The fine-tuned model must beat each baseline of ``gate_against`` by this much."""
    gate_against: tuple[str, ...] = ("scratch",)
    """Baselines the quality gate compares with (a subset of ``baselines``: scratch, sasrec, id_tower)."""

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if isinstance(self.sasrec, dict):
            object.__setattr__(self, "sasrec", from_dict(SASRecBaselineConfig, self.sasrec, "evaluation.sasrec"))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {HISTORY_MODES}, got {self.history!r}")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            hint = " ('id' is now 'id_tower'; the standard ID SASRec is 'sasrec')" if "id" in bad else ""
            raise ValueError(f"unknown baseline(s) {bad}; valid: {list(BASELINES)}{hint}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        object.__setattr__(self, "gate_against", tuple(self.gate_against))
        bad = sorted(set(self.gate_against) - (set(TRAINED_BASELINES) & set(self.baselines)))
        if bad:
            raise ValueError(f"gate_against {bad} must be trained baselines listed in baselines {list(self.baselines)}")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: domains, data locations and per-stage sections."""

    root: Path
    """Project root; relative paths below resolve against it."""
    domains: tuple[DomainConfig, ...]
    artifacts: Path
    """Where stage outputs go: ``<artifacts>/<stage>/<domain>/``."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    """Where torch runs (device, CPU threads)."""
    demo: DemoConfig | None = None
    """Synthetic demo data to generate (``mmrec demo_data``), or None."""
    demo_path: Path | None = None
    """Where the demo data is generated (inside the DVC-tracked raw data folder)."""
    config_path: Path | None = None
    """The YAML file this config was loaded from."""
    sections: dict[str, Any] = field(default_factory=dict)
    """The model stages' raw sections (``model``, ``pretrain``, ``finetune``, ``transfer``,
    ``features``, ``evaluation``), parsed on first use by the accessors below so that loading a
    config (and the CLI) does not import torch."""

    def __post_init__(self):
        if not self.domains:
            raise ValueError("at least one domain is required")
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate domain names: {dup}")

    def domain(self, name: str) -> DomainConfig:
        """The domain called ``name``; raises listing the configured ones otherwise."""
        for d in self.domains:
            if d.name == name:
                return d
        raise ConfigError(f"unknown domain {name!r}; configured domains: {[d.name for d in self.domains]}")

    def resolve(self, path: str | os.PathLike) -> Path:
        """An absolute path for ``path`` (relative paths resolve against ``root``)."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.root / p).resolve()

    def artifact_path(self, stage: str, domain: str | None = None) -> Path:
        """The folder of one stage's artifact for one domain (``None``: a cross-domain artifact
        such as the pretrained model)."""
        return self.artifacts / stage / domain if domain else self.artifacts / stage

    def with_seed(self, seed: int) -> PipelineConfig:
        """This config with ``seed`` for pretraining and fine-tuning (``mmrec --seed``). Unless both
        phases already use that seed, its artifacts move to the sibling folder ``<artifacts>-seed<N>``
        so that the runs of several seeds sit side by side (the feature cache, keyed by encoder and
        not by seed, stays shared)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        phases = ("pretrain", "finetune")
        if all((self.sections.get(p) or {}).get("seed") == seed for p in phases):
            return self
        sections = {**self.sections, **{p: {**(self.sections.get(p) or {}), "seed": seed} for p in phases}}
        return dataclasses.replace(self, sections=sections, artifacts=self.artifacts.with_name(f"{self.artifacts.name}-seed{seed}"))

    def with_device(self, device: str) -> PipelineConfig:
        """This config with ``compute.device`` set to ``device`` (``mmrec --device``, the Dagster
        compute resource); an invalid name is a ``ConfigError``."""
        compute = from_dict(ComputeConfig, {**dataclasses.asdict(self.compute), "device": device}, "--device")
        return dataclasses.replace(self, compute=compute)

    def device(self):
        """``compute.device`` as a ``torch.device`` (imports torch; see ``ComputeConfig.torch_device``)."""
        try:
            return self.compute.torch_device()
        except ConfigError as exc:
            raise ConfigError(f"{self.config_path}: {exc}") from None

    @property
    def sources(self) -> list[DomainConfig]:
        return [d for d in self.domains if d.role == "source"]

    @property
    def targets(self) -> list[DomainConfig]:
        return [d for d in self.domains if d.role == "target"]

    def _where(self, section: str) -> str:
        return f"{self.config_path}: {section}"

    def model(self, phase: str | None = None):
        """The ``model`` section as a ``ModelConfig`` (imports torch). ``phase="finetune"``: with the
        ``finetune`` section's ``objective``, ``item_tower`` and ``user_encoder`` (if any; the latter its
        ``dropout`` only) merged onto the model section's: the losses, item tower (e.g. ``item_ids``) and
        user-encoder dropout fine-tuning and every baseline trained on a target use; pretraining keeps
        the ``model`` section as it is."""
        from mmrec.models.recommender import ModelConfig

        section = self.sections.get("model") or {}
        if phase is not None:
            if phase not in ("pretrain", "finetune"):
                raise ValueError(f"phase must be 'pretrain' or 'finetune', got {phase!r}")
            for key in FINETUNE_MODEL_KEYS:
                over = (self.sections.get("finetune") or {}).get(key) if phase == "finetune" else None
                if over is not None and not isinstance(over, dict):
                    raise ConfigError(f"{self._where('finetune')}.{key} must be a mapping, got {over!r}")
                if key == "user_encoder" and over and set(over) - set(FINETUNE_USER_ENCODER_KEYS):
                    raise ConfigError(
                        f"{self._where('finetune')}.user_encoder may set only {list(FINETUNE_USER_ENCODER_KEYS)}, got "
                        f"{sorted(set(over) - set(FINETUNE_USER_ENCODER_KEYS))}: other keys change the pretrained "
                        "user encoder's parameters (set them in the model section)")
                if over:
                    section = _merge(section, {key: over})
        try:
            model = ModelConfig.from_dict(section, self._where("model") if phase is None else self._where(phase))
            model.check_history_length(self.preprocess.max_seq_len, str(self.config_path))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return model

    def train(self, phase: str):
        """The ``pretrain`` or ``finetune`` section as a ``TrainConfig``."""
        from mmrec.training import TrainConfig

        if phase not in ("pretrain", "finetune"):
            raise ValueError(f"phase must be 'pretrain' or 'finetune', got {phase!r}")
        section = dict(self.sections.get(phase) or {})
        if phase == "finetune":  # read by model("finetune"); pretrain has none (unknown keys)
            for key in FINETUNE_MODEL_KEYS:
                section.pop(key, None)
        return from_dict(TrainConfig, section, self._where(phase))

    def transfer(self):
        from mmrec.transfer import TransferConfig

        return from_dict(TransferConfig, self.sections.get("transfer"), self._where("transfer"))

    def features(self) -> FeaturesConfig:
        return from_dict(FeaturesConfig, self.sections.get("features"), self._where("features"))

    def evaluation(self) -> EvaluationConfig:
        return from_dict(EvaluationConfig, self.sections.get("evaluation"), self._where("evaluation"))


MODEL_SECTIONS = ("model", "pretrain", "finetune", "transfer", "features", "evaluation")
_TOP_KEYS = {"root", "artifacts", "domains", "validation", "preprocess", "compute", "demo", "preset", *MODEL_SECTIONS}


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, recursively for mappings."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config mapping with its ``preset`` (a YAML file relative to it) merged underneath."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}" + (f" (preset of {seen[-1]})" if seen else "")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "root" in raw:  # relative to the file that sets it, also when that file is a preset
        raw["root"] = str((path.parent / str(raw["root"])).resolve())
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    ppath = (path.parent / str(preset)).resolve()
    if ppath in seen or ppath == path:
        raise ConfigError(f"{path}: preset cycle through {ppath}")
    return _merge(_read_yaml(ppath, (*seen, path)), raw)


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Load and validate a pipeline config from YAML."""
    path = Path(path).resolve()
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; valid keys: {sorted(_TOP_KEYS)}")
    root = (path.parent / str(raw.get("root", "."))).resolve()
    where = str(path)

    for section in ("validation", "preprocess", "compute", "demo", *MODEL_SECTIONS):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: {section}: expected a mapping, got {type(raw[section]).__name__} {raw[section]!r}")
    base_validation = dict(raw.get("validation") or {})
    from_dict(ValidationConfig, base_validation, f"{where}: validation")  # fail early on a bad top section
    domains = []
    raw_domains = raw.get("domains") or []
    if isinstance(raw_domains, dict):
        # mapping form (name -> spec), used by dvc.yaml's `foreach` to name stages by domain
        listed = []
        for name, spec in raw_domains.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}: domains.{name} must be a mapping")
            if "name" in spec and spec["name"] != name:
                raise ConfigError(f"{where}: domains.{name} has a different name: {spec['name']!r}")
            listed.append({**spec, "name": name})
        raw_domains = listed
    elif not isinstance(raw_domains, list):
        raise ConfigError(f"{where}: domains must be a list or a mapping of name -> domain")
    for i, d in enumerate(raw_domains):
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: domains[{i}] must be a mapping")
        d = dict(d)
        dwhere = f"{where}: domains[{i}] ({d.get('name', '?')})"
        source = from_dict(SourceConfig, d.pop("source", None), f"{dwhere}.source")
        validation = from_dict(ValidationConfig, {**base_validation, **(d.pop("validation", None) or {})}, f"{dwhere}.validation")
        domains.append(from_dict(DomainConfig, {**d, "source": source, "validation": validation}, dwhere))

    demo_raw = raw.get("demo")
    demo = demo_path = None
    if demo_raw is not None:
        from mmrec.data.synthetic import DemoConfig

        demo_raw = dict(demo_raw)
        demo_path = demo_raw.pop("path", "data/demo")
        try:
            demo = DemoConfig.from_dict(demo_raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: demo: {exc}") from exc
        demo_path = (root / demo_path).resolve()
    try:
        return PipelineConfig(
            root=root,
            domains=tuple(domains),
            artifacts=(root / str(raw.get("artifacts", "artifacts"))).resolve(),
            preprocess=from_dict(PreprocessConfig, raw.get("preprocess"), f"{where}: preprocess"),
            compute=from_dict(ComputeConfig, raw.get("compute"), f"{where}: compute"),
            demo=demo,
            demo_path=demo_path,
            config_path=path,
            sections={k: raw[k] for k in MODEL_SECTIONS if raw.get(k) is not None},
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
