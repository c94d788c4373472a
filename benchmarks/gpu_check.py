"""The one-go GPU check (run through benchmarks/gpu_check.sh). Steps, each a subprocess with its own time limit,
its output appended to log.txt:

  env         versions, the GPU, `import mimkit` (without webdataset / braceexpand where they are absent)
  tests       pytest tests/test_devices.py tests/test_device_decode.py, the cuda parameters (dry run: two cpu tests)
  throughput  benchmarks/throughput.py per model: mimkit vs HF ViTMAE (sdpa), each with and without compiled
              blocks, bf16, at ViT-B/16@224, ViT-L/16@224 and ViT-T/4@32: img/s, MFU against the datasheet peak and
              the matmul ceilings measured in the run, peak memory
  data        benchmarks/throughput.py --data-only: the CPU path and the device-decode path (folder, WebDataset)
  dist        torchrun --nproc_per_node 1 `mimkit pretrain --dry-run`, DDP and FSDP2 (bf16 policy), nccl on CUDA /
              gloo on CPU: one step and one checkpoint (FSDP2: sharded) written and read back
  study       `mimkit compare --gpu-minutes` (dry run: --core-minutes) with two tiny specs on generated data: each run
              ends within 10% of its budget on its own clock, the rows name the GPU, the read-out is in GPU-minutes

Results (at most 8 files, as the device tool brings back): log.txt, env.txt, tests.xml, throughput.json, data.json,
summary.json, summary.md; the summary table is printed last. Each step's time limit comes out of one budget
(470 s on a GPU, so the run ends inside the 8 minutes with start-up to spare). --cpu-dry-run runs every step at
tiny sizes on the CPU (tests/test_gpu_check.py runs it in the suite). The exit status is 0 when every step ran and
passed; the issue's performance targets are reported in the table (met / missed) without failing the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = [
    "model.arch=vit_tiny_patch4_32",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
]  # tests/conftest.py's TINY_MODEL
TARGET_MFU, TARGET_VS_HF = 0.50, 1.3  # issue 19: ViT-B/16 MAE bf16


class Runner:
    def __init__(self, out: Path, scratch: Path, dry: bool):
        self.out, self.scratch, self.dry = out, scratch, dry
        self.log = out / "log.txt"
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.budget = 300.0 if dry else 470.0
        self.machine = ""  # seconds for the whole run (issue 19: <= 8 min on one H200)

    def limit(self, cap: float, reserve: float = 0.0) -> float:
        """A step's time limit: its cap, or what is left of the run's budget after `reserve` seconds for the steps
        still to come (at least 10 s)."""
        left = self.budget - (time.perf_counter() - self.started) - reserve
        return max(10.0, min(cap, left))

    def row(self, check: str, status: str, detail: str = "") -> None:
        self.rows.append({"check": check, "status": status, "detail": detail})
        print(f"[{time.perf_counter() - self.started:6.0f} s] {check}: {status} {detail}", flush=True)

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
        """(exit status or None on timeout, output, seconds); the output goes to log.txt."""
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun's workers, DataLoader workers
            output, _ = proc.communicate()
            rc = None
        seconds = time.perf_counter() - start
        with open(self.log, "a") as f:
            ended = "timed out" if rc is None else f"exit {rc}"
            f.write(f"\n===== {name} ({seconds:.0f} s, {ended})\n$ {' '.join(cmd)}\n")
            f.write(output or "")
        return rc, output or "", seconds


def python() -> str:
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jpegs(root: Path, count: int, size: tuple[int, int]) -> Path:
    """Smooth colour fields with grain, as JPEGs in 2 class folders (generated here: nothing travels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i:05d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------- steps


def step_env(r: Runner) -> bool:
    probe = ("import importlib.util, sys, torch, torchvision, timm; import mimkit, mimkit.train, mimkit.device_decode\n"
             "print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)\n"
             "print('torchvision', torchvision.__version__, '| timm', timm.__version__)\n"
             "for name in ('transformers', 'webdataset', 'braceexpand'):\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    print(name, __import__(name).__version__ if spec and hasattr(__import__(name), '__version__') "
             "else ('present' if spec else 'absent'))\n"
             "print('mimkit', mimkit.__version__, mimkit.__file__)\n"
             "print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')\n")  # fmt: skip
    rc, output, _ = r.run("env", [python(), "-c", probe], timeout=120)
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if not r.dry and _which("nvidia-smi") else None
    (r.out / "env.txt").write_text(output + ("\n" + smi.stdout if smi is not None else ""))
    if rc != 0:
        r.row("env: import mimkit", "FAIL", output.strip().splitlines()[-1] if output.strip() else "")
        return False
    info = dict(line.split(" ", 1) for line in output.strip().splitlines() if " " in line)
    r.row("env: import mimkit", "ok", f"torch {info.get('torch', '?')} | gpu {info.get('gpu', '?')} | "
          f"webdataset {info.get('webdataset', '?')}")  # fmt: skip
    if not r.dry and info.get("gpu", "none") == "none":
        r.row("env: CUDA", "FAIL", "torch sees no GPU (run with --cpu-dry-run on a machine without one)")
        return False
    return True


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def step_tests(r: Runner) -> None:
    xml = r.out / "tests.xml"
    if r.dry:
        select = ["tests/test_devices.py::test_method_trains_in_bf16[cpu-mae]",
                  "tests/test_device_decode.py::test_device_path_equals_cpu_path_on_a_folder[cpu]"]  # fmt: skip
    else:
        select = ["tests/test_devices.py", "tests/test_device_decode.py", "-k", "cuda"]
    cmd = [python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={xml}", *select]
    # deterministic cuBLAS for the resume test: must be set before the process first uses cuBLAS
    limit = r.limit(120 if r.dry else 150, reserve=0 if r.dry else 260)
    rc, output, seconds = r.run("tests", cmd, timeout=limit, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    detail = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
              f"({seconds:.0f} s)")  # fmt: skip
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    ok = rc == 0 and passed > 0
    status = "ok" if ok else "FAIL" if rc is not None else "TIMEOUT"
    r.row("tests on " + ("cpu (dry run subset)" if r.dry else "cuda"), status,
          detail + ("; " + "; ".join(failed[:6]) if failed else ""))  # fmt: skip


def throughput_cmd(r: Runner, model: str, json_path: Path) -> list[str]:
    cmd = [python(), "benchmarks/throughput.py", "--models", model, "--precisions", "bf16", "--json", str(json_path)]
    if r.dry:  # compiled rows left out: inductor's C++ build takes minutes on a CPU (tests/test_kernels.py covers it)
        return cmd + ["--device", "cpu", "--impls", "mimkit,hf-sdpa", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--gemm-seconds", "0.002", "--square", "64"]  # fmt: skip
    steps = {"tiny": "10", "base": "8", "large": "5"}[model]
    return cmd + ["--device", "cuda", "--impls", "mimkit,hf-sdpa,mimkit-compiled,hf-sdpa-compiled", "--steps", steps,
                  "--warmup", "2", "--gemm-seconds", "0.03"]  # fmt: skip


def step_throughput(r: Runner, models: list[str], caps: dict, reserves: dict, rows: list[dict]) -> list[dict]:
    """Each model in its own process and time limit; rows written so far survive a timeout (throughput.py writes its
    JSON after every row). `rows` accumulates over calls; throughput.json is rewritten after each model."""
    for model in models:
        part = r.scratch / f"throughput_{model}.json"
        limit = r.limit(caps[model], reserves[model])
        rc, output, seconds = r.run(f"throughput {model}", throughput_cmd(r, model, part), timeout=limit)
        data = json.loads(part.read_text()) if part.exists() else {"machine": "", "rows": []}
        rows += data["rows"]
        r.machine = data["machine"] or r.machine
        status = "ok" if rc == 0 else "TIMEOUT" if rc is None else "FAIL"
        for row in summarise_model(data["rows"]) if data["rows"] else []:
            partial = "" if rc == 0 else f" (partial: stopped after {seconds:.0f} s)"
            r.row(f"throughput {row['model']}", status, row["text"] + (f" ({seconds:.0f} s)" if rc == 0 else partial))
        if not data["rows"]:
            last = output.strip().splitlines()[-1] if output.strip() else ""
            r.row(f"throughput {model}", status, last[:200])
        (r.out / "throughput.json").write_text(json.dumps({"machine": r.machine, "rows": rows}, indent=2))
    return rows


def summarise_model(rows: list[dict]) -> list[dict]:
    by_impl = {row["impl"]: row for row in rows}
    model = rows[0]["model"]
    hf = [row for row in rows if row["impl"].startswith("hf")]
    best_hf = max(hf, key=lambda row: row["images_per_second"]) if hf else None
    cells = []
    for impl in ("mimkit", "mimkit-compiled", "hf-sdpa", "hf-sdpa-compiled"):
        row = by_impl.get(impl)
        if row is None:
            continue
        mfu_peak = f", {row['mfu_vs_peak']:.0%} of peak" if row.get("mfu_vs_peak") is not None else ""
        cells.append(f"{impl} {row['images_per_second']:.0f} img/s ({row['mfu']:.0%} of matmul ceiling{mfu_peak}, "
                     f"{row['peak_memory_mib'] / 1024:.1f} GiB)")  # fmt: skip
    if best_hf is not None:
        best = max((row for row in rows if row["impl"].startswith("mimkit")), key=lambda row: row["images_per_second"])
        cells.append(f"best mimkit / best HF {best['images_per_second'] / best_hf['images_per_second']:.2f}×")
    return [{"model": model, "text": "; ".join(cells)}]


def targets(r: Runner, rows: list[dict]) -> None:
    """The issue's ViT-B/16 targets, from the fastest mimkit row (compiled or not) and the fastest HF row."""
    base = [row for row in rows if row["model"].startswith("ViT-B/16")]
    if not base or r.dry:
        r.row("target ViT-B/16 MFU >= 50% of peak, >= 1.3x HF", "n/a", "CPU dry run" if r.dry else "no ViT-B rows")
        return
    mimkit = max((row for row in base if row["impl"].startswith("mimkit")), key=lambda row: row["images_per_second"])
    rate = lambda row: row["images_per_second"]  # noqa: E731
    hf = max((row for row in base if row["impl"].startswith("hf")), key=rate, default=None)
    mfu = mimkit.get("mfu_vs_peak")
    ratio = mimkit["images_per_second"] / hf["images_per_second"] if hf else None
    met = mfu is not None and mfu >= TARGET_MFU and ratio is not None and ratio >= TARGET_VS_HF
    r.row("target ViT-B/16 MFU >= 50% of peak, >= 1.3x HF", "met" if met else "missed",
          f"{mimkit['impl']}: {'n/a' if mfu is None else f'{mfu:.1%}'} of the bf16 peak, "
          f"{'n/a' if ratio is None else f'{ratio:.2f}x'} the fastest HF row "
          f"({hf['impl'] if hf else 'none'})")  # fmt: skip


def step_data(r: Runner, step_rows: list[dict]) -> None:
    out = r.out / "data.json"
    cmd = [python(), "benchmarks/throughput.py", "--data-only", "--data", str(r.scratch / "no-cifar.npz"), "--json",
           str(out)]  # fmt: skip
    if (r.out / "throughput.json").exists():  # the model rows, for the pipeline / step column
        cmd += ["--step-json", str(r.out / "throughput.json")]
    if r.dry:
        cmd += ["--device", "cpu", "--decode-device", "cpu", "--jpeg-images", "16", "--batch", "4", "--data-batches",
                "2", "--warmup", "1", "--workers", "1"]  # fmt: skip
    else:
        cmd += ["--device", "cuda", "--jpeg-images", "1024", "--workers", "12", "--data-batches", "30", "--warmup", "2"]
    rc, output, seconds = r.run("data", cmd, timeout=r.limit(120, 0) if r.dry else r.limit(90, reserve=120))
    if rc != 0 or not out.exists():
        last = output.strip().splitlines()[-1] if output.strip() else ""
        r.row("data path", "TIMEOUT" if rc is None else "FAIL", last[:200])
        return
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        r.row(f"data: {row['pipeline'].split(',')[0]}, decode {row['decode_on']}", "ok",
              f"{row['images_per_second']:.0f} img/s at batch {row['batch']}, {row['num_workers']} workers, "
              f"{row['model']}")  # fmt: skip
    model = [s["images_per_second"] for s in step_rows
             if s["model"].startswith("ViT-B/16") and s["impl"].startswith("mimkit")]  # fmt: skip
    device = [row["images_per_second"] for row in rows if row["decode"] == "device" and "folder" in row["pipeline"]]
    if r.dry or not model or not device:
        r.row("target data path >= ViT-B/16 step img/s", "n/a", "CPU dry run" if r.dry else "missing rows")
    else:
        met = device[0] >= max(model)
        r.row("target data path >= ViT-B/16 step img/s", "met" if met else "missed",
              f"device decode {device[0]:.0f} img/s vs fastest mimkit step {max(model):.0f} img/s")  # fmt: skip


def step_dist(r: Runner) -> None:
    folder = write_jpegs(r.scratch / "dist_jpegs", 16 if r.dry else 128, (40, 30) if r.dry else (500, 375))
    if r.dry:
        model = TINY_MODEL + ["train.device=cpu", "train.batch_size=4", "data.num_workers=0", "data.decode=device"]
    else:  # data.decode auto: the device path on CUDA; compile off to stay in the time budget (the tests cover it)
        model = ["model.arch=vit_base_patch16_224", "train.device=cuda", "train.batch_size=64", "data.num_workers=8",
                 "train.compile=false"]  # fmt: skip
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = r.scratch / f"run_{strategy}"
        cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *model, f"data.path={folder}",
               "train.precision=bf16", f"distributed.strategy={strategy}", "train.max_steps=1", "train.resume=none",
               "train.progress=false", "train.tensorboard=false", "optim.warmup_epochs=1",
               f"train.out_dir={runs[strategy]}"]  # fmt: skip
        runs[strategy] = (runs[strategy], cmd)
    # both launches at once: each is mostly start-up (imports, process group), and they share nothing
    import concurrent.futures

    limit = r.limit(120, 10) if r.dry else r.limit(90, reserve=60)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {s: pool.submit(r.run, f"dist {s}", cmd, limit, {"OMP_NUM_THREADS": "1"})
                   for s, (_, cmd) in runs.items()}  # fmt: skip
        results = {s: f.result() for s, f in futures.items()}
    # the checkpoints on disk (FSDP2: a folder with one shard file per rank), then read back by mimkit
    readback = ("import sys\nfrom mimkit.checkpoint import load_checkpoint\nfor path in sys.argv[1:]:\n"
                "    state = load_checkpoint(path)\n    print(path, state['step'], len(state['rng']), "
                "state['nonfinite_steps'], len(state['model']))\n")  # fmt: skip
    found = {s: next(iter(sorted(out.glob("checkpoint-*"))), None) for s, (out, _) in runs.items()}
    rc, output, _ = r.run("dist read back", [python(), "-c", readback, *[str(p) for p in found.values() if p]],
                          timeout=r.limit(60, reserve=5))  # fmt: skip
    read = {line.split()[0]: line.split()[1:] for line in output.splitlines() if line.startswith(str(r.scratch))}
    for strategy, (rc_run, out_run, seconds) in results.items():
        ckpt = found[strategy]
        shards = len(list(ckpt.glob("*.distcp"))) if ckpt is not None and ckpt.is_dir() else 0
        layout_ok = ckpt is not None and (ckpt.is_dir() and shards == 1 if strategy == "fsdp" else ckpt.is_file())
        back = read.get(str(ckpt), [])
        wrapped = "| FSDP2" if strategy == "fsdp" else "| DDP"
        ok = rc_run == 0 and wrapped in out_run and layout_ok and back[:3] == ["1", "1", "0"]
        done = [x for x in out_run.splitlines() if x.startswith("done: step 1, loss")]
        loss = done[0].rsplit(" ", 1)[-1] if done else "?"
        what = f"sharded checkpoint folder ({shards} shard file)" if strategy == "fsdp" else "checkpoint file"
        policy = "bf16 MixedPrecisionPolicy" if strategy == "fsdp" else "bf16 autocast"
        detail = (f"{'gloo' if r.dry else 'nccl'}, 1 process, {policy}: step 1 loss {loss}; {what} written and read "
                  f"back ({seconds:.0f} s)")  # fmt: skip
        if not ok:
            tail = out_run.strip().splitlines()[-1][:200] if out_run.strip() else ""
            detail = f"run exit {rc_run}, wrapped {wrapped in out_run}, layout {layout_ok}, read back {back}: {tail}"
        name = "dist DDP" if strategy == "ddp" else "dist FSDP2"
        r.row(name, "ok" if ok else "TIMEOUT" if rc_run is None else "FAIL", detail)


def step_study(r: Runner) -> None:
    import numpy as np

    data = r.scratch / "study.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8), y_train=np.arange(96) % 3,
             x_test=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8), y_test=np.arange(30) % 3)  # fmt: skip
    budget = 0.05 if r.dry else 0.25  # minutes per run: 3 s / 15 s of training
    sets = [a for s in TINY_MODEL[1:] + ["train.batch_size=8", "linprobe:train.epochs=2"] for a in ("--set", s)]
    methods = "mae" if r.dry else "mae,mae+crossmae"  # the dry run checks the plumbing, the GPU run two rows
    cmd = [python(), "-m", "mimkit.cli", "compare", "--data", str(data), "--methods", methods,
           "--core-minutes" if r.dry else "--gpu-minutes", str(budget), "--eval-every", "0", "--threads", "1",
           "--out", str(r.scratch / "study"), "--no-page", *sets]  # fmt: skip
    rc, output, seconds = r.run("study", cmd, timeout=r.limit(150, 0) if r.dry else r.limit(120, reserve=60))
    record = r.scratch / "study" / "compare.json"
    if rc != 0 or not record.exists():
        last = output.strip().splitlines()[-1] if output.strip() else ""
        r.row("study (mimkit compare)", "TIMEOUT" if rc is None else "FAIL", last[:200])
        return
    study = json.loads(record.read_text())
    key = study.get("compute", "core_minutes")
    spent = {run["name"]: run.get(f"{key}_spent") or 0.0 for run in study["runs"]}
    machines = sorted({m for run in study["runs"] for m in run.get("machines", [])})
    ok = all(abs(s - budget) <= 0.1 * budget for s in spent.values()) and key == ("core_minutes" if r.dry else
                                                                                 "gpu_minutes")  # fmt: skip
    r.row("study (mimkit compare)", "ok" if ok else "FAIL",
          f"{key}: " + ", ".join(f"{n} {s:.3g}" for n, s in spent.items()) + f" of {budget:g} each; on "
          f"{', '.join(machines) or '?'} ({seconds:.0f} s)")  # fmt: skip


