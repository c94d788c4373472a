"""train.init_from: a new run starts from released or earlier weights (continued pretraining). An official-layout MAE
checkpoint gives the run exactly its encoder's features; position tables and the patch embedding are fitted as timm
fits them; a teacher copy starts as the encoder; a resume reads its own checkpoints, not the source; a bad source is
one line."""

import json

import pytest
import timm
import torch
from conftest import one_error_line, tiny_model
from test_interop import official_checkpoint, official_mae_state_dict
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from mimkit.checkpoint import load_checkpoint
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.interop.init_weights import fit_tensor, initial_state
from mimkit.methods import build_model
from mimkit.models import sincos_2d_pos_embed
from mimkit.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def timm_encoder(sd: dict) -> torch.nn.Module:
    """The official checkpoint's encoder as a stock timm ViT (the official keys are timm's)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2,
                            num_heads=2, num_classes=0, global_pool="")  # fmt: skip
    vit.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))})
    return vit.eval()


def test_an_official_mae_checkpoint_gives_the_model_its_features_and_decoder(tmp_path):
    sd = official_mae_state_dict(with_decoder=True, seed=3)
    path = official_checkpoint(tmp_path / "mae.pth", sd)
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_model("mae")))
    new, report = initial_state(model, model.state_dict(), path)
    model.load_state_dict(new)
    assert report.missing == [] and report.skipped == {} and report.kind == "mae weights, converted"
    assert "decoder.decoder_pred.weight" in report.matched
    torch.testing.assert_close(model.decoder.decoder_pred.weight, sd["decoder_pred.weight"], rtol=0, atol=0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encoder.eval().forward_features(x), timm_encoder(sd).forward_features(x))


def test_a_run_starts_from_the_source_records_it_and_a_resume_does_not_read_it(tiny_cfg, tmp_path):
    sd = official_mae_state_dict(with_decoder=False, seed=4)
    path = official_checkpoint(tmp_path / "mae.pth", sd)
    # an lr of ~0 keeps the weights where init_from put them: the checkpoint after one step shows the start
    args = [f"train.init_from={path}", "optim.lr=1e-12", "optim.weight_decay=0", "train.keep_last=5"]
    first = pretrain(tiny_cfg(*args, "train.max_steps=1"))
    weights = load_checkpoint(first.checkpoint)["model"]
    torch.testing.assert_close(weights["encoder.blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"],
                               rtol=0, atol=1e-9)  # fmt: skip
    report = json.loads((first.out_dir / "init_from.json").read_text())
    assert report["source"] == str(path) and all(k.startswith("decoder.") for k in report["missing"])
    events = [json.loads(x) for x in first.metrics.read_text().splitlines() if '"init_from"' in x]
    assert events and events[0]["taken"] == len(report["matched"]) + len(report["fitted"])
    path.unlink()  # a resume continues from the run's own checkpoints
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=2"))
    assert resumed.step == 2
    from mimkit.report import build_report  # the report says where the run started

    summary = build_report(first.out_dir).summary
    assert summary["started from"].startswith(f"{path} (mae weights, converted: {events[0]['taken']} tensors taken")


def test_tables_and_channels_are_fitted_as_timm_fits_them():
    learned = torch.randn(1, 1 + 16, 32)
    fitted, how = fit_tensor("encoder.pos_embed", learned, torch.zeros(1, 1 + 64, 32), prefix_tokens=1)
    assert torch.equal(fitted, resample_abs_pos_embed(learned, new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1))
    assert "resampled 4x4 -> 8x8" in how
    fixed, how = fit_tensor("encoder.pos_embed", sincos_2d_pos_embed(32, 4), torch.zeros(1, 65, 32), prefix_tokens=1)
    assert torch.equal(fixed, sincos_2d_pos_embed(32, 8)) and "sin-cos" in how
    rgb = torch.randn(32, 3, 4, 4)
    gray, how = fit_tensor("encoder.patch_embed.proj.weight", rgb, torch.zeros(32, 1, 4, 4), prefix_tokens=1)
    assert torch.equal(gray, adapt_input_conv(1, rgb)) and torch.allclose(gray, rgb.sum(1, keepdim=True))
    assert "3 -> 1 input channels" in how
    assert fit_tensor("encoder.blocks.0.mlp.fc1.weight", rgb, torch.zeros(5, 5), 1)[0] is None


def test_a_teacher_copy_starts_as_the_encoder_from_a_mimkit_checkpoint(tiny_cfg):
    mae = pretrain(tiny_cfg("train.max_steps=1", out="mae"))
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_model("bootmae")))
    from mimkit.registry import method_spec

    new, report = initial_state(model, model.state_dict(), mae.checkpoint, method_spec("bootmae").teachers)
    source = load_checkpoint(mae.checkpoint)["model"]
    assert report.kind.startswith("mimkit mae checkpoint") and report.from_encoder
    assert torch.equal(new["ema_encoder.blocks.0.attn.qkv.weight"], source["encoder.blocks.0.attn.qkv.weight"])
    assert any(k.startswith("pixel_decoder.") for k in report.missing)  # BootMAE's decoders: not MAE's layout


def test_a_bad_source_is_one_line(tiny_cfg, tmp_path, capsys, npz_data):
    args = [
        "pretrain",
        *tiny_model("mae"),
        f"data.path={npz_data}",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.max_steps=1",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.out_dir={tmp_path / 'r'}",
    ]
    assert main([*args, f"train.init_from={tmp_path / 'nope.pth'}"]) == 2
    line = one_error_line(capsys)
    assert "train.init_from: " in line and "nope.pth does not exist" in line
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    assert main([*args, f"train.init_from={other}"]) == 2
    assert str(other) in one_error_line(capsys)
