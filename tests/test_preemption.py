"""Preemption and the run folder: a stop signal finishes the step, writes a checkpoint and exits with
EXIT_STOPPED, and the resumed run ends bit-identical to an uninterrupted one (one process and 2-process
FSDP); a second signal stops at once; a resumed run that would change its trajectory is refused unless
the keys are named, and then recorded; a finished run started again says so; one writer per folder; files
follow the umask."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import TINY_MODEL
from test_distributed import free_port, worker_pids

import mimkit.train
from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.cli import main
from mimkit.runs import EXIT_STOPPED, HISTORY_NAME, ConfigDrift, RunFolderBusy, RunLock, RunStopped, read_history
from mimkit.train import pretrain


def signal_at(monkeypatch, step: int, sig=signal.SIGTERM, times: int = 1):
    """Send `sig` to this process while the loop sets up optimizer step `step` (0-based)."""
    real = mimkit.train.lr_at

    def lr_at(s, *args):
        if s == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(s, *args)

    monkeypatch.setattr(mimkit.train, "lr_at", lr_at)


def assert_same_state(a: dict, b: dict):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    assert a["rng"][0]["torch"].equal(b["rng"][0]["torch"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_writes_a_checkpoint_and_the_resumed_run_is_bit_identical(tiny_cfg, monkeypatch, sig):
    extra = ("model.drop_path_rate=0.1", "train.max_steps=10", "train.save_every_epochs=100")
    whole = pretrain(tiny_cfg(*extra, out="whole"))

    signal_at(monkeypatch, 3, sig)
    with pytest.raises(RunStopped) as stopped:
        pretrain(tiny_cfg(*extra, out="cut"))
    assert stopped.value.step == 4 and stopped.value.signal_name == sig.name  # step 3 finished: 4 steps done
    out = whole.out_dir.parent / "cut"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-00000004.pt"]
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)  # the handler is gone again
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "stopped" and records[-1]["signal"] == sig.name

    monkeypatch.undo()
    resumed = pretrain(tiny_cfg(*extra, out="cut"))
    assert resumed.step == 10 and resumed.loss == whole.loss
    assert_same_state(load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint))
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 11))  # one record per step


def test_the_cli_exits_with_the_stopped_code_and_one_line(tiny_cfg, monkeypatch, capsys, tmp_path, npz_data):
    signal_at(monkeypatch, 2)
    args = ["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
            "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.max_steps=6",
            f"train.out_dir={tmp_path / 'cli'}"]  # fmt: skip
    assert main(args) == EXIT_STOPPED == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mimkit: stopped by SIGTERM at step 3; checkpoint {tmp_path / 'cli' / 'checkpoint-00000003.pt'}; "
                   f"run the same command to resume {tmp_path / 'cli'} exactly"]  # fmt: skip


def test_a_second_signal_stops_at_once(tmp_path):
    script = textwrap.dedent("""
        import os, signal, time
        from mimkit.runs import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            print("first:", stop.requested, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still running", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "first: SIGTERM\n"
    assert "SIGTERM again: stopping at once" in proc.stderr


def test_dataloader_workers_ignore_the_stop_signal_of_their_process_group(tiny_cfg, monkeypatch):
    """Ctrl-C and SLURM signal every process of the job: the workers leave stopping to the run."""
    real, survivors = mimkit.train.lr_at, {}

    def lr_at(s, *args):
        if s == 2:
            workers = _children(os.getpid())
            subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)  # sent by another process, as SLURM's
            time.sleep(0.5)
            survivors.update({pid: _alive(pid) for pid in workers})
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, *args)

    monkeypatch.setattr(mimkit.train, "lr_at", lr_at)
    with pytest.raises(RunStopped) as stopped:
        pretrain(tiny_cfg("data.num_workers=2", "train.max_steps=8", out="workers"))
    assert stopped.value.step == 3
    assert len(survivors) == 2 and all(survivors.values()), survivors


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------- 2 processes, FSDP


