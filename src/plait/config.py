"""Run configuration: YAML files in ``configs/`` merged over typed defaults, plus dotted overrides.

``load_config("configs/emoji_gamma.yaml", ["loss.name=infonce", "data.batch_size=512"])``
returns an OmegaConf object; unknown keys and values of the wrong type raise a ValueError that
names the key. Free-form option blocks (``data.options``, ``model.a``, ``model.b``,
``loss.options``) accept any keys and are checked by the components they configure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class AugmentConfig:
    """Whether the training view of each modality is augmented. Regularisers and in-modal terms
    also need a second, augmented view, which always uses the modality's augmentation."""

    image: bool = False
    text: bool = False
    vector: bool = False
    image_options: dict[str, Any] = field(default_factory=dict)
    text_options: dict[str, Any] = field(default_factory=dict)
    vector_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "emoji"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    # > 0: carve this fraction of the training split (by group) as a validation split; training
    # uses the rest, per-epoch evaluations use it, and eval.split may name it for the final one.
    validation_fraction: float = 0.0
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    # Encoder specs {name: ..., **options}; empty: chosen by the view's modality (see build_model).
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 128
    init_temperature: float = 0.07
    learn_temperature: bool = True
    projection_hidden: int = 0


@dataclass
class LossConfig:
    name: str = "gamma"
    options: dict[str, Any] = field(default_factory=dict)
    in_modal: bool = False  # L_Con = 1/4 (V2T + T2V + V2V + T2T) with augmented views


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    epochs: int = 20
    # a budget in optimizer steps instead of epochs: the schedule spans this many steps, over as
    # many epochs as it takes (equal-step comparisons across batch sizes)
    steps: Optional[int] = None
    max_steps: Optional[int] = None  # stop early after this many steps (tests, quick runs)
    warmup_fraction: float = 0.05
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = False
    log_every: int = 10
    eval_every_epochs: int = 0  # 0: evaluate only at the end (on the validation split if there is one)
    staleness_every_epochs: int = 1  # per-sample losses: log the state's error against a frozen snapshot (0: never)
    # > 0: a momentum copy of the model (weight m on the old copy per step, as MoCo) encodes each
    # batch for the gamma loss's memory bank, so bank rows come from one slowly moving encoder
    bank_momentum: float = 0.0
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    tensorboard: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "zero_shot", "linear_probe", "knn"])
    split: str = "test"  # the final evaluation's split: test | validation (needs data.validation_fraction)
    label: Optional[str] = None  # label set for zero-shot / probes (default: the dataset's first)
    few_shot: list[int] = field(default_factory=lambda: [1, 5, 10])
    few_shot_seeds: int = 3
    batch_size: int = 256
    gallery: int = 8
    features: str = "shared"  # probes on the shared, independent or both ([z, z^i]) features


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # e.g. [{name: bridge, weight: 0.1, t: 0.25}, {name: consistency, weight: 0.5}]
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PACKAGED = Path(__file__).parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (``emoji``, ``uci``, ``tiny``)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    raise ValueError(f"config file {path} does not exist (packaged configs: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Defaults <- YAML file <- ``key=value`` overrides; errors name the offending key."""
    config = OmegaConf.structured(RunConfig)
    try:
        if path is not None:
            path = resolve_config_path(path)
            config = OmegaConf.merge(config, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"bad config{where}: {error}".splitlines()[0] + f" ({error.full_key if hasattr(error, 'full_key') else ''})") from error
    return config


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config)


def from_yaml(text: str) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
