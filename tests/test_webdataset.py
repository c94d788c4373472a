"""WebDataset tar shards: streaming, exact mid-epoch resume, corrupt samples skipped and counted."""

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from mimkit.checkpoint import load_checkpoint
from mimkit.data import DataError
from mimkit.train import pretrain

from conftest import make_images


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
