"""Checkpoints written by mimkit 0.1.0 (tests/fixtures/v0.1.0, made by its make_fixtures.py with that
version) keep loading, exporting, evaluating and resuming — exactly, for MAE, given 0.1.0's settings."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.checkpoint import load_checkpoint
from mimkit.interop import export_timm, load_mimkit_checkpoint
from mimkit.train import pretrain

from conftest import TINY_MODEL, TINY_TOKENIZER, make_images

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1.0"
METHODS = {"mae": [], "emae": ["method=emae"], "bootmae": ["method=bootmae", "mask.type=hybrid"],
           "beit": ["method=beit", "mask.type=block", "mask.ratio=0.4", *TINY_TOKENIZER],
           "mcbeit": ["method=mcbeit", "mask.type=random", "mask.ratio=0.4", *TINY_TOKENIZER]}  # fmt: skip
# 0.1.0's choices that later versions changed by default (issue 16): its weight-decay exemptions and
# exact-count block masks
V010_SETTINGS = ["optim.no_weight_decay=['*pos_embed','*cls_token','*mask_token']", "mask.block_generator=exact"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "tiny.npz"  # the fixtures' data, regenerated (make_images is deterministic)
    np.savez(path, x_train=make_images(32), y_train=np.arange(32) % 4)
    return path


def run_args(method, data, out, *extra):
    from mimkit.config import load_config

    return load_config(None, TINY_MODEL + METHODS[method] + [
        f"data.path={data}", "data.num_workers=0", "train.batch_size=8", "train.epochs=2", "train.precision=fp32",
        "train.progress=false", "train.tensorboard=false", "optim.blr=1e-3", "optim.warmup_epochs=1",
        "train.keep_last=10", f"train.out_dir={out}", *extra])  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_a_0_1_0_checkpoint_loads_exports_and_resumes(method, data, tmp_path):
    ckpt = FIXTURES / f"{method}-checkpoint-00000002.pt"
    state = load_checkpoint(ckpt)
    assert state["mimkit_version"] == "0.1.0" and state["method"] == method and state["step"] == 2
    model, cfg, _ = load_mimkit_checkpoint(ckpt)
    x = torch.randn(2, 3, 16, 16)
    written = export_timm(ckpt, tmp_path / "timm")
    import timm

    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.forward_features(x), model.encoder.forward_features(x), rtol=0, atol=0)
    assert written["weights"].is_file()
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint-00000002.pt")
    resumed = pretrain(run_args(method, data, run, "train.max_steps=4"))
    assert resumed.step == 4 and np.isfinite(resumed.loss)


def test_a_0_1_0_mae_run_resumes_bit_identically_with_its_settings(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "mae-checkpoint-00000002.pt", run / "checkpoint-00000002.pt")
    resumed = pretrain(run_args("mae", data, run, "train.max_steps=4", *V010_SETTINGS))
    ours, theirs = load_checkpoint(resumed.checkpoint), load_checkpoint(FIXTURES / "mae-checkpoint-00000004.pt")
    for k, v in theirs["model"].items():
        assert torch.equal(ours["model"][k], v), k
    for name, st in theirs["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(ours["optimizer"]["state"][name][k], v), (name, k)
