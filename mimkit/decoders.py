"""Decoders: MAE's (mask tokens re-inserted, self-attention blocks, pixel head), BootMAE's target-aware
decoder (cross-attention from the decoder tokens to the visible tokens' encoder features) and CrossMAE's
(cross-attention only: each decoded patch is read out on its own)."""

from __future__ import annotations

from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Attention, Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.masking import take_patches
from mimkit.models import init_weights_jepa, run_blocks, sincos_2d_pos_embed


def unshuffle_tokens(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, 1 + keep, D) tokens of the encoder side (cls, then the kept patches in shuffled order) -> (B, 1 + L, D):
    cls, then every patch in image order, the masked ones `mask_token`. The official code's cat + gather + cat as
    one gather from a table of the kept rows and the mask token: the same values (and input gradients; the mask token's
    is the same sum in another order) without two intermediate copies
    (benchmarks/RESULTS.md, decoder token assembly)."""
    b, t, d = x.shape
    table = torch.cat([x.reshape(b * t, d), mask_token.reshape(1, d).to(x.dtype)])
    first = t * torch.arange(b, device=x.device).unsqueeze(1)  # each image's cls row
    rows = torch.where(ids_restore < t - 1, ids_restore + 1 + first, b * t)  # restore ids >= keep are masked
    index = torch.cat([first, rows], dim=1)
    # index_select, not table[index]: the backward of advanced indexing (index_put_ with accumulate) sums the mask
    # token's many rows in a thread-dependent order on multi-threaded CPUs, so a resumed run would drift from an
    # uninterrupted one by rounding; index_select's backward (index_add_) sums them in a fixed order
    return table.index_select(0, index.reshape(-1)).reshape(b, index.shape[1], d)


class MAEDecoder(nn.Module):
    """Linear embed -> mask tokens appended and un-shuffled -> fixed sin-cos pos -> blocks -> LN ->
    per-patch head (pixels, or the target's `out_dim` values). The cls token passes through and is dropped from the output."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_size: int, dim: int, depth: int, heads: int,
                 out_dim: int | None = None):  # fmt: skip
        """out_dim: values predicted per patch (the target's width; default p*p*3, pixels)."""
        super().__init__()
        grid = int(num_patches**0.5)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(dim, grid), requires_grad=False)
        blocks = [
            ReadoutBlock(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
            for _ in range(depth)
        ]  # timm annotates norm_layer as a class; it calls any factory
        self.decoder_blocks = nn.Sequential(*blocks)
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, out_dim or patch_size * patch_size * 3)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, readout: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, L, out_dim) predictions (pixels: p*p*3) of every patch; with `readout` (B, M) patch indices, (B, M, out_dim)
        of those only (`pos_embed`: the table of another input size, train.resolution_stages):
        the last block's queries and MLP and the pixel head then run at those patches alone (the keys and values
        at every token), which changes none of their values (MAE's loss reads the masked patches only)."""
        pos = self.decoder_pos_embed if pos_embed is None else pos_embed
        x = unshuffle_tokens(self.decoder_embed(latent), self.mask_token, ids_restore) + pos
        if readout is None or not len(self.decoder_blocks):
            x = self.decoder_norm(run_blocks(self.decoder_blocks, x, self.grad_checkpointing))
            x = x[:, 1:] if readout is None else take_patches(x[:, 1:], readout)
            return self.decoder_pred(x)
        x = run_blocks(self.decoder_blocks[:-1], x, self.grad_checkpointing)
        last, rows = self.decoder_blocks[-1], readout + 1  # token rows: the cls token is row 0
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(last, x, rows, use_reentrant=False)
        else:
            x = last(x, rows)
        return self.decoder_pred(self.decoder_norm(x))


class ReadoutBlock(Block):
    """timm's Block (same parameters and names), callable at some token rows only: `block(x, rows)`. Through the
    module's own call, so FSDP2's hooks gather its parameters and activation checkpointing wraps it as a whole."""

    # rows in place of timm's attn_mask / is_causal, which the decoder never passes
    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) if rows is None else block_at_rows(self, x, rows)


