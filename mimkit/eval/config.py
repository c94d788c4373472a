"""Typed configs of the evaluation commands (`mimkit knn`, `mimkit linprobe`, `mimkit finetune`).

Same rules as the pretraining config (the parsing helpers are mimkit.typed_config's): a YAML recipe, then
`section.key=value` overrides; unknown keys, wrong types and out-of-range values are rejected before any
data is read or any model is built, naming the dotted field.

Each command has its own dataclasses (not shared ones with per-command defaults) so that a YAML
section that sets one key keeps the command's defaults for the others.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mimkit.config import AttentionKernel, check_loggers
from mimkit.presets import PRESETS
from mimkit.registry import encoder_family, method_names
from mimkit.typed_config import ConfigError, from_dict, read_recipe, require, to_dict
from mimkit.typed_config import _merge as merge_dicts

log = logging.getLogger("mimkit")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pool = Literal["auto", "cls", "mean", "cls_mean"]  # features.pool / probe.pool


# ---------------------------------------------------------------- sections shared by the three commands


@dataclass
class EncoderConfig:
    # A mimkit pretraining checkpoint (.pt; official MAE / BEiT / HF weights: convert with `mimkit import`),
    # or "none": a randomly initialised encoder (the one MAE pretraining starts from), the baseline.
    checkpoint: str = "none"
    # The architecture, as model.* in pretraining. Required with checkpoint none; with a checkpoint it is
    # read from the checkpoint's config, and any value set here must agree with it.
    arch: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    # Evaluation resolution (default: the checkpoint's); the position embedding is resampled if it differs.
    img_size: int | None = None
    # The backbone: vit = timm VisionTransformer, beit = timm Beit as BEiT / mc-BEiT pretraining builds it (the
    # pretraining config's beit.* defaults: layer scale 0.1, shared relative position bias, no absolute position
    # embedding), so BEiT rows get a random-init baseline of their own network. auto = the checkpoint's, vit
    # with checkpoint none.
    family: Literal["auto", "vit", "beit"] = "auto"
    # With checkpoint none: the pretraining method whose initial encoder is the random init (default: MAE's, or
    # BEiT's with family beit), e.g. ijepa for I-JEPA's (no cls token: pooled on the mean of its patch tokens).
    # With a checkpoint the method is the checkpoint's: leave it unset.
    method: str | None = None


@dataclass
class FeatureConfig:
    # Which tokens: cls (after the final LayerNorm; MAE's linear-probe feature), mean (mean of the patch
    # tokens, cls excluded), or cls_mean ([cls ‖ mean], BEiT's linear-eval feature; 2 x width); auto: the
    # checkpoint's method's (its MethodSpec.pool: cls, or mean for an encoder without a cls token, I-JEPA).
    pool: Literal["auto", "cls", "mean", "cls_mean"] = "auto"
    # Which block's output (1-based; -1 = the last). The final LayerNorm is applied to any block's tokens.
    block: int = -1


@dataclass
class EvalDataConfig:
    """Labelled data of the evaluation commands: a train split and a val split.

    Fields:
        format: how data.path is read; auto infers it (npz, folder, torchvision)
        train_split: the split the k-NN bank / probe / fine-tune trains on
        val_split: the split the top-1 is measured on
        mean: per-channel mean the images are normalised with (RGB, 0-1 scale; ImageNet's by default)
        std: per-channel standard deviation the images are normalised with (RGB, 0-1 scale)
        num_workers: DataLoader worker processes per process (0 = load in the main process)
    """

    # A .npz with x_{split} uint8 NHWC and y_{split} labels (CIFAR-10 layout), a folder holding one
    # ImageFolder tree per split (path/train/<class>/..., path/val/<class>/...), or torchvision:NAME (a
    # torchvision dataset class, e.g. CIFAR10, under data.root; the splits are its own: train / test ...).
    path: str = ""
    format: Literal["auto", "npz", "folder", "torchvision"] = "auto"
    root: str = "data"  # torchvision datasets: the folder holding torchvision's layout (e.g. data/cifar-10-batches-py)
    download: bool = False  # torchvision datasets: download into data.root if missing
    train_split: str = "train"
    val_split: str = "test"
    # Seeded random subsets (quick runs, monitors); null = all images.
    train_samples: int | None = None
    val_samples: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Evaluation transform: resize the short side to img_size / crop_pct (bicubic), centre crop img_size.
    # null = 0.875 from 128 px up (MAE's 256 -> 224), 1.0 below (CIFAR-sized images are used whole).
    crop_pct: float | None = None
    # Training transform (linprobe augment mode, finetune): RandomResizedCrop(scale) + flip.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    num_workers: int = 2


# ---------------------------------------------------------------- mimkit knn


@dataclass
class KnnParams:
    """The k-NN vote: cosine similarity, the k nearest training images weighted by exp(similarity / temperature).

    Fields:
        k: neighbours that vote
        temperature: T of the vote's weights exp(similarity / T)
    """

    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024  # test images per similarity chunk (memory: chunk x train-set floats)


@dataclass
class KnnRun:
    """How `mimkit knn` runs: batch, precision, device, output folder and logging. Written `train.*` (a YAML `train:`
    section), as in the other commands; `run.*`, its former name, still works with a deprecation warning.

    Fields:
        precision: autocast of the feature extraction: auto = bf16 where native (GPUs, CPUs with AVX512-BF16 / AMX)
        device: auto | cpu | cuda | cuda:N
        out_dir: where metrics.json, metrics.jsonl and the feature caches go
        progress: tqdm bar on rank 0
    """

    batch_size: int = 256  # feature extraction, per process
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = 0  # random-init encoder and the data subsets
    out_dir: str = "runs/knn"
    resume: Literal["auto", "none"] = "auto"  # auto: reuse / continue the feature caches in out_dir
    save_every_batches: int = 50  # partial feature caches, for resuming an interrupted extraction
    loggers: tuple[str, ...] | str = (
        "tensorboard",
    )  # besides metrics.jsonl: tensorboard, csv, wandb, mlflow (as pretraining's)
    tensorboard: bool | Literal["auto"] = "auto"  # auto: when installed; true: required; false: none
    progress: bool = True


# knn's run section is written `train` (train.out_dir=..., a YAML `train:` section), as in the other commands, and
# held in `run`; `run.*` itself is a deprecated alias: see load_eval_config
@dataclass
class KnnConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    knn: KnnParams = field(default_factory=KnnParams)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    train: KnnRun = field(default_factory=KnnRun)  # `run` before 0.2: still read, with a deprecation line


# ---------------------------------------------------------------- shared training-run settings


@dataclass
class RunConfig:
    """The training run of `mimkit linprobe` and `mimkit finetune`, as pretraining's `train` section.

    Fields:
        epochs: passes over the training split; sets the lr schedule
        accum_steps: micro-steps per optimizer step
        precision: auto = bf16 autocast on GPUs and on CPUs with native bf16, else fp32
        device: auto | cpu | cuda | cuda:N
        seed: seed of the head's init, the data order and the augmentation
        out_dir: the run folder: config.yaml, checkpoints, metrics.jsonl, metrics.json
        save_every_steps: also save every N optimizer steps (mid-epoch); null = never
        save_every_epochs: write a checkpoint every N epochs (and at the end)
        keep_last: checkpoints kept in out_dir
        log_every: steps between metrics.jsonl / TensorBoard records
        progress: tqdm bar on rank 0
        max_nonfinite_steps: consecutive skipped non-finite steps before the run stops
    """

    epochs: int = 90
    batch_size: int = 256  # per process, per micro-step
    accum_steps: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still uses epochs)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/eval"
    resume: str = "auto"  # auto (newest checkpoint in out_dir) | none | path
    save_every_steps: int | None = None
    save_every_epochs: int = 1
    keep_last: int = 2
    eval_every_epochs: int = 1  # top-1 on the val split (and at the end)
    log_every: int = 20
    loggers: tuple[str, ...] | str = (
        "tensorboard",
    )  # besides metrics.jsonl: tensorboard, csv, wandb, mlflow (as pretraining's)
    tensorboard: bool | Literal["auto"] = "auto"  # auto: when installed; true: required; false: none
    progress: bool = True
    max_nonfinite_steps: int = 10


# ---------------------------------------------------------------- mimkit linprobe


@dataclass
class ProbeConfig(FeatureConfig):
    # cached: extract features once (evaluation transform, no augmentation), train the head on them (fast
    # path); augment: the MAE protocol, RandomResizedCrop + flip through the frozen encoder every epoch.
    mode: Literal["cached", "augment"] = "augment"
    # Train one head per block simultaneously (one encoder pass) and report the best block (BEiT, BootMAE).
    scan_blocks: bool = False
    head_init_std: float = 0.01  # trunc_normal, as MAE
    # cached mode: also a k-NN vote (cosine, k = knn_k, T = knn_temperature, as mimkit knn) on the configured block's
    # cached features, at no extra extraction; 0 = none
    knn_k: int = 0
    knn_temperature: float = 0.07


@dataclass
class ProbeOptim:
    """The linear head's optimizer (MAE's probe: LARS) and its warmup + cosine schedule.

    Fields:
        name: lars (MAE's protocol), sgd or adamw
        lr: absolute lr; overrides blr when set
        min_lr: the lr the cosine schedule ends at
        warmup_epochs: linear lr warmup from 0, in epochs
        weight_decay: weight decay of the head (MAE's probe: 0)
    """

    name: Literal["lars", "sgd", "adamw"] = "lars"
    blr: float = 0.1  # lr = blr * effective_batch / 256
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    momentum: float = 0.9  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    trust_coeff: float = 0.001  # lars


@dataclass
class ProbeRun(RunConfig):
    epochs: int = 90
    batch_size: int = 256
    out_dir: str = "runs/linprobe"


@dataclass
class LinprobeConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    optim: ProbeOptim = field(default_factory=ProbeOptim)
    train: ProbeRun = field(default_factory=ProbeRun)


# ---------------------------------------------------------------- mimkit finetune


@dataclass
class FinetuneModel:
    """The fine-tuned network: the pretrained encoder with a pooling, a norm and a linear head.

    Fields:
        drop_path_rate: stochastic depth rate of the encoder blocks during fine-tuning (MAE ViT-B: 0.1)
    """

    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens -> fc_norm -> head (MAE repo)
    drop_path_rate: float = 0.1
    head_init_std: float = 2e-5  # trunc_normal, as MAE
    # Partial fine-tuning: only the last k blocks (plus the final norm / fc_norm and the head) train;
    # null = all. 0 trains the head (and fc_norm) only.
    trainable_blocks: int | None = None


@dataclass
class AugConfig:
    """Fine-tuning augmentation and regularisation (MAE's fine-tuning recipe).

    Fields:
        mixup_prob: probability that a batch gets Mixup or CutMix
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on
        label_smoothing: label smoothing of the cross-entropy (with Mixup / CutMix: of the mixed targets)
    """

    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null = none
    re_prob: float = 0.25  # random erasing
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class FinetuneOptim:
    """AdamW with layer-wise lr decay, and its warmup + cosine schedule.

    Fields:
        lr: absolute lr; overrides blr when set
        min_lr: the lr the cosine schedule ends at
        warmup_epochs: linear lr warmup from 0, in epochs
        weight_decay: AdamW's decoupled weight decay (not on 1-D parameters and biases)
        betas: AdamW's (beta1, beta2)
        eps: AdamW's epsilon
        clip_grad: max global grad norm; null = no clipping
    """

    blr: float = 1e-3  # lr = blr * effective_batch / 256
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # 1.0 = off
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None


@dataclass
class EmaConfig:
    """An exponential moving average of the fine-tuned model's weights, evaluated beside it.

    Fields:
        enabled: keep the EMA model (and report its top-1)
        decay: EMA decay per optimizer step
    """

    enabled: bool = False
    decay: float = 0.9998


@dataclass
class FinetuneRun(RunConfig):
    epochs: int = 100
    batch_size: int = 64
    out_dir: str = "runs/finetune"
    attention: AttentionKernel = "auto"  # as pretraining's train.attention


@dataclass
class FinetuneConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: FinetuneModel = field(default_factory=FinetuneModel)
    aug: AugConfig = field(default_factory=AugConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: FinetuneRun = field(default_factory=FinetuneRun)


COMMANDS: dict[str, type] = {"knn": KnnConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}


# ---------------------------------------------------------------- validation


def _validate_common(cfg: Any) -> None:
    e, d = cfg.encoder, cfg.data
    require(bool(e.checkpoint), "encoder.checkpoint must be a path or 'none'")
    if e.checkpoint == "none":
        require(e.arch is not None, "encoder.arch is required with encoder.checkpoint: none (random init)")
    else:
        require(e.checkpoint.lower() != "null", "encoder.checkpoint: write 'none' for a random-init encoder")
        require(e.method is None, f"encoder.method {e.method}: only for a random init (encoder.checkpoint none); a "
                "checkpoint's encoder is its own method's")  # fmt: skip
    if e.method is not None:
        require(
            e.method in method_names(), f"encoder.method: unknown '{e.method}'; allowed: {', '.join(method_names())}"
        )
        family = encoder_family(e.method)
        require(e.family in ("auto", family), f"encoder.method {e.method} builds a {family} encoder, but "
                f"encoder.family is {e.family}; leave encoder.family at auto")  # fmt: skip
    require(
        e.arch is None or e.arch in PRESETS, f"encoder.arch: unknown '{e.arch}'; allowed: {', '.join(sorted(PRESETS))}"
    )
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        v = getattr(e, key)
        require(v is None or v > 0, f"encoder.{key} must be positive, got {v}")
    require(
        bool(d.path),
        "data.path is required: a .npz with x_train/y_train, or a folder with one ImageFolder tree per split",
    )
    require(
        d.train_samples is None or d.train_samples > 0, f"data.train_samples must be positive, got {d.train_samples}"
    )
    require(d.val_samples is None or d.val_samples > 0, f"data.val_samples must be positive, got {d.val_samples}")
    require(all(s > 0 for s in d.std), f"data.std must be positive, got {d.std}")
    require(d.crop_pct is None or 0.0 < d.crop_pct <= 1.0, f"data.crop_pct must be in (0, 1], got {d.crop_pct}")
    require(
        0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0,
        f"data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}",
    )
    require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")


def _validate_device(section: str, device: str) -> None:
    require(
        device in ("auto", "cpu") or device.startswith("cuda"),
        f"{section}.device: '{device}' is not allowed; allowed: auto, cpu, cuda, cuda:N",
    )


def _validate_features(section: str, f: FeatureConfig) -> None:
    require(
        f.block == -1 or f.block >= 1, f"{section}.block must be -1 (last) or a 1-based block number, got {f.block}"
    )


def _validate_run(t: RunConfig) -> None:
    require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    require(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {t.max_steps}")
    require(t.save_every_steps is None or t.save_every_steps >= 1, "train.save_every_steps must be >= 1 or null")
    for key in ("save_every_epochs", "keep_last", "eval_every_epochs", "log_every", "max_nonfinite_steps"):
        require(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    _validate_device("train", t.device)
    t.loggers = check_loggers(t.loggers, "train.loggers")


def validate(cfg: Any) -> Any:
    _validate_common(cfg)
    if isinstance(cfg, KnnConfig):
        _validate_features("features", cfg.features)
        require(cfg.knn.k >= 1, f"knn.k must be >= 1, got {cfg.knn.k}")
        require(cfg.knn.temperature > 0, f"knn.temperature must be positive, got {cfg.knn.temperature}")
        require(cfg.knn.chunk_size >= 1, f"knn.chunk_size must be >= 1, got {cfg.knn.chunk_size}")
        t = cfg.train
        require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
        require(t.save_every_batches >= 1, f"train.save_every_batches must be >= 1, got {t.save_every_batches}")
        _validate_device("train", t.device)
        t.loggers = check_loggers(t.loggers, "train.loggers")
    elif isinstance(cfg, LinprobeConfig):
        _validate_features("probe", cfg.probe)
        require(cfg.probe.head_init_std > 0, "probe.head_init_std must be positive")
        require(cfg.probe.knn_k >= 0 and cfg.probe.knn_temperature > 0,
                "probe.knn_k must be >= 0 (0 = no k-NN) and probe.knn_temperature positive")  # fmt: skip
        require(
            cfg.probe.knn_k == 0 or cfg.probe.mode == "cached",
            "probe.knn_k needs probe.mode cached (the k-NN reads the cached features); use mimkit knn otherwise",
        )
        po = cfg.optim
        require(po.blr > 0 and (po.lr is None or po.lr > 0), "optim.blr / optim.lr must be positive")
        require(
            po.min_lr >= 0 and po.warmup_epochs >= 0 and po.weight_decay >= 0,
            "optim.min_lr, warmup_epochs, weight_decay must be >= 0",
        )
        require(0.0 <= po.momentum < 1.0, f"optim.momentum must be in [0, 1), got {po.momentum}")
        require(po.trust_coeff > 0, f"optim.trust_coeff must be positive, got {po.trust_coeff}")
        _validate_run(cfg.train)
    elif isinstance(cfg, FinetuneConfig):
        m, a, o = cfg.model, cfg.aug, cfg.optim
        require(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
        require(m.head_init_std > 0, "model.head_init_std must be positive")
        require(
            m.trainable_blocks is None or m.trainable_blocks >= 0,
            f"model.trainable_blocks must be >= 0 or null, got {m.trainable_blocks}",
        )
        require(
            a.rand_augment is None or a.rand_augment.startswith("rand-"),
            f"aug.rand_augment must be a timm RandAugment spec like 'rand-m9-mstd0.5-inc1' or null, got {a.rand_augment!r}",
        )
        require(
            0.0 <= a.re_prob <= 1.0 and 0.0 <= a.mixup_prob <= 1.0 and 0.0 <= a.mixup_switch_prob <= 1.0,
            "aug.re_prob, mixup_prob, mixup_switch_prob must be in [0, 1]",
        )
        require(a.mixup >= 0 and a.cutmix >= 0, "aug.mixup and aug.cutmix must be >= 0")
        require(0.0 <= a.label_smoothing < 1.0, f"aug.label_smoothing must be in [0, 1), got {a.label_smoothing}")
        require(o.blr > 0 and (o.lr is None or o.lr > 0), "optim.blr / optim.lr must be positive")
        require(
            o.min_lr >= 0 and o.warmup_epochs >= 0 and o.weight_decay >= 0,
            "optim.min_lr, warmup_epochs, weight_decay must be >= 0",
        )
        require(0.0 < o.layer_decay <= 1.0, f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
        require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}")
        require(o.clip_grad is None or o.clip_grad > 0, f"optim.clip_grad must be positive or null, got {o.clip_grad}")
        require(0.0 < cfg.ema.decay < 1.0, f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
        _validate_run(cfg.train)
        mixing = a.mixup > 0 or a.cutmix > 0
        require(
            not mixing or cfg.train.batch_size % 2 == 0,
            "train.batch_size must be even with Mixup/CutMix (timm pairs images)",
        )
    return cfg


# ---------------------------------------------------------------- loading


def load_eval_config(command: str, path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any):
    """Defaults <- YAML recipe <- keyword sections (Python API) <- `key=value` overrides, for one command."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown evaluation command '{command}'; allowed: {', '.join(COMMANDS)}")
    if command != "knn":
        return validate(from_dict(COMMANDS[command], read_recipe(path, overrides, sections)))
    # knn's run section is `train`, as in the other commands; `run`, its former name, is read too, layer by layer
    # (recipe, keyword sections, overrides), so a later layer's train.X wins over an earlier one's run.X
    layers = [read_recipe(path, None, {}), read_recipe(None, None, dict(sections)), read_recipe(None, overrides, {})]
    if any("run" in layer for layer in layers):
        log.warning("knn: run.* is deprecated; write train.* (a `train:` section), as in the other commands")
    data: dict = {}
    for layer in layers:
        data = _run_as_train(layer, data)
    return validate(from_dict(KnnConfig, data))


def _run_as_train(layer: dict, base: dict | None = None) -> dict:
    """`layer` merged onto `base`, its `run` section (the former name) read as knn's `train` section."""
    layer = dict(layer)
    run = layer.pop("run", None)
    if run is not None and not isinstance(run, dict):
        raise ConfigError(f"run: expected a mapping of run settings (knn's train section), got {run!r}")
    if run:
        train = layer.get("train")
        if train is not None and not isinstance(train, dict):
            raise ConfigError(f"train: expected a mapping of run settings, got {train!r}")
        train = train or {}
        both = sorted(set(train) & set(run))
        if both and any(train[k] != run[k] for k in both):
            raise ConfigError(f"knn: run.{both[0]} and train.{both[0]} are the same setting (run is the former name "
                              "of knn's train section); set one")  # fmt: skip
        layer["train"] = {**run, **train}
    return merge_dicts(base or {}, layer)


def dump_eval_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "COMMANDS", "EncoderConfig", "EvalDataConfig", "FeatureConfig", "FinetuneConfig", "KnnConfig", "LinprobeConfig",
    "dataclasses", "dump_eval_yaml", "load_eval_config",
]  # fmt: skip