def fsdp_args(npz_data, out, steps):
    return TINY_MODEL + [
        f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=4", f"train.max_steps={steps}",
        "train.epochs=40", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "optim.blr=1e-3", "optim.warmup_epochs=1", "model.drop_path_rate=0.1",
        "distributed.strategy=fsdp", "train.save_every_epochs=1000", f"train.out_dir={out}",
    ]  # fmt: skip


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *args]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def logged_steps(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max([json.loads(x).get("step", 0) for x in lines if x.strip().endswith("}")] or [0])


def test_sigterm_to_one_rank_of_an_fsdp_run_stops_every_rank_and_resumes_bit_identical(tmp_path, npz_data):
    steps = 80
    whole = torchrun(fsdp_args(npz_data, tmp_path / "whole", steps))
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]

    cut = tmp_path / "cut"
    proc = torchrun(fsdp_args(npz_data, cut, steps))
    deadline = time.time() + 300
    while logged_steps(cut) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ranks = worker_pids(proc.pid)
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only: the all-reduce of the step tells rank 0
    _, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM at step" in err and "stopped by a signal on another process" in err, err[-3000:]
    assert "exitcode  : 75" in err or "exitcode: 75" in err or "exit code 75" in err.lower() or proc.returncode != 0
    (stopped_at,) = [p for p in list_checkpoints(cut)]
    assert 5 <= int(stopped_at.name.split("-")[1]) < steps and stopped_at.is_dir()  # sharded, every rank's shards

    again = torchrun(fsdp_args(npz_data, cut, steps))
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    a = load_checkpoint(tmp_path / "whole" / f"checkpoint-{steps:08d}")
    b = load_checkpoint(cut / f"checkpoint-{steps:08d}")
    assert_same_state(a, b)
    assert a["rng"][1]["torch"].equal(b["rng"][1]["torch"])


# ---------------------------------------------------------------- the folder is the truth


def test_a_resume_that_changes_the_trajectory_is_refused_unless_named(tiny_cfg):
    pretrain(tiny_cfg("train.max_steps=4", out="drift"))
    for change in (["train.epochs=3"], ["optim.blr=0.002"], ["mask.ratio=0.5"], ["model.drop_path_rate=0.1"]):
        with pytest.raises(ConfigDrift) as refused:
            pretrain(tiny_cfg("train.max_steps=6", *change, out="drift"))
        key, value = change[0].split("=")
        assert f"{key} " in str(refused.value) and f"-> {value}" in str(refused.value)
        assert f"train.resume_allow={key}" in str(refused.value) and "\n" not in str(refused.value)
    out = tiny_cfg(out="drift").train.out_dir
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-00000004.pt"]  # nothing trained, nothing written

    # keys that do not alter the trajectory pass; a named one passes and is recorded
    result = pretrain(tiny_cfg("train.max_steps=6", "train.epochs=3", "train.resume_allow=train.epochs",
                               "train.log_every=2", "data.num_workers=1", out="drift"))  # fmt: skip
    assert result.step == 6
    history = read_history(out)
    assert [h["step"] for h in history] == [0, 4]
    assert history[1]["allowed"] == ["train.epochs"] and history[1]["changes"]["train.epochs"] == [2, 3]
    assert history[1]["changes"]["train.log_every"] == [1, 2]  # recorded, not refused
    events = [json.loads(x) for x in open(f"{out}/metrics.jsonl") if '"resume"' in x]
    assert events[-1]["config_changes"] == {"train.epochs": [2, 3]}
    saved = load_checkpoint(result.checkpoint)["config"]
    assert saved["train"]["epochs"] == 3 and saved["model"]["embed_dim"] == 32  # resolved: no nulls


def test_the_report_marks_a_config_change(tiny_cfg, tmp_path):
    pytest.importorskip("matplotlib")
    from mimkit.report import build_report, read_metrics

    pretrain(tiny_cfg("train.max_steps=4", out="marked"))
    pretrain(tiny_cfg("train.max_steps=6", "optim.blr=2e-3", "train.resume_allow=optim.blr", out="marked"))
    out = tiny_cfg(out="marked").train.out_dir
    runlog = read_metrics(tmp_path / "marked" / "metrics.jsonl")
    assert runlog.config_changes == [(4, {"optim.blr": [0.001, 0.002]})]
    rep = build_report(out, tmp_path / "report.html", checkpoints=0)
    assert any("config changed at step 4" in n and "optim.blr 0.001 -> 0.002" in n for n in rep.notes)
    assert "config changed at step 4" in rep.html.read_text()


def test_the_saved_config_is_fully_resolved(tiny_cfg):
    import yaml

    result = pretrain(tiny_cfg("train.max_steps=1", out="resolved"))
    saved = yaml.safe_load(result.config.read_text())
    assert None not in (saved["model"]["img_size"], saved["model"]["patch_size"], saved["model"]["embed_dim"],
                        saved["model"]["num_heads"], saved["model"]["depth"])  # fmt: skip


def test_a_finished_run_started_again_says_so_and_returns_its_result(tiny_cfg, capsys, npz_data, tmp_path):
    first = pretrain(tiny_cfg("train.max_steps=3", out="done"))
    again = pretrain(tiny_cfg("train.max_steps=3", out="done"))
    assert again.already_finished and again.step == 3 and again.loss == first.loss
    assert again.checkpoint == first.checkpoint and torch.isfinite(torch.tensor(again.loss))
    # a checkpoint of an earlier version has no loss in it: it is read from the metrics log
    args = ["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
            "train.epochs=2", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1", "optim.blr=1e-3", "optim.warmup_epochs=1", "train.max_steps=3",
            f"train.out_dir={tmp_path / 'done'}"]  # fmt: skip
    state = load_checkpoint(first.checkpoint)
    del state["loss"]
    torch.save(state, first.checkpoint)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"already finished: {tmp_path / 'done'} is at step 3, final loss {first.loss:.4f}" in out
    assert "nan" not in out


