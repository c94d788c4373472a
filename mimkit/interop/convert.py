"""Import, step one: the names of each family's checkpoints (official MAE, BEiT / mc-BEiT, BootMAE, HF) converted to mimkit's."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from mimkit.files import InteropError
from mimkit.interop.hf_keys import _HF_QKV, hf_canonical_key, hf_key_map

# =============================================================================================
# Import: conversion of each family's names to mimkit's


@dataclass
class Converted:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # mimkit key -> tensor
    origin: dict[str, str] = field(default_factory=dict)  # mimkit key -> source key(s)
    unexpected: dict[str, str] = field(default_factory=dict)  # source key -> why it was not used
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        self.tensors[key] = tensor
        self.origin[key] = origin


_MAE_ENCODER_TOP = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
}
_MAE_DECODER_TOP = {
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_embed.bias",
    "decoder_norm.weight",
    "decoder_norm.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

_REASONS = {
    "beit": [
        (
            re.compile(r"(^|\.)rel_pos_bias\.|relative_position_(bias_table|index)$"),
            "relative position bias: a plain timm VisionTransformer has none "
            "(features will differ from the source model)",
        ),
        (re.compile(r"^mask_token$"), "BEiT's encoder-side [MASK] embedding; MAE's mask token lives in the decoder"),
        (re.compile(r"^lm_head\."), "visual-token classifier (pretraining head)"),
        (re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head"),
    ],
    "bootmae": [
        (
            re.compile(
                r"^(decode_blocks(_1)?\.|decode_norm(_1)?\.|down(_1)?\.|lm_head(_1)?\.|de_pos_embed$|mask_token(_1)?$)"
            ),
            "BootMAE's cross-attention pixel / feature decoders are not MAE's decoder",
        ),
        (re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head"),
    ],
    "mae": [(re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head")],
}


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    if "encoder.cls_token" in keys or "encoder.patch_embed.proj.weight" in keys:
        return "mimkit"
    if any(
        k.startswith(("decode_blocks", "down.", "down_1.", "lm_head_1.")) or k in ("de_pos_embed", "mask_token_1")
        for k in keys
    ):
        return "bootmae"
    if any(k.endswith(("attn.q_bias", ".gamma_1")) or "rel_pos_bias" in k or "relative_position" in k for k in keys):
        return "beit"
    if "patch_embed.proj.weight" in keys or any(_BLOCK_RE.match(k) for k in keys):
        return "mae"
    return "unknown"


def _fold_layer_scale(conv: Converted, sd, i: int, gamma_key: str, linear: str) -> None:
    """gamma * (W x + b) == (diag(gamma) W) x + gamma * b: exact, so the scale disappears."""
    gamma = sd[gamma_key].float()
    w_key, b_key = f"encoder.blocks.{i}.{linear}.weight", f"encoder.blocks.{i}.{linear}.bias"
    if w_key not in conv.tensors:
        conv.unexpected[gamma_key] = f"layer scale without its '{linear}' weight"
        return
    w = conv.tensors[w_key]
    conv.put(w_key, (w.float() * gamma[:, None]).to(w.dtype), f"{conv.origin[w_key]} * {gamma_key}")
    if b_key in conv.tensors:
        b = conv.tensors[b_key]
        conv.put(b_key, (b.float() * gamma).to(b.dtype), f"{conv.origin[b_key]} * {gamma_key}")


def convert_official(sd: dict[str, torch.Tensor], family: str) -> Converted:
    """Official MAE, BEiT / mc-BEiT and BootMAE layouts -> mimkit keys."""
    conv = Converted()
    reasons = _REASONS[family]
    blocks: dict[int, dict[str, str]] = defaultdict(dict)
    for k, t in sd.items():
        m = _BLOCK_RE.match(k)
        if m:
            blocks[int(m.group(1))][m.group(2)] = k
        elif k in _MAE_ENCODER_TOP:
            conv.put(f"encoder.{k}", t, k)
        elif family == "mae" and (k in _MAE_DECODER_TOP or k.startswith("decoder_blocks.")):
            conv.put(f"decoder.{k}", t, k)
        else:
            conv.unexpected[k] = next(
                (why for pat, why in reasons if pat.search(k)), "not part of a ViT encoder or MAE decoder"
            )
    folded = 0
    for i, parts in sorted(blocks.items()):
        for sub, k in parts.items():
            if sub in ("attn.q_bias", "attn.k_bias", "attn.v_bias", "gamma_1", "gamma_2"):
                continue
            if "relative_position" in sub:
                conv.unexpected[k] = next(why for pat, why in _REASONS["beit"] if pat.search(k))
                continue
            conv.put(f"encoder.blocks.{i}.{sub}", sd[k], k)
        if "attn.q_bias" in parts or "attn.v_bias" in parts:  # BEiT-style: learnable q and v bias, k bias 0
            q_key, v_key = parts.get("attn.q_bias"), parts.get("attn.v_bias")
            if q_key is None or v_key is None:
                raise InteropError(f"block {i}: has only one of attn.q_bias / attn.v_bias")
            q, v = sd[q_key], sd[v_key]
            k_key = parts.get("attn.k_bias")
            k_bias = sd[k_key] if k_key else torch.zeros_like(q)
            conv.put(
                f"encoder.blocks.{i}.attn.qkv.bias",
                torch.cat([q, k_bias, v]),
                f"cat({q_key}, {k_key or 'zeros'}, {v_key})",
            )
        for gamma, linear in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            if gamma in parts:
                _fold_layer_scale(conv, sd, i, parts[gamma], linear)
                folded += 1
    if any(k.endswith("attn.q_bias") for k in sd):
        conv.notes.append("fused BEiT-style attn.q_bias / attn.v_bias (k bias zero) into attn.qkv.bias")
    if folded:
        conv.notes.append(f"folded {folded} layer-scale vectors (gamma_1 / gamma_2) exactly into attn.proj / mlp.fc2")
    return conv


_BOOTMAE_DECODERS = {  # official decoder prefix -> (mimkit decoder, its mask token, the table its mask tokens get)
    "": ("pixel_decoder", "mask_token", "de_pos_embed"),
    "_1": ("feature_decoder", "mask_token_1", "pos_embed"),  # the feature decoder reuses the encoder's table
}
_BOOTMAE_BLOCK = {  # official Decode_Block sub-module -> mimkit DecoderBlock sub-module (weights and biases)
    "norm1": "norm1", "attn.proj": "attn.proj", "norm3": "norm_q", "norm4": "norm_context",
    "c_attn.proj": "cross_attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip


def convert_bootmae_official(sd: dict[str, torch.Tensor], patch_size: int, pixel_head: str = "official") -> Converted:
    """A whole official BootMAE pretraining model (``modeling_pretrain_bootmae.py`` names) -> mimkit ``BootMAE``
    keys: the encoder as :func:`convert_official` maps it, both cross-attention decoders, and the momentum
    encoder as a copy of the encoder (load ``model_ema`` the same way for the EMA one). Exact: BEiT-style
    q / v biases become fused biases with a zero k part; the cross-attention's fused ``kv`` splits into ``k`` /
    ``v``; the pixel head ``ConvTranspose2d(dim, 3, p, p)`` becomes mimkit's per-token (dim -> p*p*3) map in
    patchify order, its 3 channel biases kept as they are (`pixel_head` official, `bootmae.pixel_head`'s default)
    or repeated over the p*p pixels (per_pixel)."""
    decoder_side = ("decode_", "down", "lm_head", "mask_token", "de_pos_embed")
    encoder = convert_official({k: v for k, v in sd.items() if not k.startswith(decoder_side)}, "bootmae")
    conv = Converted(notes=list(encoder.notes), unexpected=dict(encoder.unexpected))
    for key, tensor in encoder.tensors.items():
        conv.put(key, tensor, encoder.origin[key])
        conv.put("ema_encoder." + key[len("encoder.") :], tensor, encoder.origin[key])
    taken: set[str] = set()

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise InteropError(f"official BootMAE state dict: no '{src}'")
        taken.add(src)
        return sd[src]

    for suffix, (name, token, table) in _BOOTMAE_DECODERS.items():
        conv.put(f"{name}.mask_token", take(token), token)
        conv.put(f"{name}.pos_embed", take(table), table)
        for wb in ("weight", "bias"):
            conv.put(f"{name}.embed.{wb}", take(f"down{suffix}.{wb}"), f"down{suffix}.{wb}")
            conv.put(f"{name}.norm.{wb}", take(f"decode_norm{suffix}.{wb}"), f"decode_norm{suffix}.{wb}")
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"^decode_blocks{suffix}\.(\d+)\.", k)))
        for i in range(depth):
            src, dst = f"decode_blocks{suffix}.{i}", f"{name}.blocks.{i}"
            for official, ours in _BOOTMAE_BLOCK.items():
                for wb in ("weight", "bias"):
                    conv.put(f"{dst}.{ours}.{wb}", take(f"{src}.{official}.{wb}"), f"{src}.{official}.{wb}")
            q, v = take(f"{src}.attn.q_bias"), take(f"{src}.attn.v_bias")
            conv.put(f"{dst}.attn.qkv.weight", take(f"{src}.attn.qkv.weight"), f"{src}.attn.qkv.weight")
            conv.put(f"{dst}.attn.qkv.bias", torch.cat([q, torch.zeros_like(q), v]),
                     f"cat({src}.attn.q_bias, zeros, {src}.attn.v_bias)")  # fmt: skip
            k_w, v_w = take(f"{src}.c_attn.kv.weight").chunk(2, dim=0)
            conv.put(f"{dst}.cross_attn.q.weight", take(f"{src}.c_attn.q.weight"), f"{src}.c_attn.q.weight")
            conv.put(f"{dst}.cross_attn.q.bias", take(f"{src}.c_attn.q_bias"), f"{src}.c_attn.q_bias")
            conv.put(f"{dst}.cross_attn.k.weight", k_w, f"{src}.c_attn.kv.weight[:half]")
            conv.put(f"{dst}.cross_attn.v.weight", v_w, f"{src}.c_attn.kv.weight[half:]")
            conv.put(f"{dst}.cross_attn.v.bias", take(f"{src}.c_attn.v_bias"), f"{src}.c_attn.v_bias")
    conv.put("feature_decoder.head.weight", take("lm_head_1.weight"), "lm_head_1.weight")
    conv.put("feature_decoder.head.bias", take("lm_head_1.bias"), "lm_head_1.bias")
    deconv_w, deconv_b = take("lm_head.proj.weight"), take("lm_head.proj.bias")  # (dim, 3, p, p), (3,)
    if tuple(deconv_w.shape[1:]) != (3, patch_size, patch_size):
        raise InteropError(f"official BootMAE 'lm_head.proj.weight' has shape {tuple(deconv_w.shape)}; expected "
                           f"(dim, 3, {patch_size}, {patch_size})")  # fmt: skip
    # output pixel (i, j) of channel c of a patch = sum_d x_d W[d, c, i, j] + b[c]; patchify order is (i, j, c)
    conv.put("pixel_decoder.head.weight", deconv_w.permute(2, 3, 1, 0).reshape(-1, deconv_w.shape[0]),
             "lm_head.proj.weight (ConvTranspose2d -> Linear)")  # fmt: skip
    if pixel_head == "official":
        conv.put("pixel_decoder.head.bias", deconv_b, "lm_head.proj.bias (one per channel)")
    else:
        conv.put("pixel_decoder.head.bias", deconv_b.repeat(patch_size * patch_size), "lm_head.proj.bias (per pixel)")
    for k in sd:
        if k.startswith(decoder_side) and k not in taken:
            conv.unexpected[k] = "not part of mimkit's BootMAE decoders"
    return conv


def convert_hf(sd: dict[str, torch.Tensor]) -> Converted:
    """Hugging Face ViTMAEForPreTraining / ViTMAEModel / ViTModel (any name vintage) -> mimkit keys."""
    conv = Converted()
    canon = {hf_canonical_key(k): k for k in sd}
    prefix = "vit." if any(k.startswith("vit.") for k in canon) else ""
    enc_depth = 1 + max(
        (int(m.group(1)) for k in canon if (m := re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", k))), default=-1
    )
    dec_ids = [int(m.group(1)) for k in canon if (m := re.match(r"^decoder\.decoder_layers\.(\d+)\.", k))]
    has_decoder = any(k.startswith("decoder.") for k in canon)
    mapping = hf_key_map(enc_depth, (1 + max(dec_ids, default=-1)) if has_decoder else None, prefix)
    qkv: dict[str, list] = defaultdict(lambda: [None, None, None])
    used = set()
    for hf_key, (mk_key, chunk) in mapping.items():
        if hf_key not in canon:
            continue
        used.add(hf_key)
        src = canon[hf_key]
        if chunk is None:
            conv.put(mk_key, sd[src], src)
        else:
            qkv[mk_key][chunk] = src
    for mk_key, parts in qkv.items():
        if None in parts:
            absent = _HF_QKV[parts.index(None)]
            raise InteropError(f"{mk_key}: the source has the other attention projections but no '{absent}'")
        conv.put(mk_key, torch.cat([sd[p] for p in parts], dim=0), "cat(" + ", ".join(parts) + ")")
    for k, original in canon.items():
        if k not in used:
            pooler = "pooler." in k
            conv.unexpected[original] = (
                "HF ViTModel pooler (mimkit has none)" if pooler else "not part of a ViT encoder or MAE decoder"
            )
    if any(k != hf_canonical_key(k) for k in sd):
        conv.notes.append("read Hugging Face on-disk names (encoder.layer.N.attention.attention.query ...)")
    conv.notes.append("fused HF q_proj / k_proj / v_proj into timm's attn.qkv")
    return conv


def convert_mimkit(sd: dict[str, torch.Tensor]) -> Converted:
    conv = Converted()
    for k, t in sd.items():
        if k.startswith(("encoder.", "decoder.")):
            conv.put(k, t, k)
        else:
            conv.unexpected[k] = "not an encoder. / decoder. key"
    return conv
