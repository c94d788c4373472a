"""Kill a pretraining run with SIGKILL R times, at random moments and in the middle of checkpoint writes,
resume it each time, and compare its final state with an uninterrupted run's, bit for bit: parameters,
optimizer state and the saved RNG states (stochastic depth is on, so a shifted RNG stream would show).
Then stop it with SIGTERM S times (the graceful stop: the step finishes, a checkpoint is written, exit 75),
at random moments, during checkpoint writes and sent to the whole process group (DataLoader workers
included, as SLURM and Ctrl-C do), and the same for a 2-process FSDP run under torchrun (sharded
checkpoints); resume a stopped 2-process run in one process (another world size); resume with a changed
config (refused); start two writers on one folder (one refused). Then fill a small tmpfs during a
checkpoint write: the run must stop with one clear line and leave the previous checkpoint loadable.

    python benchmarks/fault_injection.py --kills 20 --sigterms 20 [--fsdp-sigterms 4] [--steps 60] [--seed 0]
                                         [--drop-path 0.1] [--no-full-disk] [--no-fsdp]

Prints one line per kill / stop (when, what was on disk, whether every checkpoint was readable) and a
summary table. Exit code 0 only if nothing was lost: final states identical, no checkpoint unreadable,
every graceful stop exited 75 with a checkpoint of the step it stopped at, one metrics record per step,
the changed config and the second writer refused in one line, and the full-disk run ended as described.
The full-disk part mounts a tmpfs and needs root (it says so and fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mimkit.checkpoint import list_checkpoints, load_checkpoint


def overrides(data: Path, out: Path, steps: int, drop_path: float) -> list[str]:
    # ViT-Tiny/4 at 32 px with batch 16: steps take ~0.1-0.3 s and a checkpoint (~70 MB with AdamW state)
    # takes a comparable time to write, so random kills land in both.
    return [
        "model.arch=vit_tiny_patch4_32", "mae.decoder_dim=128", "mae.decoder_depth=2", "mae.decoder_heads=4",
        f"data.path={data}", "data.num_workers=1", "train.batch_size=16", "train.epochs=10",
        f"train.max_steps={steps}", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.save_every_steps=3", "train.keep_last=2", "train.log_every=1", "optim.blr=1e-3",
        "optim.warmup_epochs=1", f"train.out_dir={out}", f"model.drop_path_rate={drop_path}",
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (the run's DataLoader workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def outlived_by(pids: list[int], limit: float = 30.0) -> float:
    """Seconds until every pid has exited (or limit)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            break
        time.sleep(0.01)
    return time.perf_counter() - start


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def same_state(a: dict, b: dict) -> bool:
    """Model, optimizer state and every RNG state equal, bit for bit."""
    if a["step"] != b["step"] or a["model"].keys() != b["model"].keys():
        return False
    model = all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    optim = all(torch.equal(x, b["optimizer"]["state"][name][k]) for name, st in a["optimizer"]["state"].items()
                for k, x in st.items())  # fmt: skip
    rng = all(torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
              and torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) for ra, rb in zip(a["rng"], b["rng"]))  # fmt: skip
    return model and optim and rng


def one_record_per_step(out: Path) -> bool:
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return steps == list(range(1, len(steps) + 1))


