"""I-JEPA: the multi-block masks against the official collator's rules, the target by formula, the schedules, where the
gradients go, FSDP units, and training / resume / evaluation / export (timm and transformers' IJepaModel)."""

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import knn_cli, tiny_model

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.eval.config import load_eval_config
from mimkit.eval.embed import embed
from mimkit.eval.encoders import encoder_source
from mimkit.eval.finetune import build_finetune_model
from mimkit.eval.linprobe import run_linprobe
from mimkit.interop import export_timm, load_mimkit_checkpoint
from mimkit.masking import MultiBlockMasks, multiblock_ids, multiblock_place, multiblock_size
from mimkit.methods import build_model
from mimkit.models import transformer_blocks
from mimkit.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def rectangle(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the bounding box of a (H, W) mask."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_block_size_follows_the_official_collator():
    # one draw sets scale and aspect; area int(H W s); h, w rounded from sqrt(area * / aspect); never a whole side
    assert multiblock_size((14, 14), (0.15, 0.2), (0.75, 1.5), 0.0) == (5, 6)  # area 29, aspect 0.75
    assert multiblock_size((14, 14), (0.15, 0.2), (0.75, 1.5), 1.0) == (8, 5)  # area 39, aspect 1.5
    assert multiblock_size((14, 14), (0.85, 1.0), (1.0, 1.0), 1.0) == (13, 13)  # 14 shrunk to 13
    assert multiblock_size((8, 8), (0.85, 1.0), (1.0, 1.0), 0.0) == (7, 7)


def test_mask_statistics_follow_the_official_collator():
    masks = MultiBlockMasks((14, 14), 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), min_keep=10)  # the ViT-H/14 recipe
    g = torch.Generator().manual_seed(0)
    overlapping, relaxed, sizes = 0, 0, set()
    possible = {multiblock_size((14, 14), (0.15, 0.2), (0.75, 1.5), u / 10000) for u in range(10001)}
    for _ in range(300):
        out = masks(g)
        ctx, tgts = out["context"].view(14, 14), out["targets"].view(4, 14, 14)
        assert out["context"].shape == (196,) and out["targets"].shape == (4, 196)  # fixed size: batches
        boxes = [rectangle(t) for t in tgts]
        assert len({(h, w) for _, _, h, w in boxes}) == 1  # one size per image, for its 4 blocks
        for (top, left, h, w), t in zip(boxes, tgts):
            assert int(t.sum()) == h * w > 10  # whole rectangles, more than min_keep patches
            assert (h, w) in possible and 28 <= h * w <= 40  # scale 0.15-0.2 of 196 (29-39), aspect 0.75-1.5, rounded
            assert top + h <= 13 and left + w <= 13  # the official range: never on the last row / column
        sizes.add(boxes[0][2:])
        overlapping += any((tgts[i] & tgts[j]).any() for i in range(4) for j in range(i + 1, 4))
        # context: a square 13x13 block (0.85-1.0 of 196 -> side 13), at (0, 0) (the official range has one position)
        assert not ctx[13:].any() and not ctx[:, 13:].any() and int(ctx.sum()) > 10
        if (ctx & tgts.any(0)).any():  # the min-context rule relaxed the exclusion (drops the last target's region)
            relaxed += 1
        else:
            assert int(ctx.sum()) == 169 - int(tgts.any(0)[:13, :13].sum())  # the block less every target
    assert overlapping > 100 and len(sizes) > 3  # targets may overlap each other; sizes vary per image
    assert relaxed < 30  # the relaxation is rare at 14x14


def test_min_context_rule_relaxes_the_last_regions_first():
    g = torch.Generator().manual_seed(0)
    everything_out = [torch.zeros(8, 8, dtype=torch.bool)] * 2  # no allowed patch at all: both regions must go
    mask, block = multiblock_place((8, 8), (7, 7), g, 4, everything_out, tries=3)
    assert torch.equal(mask, block) and int(mask.sum()) == 49
    keep_left = torch.zeros(8, 8, dtype=torch.bool)
    keep_left[:, :3] = True  # allows 21 of the 49: kept, the impossible second region dropped
    mask, _ = multiblock_place((8, 8), (7, 7), g, 4, [keep_left, everything_out[0]], tries=3)
    assert int(mask.sum()) == 21
    with pytest.raises(ValueError, match="min_keep"):
        multiblock_place((8, 8), (2, 2), g, 4)  # a target too small for min_keep: refused, not drawn forever


