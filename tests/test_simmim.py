"""SimMIM, the method written from mimkit's parts in one file: its mask, encoder pass and loss follow the
paper's definitions; it trains, resumes bit-identically, evaluates and exports like every method."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import knn_cli, tiny_model

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.interop import export_timm, load_mimkit_checkpoint
from mimkit.masking import coarse_random_mask
from mimkit.methods import build_model
from mimkit.methods.simmim import SimMIM
from mimkit.models import patchify, unpatchify
from mimkit.train import pretrain

SIMMIM = ["method=simmim", "simmim.mask_patch_size=8", "mask.ratio=0.6"]  # 16-px images, 4-px patches: 2x2 cells

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_mask_masks_whole_cells_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = coarse_random_mask((8, 8), 2, 0.6, g)
        cells = m.view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
        assert bool((cells.all(1) | ~cells.any(1)).all())  # each 2x2 cell is all masked or all visible
        assert int(cells.all(1).sum()) == 10  # ceil(0.6 * 16)
    a = coarse_random_mask((8, 8), 2, 0.6, torch.Generator().manual_seed(3))
    b = coarse_random_mask((8, 8), 2, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_masked_patches_enter_the_encoder_as_the_mask_token_and_the_loss_is_l1_on_their_pixels():
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_model("simmim") + SIMMIM)).eval()
    assert isinstance(model, SimMIM)
    imgs = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16)
    mask[0, [0, 1, 4, 5]] = 1
    mask[1, [10, 11, 14, 15]] = 1
    with torch.no_grad():
        out = model(imgs, mask=mask)
        # the paper's loss on the pixel grid: mean |x - x_rec| over masked pixels and channels
        rec = unpatchify(out.pred, 4, (4, 4))
        pix = mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
        expected = (F.l1_loss(rec, imgs, reduction="none") * pix).sum() / (pix.sum() + 1e-5) / 3
        torch.testing.assert_close(out.loss, expected)
        # what a masked patch looked like does not matter; a visible patch's content does
        changed = imgs.clone()
        changed[0, :, :4, :4] += 5.0  # patch 0 of image 0: masked
        torch.testing.assert_close(model(changed, mask=mask).pred[0], out.pred[0])
        changed[0, :, 8:12, 8:12] += 5.0  # patch 10 of image 0: visible
        assert not torch.allclose(model(changed, mask=mask).pred[0], out.pred[0])
    assert out.pred.shape == (2, 16, 48) and torch.equal(patchify(imgs, 4), model.target(imgs))


def test_config_checks_the_mask_cell():
    with pytest.raises(ConfigError, match="simmim.mask_patch_size 6 must be a multiple"):
        load_config(None, tiny_model("simmim") + ["simmim.mask_patch_size=6"])
    with pytest.raises(ConfigError, match="mask.type block does not compose with method simmim"):
        load_config(None, tiny_model("simmim") + SIMMIM + ["mask.type=block"])


def test_simmim_trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, capsys):
    args = [*SIMMIM, "model.drop_path_rate=0.1"]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and np.isfinite(straight.loss)
    assert {"mask_token", "head.weight"} <= set(a["model"])
    # export: the encoder loads into timm unchanged, features identical
    model, _, _ = load_mimkit_checkpoint(straight.checkpoint)
    export_timm(straight.checkpoint, tmp_path / "timm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
                                   .forward_features(x), model.encoder.forward_features(x), rtol=0, atol=0)  # fmt: skip
    # evaluation: k-NN on its checkpoint, like any method
    data = tiny_cfg().data.path
    assert knn_cli(straight.checkpoint, data, tmp_path / "knn") == 0
    assert "done: knn top-1" in capsys.readouterr().out


def test_the_recipe_loads():
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "simmim_vit_tiny_cifar10.yaml"))
    assert cfg.method == "simmim" and cfg.simmim.mask_patch_size == 8 and cfg.mask.ratio == 0.6