def full_disk_run(data: Path, work: Path, steps: int, drop_path: float, checkpoint_bytes: int) -> tuple[bool, str]:
    """Run on a tmpfs with room for about 1.5 checkpoints: the second write fills it."""
    mount = work / "small-disk"
    mount.mkdir()
    size = int(checkpoint_bytes * 1.5) + (1 << 20)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        return False, f"could not mount a tmpfs (needs root): {done.stderr.strip()}"
    try:
        args = overrides(data, mount / "run", steps, drop_path) + ["train.save_every_steps=3", "train.keep_last=5"]
        proc = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", *args], capture_output=True, text=True)
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        last = err[-1] if err else ""
        ckpts = list_checkpoints(mount / "run")
        readable = bool(ckpts)
        for ckpt in ckpts:
            try:
                load_checkpoint(ckpt)
            except Exception:
                readable = False
        ok = (proc.returncode == 2 and last.startswith("mimkit: error: ") and "No space left on device" in last
              and not any(x.startswith("Traceback") for x in err) and readable
              and not list((mount / "run").glob(".checkpoint-*")))  # fmt: skip
        return ok, f"exit {proc.returncode}; {len(ckpts)} checkpoint(s) left, readable: {readable}; last line: {last}"
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def launch(args: list[str], new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=new_session)  # fmt: skip


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "mimkit.cli", "pretrain", *args]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def wait_for(proc: subprocess.Popen, out: Path, rng: random.Random, mode: str) -> None:
    """Wait until the run has made progress (a new checkpoint) and then a random while, or until the temporary
    file of a checkpoint write appears."""
    start_step = newest_step(out)
    if "write" in mode:
        while proc.poll() is None and not list(out.glob(".checkpoint-*.tmp")):
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.01))
    elif "group" in mode or mode == "random step":  # after the next logged step, at a random time
        first = logged_step(out)
        while proc.poll() is None and logged_step(out) <= first:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
    else:
        while proc.poll() is None and newest_step(out) <= start_step:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))


def logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max([json.loads(x).get("step", 0) for x in lines if x.endswith("}")] or [0])


def sigterm_rounds(data: Path, out: Path, steps: int, drop_path: float, stops: int, rng: random.Random) -> dict:
    """SIGTERM the run `stops` times (to the process, during checkpoint writes, to its process group), relaunch it
    each time, and let the last launch finish. A stop must exit 75 and leave the checkpoint of the step it
    stopped at as the newest (and readable) one."""
    res = {"stops": 0, "mid_write": 0, "group": 0, "launches": 0, "bad_exits": 0, "unreadable": 0, "not_at_stop": 0}
    modes = ["random step", "during checkpoint write", "random step, process group"]
    while True:
        res["launches"] += 1
        mode = modes[res["stops"] % len(modes)]
        proc = launch(overrides(data, out, steps, drop_path), new_session=True)
        if res["stops"] >= stops:
            _, err = proc.communicate()
            res["final_exit"] = proc.returncode
            if proc.returncode:
                print(err.decode()[-3000:])
            return res
        wait_for(proc, out, rng, mode)
        if proc.poll() is not None:  # finished before the signal: nothing to count
            res["final_exit"] = proc.returncode
            return res
        tmp_present = bool(list(out.glob(".checkpoint-*.tmp")))
        if "group" in mode:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        last = err.decode().strip().splitlines()[-1] if err.strip() else ""
        res["stops"] += 1
        res["mid_write"] += tmp_present
        res["group"] += "group" in mode
        stopped_at = int(last.split(" at step ")[1].split(";")[0]) if " at step " in last else None
        ok, bad = all_readable(out)
        res["unreadable"] += bad
        if proc.returncode != 75 or not last.startswith("mimkit: stopped by SIGTERM"):
            res["bad_exits"] += 1
        if stopped_at is None or newest_step(out) != stopped_at:
            res["not_at_stop"] += 1
        print(f"stop {res['stops']:2d} ({mode}): exit {proc.returncode}, stopped at step {stopped_at}, newest checkpoint "
              f"step {newest_step(out)}, temp file present at the signal: {tmp_present}, checkpoints readable "
              f"{ok}/{ok + bad}")  # fmt: skip


def fsdp_overrides(data: Path, out: Path, steps: int, drop_path: float, processes: int = 2) -> list[str]:
    args = overrides(data, out, steps, drop_path)
    batch = 16 // processes  # the same global batch (and steps per epoch) on any number of processes
    return [a for a in args if not a.startswith(("train.batch_size", "data.num_workers"))] + [
        f"train.batch_size={batch}", "data.num_workers=0", "distributed.strategy=fsdp"]  # fmt: skip


