"""MaskFeat as a preset of parts: the HOG target equals scikit-image's `hog` on the same cells, masked patches enter
the encoder as the mask token and the loss is MSE on their HOG, masks are BEiT's blocks at 40%; it trains, resumes,
evaluates and exports like every method (the registry-driven tests cover exact resume, bf16, FSDP units)."""

import numpy as np
import pytest
import torch
from conftest import tiny_model, trains_resumes_evaluates_and_exports
from skimage.feature import hog

from mimkit.config import ConfigError, load_config
from mimkit.files import InteropError
from mimkit.methods import build_model
from mimkit.targets import hog_features
from mimkit.visualize import visualize

MASKFEAT = ["method=maskfeat", "mask.type=block", "mask.ratio=0.4"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cell", [2, 4, 8])
def test_hog_equals_scikit_image_on_the_same_cells(cell):
    """With central differences and no gaussian window, each channel's cell histograms are skimage's (one cell per
    block, L2). skimage measures orientations from the horizontal axis, MaskFeat's from the vertical one: the same
    histograms on the transposed image."""
    rng = np.random.default_rng(cell)
    img = rng.random((3, 16, 16))
    ours = hog_features(torch.from_numpy(img.transpose(0, 2, 1).copy())[None], patch_size=16, cell=cell,
                        gradient="central", window=False)  # fmt: skip
    per_cell = ours.view(3, 9, 16 // cell, 16 // cell)  # one 16-px patch: (channel, bin, cell row, cell column)
    for c in range(3):
        expected = hog(img[c], orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(1, 1), block_norm="L2",
                       feature_vector=False)[:, :, 0, 0, :]  # (rows, cols, bins)  # fmt: skip
        got = per_cell[c].permute(2, 1, 0).numpy()  # transposed back: (rows, cols, bins) of the original image
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # MaskFeat's own setting (Sobel gradients, a gaussian window per patch) is a different, also normalised, feature
    default = hog_features(torch.from_numpy(img)[None].float(), patch_size=16, cell=cell)
    assert not torch.allclose(default, ours.float(), atol=1e-3)


def test_masked_patches_enter_the_encoder_as_the_mask_token_and_the_loss_is_mse_on_their_hog():
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_model("maskfeat") + MASKFEAT)).eval()
    imgs = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, :6] = 1
    out = model(imgs, mask=mask)
    target = hog_features(imgs, 4)
    expected = ((out.pred - target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, (expected * mask).sum() / mask.sum())
    assert out.pred.shape == (2, 16, 3 * 9 * 4)
    # a masked patch's pixels cannot reach the encoder: changing them changes no prediction
    changed = imgs.clone()
    changed[:, :, :4, :4] += 5.0  # patch 0, masked
    torch.testing.assert_close(model(changed, mask=mask).pred, out.pred)
    changed[:, :, 12:, 12:] += 5.0  # patch 15, visible
    assert not torch.allclose(model(changed, mask=mask).pred, out.pred)


def test_block_masks_at_40_percent_and_the_config_checks():
    model = build_model(load_config(None, tiny_model("maskfeat") + MASKFEAT + ["model.img_size=32"]))
    counts = [int(model.mask_inputs(torch.Generator().manual_seed(s))["mask"].sum()) for s in range(30)]
    assert model.num_masked == 64 - int(64 * 0.6) and max(counts) <= model.num_masked and min(counts) >= 16
    assert model.mask_inputs(torch.Generator().manual_seed(1))["mask"].equal(
        model.mask_inputs(torch.Generator().manual_seed(1))["mask"]
    )
    with pytest.raises(ConfigError, match="method maskfeat: its HOG cells are half a patch"):
        load_config(None, tiny_model("maskfeat") + ["model.patch_size=5", "model.img_size=20"])
    with pytest.raises(ConfigError, match="mask.type parallel does not compose with method maskfeat"):
        load_config(None, tiny_model("maskfeat") + ["mask.type=parallel"])


def test_maskfeat_trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path):
    a, checkpoint = trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, *MASKFEAT, "model.drop_path_rate=0.1")
    assert a["model"]["head.weight"].shape == (3 * 9 * 4, 32)  # the HOG width
    with pytest.raises(InteropError, match="does not predict pixels"):
        visualize(checkpoint, [], tmp_path / "vis")


def test_the_recipe_loads():
    cfg = load_config("configs/maskfeat_vit_tiny_cifar10.yaml")
    assert (cfg.method, cfg.mask.type, cfg.mask.ratio) == ("maskfeat", "block", 0.4)
