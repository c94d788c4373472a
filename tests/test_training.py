"""The training loop: exact resume, gradient accumulation, non-finite steps, checkpoint files."""

import json

import pytest
import torch

import mimkit.methods.mae as mae_module
from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.engine import TrainingDiverged
from mimkit.schedules import lr_at
from mimkit.train import pretrain


def final_state(result):
    return load_checkpoint(result.checkpoint)


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("precision,workers", [("fp32", 0), ("bf16", 0), ("fp32", 2)])
def test_resume_mid_epoch_is_bit_identical(tiny_cfg, precision, workers):
    common = [f"train.precision={precision}", f"data.num_workers={workers}", "train.keep_last=10"]
    straight = pretrain(tiny_cfg(*common, "train.max_steps=12", out="straight"))
    # 8 steps per epoch: stop at step 5 (mid-epoch 0), resume, run to 12 (mid-epoch 1)
    first = pretrain(tiny_cfg(*common, "train.max_steps=5", out="resumed"))
    assert first.step == 5 and first.checkpoint.name == "checkpoint-00000005.pt"
    resumed = pretrain(tiny_cfg(*common, "train.max_steps=12", "train.resume=auto", out="resumed"))
    assert resumed.step == straight.step == 12
    a, b = final_state(straight), final_state(resumed)
    assert_bit_identical(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_bit_identical(sa, sb)

    # the logged losses after the resume point are identical too
    def losses(path):
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}

    la, lb = losses(straight.metrics), losses(resumed.metrics)
    assert all(la[s] == lb[s] for s in range(1, 13))


def test_gradient_accumulation_matches_the_full_batch(tiny_cfg):
    full = pretrain(tiny_cfg("train.batch_size=8", "train.max_steps=4", out="full"))
    accum = pretrain(tiny_cfg("train.batch_size=4", "train.accum_steps=2", "train.max_steps=4", out="accum"))
    a, b = final_state(full)["model"], final_state(accum)["model"]
    for k in a:
        if k.endswith("attn.qkv.bias"):  # key bias: zero true gradient, Adam amplifies rounding noise
            dim = a[k].shape[0] // 3
            a[k], b[k] = torch.cat([a[k][:dim], a[k][2 * dim :]]), torch.cat([b[k][:dim], b[k][2 * dim :]])
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
    assert abs(full.loss - accum.loss) < 1e-5


def test_checkpoint_contents_and_rotation(tiny_cfg):
    result = pretrain(tiny_cfg("train.save_every_steps=2", "train.keep_last=2", "train.max_steps=7"))
    names = [p.name for p in list_checkpoints(result.out_dir)]
    assert names == ["checkpoint-00000006.pt", "checkpoint-00000007.pt"]
    assert not list(result.out_dir.glob("*.tmp"))
    state = load_checkpoint(result.checkpoint)  # weights_only=True inside
    assert {"model", "optimizer", "scaler", "step", "rng", "config", "mimkit_version", "steps_per_epoch"} <= set(state)
    assert state["step"] == 7 and state["config"]["train"]["max_steps"] == 7
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert any(k.startswith("decoder.") for k in state["model"]) and any(
        k.startswith("encoder.") for k in state["model"]
    )
    assert (result.out_dir / "config.yaml").read_text().startswith("method: mae")
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert records[-1]["step"] == 7 and {"loss", "lr", "img_per_s"} <= set(records[-1])


def test_resume_refuses_a_changed_batch_layout(tiny_cfg):
    pretrain(tiny_cfg("train.max_steps=2"))
    with pytest.raises(ValueError, match="would change how it trains: train.batch_size 8 -> 4"):
        pretrain(tiny_cfg("train.max_steps=4", "train.batch_size=4"))
    with pytest.raises(ValueError, match="cannot resume .* exactly"):  # allowed, but the steps no longer line up
        pretrain(tiny_cfg("train.max_steps=4", "train.batch_size=4", "train.resume_allow=train.batch_size"))