def test_masks_are_a_function_of_the_generator_and_batch_by_truncation():
    masks = MultiBlockMasks((8, 8), min_keep=4)
    a = masks(torch.Generator().manual_seed(3))
    b = masks(torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ctx = torch.zeros(2, 8, dtype=torch.bool)
    ctx[0, [1, 4, 6]], ctx[1, [0, 2, 3, 7]] = True, True
    assert multiblock_ids(ctx).tolist() == [[1, 4, 6], [0, 2, 3]]  # the batch's smallest count, row-major first


def tiny(*extra):
    return build_model(load_config(None, [*tiny_model("ijepa"), *extra])).eval()


def test_target_is_the_layer_normed_last_block_of_the_ema_encoder_on_the_full_image():
    torch.manual_seed(0)
    model = tiny()
    enc = model.target_encoder
    with torch.no_grad():
        for p in enc.parameters():  # a target encoder that differs from the context encoder
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = enc.patch_embed(x) + enc.pos_embed
        for blk in enc.blocks:
            h = blk(h)
        h = enc.norm(h)
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        expected = (h - mu) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(model.targets(x), expected, rtol=1e-5, atol=1e-5)
    assert enc.cls_token is None and model.encoder.cls_token is None


def test_loss_is_smooth_l1_of_the_predictions_at_the_target_blocks():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    drawn = [model.mask_inputs(g) for _ in range(2)]
    ctx, tgt = torch.stack([d["context"] for d in drawn]), torch.stack([d["targets"] for d in drawn])
    out = model(x, context=ctx, targets=tgt)
    ci, ti = multiblock_ids(ctx), multiblock_ids(tgt)
    z = model.predictor(model.encode_context(x, ci), ci, ti)
    h = torch.stack([model.targets(x)[i][ti[i]] for i in range(2)])  # (B, M, K, D)
    torch.testing.assert_close(out.loss, F.smooth_l1_loss(z, h))
    # the targets' spread, logged to show a collapse: per feature the std over the target tokens, averaged
    torch.testing.assert_close(out.target_std, h.reshape(-1, h.shape[-1]).std(0).mean())
    collapsed = tiny()
    collapsed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in collapsed.target_encoder.blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
        collapsed.target_encoder.pos_embed.zero_()
        collapsed.target_encoder.patch_embed.proj.weight.zero_()  # every token the same: a collapsed target encoder
    assert collapsed(x, context=ctx, targets=tgt).target_std < 1e-3 < out.target_std
    l2 = tiny("ijepa.loss=l2")
    l2.load_state_dict(model.state_dict())
    torch.testing.assert_close(l2(x, context=ctx, targets=tgt).loss, F.mse_loss(z, h))


def test_momentum_and_weight_decay_schedules():
    model = tiny("optim.weight_decay=0.04")
    model.set_progress(0, 10, 100)
    assert model.momentum == 0.996
    model.set_progress(50, 10, 100)
    assert model.momentum == pytest.approx(0.998)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.after_step(50)  # EMA with this step's momentum
    for b, t, s in zip(before, model.target_encoder.parameters(), model.encoder.parameters()):
        if s.requires_grad:
            torch.testing.assert_close(t, 0.998 * b + 0.002 * s)
    wds = [model.weight_decay_at(i, 100) for i in range(100)]
    assert wds[0] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 100)))
    assert wds[-1] == pytest.approx(0.4) and all(a <= b for a, b in zip(wds, wds[1:]))


