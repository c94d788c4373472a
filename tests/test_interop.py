"""Export to timm / Hugging Face and import of official checkpoints (tiny models, CPU, seconds).

* mimkit -> timm: ``timm.create_model`` (local-dir, and by name with ``pretrained_cfg_overlay``)
  gives bit-identical features, with mean/std / input size / num_classes 0 in its pretrained_cfg.
* mimkit -> HF: ``ViTModel`` gives the same features; ``ViTMAEForPreTraining`` the same mask, loss
  and predictions for the same noise.
* HF -> mimkit: a saved ``ViTMAEForPreTraining`` folder imports to a model with the same MAE loss
  and predictions under fixed noise (sizes, mask ratio, norm_pix and mean/std taken from the folder).
* Official MAE key layout (names and shapes of ``models_mae.py``, built here by hand), with and
  without decoder, wrapped like an official checkpoint (``model`` + an argparse ``args``): zero
  missing and zero unexpected keys, every tensor lands where it should.
* BEiT layout without a relative position bias: q/v bias fused and layer scale folded exactly into a plain ViT
  (features equal timm's ``Beit``); with one it becomes a timm ``Beit`` (tests/test_import_beit.py).
  BootMAE: encoder imported, its cross-attention decoders reported.
* Position embeddings are resampled with timm when the resolution changes.
* Nothing is ever unpickled beyond tensors and inert classes; errors name the file and the key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_MODEL

import mimkit
from mimkit.checkpoint import save_checkpoint
from mimkit.cli import main
from mimkit.config import config_from_dict, load_config, to_dict
from mimkit.interop import (
    ImportOptions,
    InteropError,
    export_hf,
    export_timm,
    import_checkpoint,
    load_mimkit_checkpoint,
    timm_create_kwargs,
)
from mimkit.methods import build_model
from mimkit.models import sincos_2d_pos_embed

D, DEPTH, HEADS, P, SIZE = 32, 2, 2, 4, 16  # TINY_MODEL encoder
DD, DDEPTH = 32, 1  # TINY_MODEL decoder
L = (SIZE // P) ** 2


def perturbed_model(*overrides: str, seed: int = 0):
    cfg = load_config(None, TINY_MODEL + list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_token"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A mimkit checkpoint written by a real (2-step) pretraining run, then perturbed so that biases,
    norms and tokens are all non-trivial."""
    import numpy as np
    from conftest import make_images

    from mimkit.train import pretrain

    root = tmp_path_factory.mktemp("run")
    np.savez(root / "tiny.npz", x_train=make_images(16))
    cfg = load_config(
        None,
        TINY_MODEL
        + [
            f"data.path={root / 'tiny.npz'}",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "train.max_steps=1",
            "train.precision=fp32",
            "train.progress=false",
            "train.tensorboard=false",
            "data.mean=[0.5,0.4,0.3]",
            "data.std=[0.2,0.25,0.3]",
            f"train.out_dir={root / 'out'}",
        ],
    )
    path = pretrain(cfg).checkpoint
    state = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in state["model"].items():
        if v.ndim == 1 or k.endswith("_token"):
            v.add_(0.1 * torch.randn(v.shape, generator=g))
    save_checkpoint(path, state)
    return path