def test_a_second_writer_is_refused_with_the_holders_host_and_pid(tiny_cfg, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mimkit.runs import RunLock
        with RunLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderBusy) as busy:
            pretrain(tiny_cfg("train.max_steps=1", out="locked"))
        assert f"pid {holder.pid} on host " in str(busy.value) and str(out) in str(busy.value)
    finally:
        holder.kill()
        holder.wait()
    # a killed holder leaves no stale lock
    assert pretrain(tiny_cfg("train.max_steps=1", out="locked")).step == 1
    with RunLock(out):  # released after the run
        pass


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(tiny_cfg, umask):
    old = os.umask(umask)
    try:
        result = pretrain(tiny_cfg("train.max_steps=1", out=f"umask{umask:o}"))
    finally:
        os.umask(old)
    for path in (result.checkpoint, result.config, result.out_dir / "metrics.jsonl", result.out_dir / HISTORY_NAME):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# ---------------------------------------------------------------- evaluation commands stop the same way


def test_a_stopped_finetune_resumes_bit_identical_and_a_stopped_knn_says_so(tmp_path, npz_data, monkeypatch, capsys):
    import mimkit.eval.finetune as ft
    from mimkit.eval import load_eval_config

    data = tmp_path / "labelled.npz"
    import numpy as np
    from conftest import make_images

    np.savez(data, x_train=make_images(48, seed=1), y_train=np.arange(48) % 3, x_test=make_images(16, seed=2),
             y_test=np.arange(16) % 3)  # fmt: skip
    encoder = ["encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16", "encoder.patch_size=4",
               "encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2"]  # fmt: skip

    def cfg(out, *extra):
        return load_eval_config("finetune", None, encoder + [
            f"data.path={data}", "data.num_workers=0", "train.precision=fp32", "train.progress=false",
            "train.tensorboard=false", f"train.out_dir={tmp_path / out}", "train.batch_size=8", "train.epochs=2",
            "train.log_every=1", "optim.warmup_epochs=1", "model.drop_path_rate=0.1", "train.max_steps=10", *extra])  # fmt: skip

    straight = ft.run_finetune(cfg("straight"))
    real = ft.lr_at

    def lr_at(s, *args):
        if s == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, *args)

    monkeypatch.setattr(ft, "lr_at", lr_at)
    with pytest.raises(RunStopped) as stopped:
        ft.run_finetune(cfg("cut"))
    assert stopped.value.step == 5 and stopped.value.checkpoint.name == "checkpoint-00000005.pt"
    monkeypatch.undo()
    resumed = ft.run_finetune(cfg("cut"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 10 and a["evals"] == b["evals"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    # k-NN: the feature extraction stops between batches, one line and exit 75 from the command line
    real_kill_at = {"n": 0}
    import mimkit.eval.common as common

    real_features = common.encoder_features

    def features(*args, **kwargs):
        real_kill_at["n"] += 1
        if real_kill_at["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_features(*args, **kwargs)

    monkeypatch.setattr(common, "encoder_features", features)
    rc = main(["knn", *encoder, f"data.path={data}", "data.num_workers=0", "train.precision=fp32", "train.progress=false",
               "train.tensorboard=false", "train.batch_size=8", f"train.out_dir={tmp_path / 'knn'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_STOPPED and err[-1].startswith("mimkit: stopped by SIGTERM during feature extraction")
    assert not (tmp_path / "knn" / "metrics.json").exists()


def test_a_checkpoint_saved_with_auto_is_compared_by_what_auto_meant_then(tiny_cfg):
    """mask.block_generator auto meant BEiT's generator for BootMAE's hybrid blocks before it meant BootMAE's own:
    a checkpoint that says auto is read as it was trained, so resuming it under the new meaning is refused."""
    result = pretrain(tiny_cfg("method=bootmae", "mask.type=hybrid", "train.max_steps=2", out="bootmae"))
    state = load_checkpoint(result.checkpoint)
    assert state["config"]["mask"]["block_generator"] == "exact"  # written resolved from now on
    state["config"]["mask"]["block_generator"] = "auto"
    torch.save(state, result.checkpoint)
    with pytest.raises(ConfigDrift, match="mask.block_generator beit -> exact"):
        pretrain(tiny_cfg("method=bootmae", "mask.type=hybrid", "train.max_steps=4", out="bootmae"))
    assert pretrain(tiny_cfg("method=bootmae", "mask.type=hybrid", "mask.block_generator=beit", "train.max_steps=4",
                             out="bootmae")).step == 4  # fmt: skip