def block_at_rows(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """timm `block(x)` (B, N, D) at the token rows `rows` (B, M) only, `take_patches(block(x), rows)`: queries,
    output projection and MLP at those rows, keys and values from every row."""
    attn = cast(Attention, block.attn)  # the Block's attn_layer default
    h = block.norm1(x)
    (b, n, _), m, heads = h.shape, rows.shape[1], attn.num_heads
    inner = heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    h_rows = take_patches(h, rows)
    q = F.linear(h_rows, weight[:inner], None if bias is None else bias[:inner])
    kv = F.linear(h, weight[inner:], None if bias is None else bias[inner:])
    q = q.view(b, m, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.view(b, n, 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    out = getattr(attn, "norm", nn.Identity())(out.transpose(1, 2).reshape(b, m, inner))
    gate = getattr(attn, "gate", None)  # timm versions before the gated option have none
    if gate is not None:
        out = out * gate(h_rows).sigmoid()
    x = take_patches(x, rows) + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class CrossAttention(nn.Module):
    """Queries from the decoder tokens; keys and values from the context (encoder features of the visible
    tokens, cls included). Key bias is zero, as in BootMAE (it cannot change a softmax over keys anyway).
    The head width is dim // heads (BootMAE's 512-wide decoder with 12 heads: 42, inner width 504)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        inner = self.heads * self.head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(context_dim, inner, bias=False)
        self.v = nn.Linear(context_dim, inner)
        self.proj = nn.Linear(inner, dim)
        self.fused_attn = True  # the kernel switch timm's Attention has (mimkit.models.set_attention_kernel)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class DecoderBlock(nn.Module):
    """x += SelfAttn(LN x); x += CrossAttn(LN x, LN context) (when context_dim is set); x += MLP(LN x)."""

    IS_TRANSFORMER_BLOCK = True  # listed by mimkit.models.transformer_blocks (FSDP units, compile)

    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads, attn_head_dim=dim // heads, qkv_bias=True)
        self.cross_attn = CrossAttention(dim, context_dim, heads) if context_dim else None
        if self.cross_attn is not None:
            self.norm_q, self.norm_context = norm(dim), norm(context_dim)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_q(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class ChannelBiasHead(nn.Module):
    """BootMAE's pixel head, ConvTranspose2d(dim, channels, p, p) over the token grid, as a per-token linear map to the
    patch's p*p*channels values in patchify order (row, column, channel): `weight` (p*p*channels, dim) and one bias
    per output channel (`bias` (channels,)), shared by the patch's p*p pixels as the transposed convolution's."""

    def __init__(self, dim: int, patch_size: int, channels: int = 3):
        super().__init__()
        self.in_features, self.pixels = dim, patch_size * patch_size
        self.out_features = self.pixels * channels
        self.weight = nn.Parameter(torch.empty(self.out_features, dim))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias.repeat(self.pixels))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, channel biases={self.bias.numel()}"


class TargetAwareDecoder(nn.Module):
    """Linear embed of the final-LN encoder tokens (cls + visible), learned mask tokens appended and un-shuffled;
    fixed sin-cos position embeddings on the mask tokens only (on every patch token with mask_pos_only=False);
    blocks with cross-attention to `context`; LN; per-token head (`head`, default a Linear to `out_dim`). Cls is
    dropped from the output."""

    def __init__(self, encoder_dim: int, context_dim: int | None, grid: int, dim: int, depth: int, heads: int,
                 out_dim: int, mask_pos_only: bool = True, head: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(dim, grid, row_first=True), requires_grad=False)
        self.blocks = nn.ModuleList([DecoderBlock(dim, heads, context_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim) if head is None else head
        self.mask_pos_only, self.grad_checkpointing = mask_pos_only, False

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor,
                context: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        x = unshuffle_tokens(self.embed(latent), self.mask_token, ids_restore)
        pos = self.pos_embed  # its cls row is zero: the cls token passes unchanged
        x = x + (pos * F.pad(mask.to(pos.dtype), (1, 0)).unsqueeze(-1) if self.mask_pos_only else pos)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, context, use_reentrant=False) if recompute else blk(x, context)
        return self.head(self.norm(x))[:, 1:]


class CrossAttentionBlock(nn.Module):
    """CrossMAE's decoder block: x += CrossAttn(LN x, LN context); x += MLP(LN x). No self-attention, so each query
    is decoded independently of the others. Given K contexts (K, B, T, D), the block reads its own learned linear
    combination of them (CrossMAE's inter-block attention)."""

    IS_TRANSFORMER_BLOCK = True  # listed by mimkit.models.transformer_blocks (FSDP units, compile)

    def __init__(self, dim: int, heads: int, contexts: int = 1):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm_q, self.norm_context, self.norm2 = norm(dim), norm(dim), norm(dim)
        self.cross_attn = CrossAttention(dim, dim, heads)
        self.mlp = Mlp(dim, 4 * dim)
        # starts as the mean of the contexts; 1-D, so never weight-decayed (as norms and biases)
        self.context_weights = nn.Parameter(torch.full((contexts,), 1.0 / contexts)) if contexts > 1 else None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.context_weights is not None:
            context = torch.einsum("k,kbtd->btd", self.context_weights.to(context.dtype), context)
        x = x + self.cross_attn(self.norm_q(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


def resolve_context_blocks(blocks: tuple[int, ...] | str, encoder_depth: int) -> tuple[int, ...]:
    """`mae.decoder_context_blocks` as indices in [0, depth - 1): "all" = every block before the last (whose
    final-LN output the decoder always reads), negative indices count from the end."""
    if blocks == "all":
        return tuple(range(encoder_depth - 1))
    if isinstance(blocks, str):
        raise ValueError(f"context blocks must be all or block indices, got {blocks!r}")
    return tuple(sorted(b % encoder_depth for b in blocks))


class CrossMAEDecoder(nn.Module):
    """CrossMAE (Fu et al., TMLR 2025): one query per patch to decode, a learned mask token plus the fixed sin-cos
    position of that patch; cross-attention blocks reading the visible tokens' encoder features (cls included);
    LN; per-patch pixel head. The context is the encoder's final-LN output, and with `context_blocks` also those
    encoder blocks' outputs, each layer-normalised, all embedded by one linear map and mixed per decoder block."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_size: int, dim: int, depth: int, heads: int,
                 context_blocks: tuple[int, ...] = (), out_dim: int | None = None):  # fmt: skip
        """out_dim: values predicted per patch (the target's width; default p*p*3, pixels)."""
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.context_blocks = context_blocks  # encoder block indices (>= 0), read besides the final-LN output
        self.context_norms = nn.ModuleList([norm(encoder_dim) for _ in context_blocks])
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = int(num_patches**0.5)
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(dim, grid, cls_token=False), requires_grad=False)
        contexts = 1 + len(context_blocks)
        self.decoder_blocks = nn.ModuleList([CrossAttentionBlock(dim, heads, contexts) for _ in range(depth)])
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, out_dim or patch_size * patch_size * 3)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, ids: torch.Tensor, features: dict[int, torch.Tensor] | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """latent: final-LN encoder tokens (B, T, E); features: {block: output} of `context_blocks` (encode_visible's
        keep_blocks); ids (B, N): the patches to decode; pos_embed: the table of another input size
        (train.resolution_stages). Returns their predictions (B, N, out_dim)."""
        contexts = [latent]
        if self.context_blocks:
            assert features is not None, "context_blocks need the encoder's block outputs (features)"
            contexts += [n(features[b]) for n, b in zip(self.context_norms, self.context_blocks, strict=True)]
        context = self.decoder_embed(torch.stack(contexts) if len(contexts) > 1 else latent)
        pos = self.decoder_pos_embed if pos_embed is None else pos_embed
        x = (self.mask_token + take_patches(pos, ids)).to(context.dtype)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.decoder_blocks:
            x = checkpoint(blk, x, context, use_reentrant=False) if recompute else blk(x, context)
        return self.decoder_pred(self.decoder_norm(x))


class ConvDecoderBlock(nn.Module):
    """One block of data2vec 2.0's image decoder on (B, C, H, W): a grouped k x k convolution ("same" padding), a
    LayerNorm over the channels without affine, GELU."""

    def __init__(self, in_dim: int, dim: int, kernel: int = 3, groups: int = 16, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return F.gelu(F.layer_norm(x, x.shape[-1:], eps=self.eps)).permute(0, 3, 1, 2)


class ConvDecoder2d(nn.Module):
    """data2vec 2.0's light image decoder: the tokens of every patch (B, L, in_dim), in image order, laid out on the
    patch grid, through `layers` ConvDecoderBlocks, each with a residual connection where its input and output
    widths agree, then a per-patch Linear to `out_dim` (default in_dim): (B, L, out_dim). No attention, no position
    embedding (the convolutions see the layout)."""

    def __init__(self, in_dim: int, grid: tuple[int, int], dim: int, layers: int, kernel: int = 3, groups: int = 16,
                 out_dim: int | None = None):  # fmt: skip
        super().__init__()
        self.grid = tuple(grid)
        self.blocks = nn.ModuleList([ConvDecoderBlock(in_dim if i == 0 else dim, dim, kernel, groups)
                                     for i in range(layers)])  # fmt: skip
        self.proj = nn.Linear(dim, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *self.grid)
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape[1] == x.shape[1] else y
        return self.proj(x.flatten(2).transpose(1, 2))


class JEPAPredictor(nn.Module):
    """I-JEPA's narrow ViT predictor: context tokens (encoder width) -> predictor width, plus fixed sin-cos positions;
    per target block, mask tokens with the target positions appended; timm blocks, a norm, a projection back."""

    def __init__(self, dim: int, grid: int, width: int, depth: int, heads: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(width, grid, cls_token=False), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        norm = partial(nn.LayerNorm, eps=1e-6)  # timm annotates norm_layer as a class; it calls any factory
        blocks = [
            Block(width, heads, 4.0, qkv_bias=True, drop_path=r, norm_layer=norm)  # type: ignore[arg-type]
            for r in rates
        ]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, dim)
        self.grad_checkpointing = False
        init_weights_jepa(self)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx: torch.Tensor, ctx_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """ctx (B, N, D) at ctx_ids (B, N); tgt_ids (B, M, K) -> predictions (B, M, K, D)."""
        b, m, k = tgt_ids.shape
        x = self.embed(ctx) + take_patches(self.pos_embed, ctx_ids)
        x = x.unsqueeze(1).expand(-1, m, -1, -1).reshape(b * m, *x.shape[1:])
        queries = self.mask_token + take_patches(self.pos_embed, tgt_ids.reshape(b * m, k))
        x = run_blocks(self.blocks, torch.cat([x, queries.to(x.dtype)], dim=1), self.grad_checkpointing)
        return self.proj(self.norm(x[:, -k:])).view(b, m, k, -1)
