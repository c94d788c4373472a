"""EMAE: parallel disjoint masks, one batched forward, self-consistency term."""

import pytest
import torch
from conftest import TINY_MODEL

from mimkit.config import ConfigError, load_config
from mimkit.masking import parallel_masks, parts_for_ratio, random_mask
from mimkit.methods import build_model
from mimkit.methods.emae import EMAE, consistency_loss
from mimkit.train import pretrain


def tiny_emae(*overrides) -> EMAE:
    return build_model(load_config(None, TINY_MODEL + ["method=emae", *overrides]))


@pytest.mark.parametrize("ratio,parts", [(0.75, 4), (0.5, 2), (0.8, 5)])
def test_parts_partition_the_patches_of_every_image(ratio, parts):
    assert parts_for_ratio(ratio) == parts
    num = 20 * parts
    m = parallel_masks(6, num, parts, generator=torch.Generator().manual_seed(0))
    visible = (m.mask == 0).float()
    assert torch.equal(visible.sum(1), torch.ones(6, num))  # every patch visible in exactly one part
    assert torch.equal(visible.sum(2), torch.full((6, parts), float(num // parts)))
    for b in range(6):
        for k in range(parts):
            assert set(m.ids_keep[b, k].tolist()) == set(visible[b, k].nonzero().squeeze(1).tolist())
    with pytest.raises(ValueError, match="whole K"):
        parts_for_ratio(0.7)


def test_part_zero_is_maes_random_mask_for_the_same_noise():
    noise = torch.rand(3, 16)
    assert torch.equal(parallel_masks(3, 16, 4, noise=noise).mask[:, 0], random_mask(3, 16, 0.75, noise=noise).mask)


def test_consistency_compares_exactly_the_patches_masked_in_both_parts():
    b, parts, num, dim = 2, 4, 8, 3
    pred = torch.randn(b, parts, num, dim)
    mask = parallel_masks(b, num, parts, generator=torch.Generator().manual_seed(1)).mask
    # independent computation: loop over images, pairs and patches
    total, count = 0.0, 0
    for i in range(b):
        for p in range(parts):
            for q in range(parts):
                if p == q:
                    continue
                for n in range(num):
                    if mask[i, p, n] == 1 and mask[i, q, n] == 1:
                        total += float(((pred[i, p, n] - pred[i, q, n]) ** 2).mean())
                        count += 1
    assert count == b * parts * (parts - 1) * (num - 2 * num // parts)  # |M_i ∩ M_j| = N - 2N/K
    torch.testing.assert_close(consistency_loss(pred, mask), torch.tensor(total / count))
    # changing the prediction of a patch visible in part p (so masked in no pair with p) changes nothing
    visible_in_0 = (mask[0, 0] == 0).nonzero()[0, 0]
    pred2 = pred.clone()
    pred2[0, 0, visible_in_0] += 10
    torch.testing.assert_close(consistency_loss(pred2, mask), consistency_loss(pred, mask))


def test_stop_gradient_detaches_the_partner():
    pred = torch.randn(1, 2, 4, 3, requires_grad=True)
    mask = torch.ones(1, 2, 4)
    consistency_loss(pred, mask, stop_gradient=True).backward()
    g_sg = pred.grad.clone()
    pred.grad = None
    consistency_loss(pred, mask, stop_gradient=False).backward()
    torch.testing.assert_close(pred.grad, 2 * g_sg)  # both directions: gradient doubles without stop-grad


def test_lambda_zero_is_k_independent_mae_losses():
    model = tiny_emae("emae.consistency_weight=0").eval()
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    out = model(imgs, noise=noise)
    masks = parallel_masks(3, 16, 4, noise=noise).mask
    per_part = [super(EMAE, model).forward(imgs, mask=masks[:, k]).loss for k in range(4)]
    torch.testing.assert_close(out.loss, torch.stack(per_part).mean())
    assert out.pred.shape == (3, 4, 16, 48)
    # and the batched forward gives each part what a separate MAE forward gives
    for k in range(4):
        torch.testing.assert_close(out.pred[:, k], super(EMAE, model).forward(imgs, mask=masks[:, k]).pred)


def test_weighted_total_and_checkpoint_layout():
    model = tiny_emae("emae.consistency_weight=0.5").eval()
    out = model(torch.randn(2, 3, 16, 16), noise=torch.rand(2, 16))
    torch.testing.assert_close(out.loss, out.reconstruction + 0.5 * out.consistency)
    assert out.consistency > 0
    keys = set(model.state_dict())
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)


def test_reconstruction_grid_shows_part_zero():
    from mimkit.visualize import reconstruct

    model = tiny_emae()
    images = torch.rand(2, 3, 16, 16)
    recs = reconstruct(model, images, seed=0)
    noise = model.mask_inputs(torch.Generator().manual_seed(0))["noise"]
    assert torch.equal(recs[0].patch_mask, random_mask(1, 16, 0.75, noise=noise[None]).mask[0])
    visible = ~recs[0].mask
    assert torch.equal(recs[0].pasted[:, visible], images[0][:, visible])


def test_config_checks_the_ratio(tiny_cfg):
    with pytest.raises(ConfigError, match="must be 1 - 1/K"):
        load_config(None, ["method=emae", "mask.ratio=0.7"])


def test_emae_trains_and_resumes_exactly(tiny_cfg):
    straight = pretrain(tiny_cfg("method=emae", "train.max_steps=6", out="a"))
    pretrain(tiny_cfg("method=emae", "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg("method=emae", "train.max_steps=6", out="b"))
    from mimkit.checkpoint import load_checkpoint

    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    last = json.loads(straight.metrics.read_text().splitlines()[-1])
    assert {"reconstruction", "consistency"} <= set(last)
