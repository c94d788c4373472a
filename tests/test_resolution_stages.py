"""Progressive resolution (train.resolution_stages): early epochs at a smaller input size, the position tables
resampled to its grid, masks drawn on it; the same model and checkpoints; exact resume across a stage change."""

import pytest
import torch
from conftest import TINY_MODEL
from test_resume_exact import assert_same_tensors

from mimkit.checkpoint import load_checkpoint
from mimkit.config import load_config
from mimkit.errors import MimkitError
from mimkit.methods import build_model
from mimkit.models import resampled_pos_embed, sincos_2d_pos_embed
from mimkit.pipeline import PretrainData
from mimkit.train import pretrain, resolution_stages

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = "train.resolution_stages=[[0, 8], [1, 16]]"  # the tiny model is 16 px, patch 4: a 2 x 2 grid, then 4 x 4


def test_a_table_resampled_reads_each_new_patch_at_its_centre():
    """Bicubic without antialiasing reproduces a table linear in position exactly where its 4-tap support lies
    inside the grid: entry (i, j) of the 4 x 4 table read from the 8 x 8 one is position (2i + 0.5, 2j + 0.5)."""
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    table = torch.cat([torch.full((1, 1, 2), -7.0), torch.stack([rows, cols], -1).reshape(1, 64, 2)], dim=1)
    out = resampled_pos_embed(table, (4, 4))
    assert out.shape == (1, 17, 2) and torch.equal(out[:, 0], table[:, 0])  # the cls row as it was
    grid = out[0, 1:].reshape(4, 4, 2)
    expect = torch.tensor([2.5, 4.5])  # the interior rows / columns (1 and 2)
    torch.testing.assert_close(grid[1:3, 1:3, 0], expect[:, None].expand(2, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(grid[1:3, 1:3, 1], expect[None, :].expand(2, 2), rtol=0, atol=1e-5)
    assert resampled_pos_embed(table, (8, 8)) is table  # its own grid: untouched
    sincos = sincos_2d_pos_embed(16, 8, cls_token=False)
    assert resampled_pos_embed(sincos, (6, 6), prefix_tokens=0).shape == (1, 36, 16)


@pytest.mark.parametrize("decoder", ["mae", "crossmae"])
def test_smaller_inputs_run_as_a_model_built_at_that_size_with_the_resampled_tables(decoder):
    """MAE (and its CrossMAE decoder) on 8-px inputs equals, output for output, the same weights built for 8 px
    whose position tables are the 16-px model's resampled: the resampled tables reach the encoder and the decoder."""
    common = [*TINY_MODEL, f"mae.decoder={decoder}"]
    torch.manual_seed(0)
    big = build_model(load_config(None, common)).eval()
    small = build_model(load_config(None, [*common, "model.img_size=8"])).eval()
    state = {k: v for k, v in big.state_dict().items() if "pos_embed" not in k}
    small.load_state_dict(state, strict=False)
    small.encoder.pos_embed.data.copy_(resampled_pos_embed(big.encoder.pos_embed, (2, 2)))
    prefix = 0 if decoder == "crossmae" else 1
    small.decoder.decoder_pos_embed.data.copy_(resampled_pos_embed(big.decoder.decoder_pos_embed, (2, 2), prefix))
    big.encoder.patch_embed.strict_img_size = False
    imgs, noise = torch.randn(3, 3, 8, 8), torch.rand(3, 4)
    a, b = big(imgs, noise=noise), small(imgs, noise=noise)
    assert a.pred.shape == (3, 4, 48) and torch.isfinite(a.loss)
    torch.testing.assert_close(a.pred, b.pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    # and the check can fail: the 16-px tables' first rows instead of the resampled ones change the output
    small.encoder.pos_embed.data.copy_(big.encoder.pos_embed[:, :5])
    assert not torch.allclose(small(imgs, noise=noise).pred, a.pred, atol=1e-4)


def test_each_epoch_gets_its_stage_size_and_masks_on_its_grid(tiny_cfg):
    cfg = tiny_cfg(STAGES, "mae.decoder=crossmae")
    model = build_model(cfg)
    data = PretrainData(cfg, 16, model.mask_inputs, 8, 1, stages=resolution_stages(cfg, model))
    for epoch, side in ((0, 8), (1, 16), (2, 16), (0, 8)):  # back to epoch 0: a resume into the first stage
        batch = next(iter(data.epoch_batches(epoch)))
        grid = (side // 4) ** 2
        assert batch["image"].shape == (8, 3, side, side), epoch
        assert batch["noise"].shape == batch["select_noise"].shape == (8, grid), epoch
    assert model.encoder.patch_embed.strict_img_size is False  # timm's size check lets the smaller stage through


def test_a_run_across_a_stage_change_resumes_bit_identically_and_ends_at_full_size(tiny_cfg):
    args = [STAGES, "model.drop_path_rate=0.2", "train.keep_last=10", "data.num_workers=1"]
    straight = pretrain(tiny_cfg(*args, out="a"))  # 8 steps an epoch, 2 epochs: 8 px, then 16 px
    # stopped inside the 16-px stage (epoch 1), and inside the 8-px one (epoch 0)
    assert pretrain(tiny_cfg(*args, "train.max_steps=11", out="b")).step == 11 > straight.step // 2
    assert pretrain(tiny_cfg(*args, "train.max_steps=3", out="c")).step == 3 < straight.step // 2
    for out in ("b", "c"):
        resumed = pretrain(tiny_cfg(*args, out=out))
        a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
        assert_same_tensors(a["model"], b["model"], f"model resumed in {out}")
    # the stages changed the run: the same run at 16 px throughout ends elsewhere
    plain = load_checkpoint(pretrain(tiny_cfg(*args[1:], out="d")).checkpoint)
    assert not torch.equal(plain["model"]["encoder.blocks.0.attn.qkv.weight"],
                           a["model"]["encoder.blocks.0.attn.qkv.weight"])  # fmt: skip
    assert a["model"]["encoder.pos_embed"].shape == (1, 17, 32)  # the checkpoint holds the full-size model


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["method=simmim", "train.resolution_stages=[[0, 8], [1, 16]]"], "method simmim"),
        (["mask.type=parallel", "train.resolution_stages=[[0, 8], [1, 16]]"], "mask.type parallel"),
        (["mask.count=10", "train.resolution_stages=[[0, 8], [1, 16]]"], "mask.count"),
        (["train.resolution_stages=[[1, 8], [2, 16]]"], "start at 0"),
        (["train.resolution_stages=[[0, 8], [0, 16]]"], "increase"),
        (["train.resolution_stages=[[0, 8], [5, 16]]"], "train.epochs 2"),
        (["train.resolution_stages=[[0, 6], [1, 16]]"], "multiple of the patch size 4"),
        (["train.resolution_stages=[[0, 8], [1, 12]]"], "must be model.img_size 16"),
        (["train.resolution_stages=[[0, 32], [1, 16]]"], "in (0, model.img_size 16]"),
    ],
)
def test_bad_stages_are_refused_naming_the_key(tiny_cfg, overrides, says):
    with pytest.raises(MimkitError, match="train.resolution_stages") as info:
        tiny_cfg(*overrides)
    assert says in str(info.value)
