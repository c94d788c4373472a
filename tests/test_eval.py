"""Evaluation commands (k-NN, linear probe, fine-tune) on tiny models and generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images

from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.eval import finetune as ft
from mimkit.eval import knn_accuracy, knn_monitor, knn_scores, load_eval_config, open_labelled_split
from mimkit.eval import linprobe as lp
from mimkit.eval.encoders import load_encoder
from mimkit.eval.knn import run_knn
from mimkit.train import pretrain

TINY_ENCODER = [
    "encoder.arch=vit_tiny_patch4_32",
    "encoder.img_size=16",
    "encoder.patch_size=4",
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
]


@pytest.fixture
def labelled_npz(tmp_path):
    path = tmp_path / "labelled.npz"
    x_train, x_test = make_images(64, seed=1), make_images(32, seed=2)
    # a learnable label: which colour channel is brightest on average
    y_train, y_test = (x.reshape(len(x), -1, 3).mean(1).argmax(1) for x in (x_train, x_test))
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


@pytest.fixture
def eval_cfg(tmp_path, labelled_npz):
    def build(command: str, *overrides: str, out: str = "eval", encoder: list[str] | None = None):
        run = "run" if command == "knn" else "train"
        base = (TINY_ENCODER if encoder is None else encoder) + [
            f"data.path={labelled_npz}", "data.num_workers=0", f"{run}.precision=fp32", f"{run}.progress=false",
            f"{run}.tensorboard=false", f"{run}.out_dir={tmp_path / out}", f"{run}.batch_size=8",
        ]  # fmt: skip
        if command != "knn":
            base += ["train.epochs=2", "train.log_every=1", "optim.warmup_epochs=1"]
        return load_eval_config(command, None, base + list(overrides))

    return build


@pytest.fixture
def pretrained(tiny_cfg):
    """A tiny MAE pretraining checkpoint (2 steps)."""
    return pretrain(tiny_cfg("train.max_steps=2", out="mae")).checkpoint


def states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            states_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------- k-NN


def test_knn_on_linearly_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(6, 16) * 4

    def draw(n):
        y = torch.arange(n) % 6
        return centers[y] + 0.5 * torch.randn(n, 16, generator=g), y

    (f_train, y_train), (f_test, y_test) = draw(300), draw(120)
    acc = knn_accuracy(f_train, y_train, f_test, y_test, num_classes=6, k=20, temperature=0.07, chunk_size=7)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # one very similar neighbour of class 1 against two less similar ones of class 0
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    sharp = knn_scores(train, labels, test, 2, k=3, temperature=0.05)
    flat = knn_scores(train, labels, test, 2, k=3, temperature=10.0)
    assert sharp.argmax() == 1 and flat.argmax() == 0
    expected = torch.tensor([[2 * np.exp(0.8 / 0.05), np.exp(1.0 / 0.05)]], dtype=torch.float32)
    torch.testing.assert_close(sharp, expected)


def test_knn_command_writes_metrics_and_reuses_feature_caches(eval_cfg, pretrained, caplog):
    cfg = eval_cfg("knn", f"encoder.checkpoint={pretrained}", "knn.k=5", "features.pool=cls_mean")
    result = run_knn(cfg)
    m = json.loads(result.metrics_path.read_text())
    assert 0 <= m["top1"] <= 100 and m["feature_dim"] == 64 and m["val_images"] == 32 and m["k"] == 5
    assert m["key_report"]["missing"] == [] and "trend monitor" in m["note"]
    assert (result.out_dir / "features-train.pt").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="mimkit"):
        again = run_knn(cfg)
    assert "reusing" in caplog.text and again.metrics["top1"] == m["top1"]


def test_knn_monitor_restores_mode_and_leaves_the_global_rng_alone(labelled_npz):
    from mimkit.models import create_encoder

    encoder = create_encoder("vit_tiny_patch4_32", 16, 4, 0.1, 32, 2, 2).train()
    train, val = open_labelled_split(labelled_npz, "train"), open_labelled_split(labelled_npz, "test")
    import random

    rngs = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    stats = knn_monitor(encoder, train, val, k=5, batch_size=16, max_train=48, max_val=16)
    assert torch.equal(rngs[0], torch.get_rng_state()) and np.array_equal(rngs[1], np.random.get_state()[1])
    assert rngs[2] == random.getstate() and encoder.training
    assert stats["knn_train_images"] == 48 and stats["knn_val_images"] == 16 and 0 <= stats["knn_top1"] <= 100
    assert all(p.grad is None for p in encoder.parameters())


# ---------------------------------------------------------------- linear probe


def test_probed_encoder_gets_no_gradient_and_stays_in_eval_mode(eval_cfg, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        encoder, report = load_encoder(*args, **kwargs)
        seen["encoder"], seen["before"] = encoder, {k: v.clone() for k, v in encoder.state_dict().items()}
        seen["modes"] = []
        encoder.register_forward_pre_hook(lambda m, _: seen["modes"].append(m.training))
        encoder.blocks[0].register_forward_pre_hook(lambda m, _: seen["modes"].append(m.training))
        return encoder, report

    monkeypatch.setattr(lp, "load_encoder", spy)
    cfg = eval_cfg("linprobe", "probe.mode=augment", "train.max_steps=6", "optim.blr=1.0")
    result = lp.run_linprobe(cfg)
    encoder = seen["encoder"]
    assert seen["modes"] and not any(seen["modes"])  # every forward (train steps and val features) in eval mode
    assert not encoder.training and all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    states_equal(seen["before"], encoder.state_dict())
    heads = load_checkpoint(result.checkpoint)["heads"]
    assert set(heads) == {"heads.0.0.running_mean", "heads.0.0.running_var", "heads.0.0.num_batches_tracked",
                          "heads.0.1.weight", "heads.0.1.bias"}  # BatchNorm without affine + Linear  # fmt: skip
    records = [json.loads(x) for x in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["step"] == 6 and "top1" in records[-1] and result.metrics["steps"] == 6


def test_linprobe_cached_scan_reports_every_block(eval_cfg):
    cfg = eval_cfg("linprobe", "probe.mode=cached", "probe.scan_blocks=true", "probe.pool=mean", "optim.name=adamw",
                   "optim.lr=1e-2")  # fmt: skip
    result = lp.run_linprobe(cfg)
    m = result.metrics
    assert set(m["per_block_top1"]) == {"1", "2"} and m["best_block"] in (1, 2) and m["block"] == 2
    assert m["top1"] == m["per_block_top1"]["2"] and m["best_top1"] == max(m["per_block_top1"].values())
    assert (result.out_dir / "features-train.pt").is_file() and (result.out_dir / "metrics.json").is_file()


def test_cached_linprobe_knn_equals_mimkit_knn_on_the_same_features(eval_cfg, pretrained):
    """probe.knn_k: the k-NN vote on the probe's cached features is mimkit knn's result for that block, pool, k and
    T (same subsets, transform and batch size: the same features), without a second extraction."""
    encoder = [*TINY_ENCODER, f"encoder.checkpoint={pretrained}"]
    probe = lp.run_linprobe(eval_cfg("linprobe", "probe.mode=cached", "probe.scan_blocks=true", "probe.block=1",
                                     "probe.pool=cls_mean", "probe.knn_k=5", "probe.knn_temperature=0.1",
                                     "train.max_steps=1", "data.train_samples=48", "data.val_samples=24",
                                     out="probe", encoder=encoder)).metrics  # fmt: skip
    knn = run_knn(
        eval_cfg(
            "knn",
            "features.block=1",
            "features.pool=cls_mean",
            "knn.k=5",
            "knn.temperature=0.1",
            "data.train_samples=48",
            "data.val_samples=24",
            out="knn",
            encoder=encoder,
        )
    ).metrics
    assert probe["knn_block"] == 1 and probe["knn_k"] == 5 and probe["val_images"] == knn["val_images"] == 24
    assert (probe["knn_top1"], probe["knn_top5"]) == (knn["top1"], knn["top5"])
    with pytest.raises(ConfigError, match="probe.knn_k needs probe.mode cached"):
        eval_cfg("linprobe", "probe.mode=augment", "probe.knn_k=5")


def test_linprobe_resume_is_bit_identical(eval_cfg):
    common = ["probe.mode=augment", "train.keep_last=10", "optim.name=lars"]
    straight = lp.run_linprobe(eval_cfg("linprobe", *common, "train.max_steps=12", out="straight"))
    lp.run_linprobe(eval_cfg("linprobe", *common, "train.max_steps=5", out="resumed"))
    resumed = lp.run_linprobe(eval_cfg("linprobe", *common, "train.max_steps=12", out="resumed"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    states_equal(a["heads"], b["heads"])
    states_equal(a["optimizer"]["state"], b["optimizer"]["state"])
    assert [e for e in b["evals"] if e["step"] != 5] == a["evals"]  # the stopped run also evaluated at its step 5


# ---------------------------------------------------------------- fine-tuning


def test_layer_decay_gives_patch_embed_base_times_decay_to_depth_plus_one(eval_cfg):
    cfg = eval_cfg("finetune", "optim.layer_decay=0.5")
    model, _ = ft.build_finetune_model(cfg, num_classes=3)
    groups = ft.layer_decay_param_groups(model, 0.05, 0.5)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    base, depth = 2e-3, 2
    ft.set_lr(optimizer, base)
    lr_of = {
        n: g["lr"]
        for g in optimizer.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    wd_of = {
        n: g["weight_decay"]
        for g in optimizer.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(base * 0.5 ** (depth + 1))
    assert lr_of["pos_embed"] == lr_of["cls_token"] == lr_of["patch_embed.proj.weight"]
    assert lr_of["blocks.0.attn.qkv.weight"] == pytest.approx(base * 0.5**depth)
    assert lr_of["blocks.1.mlp.fc2.weight"] == pytest.approx(base * 0.5)
    assert lr_of["head.weight"] == lr_of["fc_norm.weight"] == pytest.approx(base)
    assert wd_of["pos_embed"] == wd_of["cls_token"] == wd_of["head.bias"] == wd_of["blocks.0.norm1.weight"] == 0.0
    assert wd_of["head.weight"] == wd_of["blocks.0.attn.qkv.weight"] == 0.05
    table = ft.lr_table(model, groups, base)
    assert [r["lr_scale"] for r in table] == [0.125, 0.25, 0.5, 1.0] and "patch_embed" in table[0]["params"]
    assert "head" in table[-1]["params"] and table[2]["params"] == "blocks.1 (12 tensors)"


def test_classifier_has_timms_avg_pool_layout(eval_cfg):
    from timm.models.vision_transformer import VisionTransformer

    model, _ = ft.build_finetune_model(eval_cfg("finetune"), num_classes=3)
    reference = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                                  global_pool="avg")  # fmt: skip
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    x = torch.randn(2, 3, 16, 16)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_finetune_loads_a_pretraining_checkpoint_with_a_key_report(eval_cfg, pretrained, caplog, capsys):
    cfg = eval_cfg("finetune", f"encoder.checkpoint={pretrained}", encoder=[])
    model, report = ft.build_finetune_model(cfg, num_classes=3)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"]
    saved = load_checkpoint(pretrained)["model"]
    assert len(report.matched) == len(saved) - sum(k.startswith("decoder.") for k in saved) - 2
    for k in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert k in report.matched and torch.equal(model.state_dict()[k], saved[f"encoder.{k}"])
    assert model.pos_embed.requires_grad  # fixed during MAE pretraining, learnt when fine-tuning

    # through the command line: the report is logged, the run finishes and writes its metrics
    out = Path(cfg.train.out_dir)
    with caplog.at_level("INFO", logger="mimkit"):
        code = main(["finetune", f"encoder.checkpoint={pretrained}", f"data.path={cfg.data.path}", "data.num_workers=0",
                     "train.precision=fp32", "train.progress=false", "train.tensorboard=false", f"train.out_dir={out}",
                     "train.batch_size=8", "train.epochs=1", "train.max_steps=2", "ema.enabled=true"])  # fmt: skip
    assert code == 0
    assert "missing:    fc_norm.bias, fc_norm.weight, head.bias, head.weight" in caplog.text
    assert "unexpected: norm.bias, norm.weight" in caplog.text and "layer-wise lr decay" in caplog.text
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and "ema_top1" in m and m["key_report"]["unexpected"] == ["norm.bias", "norm.weight"]
    assert "done: finetune top-1" in capsys.readouterr().out


def test_finetune_resamples_the_position_embedding(eval_cfg, pretrained):
    cfg = eval_cfg("finetune", f"encoder.checkpoint={pretrained}", "encoder.img_size=24", encoder=[])
    model, report = ft.build_finetune_model(cfg, num_classes=3)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert any("resampled 4x4 -> 6x6" in n for n in report.notes) and "pos_embed" in report.matched


def test_finetune_resume_is_bit_identical(eval_cfg):
    common = ["train.keep_last=10", "ema.enabled=true", "model.drop_path_rate=0.2", "aug.re_prob=0.5",
              "aug.mixup=0.8", "aug.cutmix=1.0", "aug.mixup_prob=0.8"]  # fmt: skip
    straight = ft.run_finetune(eval_cfg("finetune", *common, "train.max_steps=12", out="straight"))
    ft.run_finetune(eval_cfg("finetune", *common, "train.max_steps=5", out="resumed"))
    resumed = ft.run_finetune(eval_cfg("finetune", *common, "train.max_steps=12", out="resumed"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 12
    states_equal(a["model"], b["model"])
    states_equal(a["ema"], b["ema"])
    states_equal(a["optimizer"]["state"], b["optimizer"]["state"])
    assert [e for e in b["evals"] if e["step"] != 5] == a["evals"]

    def losses(out):
        return {
            r["step"]: r["loss"]
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        }

    la, lb = losses(straight.out_dir), losses(resumed.out_dir)
    assert all(la[s] == lb[s] for s in range(1, 13))
    assert [p.name for p in list_checkpoints(resumed.out_dir)][-1] == "checkpoint-00000012.pt"


def test_partial_finetuning_trains_only_the_last_blocks(eval_cfg):
    cfg = eval_cfg("finetune", "model.trainable_blocks=1", "train.max_steps=3", "optim.warmup_epochs=0")
    model, _ = ft.build_finetune_model(cfg, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ft.run_finetune(cfg)
    after = load_checkpoint(result.checkpoint)["model"]
    for k in before:
        frozen_part = k.startswith(("blocks.0.", "patch_embed.", "pos_embed", "cls_token"))
        assert torch.equal(before[k], after[k]) == frozen_part, k


# ---------------------------------------------------------------- configs


def test_shipped_eval_recipes_are_valid():
    recipes = sorted((Path(__file__).parent.parent / "configs" / "eval").glob("*.yaml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        cfg = load_eval_config(recipe.name.split("_")[0], recipe)
        assert cfg.data.path


@pytest.mark.parametrize(
    "command,override,message",
    [
        ("knn", "knn.kk=3", "unknown config key 'knn.kk'; allowed keys in knn: k, temperature, chunk_size"),
        ("linprobe", "probe.mode=fast", "probe.mode: 'fast' is not allowed; allowed: 'cached', 'augment'"),
        ("linprobe", "optim.name=lamb", "optim.name: 'lamb' is not allowed"),
        ("finetune", "optim.layer_decay=0", r"optim.layer_decay must be in \(0, 1\]"),
        ("finetune", "train.batch_size=7", "must be even with Mixup/CutMix"),
        ("finetune", "aug.rand_augment=autoaug", "aug.rand_augment must be a timm RandAugment spec"),
        ("knn", "encoder.arch=null", "encoder.arch is required with encoder.checkpoint: none"),
        ("knn", "data.path=''", "data.path is required"),
    ],
)
def test_bad_eval_values_name_the_field(command, override, message):
    base = ["encoder.arch=vit_tiny_patch4_32", "data.path=x.npz"]
    with pytest.raises(ConfigError, match=message):
        load_eval_config(command, None, base + [override])


def test_checkpoint_architecture_mismatch_is_named(eval_cfg, pretrained):
    cfg = eval_cfg("knn", f"encoder.checkpoint={pretrained}", "encoder.depth=3", encoder=[])
    with pytest.raises(ConfigError, match=r"encoder.depth: 3 does not match the checkpoint"):
        run_knn(cfg)


def test_missing_labels_or_split_fail_before_any_model(tmp_path, npz_data):
    from mimkit.sources import DataError

    with pytest.raises(DataError, match="has no array 'x_test'"):
        open_labelled_split(npz_data, "test")
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, x_train=make_images(4))
    with pytest.raises(DataError, match="no labels y_train"):
        open_labelled_split(str(unlabelled), "train")


def test_image_folder_splits_work_for_knn_and_finetune(tmp_path, eval_cfg):
    from PIL import Image

    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(("cat", "dog")):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i, img in enumerate(make_images(n, seed=10 * c + (split == "val"))):
                Image.fromarray(img).save(tmp_path / "folder" / split / cls / f"{i}.png")
    data = [f"data.path={tmp_path / 'folder'}", "data.val_split=val"]
    knn = run_knn(eval_cfg("knn", *data, "knn.k=3", out="knn_folder"))
    assert knn.metrics["train_images"] == 16 and knn.metrics["val_images"] == 8 and knn.metrics["num_classes"] == 2
    fine = ft.run_finetune(eval_cfg("finetune", *data, "train.epochs=1", "train.max_steps=1", out="ft_folder"))
    assert fine.metrics["steps"] == 1 and 0 <= fine.metrics["top1"] <= 100


def test_beit_checkpoints_are_evaluated_with_their_timm_beit_encoder(eval_cfg, tiny_cfg, caplog):
    """BEiT / mc-BEiT pretrain a timm Beit (relative position bias, layer scale): k-NN, the probe and
    fine-tuning rebuild that encoder from the checkpoint, every encoder tensor matched."""
    from timm.models.beit import Beit

    beit = ["method=beit", "mask.type=block", "mask.ratio=0.4", "tokenizer.kind=random", "tokenizer.vocab_size=32",
            "tokenizer.hidden=8", "tokenizer.code_dim=8", "tokenizer.downsample=4",
            "model.img_size=null"]  # the preset's 32 px, as the recipes leave it  # fmt: skip
    ckpt = pretrain(tiny_cfg(*beit, "train.max_steps=2", out="beit")).checkpoint
    saved = {k[len("encoder.") :]: v for k, v in load_checkpoint(ckpt)["model"].items() if k.startswith("encoder.")}
    assert "rel_pos_bias.relative_position_bias_table" in saved and "blocks.0.gamma_1" in saved

    model, report = ft.build_finetune_model(eval_cfg("finetune", f"encoder.checkpoint={ckpt}", encoder=[]), 3)
    assert isinstance(model, Beit)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"] and len(report.matched) == len(saved) - 2
    for k in ("rel_pos_bias.relative_position_bias_table", "blocks.1.gamma_2", "patch_embed.proj.weight"):
        assert torch.equal(model.state_dict()[k], saved[k])

    knn = run_knn(eval_cfg("knn", f"encoder.checkpoint={ckpt}", "features.pool=mean", encoder=[]))
    assert 0.0 <= knn.metrics["top1"] <= 100.0
    probe = lp.run_linprobe(eval_cfg("linprobe", f"encoder.checkpoint={ckpt}", "probe.scan_blocks=true", out="probe",
                                  encoder=[]))  # fmt: skip
    assert sorted(int(b) for b in probe.metrics["per_block_top1"]) == [1, 2]
    with pytest.raises(ConfigError, match="encoder.img_size: 16 differs from the BEiT checkpoint"):
        ft.build_finetune_model(
            eval_cfg("finetune", f"encoder.checkpoint={ckpt}", "encoder.img_size=16", encoder=[]), 3
        )


def test_randaugment_posterize_to_zero_bits_does_not_kill_the_loader(eval_cfg):
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (mstd > 0 reaches it); Pillow >= 11 raises on
    0 bits. The fine-tuning transform keeps timm's intended op: an all-black image."""
    from PIL import Image

    cfg = eval_cfg("finetune", "aug.rand_augment=rand-m10-n1-inc1")
    tf = ft.finetune_train_transform(16, cfg)
    ops = [op for t in tf.transforms[1].transforms for op in getattr(t, "ops", [])]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    img = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize.aug_fn(img, 0)).max() == 0
    assert np.asarray(posterize.aug_fn(img, 4)).max() == 192  # 200 keeps its top 4 bits
    for op in ops:  # every op at magnitude 10 runs
        op.prob, op.magnitude_std = 1.0, 0.0
        op(img)


