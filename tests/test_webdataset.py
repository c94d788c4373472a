"""WebDataset tar shards: streaming, exact mid-epoch resume, corrupt samples skipped and counted."""

import io
import itertools
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import TINY_MODEL, make_images
from PIL import Image

from mimkit.checkpoint import load_checkpoint
from mimkit.sources import DataError
from mimkit.train import pretrain


@pytest.fixture
def shards(tmp_path):
    imgs = make_images(48, 20)
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(3):
        with wds.TarWriter(str(root / f"train-{s:03d}.tar")) as sink:
            for i in range(s * 16, (s + 1) * 16):
                buf = io.BytesIO()
                Image.fromarray(imgs[i]).save(buf, format="PNG")
                data = buf.getvalue() if i != 5 else b"corrupt bytes"
                sink.write({"__key__": f"{i:05d}", "png": data, "cls": str(i % 4).encode()})
    return root


def test_webdataset_needs_num_samples(tiny_cfg, shards):
    with pytest.raises(DataError, match="data.num_samples is required"):
        pretrain(tiny_cfg(f"data.path={shards}/train-{{000..002}}.tar"))


def test_missing_shard_is_named(tiny_cfg, shards):
    with pytest.raises(DataError, match=r"shard .*train-003.tar does not exist \(7 missing\)"):
        pretrain(tiny_cfg(f"data.path={shards}/train-{{000..009}}.tar", "data.num_samples=48"))


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_trains_and_resumes_exactly(tiny_cfg, shards, workers):
    common = [f"data.path={shards}/train-{{000..002}}.tar", "data.num_samples=48", f"data.num_workers={workers}"]
    straight = pretrain(tiny_cfg(*common, "train.max_steps=9", out="a"))
    assert straight.skipped_images >= 1  # the corrupt sample, counted
    pretrain(tiny_cfg(*common, "train.max_steps=4", out="b"))
    resumed = pretrain(tiny_cfg(*common, "train.max_steps=9", out="b"))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folder_of_shards_is_detected(tiny_cfg, shards):
    result = pretrain(tiny_cfg(f"data.path={shards}", "data.num_samples=48", "train.max_steps=2"))
    assert result.step == 2


def undecodable_shard(tmp_path, kind):
    """A .tar of random bytes, or a real tar holding only text files (no image entry in any sample)."""
    shard = tmp_path / f"{kind}.tar"
    if kind == "random-bytes":
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    else:
        with tarfile.open(shard, "w") as tar:
            for i in range(6):
                for ext in ("txt", "cls"):
                    data = f"sample {i}".encode()
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shard


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["random-bytes", "text-only"])
def test_a_shard_without_one_decodable_image_ends_in_one_line(tmp_path, kind, workers):
    """It used to spin at 100% CPU forever, pass after pass over the shard: run in a subprocess with a timeout."""
    shard = undecodable_shard(tmp_path, kind)
    argv = ["pretrain", *TINY_MODEL, f"data.path={shard}", "data.num_samples=16", f"data.num_workers={workers}",
            "train.batch_size=8", "train.max_steps=1", "train.precision=fp32", "train.progress=false",
            "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    try:
        proc = subprocess.run([sys.executable, "-m", "mimkit.cli", *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"pretrain on a {kind} shard with {workers} workers still running after 120 s")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in lines if x.startswith("mimkit: error: ")]  # (a worker's warnings may still follow it)
    assert len(errors) == 1, lines[-5:]
    assert errors[0].startswith("mimkit: error: data.path: no decodable image in WebDataset shard(s)"), errors
    assert str(shard) in errors[0]
    assert ("no sample could be read" if kind == "random-bytes" else "none with a decodable image entry") in errors[0]
    assert not any(x.startswith(("Traceback", "Original Traceback", "Caught ")) for x in lines), lines


def test_one_decodable_image_among_text_samples_keeps_training(tmp_path):
    """The bound is a whole pass without an image: a shard with a single image among text samples still trains."""
    shard = undecodable_shard(tmp_path, "text-only")
    buf = io.BytesIO()
    Image.fromarray(make_images(1, 20)[0]).save(buf, format="PNG")
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("00099.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    from mimkit.config import load_config
    from mimkit.data import WebDatasetStream, pretrain_transform

    cfg = load_config(None, TINY_MODEL)
    stream = WebDatasetStream(
        [str(shard)], pretrain_transform(16, cfg.data), None, seed=0, epoch=0, rank=0, world_size=1
    )
    samples = list(itertools.islice(iter(stream), 5))  # the same image, pass after pass
    assert len(samples) == 5 and all(s["image"].shape == (3, 16, 16) for s in samples)
    assert samples[0]["skipped"] == 6  # the six text samples before it, counted
