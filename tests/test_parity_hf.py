"""Parity of mimkit's MAE with Hugging Face ``transformers.ViTMAEForPreTraining``.

With identical weights (copied through the explicit, bijective key map below) and the same masking
noise, mimkit's ``MAE.forward(imgs, noise=noise)`` gives the same mask (exactly) and the same loss
and per-patch predictions as HF's ``loss`` / ``logits`` (fp32, <= 1e-5 relative), with
``norm_pix_loss`` on and off, at two model sizes with a decoder unlike the encoder. Every parameter
is random and non-trivial (LayerNorm affines, biases and tokens are perturbed away from their
init), so the match cannot come from zeros or ones. It also shows that mimkit's fixed 2-D sin-cos
position tables (encoder and decoder) equal the ones HF's own initialisers build.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")  # the key map uses the 5.x parameter names
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from mimkit.methods.mae import MAE  # noqa: E402
from mimkit.models import create_encoder  # noqa: E402

BATCH = 3
RTOL = 1e-5
ATOL_PRED = 1e-5  # for prediction entries near zero, where a relative bound means nothing
POS_TABLES = ("encoder.pos_embed", "decoder.decoder_pos_embed")  # fixed sin-cos, never perturbed


@dataclass(frozen=True)
class Case:
    arch: str
    img_size: int
    patch_size: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mask_ratio: float


CASES = {
    # 192 wide x 12 deep, 8x8 grid of 4 px patches; decoder 128 wide x 2 deep, 4 heads.
    "tiny": Case("vit_tiny_patch4_32", 32, 4, decoder_dim=128, decoder_depth=2, decoder_heads=4, mask_ratio=0.75),
    # 384 wide x 12 deep, 6x6 grid of 8 px patches (192 values per patch); 36 * 0.4 -> 14 kept.
    "small": Case("vit_small_patch4_32", 48, 8, decoder_dim=96, decoder_depth=3, decoder_heads=3, mask_ratio=0.6),
}


# ---------------------------------------------------------------------------------------------
# Models


def build_mimkit(case: Case, norm_pix_loss: bool, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    encoder = create_encoder(case.arch, img_size=case.img_size, patch_size=case.patch_size)
    mae = MAE(
        encoder,
        decoder_dim=case.decoder_dim,
        decoder_depth=case.decoder_depth,
        decoder_heads=case.decoder_heads,
        mask_ratio=case.mask_ratio,
        norm_pix_loss=norm_pix_loss,
    )
    # MAE init leaves biases at 0, LayerNorms at (1, 0) and tokens tiny: move them all off their
    # init so a wrong or missing mapping of any of them changes the output.
    with torch.no_grad():
        for name, p in mae.named_parameters():
            if name not in POS_TABLES and (p.ndim == 1 or name.endswith("_token")):
                p.add_(0.1 * torch.randn_like(p))
    return mae.eval()


def hf_config(mae: MAE) -> ViTMAEConfig:
    """An HF config with every size read back from the built mimkit model."""
    enc, dec = mae.encoder, mae.decoder
    enc_block, dec_block = enc.blocks[0], dec.decoder_blocks[0]
    return ViTMAEConfig(
        hidden_size=enc.embed_dim,
        num_hidden_layers=len(enc.blocks),
        num_attention_heads=enc_block.attn.num_heads,
        intermediate_size=enc_block.mlp.fc1.out_features,
        decoder_hidden_size=dec.decoder_embed.out_features,
        decoder_num_hidden_layers=len(dec.decoder_blocks),
        decoder_num_attention_heads=dec_block.attn.num_heads,
        decoder_intermediate_size=dec_block.mlp.fc1.out_features,
        image_size=enc.patch_embed.img_size[0],
        patch_size=mae.patch_size,
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_ratio=mae.mask_ratio,
        norm_pix_loss=mae.norm_pix_loss,
    )


def hf_own_pos_tables(hf: ViTMAEForPreTraining) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder / decoder sin-cos tables as HF's own initialisers build them.

    In transformers 5.x a freshly constructed ViTMAEForPreTraining holds all-zero tables: the
    embeddings' ``initialize_weights`` returns early once the patch projection is flagged as
    initialised, and ``_init_weights`` zeroes ``decoder_pos_embed``. So run both initialisers here.
    """
    emb = hf.vit.embeddings
    emb.patch_embeddings.projection._is_hf_initialized = False
    emb.initialize_weights()
    hf.decoder.initialize_weights(emb.patch_embeddings.num_patches)
    return emb.position_embeddings.detach().clone(), hf.decoder.decoder_pos_embed.detach().clone()


# ---------------------------------------------------------------------------------------------
# Weight mapping: HF key -> (mimkit key, chunk of the fused qkv or None)