def test_random_init_beit_is_the_encoder_beit_pretraining_starts_from(eval_cfg, tiny_cfg):
    """encoder.family=beit with checkpoint none: a timm Beit of the BEiT recipe's shape, drawn from the seed as BEiT
    pretraining draws it (the baseline of BEiT rows); a checkpoint of the other family is refused."""
    from timm.models.beit import Beit

    from mimkit.engine import seed_everything
    from mimkit.methods import build_model

    beit = ["method=beit", "mask.type=block", "mask.ratio=0.4", "tokenizer.kind=random", "tokenizer.vocab_size=32",
            "tokenizer.hidden=8", "tokenizer.code_dim=8", "tokenizer.downsample=2"]  # fmt: skip
    seed_everything(0)
    start = build_model(tiny_cfg(*beit)).encoder.state_dict()
    cfg = eval_cfg("knn", "encoder.family=beit")
    encoder, report = load_encoder(cfg.encoder, seed=0)
    assert isinstance(encoder, Beit) and "Beit" in report.notes[0]
    states_equal(encoder.state_dict(), start)
    vit, _ = load_encoder(eval_cfg("knn").encoder, seed=0)
    assert not isinstance(vit, Beit)
    assert 0.0 <= run_knn(cfg).metrics["top1"] <= 100.0
    ckpt = pretrain(tiny_cfg("train.max_steps=1", out="mae")).checkpoint
    with pytest.raises(ConfigError, match="encoder.family: 'beit', but .* holds a vit encoder"):
        load_encoder(eval_cfg("knn", f"encoder.checkpoint={ckpt}", "encoder.family=beit", encoder=[]).encoder)
