"""Exact resume for every method with drop path on, one metrics record per step, and `resume: auto` passing
over unreadable checkpoints. A mid-epoch resume must not draw from the global RNG (which drop path uses)
more than the uninterrupted run did."""

import json

import pytest
import torch
from conftest import METHODS

from mimkit.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_sharded
from mimkit.train import pretrain

# every registered method with its defaults, and the compositions whose masks differ most from them
RUNS = {**{m: [f"method={m}"] for m in METHODS}, "bootmae+hybrid": ["method=bootmae", "mask.type=hybrid"],
        "beit+block": ["method=beit", "mask.type=block", "mask.ratio=0.4"]}  # fmt: skip


def assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def assert_same_rng(a: list, b: list):
    for ra, rb in zip(a, b, strict=True):
        assert torch.equal(ra["torch"], rb["torch"]), "torch RNG state differs"
        assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]
        assert ra["python"] == rb["python"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", list(RUNS))
def test_resume_with_drop_path_is_bit_identical(tiny_cfg, method):
    # 8 steps per epoch; a loader worker (its iterator is rebuilt on resume), stochastic depth on
    args = [*RUNS[method], "model.drop_path_rate=0.2", "data.num_workers=1", "train.keep_last=10"]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    first = pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    assert first.step == 3 and resumed.step == straight.step == 6
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_tensors(a["model"], b["model"], "model")
    for name, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][name], f"optimizer state of {name}")
    assert_same_rng(a["rng"], b["rng"])

    # one record per step in the resumed run's log, equal to the uninterrupted run's
    def per_step(path):
        records = [json.loads(x) for x in path.read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == sorted(set(steps)), "a step is logged twice"
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert per_step(straight.metrics) == per_step(resumed.metrics)


def test_a_restart_before_the_first_checkpoint_keeps_one_record_per_step(tiny_cfg):
    """A run killed before its first checkpoint starts again from step 0 in the same folder: the dead attempt's
    records are dropped, not kept beside the new ones."""
    run = pretrain(tiny_cfg("train.max_steps=3", "train.save_every_epochs=100", out="a"))
    for ckpt in list_checkpoints(run.checkpoint.parent):  # as if killed before any checkpoint was written
        ckpt.unlink()
    again = pretrain(tiny_cfg("train.max_steps=3", out="a"))
    steps = [json.loads(x)["step"] for x in again.metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3]


def test_drop_path_would_expose_an_extra_rng_draw(tiny_cfg):
    """The check above can fail: drawing once from the global RNG at the resume point changes the result."""
    args = ["model.drop_path_rate=0.2", "train.keep_last=10"]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=4", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=2", out="b"))
    import mimkit.train as train_module

    original = train_module.set_rng_state

    def restore_then_draw(state):
        original(state)
        torch.rand(1)  # what building a DataLoader iterator without its own generator does

    train_module.set_rng_state = restore_then_draw
    try:
        resumed = pretrain(tiny_cfg(*args, "train.max_steps=4", out="b"))
    finally:
        train_module.set_rng_state = original
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_truncates_the_metrics_log_after_the_checkpoint(tiny_cfg):
    args = ["train.save_every_steps=2", "train.keep_last=10"]
    pretrain(tiny_cfg(*args, "train.max_steps=5", out="r"))
    run = tiny_cfg(*args, out="r").train.out_dir
    # the run was killed after step 5 was logged but before... resume from step 4 instead of 5
    (list_checkpoints(run)[-1]).unlink()  # checkpoint-5 gone: the newest is step 4, steps 5 must be redone
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="r"))
    records = [json.loads(x) for x in resumed.metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r.get("resumed_step") for r in records if r.get("event") == "resume"] == [4]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_auto_resume_passes_over_an_unreadable_newest_checkpoint(tiny_cfg, damage, caplog):
    args = ["train.save_every_steps=2", "train.keep_last=10"]
    pretrain(tiny_cfg(*args, "train.max_steps=4", out="r"))
    out = tiny_cfg(out="r").train.out_dir
    newest = list_checkpoints(out)[-1]
    assert newest.name == "checkpoint-00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="mimkit"):
        resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="r"))
    assert resumed.step == 6
    assert "checkpoint-00000004.pt" in caplog.text and "skipping an unreadable checkpoint" in caplog.text
    reference = pretrain(tiny_cfg(*args, "train.max_steps=6", out="ref"))
    a, b = load_checkpoint(reference.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert_same_tensors(a, b, "model after resuming from step 2")


def test_auto_resume_with_no_readable_checkpoint_is_an_error(tiny_cfg):
    pretrain(tiny_cfg("train.max_steps=2", out="r"))
    out = tiny_cfg(out="r").train.out_dir
    for ckpt in list_checkpoints(out):
        ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* is readable"):
        pretrain(tiny_cfg("train.max_steps=4", out="r"))


def sharded_copy(file_ckpt, folder):
    """A sharded (DCP) checkpoint folder with the same contents as a single-file one."""
    state = load_checkpoint(file_ckpt)
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    save_sharded(folder, state["model"], state["optimizer"], meta, is_main=True)
    return folder


def test_train_resume_accepts_a_sharded_folder(tiny_cfg, tmp_path):
    straight = pretrain(tiny_cfg("train.max_steps=4", out="a"))
    half = pretrain(tiny_cfg("train.max_steps=2", out="b"))
    folder = sharded_copy(half.checkpoint, tmp_path / "elsewhere" / "checkpoint-00000002")
    resumed = pretrain(tiny_cfg("train.max_steps=4", f"train.resume={folder}", out="c"))
    assert resumed.step == 4
    assert_same_tensors(
        load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"], "model"
    )


def test_a_sharded_folder_whose_name_and_step_disagree_is_refused(tiny_cfg, tmp_path):
    half = pretrain(tiny_cfg("train.max_steps=2", out="b"))
    folder = sharded_copy(half.checkpoint, tmp_path / "checkpoint-00000009")
    with pytest.raises(CheckpointError, match="name says step 9 but it holds step 2"):
        load_checkpoint(folder)


def test_the_mask_tokens_gradient_does_not_depend_on_thread_timing():
    """On several CPU threads, the backward of advanced indexing sums the mask token's rows in a timing-dependent
    order (seen: 3e-8 apart between two identical steps on a 2-core AMD EPYC), which made a resumed MAE run drift
    from an uninterrupted one; the decoder's index_select sums them in a fixed order."""
    from mimkit.config import load_config
    from mimkit.methods import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        cfg = load_config(None, ["model.arch=vit_tiny_patch4_32", "mae.decoder_dim=128", "mae.decoder_depth=1",
                                 "mae.decoder_heads=4", "model.depth=2"])  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg)
        x = torch.randn(32, 3, 32, 32)
        grads = []
        for _ in range(6):
            model.zero_grad()
            torch.manual_seed(1)
            model(x).loss.backward()
            grads.append(model.decoder.mask_token.grad.clone())
        assert all(torch.equal(g, grads[0]) for g in grads[1:])
    finally:
        torch.set_num_threads(threads)
