"""Parity of mimkit's BEiT with Hugging Face ``transformers.BeitForMaskedImageModeling``, a second, independent
implementation of the paper's architecture (shared relative position bias, layer scale, [MASK] embedding, q / v
biases without a k bias).

With identical weights (copied through ``mimkit.interop.hf_beit_key_map``, the map ``mimkit export --to hf`` uses)
and the identical ``bool_masked_pos``, mimkit's lm_head logits (every patch and the masked ones) and its
cross-entropy loss against the tokenizer's ids agree with HF's ``logits`` / ``loss`` to 1e-5 (fp32), with HF's
SDPA and its own eager attention. Every parameter is random and non-trivial (LayerNorm affines, biases, layer
scales, the relative position bias table and the tokens are perturbed away from their init). One changed weight
breaks the agreement, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", minversion="5.0")
from transformers import BeitForMaskedImageModeling  # noqa: E402

from mimkit.config import load_config  # noqa: E402
from mimkit.interop import hf_beit_config, hf_beit_key_map, mimkit_to_hf  # noqa: E402
from mimkit.methods import build_model  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5
BATCH = 3
CONFIG = ["method=beit", "model.arch=vit_tiny_patch4_32", "model.img_size=32", "model.patch_size=4",
          "model.embed_dim=64", "model.depth=3", "model.num_heads=4", "mask.type=block", "mask.ratio=0.4",
          "tokenizer.kind=random", "tokenizer.vocab_size=48", "tokenizer.hidden=8", "tokenizer.code_dim=8",
          "tokenizer.downsample=4"]  # fmt: skip


def build_pair(attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, CONFIG)
    model = build_model(cfg).eval()
    with torch.no_grad():  # move everything off its init (ones, zeros, 0.1 layer scale, zero rel-pos table)
        for name, p in model.named_parameters():
            if not name.startswith("tokenizer."):
                p.add_(0.05 * torch.randn_like(p))
    hf_cfg = hf_beit_config(model, cfg, mim_head=True)
    hf_cfg._attn_implementation = attn  # eager: HF's own attention arithmetic, independent of torch's SDPA
    hf = BeitForMaskedImageModeling(hf_cfg).eval()
    tensors = mimkit_to_hf(model.state_dict(), hf_beit_key_map(len(model.encoder.blocks), mim_head=True))
    assert set(tensors) == set(hf.state_dict())  # the map covers HF's model exactly, both ways
    hf.load_state_dict(tensors, strict=True)
    return model, hf


def inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    imgs, tok = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g)
    mask = torch.stack([model.mask_inputs(torch.Generator().manual_seed(seed + i))["mask"] for i in range(BATCH)])
    return imgs, tok, mask


def mimkit_and_hf(model, hf, imgs, tok, mask):
    with torch.no_grad():
        out = model(imgs, mask=mask, tokenizer_image=tok)
        every_patch = model.lm_head(model.features(imgs, mask)[:, 1:])
        labels = model.tokenizer_logits(tok).argmax(-1)[mask]
        ref = hf(pixel_values=imgs, bool_masked_pos=mask, labels=labels)
    return out, every_patch, ref


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_and_loss_match_hf_beit(attn):
    model, hf = build_pair(attn)
    assert hf.config._attn_implementation == attn
    imgs, tok, mask = inputs(model)
    assert 0 < int(mask.sum()) < mask.numel()
    out, every_patch, ref = mimkit_and_hf(model, hf, imgs, tok, mask)
    torch.testing.assert_close(every_patch, ref.logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.logits, ref.logits[mask], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=0)
    # and the loss is HF's cross-entropy of those logits, not a coincidence of two means
    labels = model.tokenizer_logits(tok).argmax(-1)[mask]
    torch.testing.assert_close(ref.loss, F.cross_entropy(ref.logits[mask], labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("hf_key", ["beit.shared_position_bias.relative_position_bias_table", "beit.layers.2.lambda_1",
                                    "beit.embeddings.mask_token", "beit.layers.1.attention.k_proj.weight"])  # fmt: skip
def test_parity_check_is_sensitive(hf_key):
    model, hf = build_pair()
    imgs, tok, mask = inputs(model)
    with torch.no_grad():
        hf.state_dict()[hf_key].view(-1)[3] += 0.5  # one entry of one tensor
    _, every_patch, ref = mimkit_and_hf(model, hf, imgs, tok, mask)
    assert not torch.allclose(every_patch, ref.logits, rtol=RTOL, atol=ATOL)  # (the loss moves with the logits)