def test_lr_schedule_warmup_then_cosine(tiny_cfg):
    cfg = tiny_cfg("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_epochs=1", "train.epochs=3")
    assert lr_at(0, 10, cfg, 1.0) == 0.0
    assert lr_at(5, 10, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 10, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(20, 10, cfg, 1.0) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(30, 10, cfg, 1.0) == pytest.approx(0.1)


def test_schedule_steps_sizes_the_run_and_its_schedule(tiny_cfg):
    # a compute-budgeted run: 13 steps (not a whole number of epochs), cosine reaching min_lr at the last one
    cfg = tiny_cfg("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_epochs=0.5", "train.epochs=100",
                   "train.schedule_steps=13")  # fmt: skip
    assert lr_at(5, 10, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(9, 10, cfg, 1.0) == pytest.approx(0.55)  # half way from step 5 to 13
    assert lr_at(13, 10, cfg, 1.0) == pytest.approx(0.1)
    result = pretrain(tiny_cfg("train.schedule_steps=13", "train.epochs=100"))
    assert result.step == 13  # 8 steps per epoch here: it ends mid-way through the second epoch


def test_lr_scales_with_effective_batch(tiny_cfg, caplog):
    caplog.set_level("INFO", logger="mimkit")
    pretrain(tiny_cfg("train.batch_size=4", "train.accum_steps=2", "optim.blr=2.56e-2", "train.max_steps=1"))
    assert "effective batch 8" in caplog.text and "peak lr 0.0008" in caplog.text


@pytest.fixture
def nan_at(monkeypatch):
    """Make the loss NaN on chosen forward calls (0-based)."""

    def install(calls: set[int]):
        real, counter = mae_module.masked_mse, {"n": 0}

        def fake(pred, target, mask):
            loss = real(pred, target, mask)
            n = counter["n"]
            counter["n"] += 1
            return loss * float("nan") if n in calls else loss

        monkeypatch.setattr(mae_module, "masked_mse", fake)

    return install


def test_nonfinite_step_is_skipped_and_counted(tiny_cfg, nan_at):
    nan_at({2})
    result = pretrain(tiny_cfg("train.max_steps=3", "train.save_every_steps=1", "train.keep_last=10"))
    assert result.nonfinite_steps == 1 and result.checkpoint.name == "checkpoint-00000003.pt"
    before, after = (load_checkpoint(result.out_dir / f"checkpoint-0000000{i}.pt")["model"] for i in (2, 3))
    assert_bit_identical(before, after)  # the NaN step changed nothing
    resumed = pretrain(tiny_cfg("train.max_steps=5"))  # and training goes on from there
    assert resumed.nonfinite_steps == 1 and resumed.step == 5
    for v in load_checkpoint(resumed.checkpoint)["model"].values():
        assert torch.isfinite(v).all()


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(tiny_cfg, nan_at):
    nan_at({3, 4, 5, 6, 7})
    cfg = tiny_cfg("train.save_every_steps=1", "train.max_nonfinite_steps=3", "train.keep_last=10")
    with pytest.raises(TrainingDiverged, match="non-finite for 3 consecutive steps.*checkpoint-00000003.pt"):
        pretrain(cfg)
    ckpts = list_checkpoints(cfg.train.out_dir)
    assert ckpts[-1].name == "checkpoint-00000003.pt"
    state = load_checkpoint(ckpts[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_fp16_with_grad_scaler_and_clipping_runs(tiny_cfg):
    result = pretrain(tiny_cfg("train.precision=fp16", "optim.clip_grad=1.0", "train.max_steps=3"))
    state = load_checkpoint(result.checkpoint)
    assert state["scaler"]["scale"] > 0 and result.step == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert "grad_norm" in records[-1]


def test_tensorboard_reconstruction_grids_do_not_change_training(tiny_cfg):
    plain = pretrain(tiny_cfg("train.max_steps=10", out="plain"))
    with_grids = pretrain(
        tiny_cfg("train.tensorboard=true", "train.vis_every_epochs=1", "train.max_steps=10", out="tb")
    )
    a, b = final_state(plain)["model"], final_state(with_grids)["model"]
    assert_bit_identical(a, b)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(with_grids.out_dir / "tb")).Reload()
    assert events.Tags()["images"], "a reconstruction grid was logged at the end of epoch 1"
    assert "pretrain/loss" in events.Tags()["scalars"]


def test_knn_trend_monitor_during_pretraining(tiny_cfg):
    result = pretrain(tiny_cfg("train.knn_every_epochs=1", "train.knn_val_split=train", "train.knn_samples=[32,16]"))
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    knn = [r for r in records if any(k.startswith("knn") for k in r)]
    assert [r["epoch"] for r in knn] == [1, 2]
    value = next(v for k, v in knn[-1].items() if k.startswith("knn") and isinstance(v, float))
    assert 0.0 <= value <= 100.0


def test_max_minutes_stops_and_saves(tiny_cfg):
    result = pretrain(tiny_cfg("train.max_minutes=0.0001", "train.epochs=50"))
    assert result.step == 1 and result.checkpoint.name == "checkpoint-00000001.pt"
    resumed = pretrain(tiny_cfg("train.max_steps=3", "train.epochs=50"))  # resumes from there, no time limit
    assert resumed.step == 3