def test_gradients_reach_only_the_context_encoder_and_the_predictor():
    model = tiny().train()
    model(torch.randn(4, 3, 16, 16)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("target_encoder."):
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad and not name.startswith("encoder.norm"):  # all but nothing: the context path
            assert p.grad is not None, name
    assert not model.encoder.pos_embed.requires_grad and not model.predictor.pos_embed.requires_grad  # fixed sin-cos


def test_fsdp_units_cover_every_predictor_block():
    model = tiny("ijepa.predictor_depth=3")
    blocks = transformer_blocks(model)
    assert all(any(b is m for m in blocks) for b in model.predictor.blocks)
    assert len(blocks) == 2 + 3 + 2  # encoder, predictor, target encoder


def test_config_checks():
    with pytest.raises(ConfigError, match="min_keep"):
        load_config(None, [*tiny_model("ijepa"), "ijepa.min_keep=5"])
    with pytest.raises(ConfigError, match="predictor_heads"):
        load_config(None, [*tiny_model("ijepa"), "ijepa.predictor_dim=32", "ijepa.predictor_heads=3"])


def test_ijepa_trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, capsys):
    args = ["method=ijepa", "model.drop_path_rate=0.1", "optim.weight_decay=0.04"]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and np.isfinite(straight.loss)
    assert {"predictor.mask_token", "target_encoder.pos_embed"} <= set(a["model"])
    assert "encoder.cls_token" not in a["model"]
    wd = [g["weight_decay"] for g in a["optimizer"]["param_groups"]]
    assert sorted(wd)[0] == 0 and sorted(wd)[1] == pytest.approx(
        tiny().weight_decays[1] + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 6 / 16))
    )  # 16 steps
    model, _, _ = load_mimkit_checkpoint(straight.checkpoint)
    x = torch.randn(2, 3, 16, 16)
    # what is evaluated and exported is the EMA target encoder (the paper evaluates it), not the context encoder
    target = model.target_encoder
    with torch.no_grad():
        assert not torch.allclose(target.forward_features(x), model.encoder.forward_features(x), atol=1e-4)
    assert torch.equal(load_mimkit_checkpoint(straight.checkpoint, evaluated=True)[0].encoder.blocks[0].mlp.fc1.weight,
                       target.blocks[0].mlp.fc1.weight)  # fmt: skip
    # timm: the encoder loads unchanged, features identical
    export_timm(straight.checkpoint, tmp_path / "timm")
    net = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), target.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(net(x), target.forward_features(x).mean(1), rtol=0, atol=0)  # avg pool
    # transformers' IJepaModel: the same features, and one weight changed changes them
    from transformers import IJepaModel

    from mimkit.interop.export import export_hf

    export_hf(straight.checkpoint, tmp_path / "hf")
    hf = IJepaModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    with torch.no_grad():
        ours, theirs = target.forward_features(x), hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        hf.layers[1].mlp.fc2.weight[0, 0] += 1.0
        assert not torch.allclose(hf(pixel_values=x).last_hidden_state, ours, atol=1e-3)
    # evaluation: k-NN pools the patch tokens (features.pool auto), fine-tuning averages them
    data = tiny_cfg().data.path
    assert knn_cli(straight.checkpoint, data, tmp_path / "knn") == 0
    assert "done: knn top-1" in capsys.readouterr().out
    assert "pool: mean" in (tmp_path / "knn" / "config.yaml").read_text()
    common = [f"encoder.checkpoint={straight.checkpoint}", f"data.path={data}", "data.num_workers=0",
              "data.val_split=train", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
              "train.batch_size=8", "train.epochs=1", "train.max_steps=2"]  # fmt: skip
    probe_cfg = load_eval_config("linprobe", None, [*common, "probe.mode=cached", f"train.out_dir={tmp_path / 'lp'}"])
    source = encoder_source(probe_cfg.encoder)  # the target encoder's tensors
    assert source.state is not None and source.state.keys() == target.state_dict().keys()
    assert all(torch.equal(source.state[k], v) for k, v in target.state_dict().items())
    probe = run_linprobe(probe_cfg)
    assert probe.metrics["pool"] == "mean"
    cfg = load_eval_config("finetune", None, [*common, f"train.out_dir={tmp_path / 'ft'}"])
    net, report = build_finetune_model(cfg, num_classes=3)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and net.cls_token is None
    assert net.global_pool == "avg" and net(x).shape == (2, 3)
    with pytest.raises(ConfigError, match="no cls token"):
        build_finetune_model(load_eval_config("finetune", None, [*common, "model.global_pool=token"]), num_classes=3)
    with pytest.raises(ConfigError, match="no cls token"):
        run_linprobe(load_eval_config("linprobe", None, [*common, "probe.pool=cls", f"train.out_dir={tmp_path / 'x'}"]))
    emb = embed(str(straight.checkpoint), data, split="train", progress=False)
    assert emb.shape[1] == 32


def test_the_recipe_loads():
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "ijepa_vit_tiny_cifar10.yaml"))
    assert cfg.method == "ijepa" and cfg.ijepa.num_targets == 4 and cfg.optim.weight_decay == 0.04
    model = build_model(cfg)
    assert model.masks.min_keep == 8 and model.predictor.embed.out_features == cfg.ijepa.predictor_dim


def test_a_random_init_of_ijepas_encoder_is_the_one_its_pretraining_starts_from():
    """encoder.method=ijepa with checkpoint none: the encoder I-JEPA pretraining builds from the seed (no cls token,
    so features.pool auto is the mean of its patch tokens); MAE's stays the default; a checkpoint refuses it."""
    from mimkit.eval.encoders import build_encoder, encoder_source, resolve_pool

    sizes = ["encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16", "encoder.patch_size=4", "encoder.embed_dim=32",
             "encoder.depth=2", "encoder.num_heads=2"]  # fmt: skip
    cfg = load_eval_config("knn", None, ["encoder.checkpoint=none", "encoder.method=ijepa", *sizes, "data.path=x.npz"])
    encoder = build_encoder(encoder_source(cfg.encoder), seed=3)
    torch.manual_seed(3)
    model = build_model(load_config(None, tiny_model("ijepa")))
    assert encoder.cls_token is None and resolve_pool("auto", encoder) == "mean"
    assert encoder.state_dict().keys() == model.encoder.state_dict().keys()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    mae = build_encoder(encoder_source(load_eval_config("knn", None, ["encoder.checkpoint=none", *sizes,
                                                                       "data.path=x.npz"]).encoder))  # fmt: skip
    assert mae.cls_token is not None and resolve_pool("auto", mae) == "cls"
    with pytest.raises(ConfigError, match="encoder.method ijepa: only for a random init"):
        load_eval_config("knn", None, ["encoder.checkpoint=x.pt", "encoder.method=ijepa", "data.path=x.npz"])
    with pytest.raises(ConfigError, match="encoder.method: unknown 'jepa'"):
        load_eval_config("knn", None, ["encoder.checkpoint=none", "encoder.method=jepa", *sizes, "data.path=x.npz"])