_BLOCK = {  # HF ViTMAELayer sub-module -> timm Block sub-module
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # timm's fused qkv rows are [q; k; v]


def key_map(encoder_depth: int, decoder_depth: int) -> dict[str, tuple[str, int | None]]:
    m: dict[str, tuple[str, int | None]] = {
        "vit.embeddings.cls_token": ("encoder.cls_token", None),
        "vit.embeddings.position_embeddings": ("encoder.pos_embed", None),
        "decoder.mask_token": ("decoder.mask_token", None),
        "decoder.decoder_pos_embed": ("decoder.decoder_pos_embed", None),
    }
    for wb in ("weight", "bias"):
        m[f"vit.embeddings.patch_embeddings.projection.{wb}"] = (f"encoder.patch_embed.proj.{wb}", None)
        m[f"vit.layernorm.{wb}"] = (f"encoder.norm.{wb}", None)
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            m[f"decoder.{name}.{wb}"] = (f"decoder.{name}.{wb}", None)
        for hf_prefix, mk_prefix, depth in (
            ("vit.layers", "encoder.blocks", encoder_depth),
            ("decoder.decoder_layers", "decoder.decoder_blocks", decoder_depth),
        ):
            for i in range(depth):
                for hf_name, mk_name in _BLOCK.items():
                    m[f"{hf_prefix}.{i}.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.{mk_name}.{wb}", None)
                for chunk, hf_name in enumerate(_QKV):
                    m[f"{hf_prefix}.{i}.attention.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.attn.qkv.{wb}", chunk)
    return m


def to_hf_state_dict(mae: MAE) -> dict[str, torch.Tensor]:
    src = mae.state_dict()
    mapping = key_map(len(mae.encoder.blocks), len(mae.decoder.decoder_blocks))
    assert {k for k, _ in mapping.values()} == set(src), "every mimkit tensor must be used"
    out = {}
    for hf_key, (mk_key, chunk) in mapping.items():
        t = src[mk_key]
        out[hf_key] = (t if chunk is None else t.chunk(3, dim=0)[chunk]).clone()
    return out


def build_pair(case: Case, norm_pix_loss: bool, attn: str = "sdpa") -> tuple[MAE, ViTMAEForPreTraining]:
    mae = build_mimkit(case, norm_pix_loss)
    config = hf_config(mae)
    config._attn_implementation = attn  # eager: HF's own attention arithmetic, independent of mimkit's kernel
    hf = ViTMAEForPreTraining(config).float()
    hf_sd = to_hf_state_dict(mae)
    assert set(hf_sd) == set(hf.state_dict()), "the key map must cover HF's state dict exactly"
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return mae, hf.eval()


def inputs(mae: MAE, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = mae.encoder.patch_embed.img_size[0]
    imgs = torch.randn(BATCH, 3, size, size, generator=g)
    noise = torch.rand(BATCH, mae.num_patches, generator=g)
    return imgs, noise


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sincos_position_tables_equal_hf(case):
    mae = build_mimkit(case, norm_pix_loss=True)
    hf = ViTMAEForPreTraining(hf_config(mae))
    hf_enc, hf_dec = hf_own_pos_tables(hf)
    assert hf_enc.abs().sum() > 0 and hf_dec.abs().sum() > 0
    # Same layout ([sin_w | cos_w | sin_h | cos_h], zero cls row), not just the same values.
    torch.testing.assert_close(mae.encoder.pos_embed.detach(), hf_enc, rtol=0, atol=1e-6)
    torch.testing.assert_close(mae.decoder.decoder_pos_embed.detach(), hf_dec, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("norm_pix_loss", [True, False], ids=["norm_pix", "raw_pix"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_matches_hf(case, norm_pix_loss, attn):
    mae, hf = build_pair(case, norm_pix_loss, attn)
    assert hf.config._attn_implementation == attn
    imgs, noise = inputs(mae)
    with torch.no_grad():
        ours = mae(imgs, noise=noise)
        ref = hf(pixel_values=imgs, noise=noise)

    num_masked = mae.num_patches - int(mae.num_patches * (1 - case.mask_ratio))
    assert torch.equal(ours.mask, ref.mask)
    assert ours.mask.sum(1).eq(num_masked).all()

    patch_dim = case.patch_size**2 * 3
    assert ours.pred.shape == ref.logits.shape == (BATCH, mae.num_patches, patch_dim)
    assert ours.pred.std() > 0.1  # a non-degenerate output
    torch.testing.assert_close(ours.pred, ref.logits, rtol=RTOL, atol=ATOL_PRED)
    assert rel_err(ours.pred, ref.logits) < RTOL

    assert ours.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, ref.loss, rtol=RTOL, atol=0.0)


def test_parity_check_is_sensitive():
    """One changed HF weight (a decoder LayerNorm bias) must break the prediction match."""
    mae, hf = build_pair(CASES["tiny"], norm_pix_loss=True)
    imgs, noise = inputs(mae)
    with torch.no_grad():
        hf.decoder.decoder_layers[-1].layernorm_after.bias.add_(1e-2)
        ours = mae(imgs, noise=noise)
        ref = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, ref.mask)
    assert rel_err(ours.pred, ref.logits) > 100 * RTOL