def fsdp_rounds(data: Path, work: Path, steps: int, drop_path: float, stops: int, rng: random.Random) -> dict:
    """A 2-process FSDP run (torchrun, gloo) stopped `stops` times by SIGTERM to one or both ranks, resumed
    each time; then a stopped copy resumed in one process."""
    ref = torchrun(fsdp_overrides(data, work / "fsdp-reference", steps, drop_path))
    _, err = ref.communicate()
    if ref.returncode:
        print(err.decode()[-3000:])
        return {"failed": True}
    out = work / "fsdp"
    res = {"stops": 0, "launches": 0, "bad_stops": 0, "unreadable": 0, "one_process": None}
    while True:
        res["launches"] += 1
        proc = torchrun(fsdp_overrides(data, out, steps, drop_path))
        if res["stops"] >= stops:
            _, err = proc.communicate()
            res["final_exit"] = proc.returncode
            if proc.returncode:
                print(err.decode()[-3000:])
            break
        wait_for(proc, out, rng, "during checkpoint write" if res["stops"] % 2 else "random moment")
        if proc.poll() is not None:
            res["final_exit"] = proc.returncode
            break
        ranks = sorted(children(proc.pid))
        targets = ranks if res["stops"] % 2 == 0 else ranks[-1:]  # both ranks, or one (the all-reduce tells the other)
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate()
        text = err.decode()
        res["stops"] += 1
        stopped = text.count("mimkit: stopped by ")
        ok, bad = all_readable(out)
        res["unreadable"] += bad
        if stopped != 2 or " at step " not in text:  # every rank stops, at one step, with a checkpoint
            res["bad_stops"] += 1
        newest = list_checkpoints(out)[-1] if list_checkpoints(out) else None
        if res["stops"] == 1 and newest is not None:
            shutil.copytree(newest, work / "fsdp-one-process" / newest.name)
        print(f"fsdp stop {res['stops']}: SIGTERM to {len(targets)} of {len(ranks)} ranks, {stopped} rank(s) said "
              f"stopped, newest checkpoint {newest.name if newest else None} (sharded: {bool(newest and newest.is_dir())}),"
              f" checkpoints readable {ok}/{ok + bad}")  # fmt: skip
    final = load_checkpoint(list_checkpoints(out)[-1])
    res["identical"] = same_state(final, load_checkpoint(list_checkpoints(work / "fsdp-reference")[-1]))
    one = work / "fsdp-one-process"
    if one.is_dir():  # resume the first stop's sharded checkpoint in one process, to the end
        proc = launch(fsdp_overrides(data, one, steps, drop_path, processes=1))
        _, err = proc.communicate()
        res["one_process"] = (proc.returncode, newest_step(one))
        if proc.returncode:
            print(err.decode()[-3000:])
    return res


def drift_and_second_writer(data: Path, work: Path, steps: int, drop_path: float, reference: Path) -> dict:
    """A finished run resumed with optim.blr changed is refused in one line and left as it was; two writers
    started on one folder at once: one is refused in one line, the other finishes bit-identical."""
    res = {}
    before = [(p.name, p.stat().st_mtime_ns) for p in list_checkpoints(reference)]
    proc = launch(overrides(data, reference, steps, drop_path) + ["optim.blr=2e-3"])
    _, err = proc.communicate()
    lines = err.decode().strip().splitlines()
    res["drift"] = (proc.returncode == 2 and len([x for x in lines if x.startswith("mimkit: error:")]) == 1
                    and "optim.blr 0.001 -> 0.002" in lines[-1] and "Traceback" not in err.decode()
                    and [(p.name, p.stat().st_mtime_ns) for p in list_checkpoints(reference)] == before)  # fmt: skip
    res["drift_line"] = lines[-1] if lines else ""
    out = work / "two-writers"
    a, b = (launch(overrides(data, out, steps, drop_path)) for _ in range(2))
    results = [(p.returncode, e.decode()) for p, (_, e) in ((p, p.communicate()) for p in (a, b))]
    refused = [e for rc, e in results if rc == 2 and "is being written by pid" in e]
    finished = [rc for rc, _ in results if rc == 0]
    res["writers"] = (len(refused) == 1 and len(finished) == 1
                      and same_state(load_checkpoint(list_checkpoints(out)[-1]),
                                     load_checkpoint(list_checkpoints(reference)[-1])))  # fmt: skip
    res["writer_line"] = refused[0].strip().splitlines()[-1] if refused else results
    return res


