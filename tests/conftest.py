"""Shared fixtures: a tiny generated dataset and a tiny model config, so every test runs in seconds."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.config import load_config, sections_used
from mimkit.registry import method_names

TINY_ENCODER = [
    "model.arch=vit_tiny_patch4_32",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
]
TINY_DECODER = ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]  # MAE's pixel decoder, tiny
TINY_MODEL = TINY_ENCODER + TINY_DECODER  # MAE's (the default method)


TINY_TOKENIZER = ["tokenizer.kind=random", "tokenizer.vocab_size=32", "tokenizer.hidden=8", "tokenizer.code_dim=8",
                  "tokenizer.downsample=2"]  # fmt: skip


def tiny_model(method: str = "mae", *composition: str) -> list[str]:
    """`method=NAME` with the tiny encoder and the tiny versions of the parts that method reads (MAE's pixel
    decoder, a random tokenizer); `composition`: overrides that change what it reads (e.g. mask.type=parallel)."""
    used = sections_used(load_config(None, [f"method={method}", *composition, "tokenizer.kind=random",
                                            *TINY_ENCODER[:3], "simmim.mask_patch_size=8"],
                                     also_reads=("tokenizer", "simmim")))  # fmt: skip
    reads_decoder = "mae" in used and (used["mae"] is None or "decoder_dim" in used["mae"])
    return [
        *TINY_ENCODER,
        f"method={method}",
        *(TINY_DECODER if reads_decoder else []),
        *(TINY_TOKENIZER if "tokenizer" in used else []),
        *(["simmim.mask_patch_size=8"] if "simmim" in used else []),
        *composition,
    ]  # 2 x 2 patches per cell


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh runs a worker per core) each worker computes on one thread, so that the
    workers do not oversubscribe the cores."""
    if hasattr(config, "workerinput"):  # set on xdist's workers only (a pytest a test starts inherits their env)
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cores_shared_or_alone(request, tmp_path_factory):
    """Under pytest-xdist a test marked `exclusive` (it measures its own speed, e.g. a calibration against the steps
    that follow it) runs with no other worker's test beside it. Every test holds the room lock shared, an exclusive
    one holds it alone; the gate makes a waiting exclusive test go next instead of starving behind shared ones. Only
    xdist's workers take the locks: a pytest that a test starts (benchmarks/gpu_check.sh's subset) inherits their
    environment, and waiting for the gate there would deadlock against its own parent test."""
    if not hasattr(request.config, "workerinput"):
        yield
        return
    base = tmp_path_factory.getbasetemp().parent / "mimkit-tests"  # the run's folder, shared by its workers
    alone = request.node.get_closest_marker("exclusive") is not None
    with open(f"{base}.gate", "a") as gate, open(f"{base}.room", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


METHODS = method_names()  # every registered method: tests that loop over methods take them from here


@pytest.fixture
def one_thread():
    """Small convolutions on a shared, oversubscribed CPU run many times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_images(n: int, size: int = 20, seed: int = 0) -> np.ndarray:
    """Smooth random images (low-frequency patterns), uint8 NHWC: learnable, unlike white noise."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, 256, size=(n, 5, 5, 3)).astype(np.float32)
    t = torch.from_numpy(coarse).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1).clamp(0, 255).round().to(torch.uint8).numpy()


@pytest.fixture
def npz_data(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=make_images(64), y_train=np.arange(64) % 4)
    return str(path)


@pytest.fixture
def tiny_cfg(tmp_path, npz_data):
    def build(*overrides: str, out: str = "run", also_reads: tuple[str, ...] = ()):
        method = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("method=")), "mae")
        base = tiny_model(method) + [
            f"data.path={npz_data}",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=2",
            "train.precision=fp32",
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every=1",
            "optim.blr=1e-3",
            "optim.warmup_epochs=1",
            f"train.out_dir={tmp_path / out}",
        ]
        return load_config(None, base + list(overrides), also_reads=also_reads)

    return build


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Tests that take `device` run on the CPU and, where CUDA is present, on the GPU too (benchmarks/gpu_check.sh
    runs them there)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(request.param)


def knn_cli(checkpoint, data, out_dir) -> int:
    """`mimkit knn` on a checkpoint, fp32, quiet, the train split as its own val split (tiny sets)."""
    from mimkit.cli import main

    return main(["knn", f"encoder.checkpoint={checkpoint}", f"data.path={data}", "data.num_workers=0",
                 "data.val_split=train", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                 f"train.out_dir={out_dir}"])  # fmt: skip


def one_error_line(capsys) -> str:
    """The last stderr line of a command that failed as a user error: `mimkit: error: ...`, no traceback."""
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert err and err[-1].startswith("mimkit: error: "), err[-5:]
    assert not any(x.startswith("Traceback") for x in err), err
    return err[-1]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium_dom(page: Path, probe_script: str, probe: Path, profile: Path) -> str:
    """Open `page` with `probe_script` appended to its body in headless Chromium (written as `probe`, which should
    sit where the page's relative links resolve) and return the DOM once loaded. Skips when chromium is absent
    (scripts/test.sh installs Debian's)."""
    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (scripts/test.sh installs it)")
    probe.write_text(Path(page).read_text().replace("</body>", probe_script + "</body>"))
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                          check=False).stdout  # fmt: skip


def trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, *args: str) -> tuple[dict, Path]:
    """What every method's checkpoints must do: 6 steps straight equal 3 + 3 resumed bit for bit (finite loss), the
    encoder exports to timm with identical features, `mimkit knn` scores it. Returns the straight run's checkpoint
    (as read, and its path)."""
    import timm

    from mimkit.checkpoint import load_checkpoint
    from mimkit.interop import export_timm, load_mimkit_checkpoint
    from mimkit.train import pretrain

    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys() and np.isfinite(straight.loss)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model, _, _ = load_mimkit_checkpoint(straight.checkpoint)
    export_timm(straight.checkpoint, tmp_path / "timm")
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, model.encoder.patch_embed.proj.in_channels, 16, 16)
    with torch.no_grad():
        assert torch.equal(exported.forward_features(x), model.encoder.eval().forward_features(x))
    assert knn_cli(straight.checkpoint, tiny_cfg().data.path, tmp_path / "knn") == 0
    return a, straight.checkpoint
