"""Parts compose by configuration: MAE with block, hybrid and parallel masks (MAE + parallel masks +
self-consistency is EMAE), MAE with CrossMAE's decoder and each visible-token mask, BootMAE with parallel masks. Each composition trains, resumes bit-identically and
evaluates; a combination that is not defined is refused with the reason."""

import pytest
import torch
from conftest import TINY_MODEL, knn_cli, tiny_model

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.methods import build_model
from mimkit.train import pretrain

COMPOSITIONS = {
    "mae+block": ["mask.type=block"],
    "mae+hybrid": ["mask.type=hybrid", "mask.hybrid_block_ratio=0.4", "mask.hybrid_max_block_ratio=0.25"],
    "mae+parallel": ["mask.type=parallel"],
    "bootmae+parallel": ["method=bootmae", "mask.type=parallel"],
    # CrossMAE's decoder on a quarter of the masked patches, with each visible-token mask MAE takes
    "mae+crossmae": ["mae.decoder=crossmae", "mae.reconstruct_ratio=0.25"],
    "mae+crossmae+block": [
        "mae.decoder=crossmae",
        "mae.reconstruct_ratio=0.25",
        "mask.type=block",
        "mae.decoder_context_blocks=all",
    ],
    "mae+crossmae+hybrid": [
        "mae.decoder=crossmae",
        "mae.reconstruct_ratio=0.5",
        "mask.type=hybrid",
        "mask.hybrid_block_ratio=0.4",
        "mask.hybrid_max_block_ratio=0.25",
    ],
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_a_composition_trains_resumes_exactly_and_evaluates(name, tiny_cfg, tmp_path, capsys):
    args = [*COMPOSITIONS[name], "model.drop_path_rate=0.1", "train.epochs=8", "data.num_samples=32"]  # 4 steps/epoch
    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    data = tiny_cfg().data.path
    assert knn_cli(straight.checkpoint, data, tmp_path / "knn") == 0
    assert "done: knn top-1" in capsys.readouterr().out


def test_mae_with_parallel_masks_is_emae():
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    imgs = torch.randn(2, 3, 16, 16)
    outs = []
    for method in (["mask.type=parallel"], ["method=emae"]):
        torch.manual_seed(0)
        model = build_model(load_config(None, TINY_MODEL + method)).eval()
        with torch.no_grad():
            outs.append(model(imgs, noise=noise))
    assert type(outs[0]) is type(outs[1]) and outs[0].pred.shape[1] == 4  # K = 4 parts at ratio 0.75
    for field in ("loss", "pred", "reconstruction", "consistency"):
        assert torch.equal(getattr(outs[0], field), getattr(outs[1], field)), field


def test_mae_hybrid_masks_have_the_exact_count_and_blocks():
    model = build_model(load_config(None, TINY_MODEL + COMPOSITIONS["mae+hybrid"]))
    for seed in range(10):
        mask = model.mask_inputs(torch.Generator().manual_seed(seed))["mask"]
        assert int(mask.sum()) == 12  # 16 patches - int(16 * 0.25) visible


@pytest.mark.parametrize("method,mask,why", [
    ("beit", "parallel", "does not compose with method beit"),
    ("mcbeit", "hybrid", "does not compose with method mcbeit"),
    ("simmim", "block", "does not compose with method simmim"),
])  # fmt: skip
def test_an_undefined_combination_is_refused_with_the_reason(method, mask, why):
    with pytest.raises(ConfigError, match=why):
        load_config(None, tiny_model(method) + [f"mask.type={mask}", "tokenizer.kind=random"])
