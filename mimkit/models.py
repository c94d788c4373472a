"""Encoders are stock timm VisionTransformers; this file only names presets and builds them.

The state dict of every encoder built here loads unchanged into
``timm.create_model(preset.timm_name, img_size=..., patch_size=..., num_classes=0)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any, cast

import numpy as np
import torch
import torch.utils.checkpoint
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint, checkpoint_seq
from timm.models.beit import Beit
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from mimkit.errors import MimkitError
from mimkit.presets import get_preset

# the timm encoders mimkit pretrains and evaluates (a method's family: vit or beit)
Encoder = VisionTransformer | Beit


def encoder_of(model: nn.Module) -> Encoder:
    """A method's timm encoder, `model.encoder` (mimkit.methods.base.MIMMethod's contract)."""
    return cast(Encoder, model.encoder)


def create_encoder(
    arch: str,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    in_chans: int = 3,
    **timm_args,
) -> VisionTransformer:
    """A timm VisionTransformer (cls token, learnable-shaped pos_embed incl. cls, final LayerNorm,
    no head). LayerNorm eps 1e-6 and qkv bias, as in MAE / BEiT. `timm_args`: other arguments of timm's
    VisionTransformer (I-JEPA's class_token=False, global_pool="avg", fc_norm=False). `in_chans`: the image
    channels the patch embedding reads (timm's in_chans)."""
    p = get_preset(arch)
    img_size = img_size or p.img_size
    patch_size = patch_size or p.patch_size
    if img_size % patch_size:
        raise ValueError(
            f"model.img_size {img_size} is not divisible by the patch size {patch_size}; use a multiple of {patch_size}"
        )
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim or p.embed_dim,
        depth=depth or p.depth,
        num_heads=num_heads or p.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate,
        **{"global_pool": "token", **timm_args},
    )


def encoder_heads(encoder: Encoder) -> int:
    """The attention heads of a timm ViT's or Beit's blocks."""
    attn: Any = encoder.blocks[0].attn  # timm's Block / Beit Block attention (timm types it as a plain Module)
    return attn.num_heads


def timm_beit_kwargs(cfg) -> dict:
    """Arguments of timm's ``Beit`` (BEiT / mc-BEiT encoders) that ``model.encoder.state_dict()`` loads into
    unchanged, from a pretraining config's model.* and beit.* sections."""
    m, b = cfg.model, cfg.beit
    p = get_preset(m.arch)
    return dict(
        img_size=m.img_size or p.img_size, patch_size=m.patch_size or p.patch_size, num_classes=0, global_pool="",
        embed_dim=m.embed_dim or p.embed_dim, depth=m.depth or p.depth, num_heads=m.num_heads or p.num_heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=b.layer_scale_init, use_abs_pos_emb=b.abs_pos_emb,
        use_rel_pos_bias=not b.shared_rel_pos_bias, use_shared_rel_pos_bias=b.shared_rel_pos_bias,
        **({"in_chans": m.in_chans} if getattr(m, "in_chans", 3) != 3 else {}),  # RGB: timm's default, unwritten
    )  # fmt: skip


def create_beit_encoder(cfg) -> Beit:
    return Beit(**timm_beit_kwargs(cfg), drop_path_rate=cfg.model.drop_path_rate)


def trunc_normal_sigma_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """In place: N(0, std^2) cut at +-1 std, the BEiT family's `trunc_normal_(t, std)` (whose bounds are a = -std,
    b = std, absolute: resulting std 0.5396 std). Drawn by rejection, each value redrawn until it lies strictly
    inside the bounds, so no value sits on a bound (an inverse-CDF sampler clamps its rounding overshoots there)."""
    if tensor.is_meta:
        return tensor
    with torch.no_grad():
        values = torch.randn(tensor.shape, device=tensor.device) * std
        outside = values.abs() >= std
        while bool(outside.any()):
            values[outside] = torch.randn(int(outside.sum()), device=tensor.device) * std
            outside = values.abs() >= std
        return tensor.copy_(values)


def init_weights_beit(encoder: Beit, std: float = 0.02) -> None:
    """The official BEiT / mc-BEiT pretraining init of a timm Beit: every Linear and the patch-embedding conv weight,
    the cls token (and an absolute position embedding) ~ N(0, std) cut at +-std (`trunc_normal_sigma_`), zero
    biases, LayerNorm (1, 0); then attn.proj and mlp.fc2 of block l (1-indexed) divided by sqrt(2 l). The relative
    position bias tables, q / v biases and layer-scale gammas keep timm's init (zeros, zeros, init_values), as the
    official code's."""
    for module in encoder.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_sigma_(module.weight, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    trunc_normal_sigma_(encoder.cls_token, std)
    if encoder.pos_embed is not None:
        trunc_normal_sigma_(encoder.pos_embed, std)
    encoder.fix_init_weight()  # timm's own: attn.proj and mlp.fc2 of block l divided by sqrt(2 l)


def sincos_2d_pos_embed(dim: int, grid: int, cls_token: bool = True, row_first: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (1, grid*grid [+1], dim): first half of the channels encodes
    the column (w) coordinate, second half the row (h); each half is [sin, cos]; cls row is zero.
    row_first: the MoCo v3 table BootMAE uses, the same channels with the row coordinate first (the transpose)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(rows), encode(cols)] if row_first else [encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def init_weights_mae(module: nn.Module) -> None:
    """Official MAE / JAX-ViT init: xavier-uniform Linear with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_weights_bootmae(name: str, module: nn.Module) -> None:
    """BootMAE's init of a named module: MAE's (xavier-uniform, zero bias, LayerNorm (1, 0)), except that a fused
    qkv Linear is xavier over each of its three matrices and a cross-attention k / v over BootMAE's one fused kv."""
    if isinstance(module, nn.Linear) and name.endswith(("qkv", "cross_attn.k", "cross_attn.v")):
        fan_out, fan_in = module.weight.shape
        fused_out = fan_out / 3 if name.endswith("qkv") else 2 * fan_out
        bound = math.sqrt(6 / (fused_out + fan_in))
        nn.init.uniform_(module.weight, -bound, bound)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        init_weights_mae(module)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patch-internal order (row, col, channel) as in MAE."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(n, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
    """Exact inverse of :func:`patchify`."""
    n, num, _ = x.shape
    gh, gw = grid or (int(num**0.5),) * 2
    x = x.reshape(n, gh, gw, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * patch_size, gw * patch_size)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a method (encoder, decoders, EMA / target encoders): timm ViT and BEiT
    blocks and BootMAE's cross-attention decoder blocks."""
    from timm.models.beit import Block as BeitBlock
    from timm.models.vision_transformer import Block

    return [
        m for m in model.modules() if isinstance(m, (Block, BeitBlock)) or getattr(m, "IS_TRANSFORMER_BLOCK", False)
    ]


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA only. On CPU inductor needs a C++ compiler and spends a minute
    or more compiling, for a gain benchmarks/throughput.py (impl mimkit-compiled) measures per machine."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def resolve_attention(setting: str, device: torch.device, precision: str) -> str:
    """`train.attention`: auto = torch's fused scaled_dot_product_attention, except under CPU autocast (bf16 /
    fp16), where its CPU kernels run several times slower than plain matmul-softmax-matmul at ViT head widths
    (benchmarks/throughput.py --impls mimkit-sdpa,mimkit-eager measures both)."""
    if setting == "auto":
        return "eager" if device.type == "cpu" and precision in ("bf16", "fp16") else "sdpa"
    return setting


def set_attention_kernel(model: nn.Module, kernel: str) -> int:
    """Point every attention module (timm ViT / BEiT Attention, BootMAE's cross-attention) at `kernel`
    ('sdpa' or 'eager'); returns how many were set."""
    modules: list[Any] = [m for m in model.modules() if hasattr(m, "fused_attn")]  # modules of several classes
    for m in modules:
        m.fused_attn = kernel == "sdpa"
    return len(modules)


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU kernels, if it is installed."""
    import shutil

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        name = get_cpp_compiler()
    except Exception:  # a torch without this helper: inductor's default
        name = "g++"
    return shutil.which(name.split()[0])


class CompileUnavailable(MimkitError, RuntimeError):
    """torch.compile asked for where it cannot run."""


def compile_blocks(model: nn.Module, device: torch.device | None = None) -> int:
    """torch.compile each transformer block in place (`Module.compile`: state-dict keys, FSDP2 sharding and
    DDP wrapping see the same modules). The gathers of masking stay eager; the blocks are where the
    element-wise work (LayerNorm, GELU, residual adds, softmax) is that fusion removes. On CPU, a missing
    C++ compiler is reported here, before any compute, instead of at the first step."""
    device = device or next(model.parameters()).device
    if device.type == "cpu" and cpu_compiler() is None:
        raise CompileUnavailable("train.compile=true on CPU needs a C++ compiler for torch.compile's CPU kernels (g++, "
                           "or $CXX); install one, or set train.compile=false")  # fmt: skip
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def encode_visible(encoder: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor,
                   keep_blocks: tuple[int, ...] = (), pos_embed: torch.Tensor | None = None):  # fmt: skip
    """Run a timm ViT on the visible patches only: pos-embed is added before masking, the cls
    token (with its own pos-embed) is prepended after. Returns final-LN tokens (B, 1+keep, D), and with
    `keep_blocks` also {block index: that block's output, before the final norm} (BootMAE's decoder context).
    `ids_keep` of shape (B, K, keep) encodes K views of each image as B*K sequences (EMAE's parts),
    embedding each image's patches once. `pos_embed` (1, 1 + L, D): the table of another input size than the
    encoder's own (train.resolution_stages: `resampled_pos_embed`)."""
    pos_embed, cls_token = encoder.pos_embed if pos_embed is None else pos_embed, encoder.cls_token
    assert pos_embed is not None and cls_token is not None  # create_encoder's ViT has both
    x = encoder.patch_embed(imgs)
    x = x + pos_embed[:, 1:, :]
    if ids_keep.dim() == 3:
        b, parts, keep = ids_keep.shape
        x = torch.gather(x.unsqueeze(1).expand(-1, parts, -1, -1), 2,
                         ids_keep.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))  # fmt: skip
        x = x.reshape(b * parts, keep, x.shape[-1])
    else:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    if not keep_blocks:
        return encoder.norm(run_blocks(encoder.blocks, x, encoder.grad_checkpointing))
    features, recompute = {}, encoder.grad_checkpointing and torch.is_grad_enabled()
    for i, blk in enumerate(encoder.blocks):
        x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        if i in keep_blocks:
            features[i] = x
    return encoder.norm(x), features


def resampled_pos_embed(table: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """A position table (1, prefix + G*G, D) resampled to `grid` (train.resolution_stages' smaller inputs): bicubic,
    each new patch's entry read at its centre's position on the table's grid (no antialiasing: the codes of
    positions, not an image to smooth); the prefix rows (cls) unchanged. The table itself when the grid is its own."""
    own = int(round((table.shape[1] - prefix_tokens) ** 0.5))
    if tuple(grid) == (own, own):
        return table
    return resample_abs_pos_embed(table, list(grid), [own, own], num_prefix_tokens=prefix_tokens,
                                  interpolation="bicubic", antialias=False)  # fmt: skip


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """A stack of blocks, recomputing activations in backward when grad_checkpointing is on (timm's
    `set_grad_checkpointing` flag), trading compute for memory."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def encode_beit_with_mask_tokens(encoder: Beit, imgs: torch.Tensor, mask: torch.Tensor,
                                 mask_token: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Run a timm Beit on every patch, the masked ones' embeddings replaced by `mask_token` (BEiT, mc-BEiT), with its
    relative position bias. `mask` (B, L), 1 = masked. Returns final-LN tokens (B, 1 + L, D)."""
    x = encoder.patch_embed(imgs)
    w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    x = encoder.pos_drop(x)
    rel = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
    for blk in encoder.blocks:
        if encoder.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, shared_rel_pos_bias=rel)
        else:
            x = blk(x, shared_rel_pos_bias=rel)
    return encoder.norm(x)


def encode_with_mask_tokens(encoder: VisionTransformer, imgs: torch.Tensor, mask: torch.Tensor,
                            mask_token: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Run a timm ViT on every patch, the masked ones replaced by `mask_token` before the position embedding
    (SimMIM, BEiT). `mask` (B, L), 1 = masked. Returns final-LN tokens (B, 1 + L, D)."""
    x = encoder.patch_embed(imgs)
    w = mask.unsqueeze(-1).to(x.dtype)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
    x = run_blocks(encoder.blocks, x, encoder.grad_checkpointing)
    return encoder.norm(x)


def init_weights_jepa(module: nn.Module, std: float = 0.02) -> None:
    """I-JEPA's official init: trunc-normal(std) Linear and conv weights, zero biases, LayerNorm (1, 0); then the official
    `fix_init_weight` (attn.proj and mlp.fc2 of block l, 1-indexed, divided by sqrt(2 l)) per block stack."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # the encoder's and the predictor's timm Blocks, with timm's default attention and MLP layers
    for i, block in enumerate(cast(Iterable[Block], module.blocks), start=1):
        cast(Attention, block.attn).proj.weight.data.div_(math.sqrt(2.0 * i))
        cast(Mlp, block.mlp).fc2.weight.data.div_(math.sqrt(2.0 * i))
