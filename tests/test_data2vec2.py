"""data2vec 2.0 from mimkit's parts: inverse block masks, M masks per image sharing one EMA-teacher pass, targets the
mean of the teacher's top-K instance-normalised block outputs, a conv decoder, L2 on the masked patches; it trains,
resumes bit-identically, evaluates and exports like every method."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model, trains_resumes_evaluates_and_exports

from mimkit.config import ConfigError, load_config
from mimkit.masking import inverse_block_mask
from mimkit.methods import build_model
from mimkit.methods.data2vec2 import Data2Vec2
from mimkit.schedules import ema_decay_at

D2V = ["method=data2vec2", "mask.type=block", "mask.ratio=0.8", "data2vec2.num_masks=3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str) -> Data2Vec2:
    torch.manual_seed(0)
    return build_model(load_config(None, tiny_model("data2vec2") + D2V + list(overrides)))


def in_full_squares(visible: torch.Tensor) -> float:
    """The fraction of visible patches lying in some fully visible 2 x 2 square of the grid."""
    v = visible.float()[None, None]
    squares = torch.nn.functional.max_pool2d(1 - v, 2, stride=1) == 0  # (H-1, W-1): all four visible
    covered = torch.nn.functional.conv_transpose2d(squares.float(), torch.ones(1, 1, 2, 2))[0, 0] > 0
    return float((covered & visible).sum() / visible.sum())


def test_inverse_block_masks_keep_blocks_visible_at_the_exact_count():
    g = torch.Generator().manual_seed(0)
    masks = [inverse_block_mask((14, 14), 0.8, generator=g) for _ in range(50)]
    # the count: int(196 * (1 - 0.8)) = 39 visible in every mask (the ratio MAE's truncation gives), so samples batch
    assert all(int((~m).sum()) == 39 for m in masks)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 50
    # the structure: visible patches come in (3 x 3) blocks; uniform random masks at the same count rarely do
    blocky = np.mean([in_full_squares(~m) for m in masks])
    rand = []
    for _ in range(50):
        v = torch.zeros(196, dtype=torch.bool)
        v[torch.randperm(196, generator=g)[:39]] = True
        rand.append(in_full_squares(v.view(14, 14)))
    assert blocky > 0.5 and np.mean(rand) < 0.15, (blocky, np.mean(rand))
    # a pure function of the generator's state
    a = inverse_block_mask((8, 8), 0.8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, inverse_block_mask((8, 8), 0.8, generator=torch.Generator().manual_seed(3)))
    assert int((~a).sum()) == 12  # int(64 * 0.2)


def test_the_m_masks_of_a_sample_are_independent_and_depend_only_on_its_generator():
    model = tiny("data2vec2.num_masks=4", "model.img_size=32")  # 8 x 8 patches
    a = model.mask_inputs(torch.Generator().manual_seed(5))["mask"]
    b = model.mask_inputs(torch.Generator().manual_seed(5))["mask"]
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert (~a).sum(1).tolist() == [12] * 4  # equal counts: the B x M sequences batch
    assert len({tuple(m.tolist()) for m in a}) == 4  # independent draws (not EMAE's partition: they may overlap)


def test_targets_are_the_mean_of_the_top_k_instance_normalised_block_outputs():
    model = tiny("model.depth=3", "data2vec2.top_k_blocks=2").eval()
    imgs = torch.randn(2, 3, 16, 16)
    enc = model.teacher.encoder
    with torch.no_grad():  # by hand: the teacher on the whole image, blocks 1 and 2 (the top 2 of 3), cls dropped
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        outs = []
        for block in enc.blocks:
            x = block(x)
            outs.append(x[:, 1:])
        normed = [(o - o.mean(1, keepdim=True)) / torch.sqrt(o.var(1, unbiased=False, keepdim=True) + 1e-5)
                  for o in outs[1:]]  # fmt: skip
        expected = (normed[0] + normed[1]) / 2
        torch.testing.assert_close(model.targets(imgs), expected, rtol=1e-5, atol=1e-5)
        # a shallow encoder averages all its blocks
        assert tiny("data2vec2.top_k_blocks=8").teacher.blocks == (0, 1)
        # the loss: squared L2 over the channels / sqrt(D), averaged over the masked patches of the B x M sequences
        mask = torch.stack([model.mask_inputs(torch.Generator().manual_seed(i))["mask"] for i in range(2)])
        out = model(imgs, mask=mask)
        err = (out.pred - expected.unsqueeze(1)).pow(2).sum(-1) / math.sqrt(32)
        torch.testing.assert_close(out.loss, err[mask].mean())
        assert out.mask.shape == mask.shape and torch.equal(out.mask.bool(), mask)


def test_the_cls_term_regresses_the_students_cls_onto_the_mean_target():
    model = tiny("data2vec2.cls_loss_weight=0.5").eval()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(imgs)
    assert float(out.cls) > 0
    torch.testing.assert_close(out.loss, out.regression + 0.5 * out.cls)
    assert float(tiny().eval()(imgs).cls) == 0.0


def test_the_ema_decay_anneals_linearly_over_the_run_and_the_teacher_follows_it():
    assert ema_decay_at(0, 100, 0.9998, 0.99999) == 0.9998
    assert math.isclose(ema_decay_at(50, 100, 0.9998, 0.99999), (0.9998 + 0.99999) / 2)
    assert ema_decay_at(100, 100, 0.9998, 0.99999) == ema_decay_at(500, 100, 0.9998, 0.99999) == 0.99999
    model = tiny("data2vec2.ema_decay=0.5", "data2vec2.ema_end_decay=0.9")
    model.set_progress(3, 2, 10)  # the update after step 3 is the 4th: 0.9 - 0.4 * (1 - 4 / 10) = 0.66
    assert math.isclose(model.current_decay(), 0.66) and math.isclose(model(torch.randn(1, 3, 16, 16)).ema_decay, 0.66)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.encoder.parameters()]
    model.after_step(3)
    for t, s, b in zip(model.teacher.encoder.parameters(), model.encoder.parameters(), before):
        torch.testing.assert_close(t, 0.66 * b + 0.34 * s if s.requires_grad else b)  # the frozen pos-embed stays


def test_gradients_reach_the_student_and_decoder_only_and_the_teacher_stays_in_eval():
    model = tiny("model.drop_path_rate=0.5").train()
    assert not model.teacher.encoder.training and model.encoder.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model(torch.randn(2, 3, 16, 16)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoder.", "decoder.")) and p.requires_grad:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name


def test_one_teacher_pass_serves_the_m_masks_of_each_image():
    model = tiny("data2vec2.num_masks=4").train()
    teacher_calls, student_batch, teacher_batch, embeds = [], [], [], []
    model.teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: student_batch.append(i[0].shape[0]))
    model.teacher.encoder.blocks[0].register_forward_hook(lambda m, i, o: teacher_batch.append(i[0].shape[0]))
    model.encoder.patch_embed.register_forward_hook(lambda m, i, o: embeds.append(i[0].shape[0]))
    out = model(torch.randn(3, 3, 16, 16))
    assert len(teacher_calls) == 1 and teacher_batch == [3]  # the whole images, once
    assert student_batch == [3 * 4] and embeds == [3]  # B x M visible-token sequences; each image embedded once
    assert out.pred.shape == (3, 4, 16, 32) and out.mask.shape == (3, 4, 16)


def test_other_mask_types_and_bad_values_are_refused_in_one_line():
    for override, words in [("mask.type=hybrid", "mask.type hybrid does not compose with method data2vec2"),
                            ("data2vec2.decoder_groups=5", "data2vec2.decoder_groups 5 must divide"),
                            ("data2vec2.num_masks=0", "data2vec2.num_masks must be >= 1")]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            load_config(None, tiny_model("data2vec2") + [override])
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_data2vec2_trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, capsys):
    a, _ = trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, *D2V, "model.drop_path_rate=0.1",
                                             "data2vec2.cls_loss_weight=0.01")  # fmt: skip
    assert {"teacher.encoder.cls_token", "decoder.proj.weight"} <= set(a["model"])
    assert not torch.equal(a["model"]["teacher.encoder.blocks.0.attn.qkv.weight"],
                           a["model"]["encoder.blocks.0.attn.qkv.weight"])  # the teacher moved slower  # fmt: skip
    assert "done: knn top-1" in capsys.readouterr().out


def test_the_recipe_loads():
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "data2vec2_vit_tiny_cifar10.yaml"))
    assert cfg.method == "data2vec2" and cfg.mask.type == "block" and cfg.mask.ratio == 0.8
    model = build_model(cfg)
    assert model.teacher.blocks == tuple(range(4, 12)) and model.mask_inputs(torch.Generator())["mask"].shape == (4, 64)