def inputs(seed=1, batch=3, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, (size // P) ** 2, generator=g)


# ---------------------------------------------------------------------------------------------- export


def test_export_timm_identical_features(ckpt, tmp_path):
    model, cfg, _ = load_mimkit_checkpoint(ckpt)
    out = tmp_path / "timm"
    written = export_timm(ckpt, out)
    assert written["weights"].name == "model.safetensors" and written["config"].name == "config.json"
    meta = json.loads(written["config"].read_text())
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["num_classes"] == 0
    x, _ = inputs()
    ref = model.encoder.forward_features(x)

    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    name, kwargs = timm_create_kwargs(out)
    by_name = timm.create_model(name, **kwargs).eval()
    plain = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        img_size=SIZE,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
    ).eval()
    with torch.no_grad():
        for m in (by_dir, by_name, plain):
            assert torch.equal(m.forward_features(x), ref)
            assert torch.equal(m(x), model.encoder(x))  # pooled (cls token) features, no head
    for m in (by_dir, by_name):
        pc = m.pretrained_cfg
        assert tuple(pc["mean"]) == pytest.approx(cfg.data.mean) and tuple(pc["std"]) == pytest.approx(cfg.data.std)
        assert tuple(pc["input_size"]) == (3, SIZE, SIZE) and pc["num_classes"] == 0 and m.num_classes == 0


def test_export_hf_identical_outputs(ckpt, tmp_path):
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import ViTMAEForPreTraining, ViTModel

    model, cfg, _ = load_mimkit_checkpoint(ckpt)
    written = export_hf(ckpt, tmp_path / "hf")
    assert (written["vit"] / "model.safetensors").is_file() and (written["vit_mae"] / "model.safetensors").is_file()
    x, noise = inputs()
    vit = ViTModel.from_pretrained(written["vit"], add_pooling_layer=False).eval()
    mae = ViTMAEForPreTraining.from_pretrained(written["vit_mae"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            vit(pixel_values=x).last_hidden_state, model.encoder.forward_features(x), rtol=1e-5, atol=1e-5
        )
        ours, ref = model(x, noise=noise), mae(pixel_values=x, noise=noise)
    assert torch.equal(ours.mask, ref.mask)
    torch.testing.assert_close(ref.logits, ours.pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.loss, ours.loss, rtol=1e-5, atol=0)
    assert mae.config.norm_pix_loss == cfg.mae.norm_pix_loss and mae.config.mask_ratio == cfg.mask.ratio
    pre = json.loads((written["vit"] / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(list(cfg.data.mean)) and pre["size"] == {"height": SIZE, "width": SIZE}


# ---------------------------------------------------------------------------------------------- HF -> mimkit


def hf_pretraining_folder(tmp_path, norm_pix: bool):
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        image_size=SIZE,
        patch_size=P,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        mask_ratio=0.6,
        norm_pix_loss=norm_pix,
    )
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # every tensor random (HF 5.x leaves fresh sin-cos tables at zero anyway)
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    folder = tmp_path / "hf_mae"
    hf.save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_hf_to_mimkit_same_mae_loss(tmp_path, norm_pix):
    hf, folder = hf_pretraining_folder(tmp_path, norm_pix)
    report = import_checkpoint(folder, tmp_path / "imported.pt")
    assert report.format == "hf" and not report.missing and not report.unexpected and not report.initialized
    model, cfg, _ = load_mimkit_checkpoint(tmp_path / "imported.pt")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (48, 2, 3)
    assert (cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (32, 2, 4)
    assert cfg.mask.ratio == 0.6 and cfg.mae.norm_pix_loss is norm_pix and cfg.data.mean == (0.5, 0.5, 0.5)
    x, noise = inputs(seed=3)
    with torch.no_grad():
        ours, ref = model(x, noise=noise), hf(pixel_values=x, noise=noise)
    assert torch.equal(ours.mask, ref.mask)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.pred, ref.logits, rtol=1e-5, atol=1e-5)


def test_hf_in_memory_names_and_a_vit_model_import_too(tmp_path):
    from safetensors.torch import save_file

    hf, folder = hf_pretraining_folder(tmp_path, True)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(flat / "model.safetensors"))  # 5.x names
    a = import_checkpoint(folder, tmp_path / "a.pt")
    b = import_checkpoint(flat, tmp_path / "b.pt")
    assert not b.missing and not b.unexpected
    sa, sb = (
        torch.load(tmp_path / "a.pt", weights_only=True)["model"],
        torch.load(tmp_path / "b.pt", weights_only=True)["model"],
    )
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(a.matched) == len(sa)


# ---------------------------------------------------------------------------------------------- official MAE


def official_mae_state_dict(with_decoder: bool = True, grid: int = SIZE // P, seed: int = 0) -> dict:
    """The parameter names and shapes of the official ``models_mae.py`` MaskedAutoencoderViT
    (per methods.md §2), for a D-wide, DEPTH-deep encoder and a DD-wide, DDEPTH-deep decoder."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": 1 + r(d),
            f"{prefix}.norm1.bias": r(d),
            f"{prefix}.attn.qkv.weight": r(3 * d, d),
            f"{prefix}.attn.qkv.bias": r(3 * d),
            f"{prefix}.attn.proj.weight": r(d, d),
            f"{prefix}.attn.proj.bias": r(d),
            f"{prefix}.norm2.weight": 1 + r(d),
            f"{prefix}.norm2.bias": r(d),
            f"{prefix}.mlp.fc1.weight": r(4 * d, d),
            f"{prefix}.mlp.fc1.bias": r(4 * d),
            f"{prefix}.mlp.fc2.weight": r(d, 4 * d),
            f"{prefix}.mlp.fc2.bias": r(d),
        }

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": sincos_2d_pos_embed(D, grid),
        "patch_embed.proj.weight": r(D, 3, P, P),
        "patch_embed.proj.bias": r(D),
    }
    for i in range(DEPTH):
        sd.update(block(f"blocks.{i}", D))
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D)})
    if with_decoder:
        sd.update(
            {
                "decoder_embed.weight": r(DD, D),
                "decoder_embed.bias": r(DD),
                "mask_token": r(1, 1, DD),
                "decoder_pos_embed": sincos_2d_pos_embed(DD, grid),
            }
        )
        for i in range(DDEPTH):
            sd.update(block(f"decoder_blocks.{i}", DD))
        sd.update(
            {
                "decoder_norm.weight": 1 + r(DD),
                "decoder_norm.bias": r(DD),
                "decoder_pred.weight": r(P * P * 3, DD),
                "decoder_pred.bias": r(P * P * 3),
            }
        )
    return sd


def official_checkpoint(path: Path, sd: dict) -> Path:
    """Wrapped as the official training script saves it: weights under 'model', the run's argparse
    Namespace under 'args' (plus epoch / numpy scalars), loadable only with the inert allowlist."""
    import numpy as np

    args = argparse.Namespace(
        model="mae_vit_tiny", norm_pix_loss=True, mask_ratio=0.75, output_dir=Path("/x"), blr=np.float64(1.5e-4)
    )
    torch.save({"model": sd, "args": args, "epoch": 799}, path)
    return path


@pytest.mark.parametrize("with_decoder", [True, False], ids=["with_decoder", "encoder_only"])
def test_official_mae_layout_imports_with_zero_missing_keys(tmp_path, with_decoder):
    sd = official_mae_state_dict(with_decoder)
    src = official_checkpoint(tmp_path / "mae_pretrain.pth", sd)
    # 32-wide layers: the head counts are not in the weights (official widths 768 / 512 are known)
    opts = ImportOptions(num_heads=HEADS, decoder_heads=2 if with_decoder else None)
    report = import_checkpoint(src, tmp_path / "mimkit.pt", opts)
    assert report.format == "mae" and report.missing == [] and report.unexpected == {}
    model, cfg, _ = load_mimkit_checkpoint(tmp_path / "mimkit.pt")
    mk = model.state_dict()
    for k, v in sd.items():
        prefix = "decoder." if k.startswith(("decoder", "mask_token")) else "encoder."
        assert torch.equal(mk[prefix + k], v), k
    assert len(report.matched) == len(sd)
    if with_decoder:
        assert report.initialized == [] and (cfg.mae.decoder_dim, cfg.mae.decoder_depth) == (DD, DDEPTH)
    else:
        assert report.initialized and all(k.startswith("decoder.") for k in report.initialized)
        assert (cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (512, 8, 16)
    # the same dict layout as a training checkpoint, loadable with plain weights_only=True
    raw = torch.load(tmp_path / "mimkit.pt", weights_only=True)
    assert {"model", "config", "step", "mimkit_version", "method"} <= set(raw) and raw["method"] == "mae"
    assert build_model(config_from_dict(raw["config"])).load_state_dict(raw["model"], strict=True)
    x, noise = inputs()
    with torch.no_grad():
        assert torch.isfinite(model(x, noise=noise).loss)


def test_pos_embed_resampled_through_timm(tmp_path):
    from timm.layers import resample_abs_pos_embed

    sd = official_mae_state_dict(True)
    sd["pos_embed"] = torch.randn(1, L + 1, D)  # a learned (fine-tuned style) table: resampled
    src = official_checkpoint(tmp_path / "mae.pth", sd)
    report = import_checkpoint(src, tmp_path / "m24.pt", ImportOptions(img_size=24, num_heads=HEADS, decoder_heads=2))
    model, cfg, _ = load_mimkit_checkpoint(tmp_path / "m24.pt")
    assert cfg.model.img_size == 24 and model.encoder.pos_embed.shape == (1, 37, D)
    expect = resample_abs_pos_embed(sd["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(model.encoder.pos_embed.detach(), expect)
    # MAE's decoder table is a fixed sin-cos function of the grid: rebuilt exactly, not interpolated
    assert torch.equal(model.decoder.decoder_pos_embed.detach(), sincos_2d_pos_embed(DD, 6))
    assert any("resample_abs_pos_embed" in n for n in report.notes) and not report.missing
    x, noise = inputs(size=24)
    with torch.no_grad():
        assert torch.isfinite(model(x, noise=noise).loss)


def test_vit_import_at_another_resolution_equals_timms_own_loading(tmp_path):
    """An encoder-only official MAE source imported at 24 px holds what timm's own checkpoint_filter_fn loads into
    a 24 px VisionTransformer: the same features."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    sd = official_mae_state_dict(False)
    sd["pos_embed"] = torch.randn(1, L + 1, D, generator=torch.Generator().manual_seed(3))
    report = import_checkpoint(official_checkpoint(tmp_path / "mae.pth", sd), tmp_path / "m24.pt",
                               ImportOptions(img_size=24, num_heads=HEADS))  # fmt: skip
    assert any("4x4 -> 6x6 by timm.models.vision_transformer.checkpoint_filter_fn" in n for n in report.notes)
    assert report.missing == [] and report.unexpected == {}
    model, _, _ = load_mimkit_checkpoint(tmp_path / "m24.pt")
    vit = VisionTransformer(img_size=24, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0)
    vit.load_state_dict(checkpoint_filter_fn(sd, vit), strict=True)
    x, _ = inputs(size=24)
    with torch.no_grad():
        features = model.encoder.eval().forward_features(x)
        torch.testing.assert_close(features, vit.eval().forward_features(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- BEiT, BootMAE


def test_beit_layout_without_relative_position_bias_is_a_plain_vit(tmp_path):
    """A BEiT-style encoder with an absolute position embedding and no relative position bias (an official
    ablation; BootMAE's encoder) is exactly a plain ViT: q/v bias fused, layer scale folded. With a relative
    position bias it imports into timm's Beit instead (tests/test_import_beit.py)."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    beit = Beit(
        img_size=SIZE,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        qkv_bias=True,
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
        init_values=0.1,
        global_pool="token",
    ).eval()
    with torch.no_grad():
        for p in beit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = dict(beit.state_dict())
    assert any(k.endswith("gamma_1") for k in sd) and any(k.endswith("attn.q_bias") for k in sd)
    sd["mask_token"] = torch.randn(1, 1, D)
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(8192, D), torch.randn(8192)
    torch.save({"model": sd}, tmp_path / "beit.pth")

    report = import_checkpoint(tmp_path / "beit.pth", tmp_path / "beit.pt", ImportOptions(num_heads=HEADS))
    assert report.format == "beit" and report.missing == [] and report.config["method"] == "mae"
    assert set(report.unexpected) == {"mask_token", "lm_head.weight", "lm_head.bias"}
    assert any("layer-scale" in n for n in report.notes) and any("plain ViT" in n for n in report.notes)
    model, _, _ = load_mimkit_checkpoint(tmp_path / "beit.pt")
    x, _ = inputs()
    with torch.no_grad():  # exact up to float rounding
        torch.testing.assert_close(model.encoder.forward_features(x), beit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_bootmae_layout_imports_the_encoder(tmp_path):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    enc = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, L + 1, D),
        "patch_embed.proj.weight": r(D, 3, P, P),
        "patch_embed.proj.bias": r(D),
        "norm.weight": r(D),
        "norm.bias": r(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}"
        enc.update(
            {
                f"{b}.norm1.weight": r(D),
                f"{b}.norm1.bias": r(D),
                f"{b}.attn.qkv.weight": r(3 * D, D),
                f"{b}.attn.q_bias": r(D),
                f"{b}.attn.v_bias": r(D),
                f"{b}.attn.proj.weight": r(D, D),
                f"{b}.attn.proj.bias": r(D),
                f"{b}.norm2.weight": r(D),
                f"{b}.norm2.bias": r(D),
                f"{b}.mlp.fc1.weight": r(4 * D, D),
                f"{b}.mlp.fc1.bias": r(4 * D),
                f"{b}.mlp.fc2.weight": r(D, 4 * D),
                f"{b}.mlp.fc2.bias": r(D),
            }
        )
    decoders = {
        "de_pos_embed": r(1, L + 1, 16),
        "down.weight": r(16, D),
        "down.bias": r(16),
        "mask_token": r(1, 1, 16),
        "decode_blocks.0.c_attn.kv.weight": r(32, D),
        "decode_blocks.0.norm4.weight": r(D),
        "decode_norm.weight": r(16),
        "lm_head.proj.weight": r(16, 3, P, P),
        "down_1.weight": r(D, D),
        "mask_token_1": r(1, 1, D),
        "decode_blocks_1.0.attn.qkv.weight": r(3 * D, D),
        "decode_norm_1.weight": r(D),
        "lm_head_1.weight": r(D, D),
    }
    ema = {k: v + 1 for k, v in {**enc, **decoders}.items()}  # BootMAE's EMA is a copy of the whole model
    torch.save({"model": {**enc, **decoders}, "model_ema": ema, "epoch": 800}, tmp_path / "bootmae.pth")

    report = import_checkpoint(tmp_path / "bootmae.pth", tmp_path / "boot.pt", ImportOptions(num_heads=HEADS))
    assert report.format == "bootmae" and report.missing == [] and set(report.unexpected) == set(decoders)
    assert all("BootMAE" in why for why in report.unexpected.values())
    assert report.initialized and any("model_ema" in n for n in report.notes)
    model, _, _ = load_mimkit_checkpoint(tmp_path / "boot.pt")
    qkv_bias = model.encoder.blocks[1].attn.qkv.bias.detach()
    assert torch.equal(qkv_bias, torch.cat([enc["blocks.1.attn.q_bias"], torch.zeros(D), enc["blocks.1.attn.v_bias"]]))
    assert torch.equal(model.encoder.pos_embed.detach(), enc["pos_embed"])

    report = import_checkpoint(
        tmp_path / "bootmae.pth", tmp_path / "ema.pt", ImportOptions(key="model_ema", num_heads=HEADS)
    )
    model, _, _ = load_mimkit_checkpoint(tmp_path / "ema.pt")
    assert torch.equal(model.encoder.cls_token.detach(), ema["cls_token"]) and report.format == "bootmae"


# ---------------------------------------------------------------------------------------------- safety and errors


def _touch(path):  # what a malicious pickle would run
    Path(path).write_text("ran")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def test_loading_never_runs_code_and_errors_name_file_and_key(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    torch.save({"model": official_mae_state_dict(False), "extra": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(InteropError, match=r"evil\.pth: refused to load.*_touch"):
        import_checkpoint(tmp_path / "evil.pth", tmp_path / "x.pt")
    assert not marker.exists()

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        import_checkpoint(tmp_path / "nope.pth", tmp_path / "x.pt")

    torch.save({"model": {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(InteropError, match=r"resnet\.pth: unrecognised key layout.*conv1\.weight"):
        import_checkpoint(tmp_path / "resnet.pth", tmp_path / "x.pt")

    sd = official_mae_state_dict(False)
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(3 * D, D + 1)
    torch.save({"model": sd}, tmp_path / "bad_shape.pth")
    with pytest.raises(InteropError, match=r"bad_shape\.pth: 'blocks\.1\.attn\.qkv\.weight' has shape \(96, 33\)"):
        import_checkpoint(tmp_path / "bad_shape.pth", tmp_path / "x.pt", ImportOptions(num_heads=HEADS))

    torch.save({"model": official_mae_state_dict(False)}, tmp_path / "ok.pth")
    with pytest.raises(InteropError, match=r"ok\.pth: has no key 'teacher'"):
        import_checkpoint(tmp_path / "ok.pth", tmp_path / "x.pt", ImportOptions(key="teacher", num_heads=HEADS))
    with pytest.raises(InteropError, match=r"ok\.pth: cannot infer the number of attention heads for width 32"):
        import_checkpoint(tmp_path / "ok.pth", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    # through the CLI: exit code 2, the message on stderr; the report on success
    assert main(["import", str(tmp_path / "resnet.pth"), str(tmp_path / "x.pt")]) == 2
    assert "resnet.pth" in capsys.readouterr().err
    assert (
        main(
            [
                "import",
                str(tmp_path / "ok.pth"),
                str(tmp_path / "ok.pt"),
                "--num-heads",
                "2",
                "--mask-ratio",
                "0.6",
                "--no-norm-pix-loss",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "matched:     30 tensors" in out and "missing:     0" in out and "initialized:" in out
    _, cfg, _ = load_mimkit_checkpoint(tmp_path / "ok.pt")
    assert cfg.mask.ratio == 0.6 and cfg.mae.norm_pix_loss is False


def test_cli_export_round_trip(ckpt, tmp_path, capsys):
    assert main(["export", str(ckpt), "--to", "timm", str(tmp_path / "t")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--to", "hf", str(tmp_path / "h")]) == 0
    assert "ViTMAEForPreTraining" in capsys.readouterr().out
    # HF folder back to mimkit: the same weights, the same recipe values that HF's config carries
    assert main(["import", str(tmp_path / "h" / "vit_mae"), str(tmp_path / "back.pt")]) == 0
    a, _, _ = load_mimkit_checkpoint(ckpt)
    b, cfg, _ = load_mimkit_checkpoint(tmp_path / "back.pt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cfg.data.mean == pytest.approx((0.5, 0.4, 0.3))
    # a timm export is an encoder state dict (the official MAE encoder layout): encoder-only source
    report = import_checkpoint(tmp_path / "t" / "model.safetensors", None, ImportOptions(num_heads=HEADS))
    assert report.format == "mae" and report.missing == [] and report.unexpected == {}
    assert len(report.matched) == len([k for k in sa if k.startswith("encoder.")])
    report = import_checkpoint(
        tmp_path / "t", tmp_path / "from_timm.pt"
    )  # the folder: heads, mean/std from config.json
    c, cfg, _ = load_mimkit_checkpoint(tmp_path / "from_timm.pt")
    assert report.missing == [] and cfg.data.mean == pytest.approx((0.5, 0.4, 0.3)) and cfg.model.num_heads == HEADS
    assert all(torch.equal(v, sa[k]) for k, v in c.state_dict().items() if k.startswith("encoder."))

    # a mimkit checkpoint re-imported at another resolution keeps its recipe, resamples its table
    report = import_checkpoint(ckpt, tmp_path / "r24.pt", ImportOptions(img_size=24))
    r, cfg24, _ = load_mimkit_checkpoint(tmp_path / "r24.pt")
    assert report.format == "mimkit" and report.missing == [] and cfg24.model.img_size == 24
    assert cfg24.data.mean == pytest.approx((0.5, 0.4, 0.3)) and cfg24.train.max_steps == 1
    assert r.encoder.pos_embed.shape == (1, 37, D)


def test_export_refuses_non_mimkit_files(tmp_path):
    torch.save({"model": official_mae_state_dict()}, tmp_path / "official.pth")
    with pytest.raises(InteropError, match=r"official\.pth: not a mimkit checkpoint: no 'config' key.*mimkit import"):
        export_timm(tmp_path / "official.pth", tmp_path / "out")
    model, cfg = perturbed_model()
    state = {"model": model.state_dict(), "config": to_dict(cfg), "step": 0, "mimkit_version": mimkit.__version__}
    state["model"].pop("encoder.norm.bias")
    save_checkpoint(tmp_path / "broken.pt", state)
    with pytest.raises(InteropError, match=r"broken\.pt: 'model' does not match.*encoder\.norm\.bias"):
        export_hf(tmp_path / "broken.pt", tmp_path / "out")