ORDER = ("env", "tests", "throughput", "target ViT-B", "data", "target data", "dist", "study")


def summary(r: Runner) -> int:
    r.rows.sort(key=lambda row: next(i for i, p in enumerate(ORDER) if row["check"].startswith(p)))  # stable
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {row['check']} | {row['status']} | {row['detail'].replace('|', '/')} |" for row in r.rows]
    elapsed = time.perf_counter() - r.started
    title = f"# mimkit GPU check{' (CPU dry run)' if r.dry else ''}: {elapsed:.0f} s"
    text = title + "\n\n" + "\n".join(lines) + "\n"
    (r.out / "summary.md").write_text(text)
    failed = [row for row in r.rows if row["status"] in ("FAIL", "TIMEOUT")]
    (r.out / "summary.json").write_text(json.dumps({"dry_run": r.dry, "seconds": elapsed, "rows": r.rows,
                                                    "ok": not failed}, indent=2))  # fmt: skip
    print("\n" + text, flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="mimkit's one-go GPU check (benchmarks/gpu_check.sh)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step at tiny sizes on the CPU (gloo)")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/gpu/; dry run: "
                        "$OUT, else a temporary folder)")  # fmt: skip
    args = parser.parse_args()
    dry = args.cpu_dry_run
    default = tempfile.mkdtemp(prefix="mimkit-gpu-dry-") if dry and not (args.out or os.environ.get("OUT")) else None
    out = args.out or os.environ.get("OUT") or default or str(REPO / "benchmarks" / "gpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    with tempfile.TemporaryDirectory(prefix="mimkit-gpu-check-") as scratch:
        r = Runner(out, Path(scratch), dry)
        print(f"# results in {out}", flush=True)
        env_ok = step_env(r)
        if env_ok and not dry:  # most important first; each step's limit leaves the later ones their minimum
            rows: list[dict] = []
            step_tests(r)
            step_throughput(r, ["base"], {"base": 120}, {"base": 190}, rows)
            targets(r, rows)
            step_data(r, rows)
            step_dist(r)
            step_study(r)
            step_throughput(r, ["large", "tiny"], {"large": 120, "tiny": 60}, {"large": 35, "tiny": 0}, rows)
        elif env_ok:  # dry run: the same steps side by side: on a CPU they are mostly Python start-up and imports
            import concurrent.futures

            def throughput_and_targets():
                rows: list[dict] = []
                step_throughput(r, ["tiny"], {"tiny": 120}, {"tiny": 0}, rows)
                targets(r, rows)

            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                jobs = [pool.submit(step_tests, r), pool.submit(throughput_and_targets), pool.submit(step_data, r, []),
                        pool.submit(step_dist, r), pool.submit(step_study, r)]  # fmt: skip
                for job in jobs:
                    job.result()
        return summary(r)


if __name__ == "__main__":
    sys.exit(main())