def newest_step(out: Path) -> int:
    ckpts = list_checkpoints(out)
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def all_readable(out: Path) -> tuple[int, int]:
    ok = bad = 0
    for ckpt in list_checkpoints(out):
        try:
            load_checkpoint(ckpt)
            ok += 1
        except Exception:
            bad += 1
    return ok, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-path", type=float, default=0.1, help="model.drop_path_rate (default 0.1)")
    parser.add_argument("--no-full-disk", action="store_true", help="skip the tmpfs full-disk run")
    parser.add_argument("--sigterms", type=int, default=20, help="graceful stops of the one-process run (default 20)")
    parser.add_argument("--fsdp-sigterms", type=int, default=4, help="graceful stops of the 2-process FSDP run")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the 2-process FSDP part")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="mimkit-faults-"))
    data = work / "data.npz"
    images = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    np.savez(data, x_train=images)

    t0 = time.time()
    ref = launch(overrides(data, work / "reference", args.steps, args.drop_path))
    _, err = ref.communicate()
    if ref.returncode:
        print(err.decode()[-3000:])
        return 1
    print(f"uninterrupted run: {args.steps} steps in {time.time() - t0:.0f} s")

    out = work / "killed"
    kills, during_write, unreadable, launches, worst_orphan = 0, 0, 0, 0, 0.0
    while True:
        launches += 1
        proc = launch(overrides(data, out, args.steps, args.drop_path))
        if kills >= args.kills:
            _, err = proc.communicate()
            if proc.returncode:
                print(err.decode()[-3000:])
                return 1
            break
        mode = "during checkpoint write" if kills % 2 else "random moment"
        start_step = newest_step(out)
        if mode == "random moment":
            # after the process is up and has made progress, at a random time
            while proc.poll() is None and newest_step(out) <= start_step:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            # poll for the temporary file of an atomic write and kill while it exists
            while proc.poll() is None and not list(out.glob(".checkpoint-*.tmp")):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.01))
        if proc.poll() is not None:  # finished before we could kill it: relaunch counts as nothing
            break
        tmp_present = bool(list(out.glob(".checkpoint-*.tmp")))
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        orphan_s = outlived_by(workers)
        worst_orphan = max(worst_orphan, orphan_s)
        kills += 1
        during_write += tmp_present
        ok, bad = all_readable(out)
        unreadable += bad
        print(f"kill {kills:2d} ({mode}): newest checkpoint step {newest_step(out)}, temp file present: "
              f"{tmp_present}, checkpoints readable {ok}/{ok + bad}, {len(workers)} worker(s) gone "
              f"{orphan_s:.2f} s after the kill")  # fmt: skip

    final = load_checkpoint(list_checkpoints(out)[-1])
    reference_ckpt = list_checkpoints(work / "reference")[-1]
    identical = same_state(final, load_checkpoint(reference_ckpt))
    per_step = one_record_per_step(out)

    print()
    # a graceful stop keeps every step, so the stopped run is longer: 5 steps per stop, against its own reference
    term_steps = max(args.steps, 5 * args.sigterms)
    term_ref = launch(overrides(data, work / "sigterm-reference", term_steps, args.drop_path))
    term_ref.communicate()
    term = sigterm_rounds(data, work / "sigterm", term_steps, args.drop_path, args.sigterms, rng)
    term_identical = same_state(load_checkpoint(list_checkpoints(work / "sigterm")[-1]),
                                load_checkpoint(list_checkpoints(work / "sigterm-reference")[-1]))  # fmt: skip
    term_per_step = one_record_per_step(work / "sigterm")
    term_ok = (term_identical and term_per_step and term["bad_exits"] == 0 and term["unreadable"] == 0
               and term["not_at_stop"] == 0 and term.get("final_exit") == 0)  # fmt: skip
    fsdp, fsdp_ok = {}, True
    if not args.no_fsdp:
        print()
        fsdp = fsdp_rounds(data, work, args.steps, args.drop_path, args.fsdp_sigterms, rng)
        fsdp_ok = (not fsdp.get("failed") and fsdp["identical"] and fsdp["bad_stops"] == 0 and fsdp["unreadable"] == 0
                   and fsdp.get("final_exit") == 0 and fsdp["one_process"] == (0, args.steps))  # fmt: skip
    guards = drift_and_second_writer(data, work, args.steps, args.drop_path, work / "reference")
    print(f"\nchanged config on resume: {'refused' if guards['drift'] else 'NOT REFUSED'} ({guards['drift_line']})")
    print(f"two writers on one folder: {'one refused' if guards['writers'] else 'FAILED'} ({guards['writer_line']})")

    disk_ok, disk_note = True, "skipped (--no-full-disk)"
    if not args.no_full_disk:
        disk_ok, disk_note = full_disk_run(data, work, args.steps, args.drop_path, reference_ckpt.stat().st_size)
    lost = 0 if identical and unreadable == 0 and per_step and disk_ok else 1
    lost += 0 if term_ok else 1
    lost += 0 if fsdp_ok else 1
    failed_guards = (not guards["drift"]) + (not guards["writers"])
    print()
    print(f"drop path {args.drop_path}; full-disk run: {'OK' if disk_ok else 'FAILED'} ({disk_note})")
    print()
    print(
        "| kills | of which mid-write | launches | unreadable checkpoints | final model + optimizer + RNG bit-identical "
        "| one metrics record per step | workers outlived the kill by (max) | full disk: clear error, previous "
        "checkpoint loadable | runs lost |"
    )
    print("|---:|---:|---:|---:|---|---|---:|---|---:|")
    print(
        f"| {kills} | {during_write} | {launches} | {unreadable} | {identical} | {per_step} | {worst_orphan:.2f} s "
        f"| {disk_ok} | {int(not (identical and unreadable == 0 and per_step and disk_ok))} |"
    )
    print()
    print(
        "| SIGTERM stops | of which mid-write | to the process group | launches | exit 75 with one line | checkpoint at "
        "the stopped step | unreadable checkpoints | final model + optimizer + RNG bit-identical | one metrics record "
        "per step | runs lost |"
    )
    print("|---:|---:|---:|---:|---|---|---:|---|---|---:|")
    print(
        f"| {term['stops']} | {term['mid_write']} | {term['group']} | {term['launches']} | "
        f"{term['stops'] - term['bad_exits']}/{term['stops']} | {term['stops'] - term['not_at_stop']}/{term['stops']} | "
        f"{term['unreadable']} | {term_identical} | {term_per_step} | {int(not term_ok)} |"
    )
    if fsdp and not fsdp.get("failed"):
        print()
        print(
            "| 2-process FSDP SIGTERM stops | launches | every rank stopped at one step | unreadable checkpoints | final "
            "state bit-identical | stopped run resumed in 1 process (exit, final step) | runs lost |"
        )
        print("|---:|---:|---|---:|---|---|---:|")
        print(
            f"| {fsdp['stops']} | {fsdp['launches']} | {fsdp['stops'] - fsdp['bad_stops']}/{fsdp['stops']} | "
            f"{fsdp['unreadable']} | {fsdp['identical']} | {fsdp['one_process']} | {int(not fsdp_ok)} |"
        )
    print()
    print(
        "| changed config on resume refused in one line, folder untouched | second writer refused in one line, the "
        "other bit-identical |"
    )
    print("|---|---|")
    print(f"| {guards['drift']} | {guards['writers']} |")
    lost += failed_guards
    print(f"\ntotal {time.time() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return lost


if __name__ == "__main__":
    sys.exit(main())
