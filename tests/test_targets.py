"""Targets and teachers as parts: the EMA teacher (several blocks, data2vec 2.0's instance norm and average), the
per-patch targets (pixels, norm_pix, BootMAE's patch_channel, MaskFeat's HOG), and MAE trained on HOG end to end."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from mimkit.checkpoint import load_checkpoint
from mimkit.config import load_config
from mimkit.files import InteropError
from mimkit.methods import build_model
from mimkit.models import create_encoder, patchify
from mimkit.registry import method_spec
from mimkit.targets import HOGTarget, hog_features, make_target
from mimkit.teachers import EMATeacher, ema_update_, teacher_blocks, teacher_targets
from mimkit.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed: int = 0, depth: int = 4):
    torch.manual_seed(seed)
    return create_encoder("vit_tiny_patch16_224", 32, 4, 0.0, 32, depth, 2).eval()


# ---------------------------------------------------------------- the EMA teacher


def test_teacher_returns_the_blocks_asked_bit_identical_to_running_them():
    enc, imgs = tiny_vit(), torch.randn(2, 3, 32, 32)
    teacher = EMATeacher(enc, blocks=(-3, -2, -1))
    outs = teacher(imgs)
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    manual = []
    for block in enc.blocks:
        x = block(x)
        manual.append(x[:, 1:])
    assert len(outs) == 3 and all(o.shape == (2, 64, 32) for o in outs)
    for got, want in zip(outs, manual[1:], strict=True):
        assert torch.equal(got, want)
    # BootMAE's target: the last block before the final norm, as one Sequential call (the code before the part)
    old = enc.blocks(torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1),
                                enc.patch_embed(imgs) + enc.pos_embed[:, 1:]], dim=1))[:, 1:]  # fmt: skip
    assert torch.equal(teacher_targets(enc, imgs)[0], old)
    assert torch.equal(teacher_blocks(enc, imgs, (-1,), final_norm=True)[0], enc.norm(manual[-1]))
    assert not torch.equal(manual[-1], enc.norm(manual[-1]))
    assert torch.equal(teacher_blocks(enc, imgs, (1, 0))[1], manual[0])  # in the order asked


def test_teacher_instance_norm_and_average_match_data2vec2_computed_independently():
    enc, imgs = tiny_vit(1), torch.randn(3, 3, 32, 32)
    outs = teacher_blocks(enc, imgs, (-2, -1))
    # by hand: each block's output, every channel normalised over the image's tokens (biased var, eps 1e-5), mean
    normed = [(o - o.mean(1, keepdim=True)) / (o.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt() for o in outs]
    want = (normed[0] + normed[1]) / 2
    got = EMATeacher(enc, (-2, -1), instance_norm=True, average=True)(imgs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.mean(1).abs().max() < 1e-4  # each channel centred over the tokens
    # then a layer norm per token, without affine
    ln = EMATeacher(enc, (-2, -1), instance_norm=True, average=True, layer_norm_average=True)(imgs)
    by_hand = (want - want.mean(-1, keepdim=True)) / (want.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(ln, by_hand, atol=1e-4, rtol=1e-4)
    # without instance norm the average differs (the check above can fail)
    plain = EMATeacher(enc, (-2, -1), average=True)(imgs)
    torch.testing.assert_close(plain, (outs[0] + outs[1]) / 2)
    assert not torch.allclose(plain, got, atol=1e-2)


def test_teacher_is_frozen_in_eval_and_updates_by_ema():
    student = tiny_vit(2)
    teacher = EMATeacher(student).train()
    assert not teacher.encoder.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("encoder.") for k in teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    teacher.update(student, 0.75)
    name = "blocks.0.attn.qkv.weight"
    expect = 0.75 * before[name] + 0.25 * student.state_dict()[name]
    torch.testing.assert_close(teacher.encoder.state_dict()[name], expect)
    teacher.update(student, 0.0)
    for k, v in student.state_dict().items():
        assert torch.equal(teacher.encoder.state_dict()[k], v), k
    # the function the teacher and BootMAE share is the same update
    other = EMATeacher(tiny_vit(3))
    ema_update_(other.encoder, student, 0.0)
    assert torch.equal(other(torch.ones(1, 3, 32, 32))[0], teacher(torch.ones(1, 3, 32, 32))[0])


def test_bootmae_keeps_its_checkpoint_keys_and_uses_the_teacher_functions():
    cfg = load_config(None, tiny_model("bootmae"))
    model = build_model(cfg)
    keys = [k for k in model.state_dict() if k.startswith("ema_encoder.")]
    assert keys and all(not k.startswith("ema_encoder.encoder.") for k in keys)
    assert sorted(k.removeprefix("ema_encoder.") for k in keys) == sorted(model.encoder.state_dict())
    imgs = torch.randn(2, 3, *model.encoder.patch_embed.img_size)
    assert torch.equal(model.feature_target(imgs), teacher_targets(model.ema_encoder, imgs)[0])


# ---------------------------------------------------------------- per-patch targets


def test_pixel_targets_are_mae_and_bootmae_formulas_and_invert():
    imgs, p = torch.randn(2, 3, 32, 32), 8
    raw = patchify(imgs, p)
    norm_pix = make_target("norm_pix", p)
    assert norm_pix.width(p) == 192 and norm_pix.PREDICTS_PIXELS
    assert torch.equal(norm_pix(imgs), (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6) ** 0.5)
    assert torch.equal(make_target("pixels", p)(imgs), raw)
    for t in (norm_pix, make_target("pixels", p), make_target("patch_channel", p)):
        torch.testing.assert_close(t.pixels_from(t(imgs), imgs), raw, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown target"):
        make_target("sift", p)


def edge_image(horizontal: bool, channel: int | None = None, size: int = 32) -> torch.Tensor:
    img = torch.zeros(1, 3, size, size)
    half = torch.zeros(size, size)
    if horizontal:
        half[size // 2 :] = 1.0  # top dark, bottom bright: a horizontal edge (the gradient points down)
    else:
        half[:, size // 2 :] = 1.0
    for c in range(3) if channel is None else (channel,):
        img[0, c] = half
    return img


def hog_cells(feat: torch.Tensor, patch: int, bins: int = 9) -> torch.Tensor:
    """(B, L, C*bins*u*u) -> (B, L, C, bins, u*u)."""
    b, num, width = feat.shape
    return feat.view(b, num, 3, bins, width // (3 * bins))


def test_hog_shape_width_and_a_flat_image_gives_zero():
    t = HOGTarget(16)
    assert t.width(16) == 3 * 9 * 4 and not t.PREDICTS_PIXELS  # 2x2 cells of 8 px per 16-px patch
    feat = t(torch.randn(2, 3, 64, 64))
    assert feat.shape == (2, 16, 108)
    # every cell of every channel is a unit histogram (random images have gradients everywhere)
    torch.testing.assert_close(hog_cells(feat, 16).norm(dim=3), torch.ones(2, 16, 3, 4))
    assert torch.equal(t(torch.full((1, 3, 64, 64), 0.3)), torch.zeros(1, 16, 108))
    assert make_target("hog", 4).width(4) == 108 and make_target("hog", 4)(torch.randn(1, 3, 32, 32)).shape == (
        1,
        64,
        108,
    )
    with pytest.raises(ValueError, match="even patch"):
        HOGTarget(5)


def test_hog_puts_an_edge_in_its_orientation_bin_per_channel_and_patch():
    p = 8
    for horizontal, bin_ in ((True, 0), (False, 4)):  # bin 0: gradients along the vertical axis; 4: ~90 degrees
        cells = hog_cells(hog_features(edge_image(horizontal, channel=1), p), p)  # (1, 16, 3, 9, 4)
        energy = cells.sum(dim=(0, 1, 4))  # (3 channels, 9 bins)
        assert energy[0].abs().sum() == 0 and energy[2].abs().sum() == 0  # only the channel with the edge
        assert energy[1].argmax() == bin_ and energy[1, bin_] > 0.99 * energy[1].sum()
        # only the patches along the edge (rows / columns 1 and 2 of the 4x4 grid at 32 px) see it
        touched = cells[0].flatten(1).abs().sum(-1).view(4, 4) > 0
        line = torch.zeros(4, 4, dtype=torch.bool)
        if horizontal:
            line[1:3] = True
        else:
            line[:, 1:3] = True
        assert torch.equal(touched, line)


def test_hog_ignores_brightness_and_contrast_per_channel():
    imgs = torch.rand(2, 3, 32, 32)
    scale, shift = torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1), torch.tensor([0.1, -1.0, 4.0]).view(1, 3, 1, 1)
    a, b = hog_features(imgs, 8), hog_features(imgs * scale + shift, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 inside a mixed-precision step
        assert torch.equal(hog_features(imgs, 8), a)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, hog_features(imgs.transpose(2, 3), 8), atol=1e-2)  # orientation does matter


def test_mae_target_auto_follows_norm_pix_loss_and_hog_sets_the_head_width():
    base = tiny_model("mae")
    for overrides, name in (([], "norm_pix"), (["mae.norm_pix_loss=false"], "pixels"), (["mae.target=hog"], "hog"),
                            (["mae.target=pixels"], "pixels")):  # fmt: skip
        model = build_model(load_config(None, base + overrides))
        assert model.target_part.name == name and model.norm_pix_loss == (name == "norm_pix")
        p = model.patch_size
        assert model.decoder.decoder_pred.out_features == (108 if name == "hog" else p * p * 3)
        assert method_spec("mae").pixels(load_config(None, base + overrides)) == (name != "hog")
    emae = build_model(load_config(None, tiny_model("emae") + ["mae.target=hog"]))
    assert emae.decoder.decoder_pred.out_features == 108
    crossmae = build_model(load_config(None, base + ["mae.decoder=crossmae", "mae.target=hog"]))
    assert crossmae.decoder.decoder_pred.out_features == 108
    out = crossmae(torch.randn(2, 3, 16, 16))
    assert out.pred.shape[-1] == 108 and torch.isfinite(out.loss)


def test_mae_on_hog_trains_resumes_exactly_and_says_it_has_no_pictures(tiny_cfg, tmp_path):
    args = ["mae.target=hog", "train.keep_last=10"]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=3", out="a"))
    losses = [json.loads(x)["loss"] for x in straight.metrics.read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    pretrain(tiny_cfg(*args, "train.max_steps=2", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from PIL import Image

    from mimkit.report import build_report
    from mimkit.visualize import visualize

    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)).save(img)
    with pytest.raises(InteropError, match=r"this mae model does not predict pixels \(MAE .*HOG"):
        visualize(straight.checkpoint, [img], tmp_path / "vis", seed=0)
    report = build_report(straight.out_dir, tmp_path / "report.html")  # curves, and a note instead of pictures
    assert report.html.is_file() and not report.checkpoints_drawn
    assert any("does not predict pixels" in n for n in report.notes), report.notes
