"""Key maps between mimkit (timm) names and Hugging Face transformers' ViT, ViTMAE and BEiT names."""

from __future__ import annotations

import re

import torch

from mimkit.config import Config
from mimkit.models import timm_beit_kwargs

# =============================================================================================
# Hugging Face key map (transformers 5.x module names)

_HF_BLOCK = {  # HF ViT / ViTMAE layer sub-module -> timm Block sub-module
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = ("q_proj", "k_proj", "v_proj")  # timm's fused qkv rows are [q; k; v]

# On-disk / older names -> 5.x module names, applied in order.
_HF_RENAMES = [
    (re.compile(r"^(vit\.)?encoder\.layer\.(\d+)\."), r"\1layers.\2."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), r"decoder.decoder_layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
]


def hf_canonical_key(key: str) -> str:
    for pattern, repl in _HF_RENAMES:
        key = pattern.sub(repl, key)
    return key


def hf_key_map(
    encoder_depth: int, decoder_depth: int | None = None, prefix: str = "vit.", cls_token: bool = True
) -> dict[str, tuple[str, int | None]]:
    """HF key -> (mimkit key, chunk of timm's fused qkv or None). ``prefix`` is ``vit.`` for
    ViTMAEForPreTraining, ``""`` for ViTModel / ViTMAEModel / IJepaModel; ``decoder_depth`` None: no decoder;
    ``cls_token`` False: an encoder without one (I-JEPA's, IJepaModel: ViT's names otherwise)."""
    m: dict[str, tuple[str, int | None]] = {
        f"{prefix}embeddings.position_embeddings": ("encoder.pos_embed", None),
    }
    if cls_token:
        m[f"{prefix}embeddings.cls_token"] = ("encoder.cls_token", None)
    if decoder_depth is not None:
        m["decoder.mask_token"] = ("decoder.mask_token", None)
        m["decoder.decoder_pos_embed"] = ("decoder.decoder_pos_embed", None)
    blocks = [(f"{prefix}layers", "encoder.blocks", encoder_depth)]
    if decoder_depth is not None:
        blocks.append(("decoder.decoder_layers", "decoder.decoder_blocks", decoder_depth))
    for wb in ("weight", "bias"):
        m[f"{prefix}embeddings.patch_embeddings.projection.{wb}"] = (f"encoder.patch_embed.proj.{wb}", None)
        m[f"{prefix}layernorm.{wb}"] = (f"encoder.norm.{wb}", None)
        if decoder_depth is not None:
            for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
                m[f"decoder.{name}.{wb}"] = (f"decoder.{name}.{wb}", None)
        for hf_prefix, mk_prefix, depth in blocks:
            for i in range(depth):
                for hf_name, mk_name in _HF_BLOCK.items():
                    m[f"{hf_prefix}.{i}.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.{mk_name}.{wb}", None)
                for chunk, hf_name in enumerate(_HF_QKV):
                    m[f"{hf_prefix}.{i}.attention.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.attn.qkv.{wb}", chunk)
    return m


_HF_BEIT_BLOCK = {  # HF BeitLayer sub-module -> timm Beit Block sub-module
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_beit_key_map(depth: int, *, shared_rel_pos_bias: bool = True, abs_pos_emb: bool = False,
                    mim_head: bool = False) -> dict[str, tuple[str, int | None]]:  # fmt: skip
    """HF ``BeitModel`` (``mim_head=False``: keys without prefix, final LayerNorm ``layernorm``) or
    ``BeitForMaskedImageModeling`` (``mim_head=True``: ``beit.`` prefix, the final norm is the head's
    ``layernorm``, plus ``lm_head``) key -> (mimkit BEiT / mc-BEiT key, chunk of timm's fused qkv weight or None).
    timm's q_bias / v_bias are HF's q_proj / v_proj biases (k has none in both); layer scale gamma_1 / gamma_2 is
    HF's lambda_1 / lambda_2; the [MASK] embedding (mimkit's top-level mask_token) is HF's embeddings.mask_token."""
    pre = "beit." if mim_head else ""
    m: dict[str, tuple[str, int | None]] = {
        f"{pre}embeddings.cls_token": ("encoder.cls_token", None),
        f"{pre}embeddings.mask_token": ("mask_token", None),
    }
    if abs_pos_emb:
        m[f"{pre}embeddings.position_embeddings"] = ("encoder.pos_embed", None)
    if shared_rel_pos_bias:
        m[f"{pre}shared_position_bias.relative_position_bias_table"] = (
            "encoder.rel_pos_bias.relative_position_bias_table", None)  # fmt: skip
    norm = "layernorm" if mim_head else f"{pre}layernorm"
    for wb in ("weight", "bias"):
        m[f"{pre}embeddings.patch_embeddings.projection.{wb}"] = (f"encoder.patch_embed.proj.{wb}", None)
        m[f"{norm}.{wb}"] = (f"encoder.norm.{wb}", None)
        if mim_head:
            m[f"lm_head.{wb}"] = (f"lm_head.{wb}", None)
    for i in range(depth):
        hf, mk = f"{pre}layers.{i}", f"encoder.blocks.{i}"
        m[f"{hf}.lambda_1"], m[f"{hf}.lambda_2"] = (f"{mk}.gamma_1", None), (f"{mk}.gamma_2", None)
        for chunk, name in enumerate(_HF_QKV):
            m[f"{hf}.attention.{name}.weight"] = (f"{mk}.attn.qkv.weight", chunk)
        m[f"{hf}.attention.q_proj.bias"], m[f"{hf}.attention.v_proj.bias"] = (
            (f"{mk}.attn.q_bias", None), (f"{mk}.attn.v_bias", None))  # fmt: skip
        if not shared_rel_pos_bias:
            m[f"{hf}.relative_position_bias.relative_position_bias_table"] = (
                f"{mk}.attn.relative_position_bias_table", None)  # fmt: skip
        for wb in ("weight", "bias"):
            for hf_name, mk_name in _HF_BEIT_BLOCK.items():
                m[f"{hf}.{hf_name}.{wb}"] = (f"{mk}.{mk_name}.{wb}", None)
    return m


def hf_beit_config(model, cfg: Config, *, mim_head: bool = False):
    """A transformers ``BeitConfig`` for a mimkit BEiT / mc-BEiT model (``model.encoder`` a timm ``Beit``)."""
    from transformers import BeitConfig

    kw = timm_beit_kwargs(cfg)
    return BeitConfig(
        vocab_size=int(model.lm_head.out_features), hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"],
        num_attention_heads=kw["num_heads"], intermediate_size=int(kw["mlp_ratio"] * kw["embed_dim"]),
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=kw.get("in_chans", 3), layer_norm_eps=1e-6,
        use_mask_token=True, use_absolute_position_embeddings=kw["use_abs_pos_emb"],
        use_relative_position_bias=kw["use_rel_pos_bias"],
        use_shared_relative_position_bias=kw["use_shared_rel_pos_bias"], layer_scale_init_value=kw["init_values"],
        use_mean_pooling=mim_head,  # MIM head: BeitModel's own final norm off, the head's layernorm is timm's norm
    )  # fmt: skip


def mimkit_to_hf(state: dict[str, torch.Tensor], mapping: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    out = {}
    for hf_key, (mk_key, chunk) in mapping.items():
        t = state[mk_key]
        out[hf_key] = (t if chunk is None else t.chunk(3, dim=0)[chunk]).detach().clone().contiguous()
    return out
