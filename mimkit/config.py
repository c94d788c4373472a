"""Typed configuration: dataclasses, YAML recipes, `key=value` overrides.

Unknown keys, wrong types and out-of-range values are rejected with the dotted field name and what
is allowed, before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from mimkit.presets import PRESETS, get_preset
from mimkit.registry import custom_sections, method_names, method_spec
from mimkit.typed_config import ConfigError, from_dict, read_recipe, require
from mimkit.typed_config import to_dict as plain_dict

AttentionKernel = Literal["auto", "sdpa", "eager"]  # train.attention of pretraining and fine-tuning


@dataclass
class ModelConfig:
    """The encoder: a timm VisionTransformer (a timm Beit for BEiT / mc-BEiT) sized by a preset.

    Fields:
        drop_path_rate: stochastic depth rate of the encoder blocks (0 = off)
    """

    arch: str = "vit_tiny_patch4_32"  # one of mimkit.models.PRESETS
    img_size: int | None = None  # default: the preset's
    patch_size: int | None = None  # default: the preset's
    # Optional overrides of the preset's width / depth / heads (custom or test-sized encoders)
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    # image channels the patch embedding reads: 3 (RGB), 1 (grayscale), or C bands (.npy / .npz / TIFF); the data
    # must have as many (a grayscale image is repeated to 3 only when in_chans is 3). Methods mae, emae, maskfeat and
    # data2vec2; beit, mcbeit (a DALL-E tokenizer), bootmae, simmim and ijepa read RGB only
    in_chans: int = 3
    # LayerNorm eps of the encoder and the decoder: 1e-6 as MAE / timm; an imported Hugging Face ViTMAE keeps its own
    # (its config's layer_norm_eps, 1e-12 by default)
    layer_norm_eps: float = 1e-6


@dataclass
class MaskConfig:
    # hybrid: BootMAE's block mask topped up at random; parallel: EMAE's disjoint parts (method bootmae)
    type: Literal["random", "block", "hybrid", "parallel"] = "random"
    ratio: float = 0.75  # fraction of patches removed (masked count L - int(L * (1 - ratio)), as MAE's)
    # patches removed per image, e.g. 75 of 196 (BEiT's num_mask_patches); when set it overrides ratio, which is then
    # ignored. Methods mae, bootmae, beit, mcbeit with mask.type random / block / hybrid (not EMAE's parallel parts,
    # whose K comes from the ratio, nor SimMIM's coarse cells)
    count: int | None = None
    hybrid_block_ratio: float = 0.6122449  # hybrid: fraction of patches masked by blocks first (BootMAE 120 / 196)
    hybrid_max_block_ratio: float = 0.3061224  # hybrid: largest block, as a fraction of the patches (60 / 196)
    # block / hybrid rectangles: beit = BEiT's own generator (stops when a round places nothing, so the count can
    # fall short of the target, as in the official code); exact = BootMAE's own (each round draws until a rectangle
    # fits: always the target count). auto: beit for beit / mcbeit, exact for BootMAE's hybrid mask and for block
    # masks of MAE-style encoders (they need equal counts).
    block_generator: Literal["auto", "beit", "exact"] = "auto"


@dataclass
class MAEConfig:
    """MAE's decoder and target (also the pixel decoder of BootMAE and EMAE).

    Fields:
        decoder_dim: width of the decoder blocks (MAE: 512)
        decoder_depth: number of decoder blocks (MAE: 8)
        decoder_heads: attention heads per decoder block (MAE: 16)
        norm_pix_loss: normalise each target patch by its own mean and std (MAE's norm-pix target)
    """

    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # what the pixel decoder predicts per patch (mimkit.targets): norm_pix (MAE's per-patch normalised pixels), pixels
    # (raw), hog (MaskFeat's per-channel HOG, 9 orientation bins in cells of patch/2 pixels); auto = norm_pix when
    # norm_pix_loss else pixels (what earlier configs and checkpoints train). Methods mae and emae
    target: Literal["auto", "norm_pix", "pixels", "hog"] = "auto"
    # mae: self-attention over every token; crossmae: CrossMAE's cross-attention-only decoder (method mae)
    decoder: Literal["mae", "crossmae"] = "mae"
    reconstruct_ratio: float = 1.0  # crossmae: fraction of the masked patches decoded (per sample) and in the loss
    # crossmae: encoder blocks read besides the final-LN output, mixed per decoder block (CrossMAE's inter-block
    # attention), e.g. [3, 7] or [-4]; all = every block before the last
    decoder_context_blocks: tuple[int, ...] | Literal["all"] = ()
    # decoder mae, training: also run the last decoder block's queries / MLP and the pixel head at the cls token and
    # the visible patches, as the official code does; their outputs are outside the loss (false: skipped, exact)
    decode_visible: bool = False


@dataclass
class SimMIMConfig:
    mask_patch_size: int = 32  # side of the square mask cells in pixels: a multiple of the patch size


@dataclass
class EMAEConfig:
    """EMAE's parallel disjoint masks and self-consistency term (K = 1 / (1 - mask.ratio) parts).

    Fields:
        distance: the consistency term's distance between two parts' predictions: squared L2 (mse) or l1
    """

    # EMAE's parallel parts: K = 1 / (1 - mask.ratio), e.g. 4 at 0.75. Assumed defaults (no public code).
    consistency_weight: float = 1.0  # lambda; 0 = K independent MAE losses
    stop_gradient: bool = True  # detach the partner prediction in the consistency term
    distance: Literal["mse", "l1"] = "mse"


@dataclass
class BootMAEConfig:
    # BootMAE (methods notes section 5). The pixel decoder is sized by mae.decoder_dim / depth / heads (paper:
    # 512 x 2, 12 heads); mask.type hybrid is BootMAE's masking. One override per ablation: feature_target=none,
    # cross_attention=false, center_weight=false, mask.type=random (parallel: EMAE's masks, with emae.*).
    feature_target: Literal["ema", "none"] = "ema"  # none: pixel target only (no momentum encoder)
    feature_weight: float = 1.0  # lambda of the feature loss
    feature_weight_ramp: float = 0.25  # lambda ramps linearly over this fraction of train.epochs (0 = constant)
    feature_decoder_dim: int | None = None  # default: the encoder width
    feature_decoder_depth: int | None = None  # default: mae.decoder_depth
    feature_decoder_heads: int | None = None  # default: the encoder's heads
    cross_attention: bool = True  # target-aware decoders; false = self-attention + MLP decoder blocks
    pixel_context_layer: int = 0  # encoder block the pixel decoder cross-attends to
    feature_context_layer: int = -1  # encoder block the feature decoder cross-attends to (-1 = last, pre-norm)
    pixel_norm: Literal["patch_channel", "patch", "none"] = "patch_channel"  # patch = MAE's norm_pix
    center_weight: bool = True  # loss weight 1 + masked fraction of the 3x3 neighbourhood
    mask_pos_only: bool = True  # decoder position embeddings on mask tokens only
    # EMA decay, set once per epoch: momentum -> momentum_mid linearly until momentum_mid_epoch; then constant,
    # or (momentum_final set, ViT-B) linearly -> momentum_final at momentum_final_epoch.
    momentum: float = 0.999
    momentum_mid: float = 0.9999
    momentum_mid_epoch: float = 100.0
    momentum_final: float | None = None
    momentum_final_epoch: float = 400.0
    # pixel decoder head: official = BootMAE's ConvTranspose2d(dim, 3, p, p) as a per-token Linear(dim, p*p*3)
    # whose bias is one per colour channel, shared by the p*p pixels (3 biases); per_pixel = one bias per output
    # value (p*p*3; tied at init, free in training: the only head before this key, which older checkpoints keep)
    pixel_head: Literal["official", "per_pixel"] = "official"


@dataclass
class BEiTConfig:
    """BEiT / mc-BEiT: the timm Beit backbone's options and mc-BEiT's soft targets.

    Fields:
        shared_rel_pos_bias: one relative position bias table shared by all blocks (BEiT's pretraining setting)
        abs_pos_emb: an absolute position embedding besides the relative bias (BEiT: none)
    """

    # BEiT / mc-BEiT backbone (timm Beit: shared relative position bias, layer scale, no absolute position
    # embedding) and mc-BEiT's soft targets (methods notes sections 3-4). Masking is mask.*: BEiT blocks of 75 of
    # 196 patches (mask.count 75; ratio 0.4 elsewhere), mc-BEiT's released recipe random 0.75 (147 of 196).
    layer_scale_init: float = 0.1  # gamma init (BEiT: 0.1 Base, 1e-5 Large)
    shared_rel_pos_bias: bool = True
    abs_pos_emb: bool = False
    temperature: float = 4.0  # mcbeit: p = softmax(tokenizer logits / temperature)
    # mcbeit: the official warm-up of that temperature, linear from temperature_warmup at epoch 0 to temperature at
    # epoch temperature_warmup_epochs - 1 (np.linspace), then constant; null = no ramp (the released recipe sets
    # both to 4.0)
    temperature_warmup: float | None = None
    temperature_warmup_epochs: int = 30
    omega: float = 0.2  # mcbeit: target = omega * W p + (1 - omega) p
    sim_temperature: float = 1.0  # mcbeit: W = row-softmax(cosine similarities / sim_temperature)
    stop_gradient: bool = False  # mcbeit: detach W (the official code does not; mimkit follows the code)


@dataclass
class Data2Vec2Config:
    """data2vec 2.0 (Baevski et al. 2023): several inverse block masks per image sharing one EMA-teacher pass, targets the
    mean of the teacher's top-K instance-normalised block outputs, a convolutional decoder (fairseq's image values)."""

    num_masks: int = 8  # M: masks per image (the paper's multi-mask; the student batch is B x M)
    top_k_blocks: int = 8  # targets: mean of the teacher's last K block outputs (all blocks when the encoder has fewer)
    mask_length: int = 3  # inverse block masks: side of the square blocks kept visible (mask.type block)
    mask_prob_adjust: float = 0.07  # inverse block masks: extra block centres drawn, as a fraction of the patches
    decoder_dim: int | None = None  # conv decoder width; default: the encoder width
    decoder_layers: int = 6  # conv decoder blocks (each: grouped conv, LayerNorm without affine, GELU, residual)
    decoder_kernel: int = 3  # conv decoder kernel side (odd: same padding over the patch grid)
    decoder_groups: int = 16  # conv decoder groups: divide the decoder and encoder widths
    mask_noise_std: float = 0.01  # the decoder's masked positions: N(0, std) noise (no learned mask token)
    cls_loss_weight: float = (
        0.0  # the image recipe's cls term (its 0.01 is per batch sum; see docs/methods.md); 0 = off
    )
    ema_decay: float = 0.9998  # teacher EMA decay, annealed linearly to ema_end_decay over the run
    ema_end_decay: float = 0.99999  # the teacher's decay at the end of the run (train.epochs / schedule_steps)


@dataclass
class IJEPAConfig:
    """I-JEPA (Assran et al. 2023): multi-block masks, a narrow ViT predictor, an EMA target encoder (official ViT-H/14
    values; the predictor's heads default to the encoder's, as the official code's)."""

    predictor_dim: int | None = None  # default: the encoder's width, at most 384 (the official ViT-H value)
    predictor_depth: int = 12  # predictor blocks (the official ViT-H/14 predictor's 12)
    predictor_heads: int | None = None  # default: the encoder's heads
    num_targets: int = 4  # target blocks per image
    target_scale: tuple[float, float] = (0.15, 0.2)  # area of each target block, fraction of the patches
    target_aspect: tuple[float, float] = (0.75, 1.5)  # height / width of the target blocks
    context_scale: tuple[float, float] = (0.85, 1.0)  # area of the (square) context block before the targets leave it
    # every block keeps more than this many patches (context: after the targets leave it); default: the official 10,
    # lowered below the smallest target block on small grids (the official collator would draw forever)
    min_keep: int | None = None
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"  # smooth_l1 (official, beta 1) or l2 (MSE) over the target blocks
    momentum: float = 0.996  # target-encoder EMA, linear to momentum_final over the run
    momentum_final: float = 1.0  # the target-encoder momentum at the end of the run
    weight_decay_final: float = 0.4  # optim.weight_decay (0.04) -> this, cosine over the run (official schedule)


@dataclass
class TokenizerConfig:
    # BEiT / mc-BEiT visual tokenizer (mimkit/tokenizers.py). mimkit: written by `mimkit tokenizer train`;
    # dalle: DALL-E dVAE encoder state dict; vqgan: taming Gumbel-VQGAN last.ckpt; random: untrained mimkit dVAE;
    # none: no tokenizer (what `mimkit import` writes for an official BEiT encoder: evaluation and export need none,
    # pretraining asks for one; vocab_size is then the lm_head's width).
    kind: Literal["mimkit", "dalle", "vqgan", "random", "none"] = "mimkit"
    path: str | None = None  # weights to read (pretraining) / to write (mimkit tokenizer train)
    size: int | None = None  # side of the tokenizer's view; default: ViT grid x the tokenizer's downsampling
    interpolation: Literal["default", "bicubic", "bilinear", "lanczos"] = "default"  # default: the tokenizer's
    # mimkit dVAE architecture (kind mimkit at training time / kind random)
    vocab_size: int = 512
    hidden: int = 64
    downsample: int = 4
    code_dim: int = 64
    # mimkit tokenizer train (batch and seed from here and train.seed; data from data.*)
    train_steps: int = 2000
    batch_size: int = 128
    lr: float = 1.0e-3
    kl_weight: float = 1.0e-3
    tau_start: float = 1.0
    tau_end: float = 0.0625
    # a killed `tokenizer train` continues bit-identically from <path stem>.resume.pt, written every this many
    # steps (0 = never) and removed when the tokenizer is written; resume: auto (continue it) | none (start over)
    save_every_steps: int = 250
    resume: Literal["auto", "none"] = "auto"


@dataclass
class DataConfig:
    """Pretraining data: the source, its augmentation and its loading.

    Fields:
        format: how data.path is read; auto infers it from the path (folder, npz, webdataset, skimage, torchvision)
        crop_scale: RandomResizedCrop's area range, as fractions of the image (MAE: 0.2 to 1)
        hflip: random horizontal flip
        mean: per-channel mean the images are normalised with (0-1 scale; ImageNet's RGB one by default), one value per
            model.in_chans channel, or auto: measured on a sample of the training data (the numbers go in config.yaml)
        std: per-channel standard deviation the images are normalised with (0-1 scale), one per channel, or auto
        num_workers: DataLoader worker processes per training process (0 = load in the main process)
    """

    # "skimage" = the embedded default (scikit-image's bundled photos); "torchvision:NAME[:SPLIT]" = a torchvision
    # dataset class (CIFAR10, CIFAR100, STL10 (default split unlabeled), Flowers102, ImageNet, ...) under data.root;
    # otherwise a path to an ImageFolder tree / flat image folder, a .npz with x_train, or WebDataset shards (.tar,
    # brace patterns allowed).
    path: str = "skimage"
    format: Literal["auto", "folder", "npz", "webdataset", "skimage", "torchvision"] = "auto"
    root: str = "data"  # torchvision datasets: the folder holding torchvision's layout (e.g. data/cifar-10-batches-py)
    download: bool = False  # torchvision datasets: download into data.root if missing
    num_samples: int | None = None  # required for webdataset (epoch length); optional cap otherwise
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: tuple[float, ...] | Literal["auto"] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] | Literal["auto"] = (0.229, 0.224, 0.225)
    num_workers: int = 2
    repeats: int = 1  # virtual epoch = dataset repeated; useful for tiny sets like the quickstart
    # where JPEGs are decoded and augmented: auto = on the GPU (nvJPEG, batched) for folder / WebDataset sources
    # when training on CUDA, else in the DataLoader workers (PIL); device / cpu force one (mimkit/device_decode.py)
    decode: Literal["auto", "cpu", "device"] = "auto"


@dataclass
class OptimConfig:
    """AdamW and its warmup + cosine lr schedule.

    Fields:
        min_lr: the lr the cosine schedule ends at
        warmup_epochs: linear lr warmup from 0, in epochs (fractions allowed)
        weight_decay: AdamW's decoupled weight decay (never on 1-D parameters and biases)
        betas: AdamW's (beta1, beta2); MAE: (0.9, 0.95)
        eps: AdamW's epsilon
    """

    blr: float = 1.5e-4  # lr = blr * effective_batch / 256 (MAE's linear scaling rule)
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    weight_decay: float = 0.05
    # parameters exempt from weight decay besides 1-D ones and biases (never decayed; frozen ones are never
    # optimised): names or fnmatch patterns of the model's parameters, e.g. [encoder.cls_token, "*mask_token"].
    # null = the method's official set (its MethodSpec.no_weight_decay): none for MAE / EMAE (their cls
    # and mask tokens are decayed), encoder.pos_embed and encoder.cls_token for BootMAE, BEiT and mc-BEiT.
    no_weight_decay: tuple[str, ...] | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm; None = no clipping
    # AdamW kernel: auto = fused (one kernel over all tensors) unless FSDP shards the
    # parameters (then foreach); fused, foreach and for_loop force one
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


@dataclass
class TrainConfig:
    """The run: its length, precision, device, output folder, checkpoints, logging and monitors.

    Fields:
        epochs: passes over the data (with data.repeats); sets the lr and method schedules unless schedule_steps
        seed: seed of the initial weights, the data order and every sample's augmentation and mask
        out_dir: the run folder: config.yaml, checkpoints, metrics.jsonl, tb/ (a resume continues from it)
        save_every_epochs: write a checkpoint every N epochs (and at the end)
        keep_last: checkpoints kept in out_dir; older ones are deleted after a newer one is written
        knn_val_split: the split of knn_data the monitor scores
    """

    epochs: int = 800
    batch_size: int = 64  # per process, per micro-step
    accum_steps: int = 1  # micro-steps per optimizer step
    max_steps: int | None = None  # stop after this many optimizer steps (schedule still uses epochs)
    max_minutes: float | None = None  # stop (and save) after this much wall-clock training, e.g. a job's time limit
    # a compute budget in minutes of training-loop wall-clock (counted over resumes): the lr and method schedules run
    # on the share of it spent instead of the step, and the run ends (and saves) when it is spent; epochs /
    # schedule_steps then only cap the run and give optim.warmup_epochs its share. Not bit-reproducible: the schedule
    # follows the clock
    budget_minutes: float | None = None
    # length of the run and of its lr / method schedules in optimizer steps, instead of `epochs` (runs sized to a
    # compute budget; may end mid-epoch)
    schedule_steps: int | None = None
    # progressive resolution: [[epoch, img_size], ...] pretrains from each epoch on at that input size (a square
    # RandomResizedCrop of that side, masks drawn on its grid, position tables resampled to it), fewer tokens a step in
    # the early stages; the first stage starts at epoch 0, the last is model.img_size, e.g. [[0, 16], [2, 32]].
    # [] = model.img_size throughout. Taken by mae and mae with the CrossMAE decoder; the other methods refuse it
    resolution_stages: tuple[tuple[int, int], ...] = ()
    # auto = bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch.compile every transformer block: auto = on CUDA only (on CPU it needs a C++ compiler and pays
    # off per machine: benchmarks/throughput.py --impls mimkit,mimkit-compiled measures it)
    compile: bool | Literal["auto"] = "auto"
    # attention kernel: auto = torch's fused SDPA, except plain matmul-softmax-matmul ("eager") under CPU
    # bf16 / fp16 autocast, where the fused CPU kernels are several times slower at ViT head widths
    attention: AttentionKernel = "auto"
    seed: int = 0
    out_dir: str = "runs/mae"
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | path to a checkpoint
    # a new run's first weights (continued pretraining): a mimkit checkpoint, or a file `mimkit import` reads (official
    # MAE / BEiT / BootMAE, a Hugging Face folder, a timm ViT state dict); every tensor that fits is taken (position
    # tables fitted to the grid, the patch embedding to the channels), the rest initialised as usual, the key report
    # in OUT_DIR/init_from.json; the optimizer and schedules start fresh. A resume continues from the run's own
    # checkpoints and does not read it.
    init_from: str | None = None
    # keys whose change on resume is meant (e.g. train.epochs to lengthen a run; comma-separated or a list): a resume
    # that would change anything that alters the trajectory is refused otherwise; the change goes to
    # config_history.jsonl. Logging, eval cadence, workers, kernels and the device may change freely.
    resume_allow: tuple[str, ...] | str = ()
    # besides SIGTERM and SIGINT, the signal that stops the run gracefully (step finished, checkpoint written, exit 75):
    # SLURM's `--signal=USR1@90`; none = only SIGTERM / SIGINT
    stop_signal: str = "SIGUSR1"
    save_every_steps: int | None = None  # also save every N optimizer steps (mid-epoch)
    save_every_epochs: int = 1
    keep_last: int = 3
    log_every: int = 10  # steps between JSONL / TensorBoard records
    # where the step records go besides OUT_DIR/metrics.jsonl (always written): tensorboard (OUT_DIR/tb), csv
    # (OUT_DIR/metrics.csv, one row per logged step), wandb (Weights & Biases; WANDB_PROJECT / WANDB_MODE=offline),
    # mlflow (MLFLOW_TRACKING_URI, default OUT_DIR/mlruns): the run's resolved config as their hyperparameters, a
    # resume continuing the same run; a list or comma-separated; [] = the JSONL only
    loggers: tuple[str, ...] | str = ("tensorboard",)
    # auto: TensorBoard when the tensorboard package is installed (a core install has none: one line says so);
    # true: required (one line naming the extra when missing); false: none even when train.loggers names it
    tensorboard: bool | Literal["auto"] = "auto"
    progress: bool = True  # tqdm bar on rank 0
    max_nonfinite_steps: int = 10  # consecutive skipped non-finite steps before the run stops
    vis_every_epochs: int = 10  # TensorBoard reconstruction grids every N epochs (0 = never)
    vis_images: int = 4  # fixed images shown in those grids
    # k-NN trend monitor on labelled data every N epochs (0 = never); MIM features score low on k-NN
    knn_every_epochs: int = 0
    knn_data: str | None = None  # labelled .npz / ImageFolder with train and val splits; default data.path
    knn_val_split: str = "test"
    knn_samples: tuple[int, int] = (10000, 2000)  # train / val images used


# Keys a resume may change without a word (recorded in config_history.jsonl): where and how fast the same steps run,
# how often they are logged, checked and saved, and when the run stops. Everything else changes the trajectory.
TRAJECTORY_FREE = frozenset(
    {f"train.{k}" for k in ("out_dir", "resume", "init_from", "resume_allow", "stop_signal", "max_steps", "max_minutes",
                            "save_every_steps", "save_every_epochs", "keep_last", "log_every", "loggers", "tensorboard", "progress",
                            "max_nonfinite_steps", "vis_every_epochs", "vis_images", "knn_every_epochs", "knn_data",
                            "knn_val_split", "knn_samples", "device", "compile", "attention")}
    | {f"data.{k}" for k in ("num_workers", "root", "download", "decode")}
    | {"optim.implementation", "distributed.strategy", "distributed.activation_checkpointing",
       "distributed.timeout_minutes"}
)  # fmt: skip


LOGGERS = (
    "tensorboard",
    "csv",
    "wandb",
    "mlflow",
)  # train.loggers (every command): mimkit.metrics.MetricsLog's besides the JSONL


def check_loggers(value, key: str) -> tuple[str, ...]:
    """train.loggers as a tuple of known names, in order, without repeats: a list or a comma-separated string."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    for name in names:
        require(name in LOGGERS, f"{key}: '{name}' is not a logger; allowed: {', '.join(LOGGERS)} (a list, e.g. "
                f"[tensorboard, csv], or [] for metrics.jsonl only)")  # fmt: skip
    return tuple(dict.fromkeys(names))


def active_loggers(section) -> tuple[str, ...]:
    """The loggers a run section asks for: its `loggers`, less tensorboard when `tensorboard` is false, and
    `tensorboard-if-installed` for it when `tensorboard` is auto (mimkit.metrics.MetricsLog reads these names)."""
    names = check_loggers(getattr(section, "loggers", ("tensorboard",)), "train.loggers")
    tb = getattr(section, "tensorboard", "auto")
    if tb is False:
        return tuple(n for n in names if n != "tensorboard")
    return tuple("tensorboard-if-installed" if n == "tensorboard" and tb == "auto" else n for n in names)


@dataclass
class DistributedConfig:
    # ddp: every process holds the whole model; fsdp: FSDP2 (fully_shard per block), sharded checkpoints
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute block activations in backward (timm checkpoint_seq)
    timeout_minutes: float = 30.0  # process-group timeout: a hung collective fails after this long


@dataclass
class Config:
    """The pretraining config (`mimkit pretrain`, `mimkit.run`): one section per dataclass.

    Fields:
        method: the pretraining method, one of the registered ones (`mimkit methods` lists them); it reads its own
            sections (mae, emae, bootmae, beit, simmim, tokenizer, or a section a user's method registered) and
            a value set in a section it does not read is refused
    """

    method: str = "mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    emae: EMAEConfig = field(default_factory=EMAEConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    bootmae: BootMAEConfig = field(default_factory=BootMAEConfig)
    beit: BEiTConfig = field(default_factory=BEiTConfig)
    ijepa: IJEPAConfig = field(default_factory=IJEPAConfig)
    data2vec2: Data2Vec2Config = field(default_factory=Data2Vec2Config)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # the sections of methods registered from outside mimkit (name -> that section's dataclass), read as top-level
    # sections `NAME:` in YAML and `NAME.key=value`; `cfg.NAME` reads them
    sections: dict = field(default_factory=dict, metadata={"internal": True}, repr=False)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"Config has no section {name!r}")


BUILTIN_METHOD_SECTIONS = (
    "mae",
    "emae",
    "simmim",
    "bootmae",
    "beit",
    "ijepa",
    "data2vec2",
    "tokenizer",
)  # read only by the methods naming them


# ---------------------------------------------------------------- range checks

STOP_SIGNALS = ("USR1", "USR2", "HUP", "QUIT", "XCPU", "PWR")  # train.stop_signal (SIGTERM / SIGINT always stop)


def config_keys(cls, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass, e.g. train.epochs."""
    keys = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = cls.__dataclass_fields__[f.name].type
        sub = globals().get(tp) if isinstance(tp, str) else tp
        if dataclasses.is_dataclass(sub):
            keys |= config_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


class Geometry(NamedTuple):
    """The encoder's sizes, the model.arch preset's where model.* leaves them unset."""

    img: int
    patch: int
    num_patches: int
    dim: int
    depth: int
    heads: int


def geometry(cfg: Config) -> Geometry:
    p, m = get_preset(cfg.model.arch), cfg.model
    img, patch = m.img_size or p.img_size, m.patch_size or p.patch_size
    return Geometry(img, patch, (img // patch) ** 2, m.embed_dim or p.embed_dim, m.depth or p.depth,
                    m.num_heads or p.num_heads)  # fmt: skip


def validate(cfg: Config, strict: bool = True, also_reads: tuple[str, ...] = ()) -> Config:
    """Range checks that types alone cannot express, the method's own checks (its registered spec), and the
    keys the method never reads: refused when `strict` (a config a user wrote), reset to their defaults
    otherwise (a saved config of an earlier version, which printed every section). `also_reads`: sections
    the command reads besides the method's (tokenizer training reads tokenizer.*)."""
    spec = method_spec(cfg.method)
    _attach_custom_sections(cfg)
    g = _validate_model(cfg)
    _validate_mask(cfg, spec, g)
    _unread_keys(cfg, spec, strict, also_reads)
    _validate_tokenizer(cfg.tokenizer)
    if spec.check is not None:
        spec.check(cfg)
    _validate_run(cfg)
    _validate_resolution_stages(cfg, spec, g)
    return cfg


def _validate_resolution_stages(cfg: Config, spec, g: Geometry) -> None:
    stages, key = cfg.train.resolution_stages, "train.resolution_stages"
    if not stages:
        return
    takers = ", ".join(n for n in method_names() if method_spec(n).takes_resolution_stages(cfg))
    require(spec.takes_resolution_stages(cfg), f"{key}: method {cfg.method} (mask.type {cfg.mask.type}) pretrains at "
            f"model.img_size only; progressive resolution is for {takers}; set {key}=[]")  # fmt: skip
    require(cfg.mask.count is None, f"{key}: mask.count fixes the masked patches of the full grid; with stages "
            f"of other sizes give mask.ratio (mask.count=null)")  # fmt: skip
    epochs = [e for e, _ in stages]
    require(epochs[0] == 0 and all(a < b for a, b in zip(epochs, epochs[1:])),
            f"{key}: stage epochs must start at 0 and increase, got {epochs} (e.g. [[0, 16], [2, 32]])")  # fmt: skip
    require(
        epochs[-1] < cfg.train.epochs,
        f"{key}: the last stage starts at epoch {epochs[-1]}, but the run has train.epochs {cfg.train.epochs}",
    )
    for _, size in stages:
        require(0 < size <= g.img and size % g.patch == 0, f"{key}: size {size} must be a multiple of the patch "
                f"size {g.patch} in (0, model.img_size {g.img}]")  # fmt: skip
    require(stages[-1][1] == g.img, f"{key}: the last stage's size {stages[-1][1]} must be model.img_size {g.img} "
            "(the size the encoder is evaluated and exported at)")  # fmt: skip


def _attach_custom_sections(cfg: Config) -> None:
    """Every registered method's own section, its defaults where the config sets none; unknown ones refused."""
    registered = custom_sections()
    for name in cfg.sections:
        require(name in registered, f"unknown config key '{name}': no registered method has a section of that name")
    cfg.sections = {name: cfg.sections.get(name) or cls() for name, cls in registered.items()}


def _validate_model(cfg: Config) -> Geometry:
    require(cfg.model.arch in PRESETS, f"model.arch: unknown '{cfg.model.arch}'; allowed: {', '.join(sorted(PRESETS))}")
    m = cfg.model
    for name, value in [("model.img_size", m.img_size), ("model.patch_size", m.patch_size),
                        ("model.embed_dim", m.embed_dim), ("model.depth", m.depth), ("model.num_heads", m.num_heads)]:  # fmt: skip
        require(value is None or value > 0, f"{name} must be positive, got {value}")
    g = geometry(cfg)
    require(
        g.img % g.patch == 0,
        f"model.img_size {g.img} is not divisible by the patch size {g.patch} (model.patch_size, default from "
        f"model.arch); use an image size that is a multiple of the patch size",
    )
    require(g.dim % g.heads == 0, f"model.embed_dim {g.dim} must be divisible by model.num_heads {g.heads}")
    require(g.dim % 4 == 0, f"model.embed_dim must be divisible by 4 (sin-cos position embedding), got {g.dim}")
    require(0.0 < m.layer_norm_eps < 1.0, f"model.layer_norm_eps must be in (0, 1), got {m.layer_norm_eps}")
    require(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    require(1 <= m.in_chans <= 256, f"model.in_chans must be in 1..256, got {m.in_chans}")
    if m.in_chans != 3 and method_spec(cfg.method).rgb_only:
        others = ", ".join(n for n in method_names() if not method_spec(n).rgb_only)
        raise ConfigError(f"model.in_chans {m.in_chans}: method {cfg.method} reads RGB images only (3 channels); use "
                          f"model.in_chans 3 or one of {others}")  # fmt: skip
    return g


def _validate_mask(cfg: Config, spec, g: Geometry) -> None:
    mask = cfg.mask
    require(0.0 < mask.ratio < 1.0, f"mask.ratio must be in (0, 1) (exclusive), got {mask.ratio}")
    if mask.count is None:
        require(int(g.num_patches * (1 - mask.ratio)) >= 1,
                f"mask.ratio {mask.ratio} leaves no visible patch of the {g.num_patches} given by "
                f"model.img_size {g.img} / model.patch_size {g.patch}")  # fmt: skip
    else:
        _validate_mask_count(cfg, spec, g)
    require(mask.type in spec.mask_types, f"mask.type {mask.type} does not compose with method {cfg.method}: "
            f"allowed {', '.join(spec.mask_types)} (BEiT's in-place corruption has no parallel parts; hybrid / parallel "
            "masks need a visible-token encoder)")  # fmt: skip
    if mask.type == "hybrid":
        bound = (f"mask.ratio {mask.ratio}" if mask.count is None
                 else f"mask.count / patches {mask.count / g.num_patches:.4g}")  # fmt: skip
        require(0.0 < mask.hybrid_block_ratio <= masked_fraction(cfg, g.num_patches),
                f"mask.hybrid_block_ratio must be in (0, {bound}], got {mask.hybrid_block_ratio}")  # fmt: skip
        require(0.0 < mask.hybrid_max_block_ratio <= 1.0,
                f"mask.hybrid_max_block_ratio must be in (0, 1], got {mask.hybrid_max_block_ratio}")  # fmt: skip
    require(mask.block_generator != "beit" or mask.type != "block" or spec.block_generator == "beit",
            f"mask.block_generator beit varies the masked count per image, which method {cfg.method}'s "
            "visible-token encoder cannot batch with mask.type block; use exact (or auto)")  # fmt: skip


def method_sections(cfg: Config) -> tuple[str, ...]:
    """Every section only some methods read: the built-in ones and those registered methods brought."""
    return BUILTIN_METHOD_SECTIONS + tuple(cfg.sections)


def sections_used(cfg: Config, also_reads: tuple[str, ...] = ()) -> dict[str, set[str] | None]:
    """{method section: the keys of it the run reads, None = all} for the sections the run's method reads."""
    used: dict[str, set[str] | None] = {}
    for item in (*method_spec(cfg.method).sections_read(cfg), *also_reads):
        section, _, key = item.partition(".")
        keys = used.get(section, set())
        if not key:
            used[section] = None
        elif keys is not None:  # a section read whole stays whole
            used[section] = keys | {key}
    return used


def reads_key(cfg: Config, key: str) -> bool:
    """Whether the run of `cfg` reads the dotted key (a common section's, or one its method reads)."""
    section, _, name = key.partition(".")
    if section not in method_sections(cfg):
        return True
    used = sections_used(cfg)
    keys = used.get(section, set())
    return section in used and (keys is None or name in keys)


def _unread_keys(cfg: Config, spec, strict: bool, also_reads: tuple[str, ...]) -> None:
    """A value changed from its default in a method section the method does not read is a mistake (it would do
    nothing): refused in one line naming the key and the method; reset when not `strict`."""
    used = sections_used(cfg, also_reads)
    if not spec.reads_mask:  # the method draws its own masks from its section: mask.* would do nothing
        used["mask"] = {"block_generator"}  # written out (resolved) in every saved config
    for section in (*method_sections(cfg), *(() if spec.reads_mask else ("mask",))):
        current = getattr(cfg, section)
        default = type(current)()
        keep = used.get(section, set())
        for f in dataclasses.fields(current):
            if keep is None or f.name in keep or getattr(current, f.name) == getattr(default, f.name):
                continue
            if strict:
                reads = ", ".join(spec.sections_read(cfg)) or "no method section"
                raise ConfigError(f"{section}.{f.name}: method {cfg.method} does not read it (it would do nothing; "
                                  f"{cfg.method} reads {reads}): remove it, or choose the method it belongs to")  # fmt: skip
            setattr(current, f.name, getattr(default, f.name))


def _validate_run(cfg: Config) -> None:
    """data.*, optim.*, train.*, distributed.*."""
    d = cfg.data
    require(
        0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0,
        f"data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}",
    )
    c = cfg.model.in_chans if hasattr(cfg, "model") else 3
    for key, value in (("data.mean", d.mean), ("data.std", d.std)):
        require(value == "auto" or len(value) == c,
                f"{key} has {0 if value == 'auto' else len(value)} values but model.in_chans is {c}: give one per "
                f"channel, or auto (measured on the training data)")  # fmt: skip
    require(d.std == "auto" or all(s > 0 for s in d.std), f"data.std must be positive, got {d.std}")
    require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    require(d.repeats >= 1, f"data.repeats must be >= 1, got {d.repeats}")
    require(d.num_samples is None or d.num_samples > 0, f"data.num_samples must be positive, got {d.num_samples}")
    o = cfg.optim
    require(o.blr > 0, f"optim.blr must be positive, got {o.blr}")
    require(o.lr is None or o.lr > 0, f"optim.lr must be positive or null, got {o.lr}")
    require(o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}")
    require(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    require(o.no_weight_decay is None or all(p.strip() == p and p for p in o.no_weight_decay),
             f"optim.no_weight_decay: names must be non-empty, without spaces; got {o.no_weight_decay}")  # fmt: skip
    require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}")
    require(o.clip_grad is None or o.clip_grad > 0, f"optim.clip_grad must be positive or null, got {o.clip_grad}")
    t = cfg.train
    require(cfg.distributed.timeout_minutes > 0,
             f"distributed.timeout_minutes must be positive, got {cfg.distributed.timeout_minutes}")  # fmt: skip
    require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    require(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    require(
        t.max_minutes is None or t.max_minutes > 0, f"train.max_minutes must be positive or null, got {t.max_minutes}"
    )
    require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {t.max_steps}")
    require(
        t.budget_minutes is None or t.budget_minutes > 0,
        f"train.budget_minutes must be positive or null, got {t.budget_minutes}",
    )
    require(
        t.schedule_steps is None or t.schedule_steps >= 1,
        f"train.schedule_steps must be >= 1 or null, got {t.schedule_steps}",
    )
    require(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    require(t.save_every_epochs >= 1, f"train.save_every_epochs must be >= 1, got {t.save_every_epochs}")
    require(t.save_every_steps is None or t.save_every_steps >= 1, "train.save_every_steps must be >= 1 or null")
    require(t.knn_every_epochs >= 0, f"train.knn_every_epochs must be >= 0, got {t.knn_every_epochs}")
    require(min(t.knn_samples) >= 1, f"train.knn_samples must be positive, got {t.knn_samples}")
    require(
        t.vis_every_epochs >= 0 and t.vis_images >= 1, "train.vis_every_epochs must be >= 0 and train.vis_images >= 1"
    )
    require(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    # numpy's seed range; the samplers seed torch generators with seed * 1_000_003 + epoch and the RNGs with
    # seed + rank + step, which then stay far inside torch's 64-bit seeds
    require(0 <= t.seed < 2**32, f"train.seed must be an integer in [0, {2**32 - 1}] (numpy's seed range; mimkit derives "
            f"seed * 1000003 + epoch for torch's 64-bit seeds), got {t.seed}")  # fmt: skip
    t.loggers = check_loggers(t.loggers, "train.loggers")
    allow = t.resume_allow.split(",") if isinstance(t.resume_allow, str) else list(t.resume_allow)
    t.resume_allow = tuple(k.strip() for k in allow if k.strip())
    known = config_keys(Config) | {f"{name}.{k}" for name, c in custom_sections().items() for k in config_keys(c)}
    for key in t.resume_allow:
        require(key in known, f"train.resume_allow: '{key}' is not a config key (e.g. train.epochs, optim.blr)")
    require(t.stop_signal.lower() == "none" or t.stop_signal.upper().removeprefix("SIG") in STOP_SIGNALS,
            f"train.stop_signal: '{t.stop_signal}' is not allowed; allowed: {', '.join(STOP_SIGNALS)} (with or without "
            "SIG), or none")  # fmt: skip
    require(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device: '{t.device}' is not allowed; allowed: auto, cpu, cuda, cuda:N",
    )


def resolve_block_generator(cfg: Config) -> Literal["beit", "exact"]:
    """`mask.block_generator` resolved: auto = each method's own generator: beit for BEiT / mc-BEiT (they corrupt
    every token in place, so the count may vary), exact otherwise (BootMAE's own, for its hybrid mask's blocks;
    MAE-style encoders need equal counts)."""
    if cfg.mask.block_generator != "auto":
        return cfg.mask.block_generator
    return method_spec(cfg.method).block_generator


def masked_fraction(cfg: Config, num_patches: int) -> float:
    """The fraction of the patches masked per image: mask.count / L when set, else mask.ratio."""
    return cfg.mask.ratio if cfg.mask.count is None else cfg.mask.count / num_patches


def _validate_mask_count(cfg: Config, spec, g: Geometry) -> None:
    count = cfg.mask.count
    assert count is not None  # called only when mask.count is set
    require(1 <= count < g.num_patches,
            f"mask.count must be in [1, {g.num_patches - 1}] (patches masked of the {g.num_patches} given by "
            f"model.img_size {g.img} / model.patch_size {g.patch}; it overrides mask.ratio), got {count}")  # fmt: skip
    require(spec.mask_count and cfg.mask.type != "parallel",
            f"mask.count does not compose with method {cfg.method} / mask.type {cfg.mask.type}: EMAE's parallel parts "
            "(K = 1 / (1 - mask.ratio)) and SimMIM's coarse cells take mask.ratio; leave mask.count null")  # fmt: skip


def check_pretrainable(cfg: Config) -> None:
    """What only pretraining needs beyond a valid config: BEiT / mc-BEiT's tokenizer (an imported encoder has none)."""
    require(not method_spec(cfg.method).needs_tokenizer or cfg.tokenizer.kind != "none",
             f"tokenizer.kind none: method {cfg.method} pretrains against a tokenizer and this config has none (an "
             "imported encoder's): set tokenizer.kind=mimkit|dalle|vqgan and tokenizer.path=FILE (a mimkit one comes "
             "from `mimkit tokenizer train configs/tokenizer_cifar10.yaml`)")  # fmt: skip


def _validate_tokenizer(t: TokenizerConfig) -> None:
    require(t.size is None or t.size > 0, f"tokenizer.size must be positive or null, got {t.size}")
    for name in ("vocab_size", "hidden", "code_dim", "train_steps", "batch_size"):
        require(getattr(t, name) >= 1, f"tokenizer.{name} must be >= 1, got {getattr(t, name)}")
    require(t.downsample >= 2 and t.downsample & (t.downsample - 1) == 0,
             f"tokenizer.downsample must be a power of two >= 2, got {t.downsample}")  # fmt: skip
    for name in ("lr", "tau_start", "tau_end"):
        require(getattr(t, name) > 0, f"tokenizer.{name} must be positive, got {getattr(t, name)}")
    require(t.kl_weight >= 0, f"tokenizer.kl_weight must be >= 0, got {t.kl_weight}")
    require(t.save_every_steps >= 0, f"tokenizer.save_every_steps must be >= 0 (0 = never), got {t.save_every_steps}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                also_reads: tuple[str, ...] = (), strict: bool = True, **sections: Any) -> Config:  # fmt: skip
    """Defaults <- YAML recipe <- keyword sections (Python API) <- `key=value` overrides. A value set in a section
    the method does not read is refused (`also_reads`: sections the command reads besides the method's), or reset
    to its default when not `strict`."""
    return validate(config_from_raw(read_recipe(path, overrides, sections)), strict=strict, also_reads=also_reads)


def config_from_raw(data: dict) -> Config:
    """Typed Config from nested plain data; the sections registered methods brought are read by their dataclass."""
    if not isinstance(data, dict):
        return from_dict(Config, data)
    registered = custom_sections()
    own = {name: from_dict(registered[name], value, f"{name}.") for name, value in data.items() if name in registered}
    cfg = from_dict(Config, {k: v for k, v in data.items() if k not in registered})
    cfg.sections = own
    return cfg


# A saved config (a checkpoint's, a run's config.yaml) lists every key of its version: a key it lacks did not exist
# yet, and takes the value that version had, where that differs from today's default. BootMAE's pixel head had
# p*p*3 biases before bootmae.pixel_head (a weight shape: its checkpoints load only into that head).
_BOOTMAE_SECTION_0_1 = ("feature_target", "feature_weight", "cross_attention", "pixel_norm", "center_weight",
                        "mask_pos_only", "momentum")  # fmt: skip


def _saved_before_keys(data: dict) -> dict:
    section = data.get("bootmae")
    if (data.get("method") == "bootmae" and isinstance(section, dict) and "pixel_head" not in section
            and all(k in section for k in _BOOTMAE_SECTION_0_1)):  # fmt: skip
        data = {**data, "bootmae": {**section, "pixel_head": "per_pixel"}}
    return data


def config_from_dict(data: dict) -> Config:
    """A saved config (checkpoint, config.yaml) as a validated Config; keys added since it was written take the
    value its version had (`_saved_before_keys`)."""
    if isinstance(data, dict):
        data = _saved_before_keys(data)
    return validate(config_from_raw(data), strict=False)


def to_dict(cfg: Any) -> dict:
    """A config as plain data (tuples as lists). A pretraining Config gives `method`, the common sections and only
    what the method reads of the method sections: what a run saves, and what loads back to the same run."""
    if not isinstance(cfg, Config):
        return plain_dict(cfg)
    data = plain_dict(cfg)
    data.pop("sections")
    data.update({name: plain_dict(section) for name, section in cfg.sections.items()})
    used = sections_used(cfg)
    out = {}
    for name, value in data.items():
        if name not in method_sections(cfg):
            out[name] = value
        elif name in used:
            keys = used[name]
            out[name] = value if keys is None else {k: v for k, v in value.items() if k in keys}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolved(cfg: Config) -> Config:
    """A copy with the values the model takes from elsewhere written out: model.img_size / patch_size / embed_dim /
    depth / num_heads from the model.arch preset, bootmae.feature_decoder_* from the encoder and mae.*,
    mask.block_generator's auto as the generator it means. Loads back to the same model (`--print-config` shows
    it)."""
    p = get_preset(cfg.model.arch)
    m = cfg.model
    model = dataclasses.replace(m, img_size=m.img_size or p.img_size, patch_size=m.patch_size or p.patch_size,
                                embed_dim=m.embed_dim or p.embed_dim, depth=m.depth or p.depth,
                                num_heads=m.num_heads or p.num_heads)  # fmt: skip
    b = cfg.bootmae
    if "bootmae" in sections_used(cfg):  # written out only where read: elsewhere they would be refused as unread
        b = dataclasses.replace(b, feature_decoder_dim=b.feature_decoder_dim or model.embed_dim,
                                feature_decoder_depth=b.feature_decoder_depth or cfg.mae.decoder_depth,
                                feature_decoder_heads=b.feature_decoder_heads or model.num_heads)  # fmt: skip
    mask = dataclasses.replace(cfg.mask, block_generator=resolve_block_generator(cfg))
    return dataclasses.replace(cfg, model=model, mask=mask, bootmae=b)
