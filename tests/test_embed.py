"""`mimkit embed`: encoder features without masking, with the image identities, as the evaluation commands pool them."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_images, one_error_line
from PIL import Image

import mimkit
from mimkit.cli import main
from mimkit.eval.common import eval_transform
from mimkit.eval.config import IMAGENET_MEAN, IMAGENET_STD
from mimkit.interop import load_mimkit_checkpoint
from mimkit.sources import load_image
from mimkit.train import pretrain


@pytest.fixture
def pretrained(tiny_cfg):
    return pretrain(tiny_cfg("train.max_steps=1", out="mae")).checkpoint


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for i, img in enumerate(make_images(5, size=16, seed=3)):
        sub = root / ("cat" if i % 2 else "dog")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"im{i}.png")
    return root


def own_features(ckpt, images, pool):
    """The encoder's own features: forward_features (final norm) + the pooling, on the evaluation transform."""
    model, _, _ = load_mimkit_checkpoint(ckpt)
    t = eval_transform(16, IMAGENET_MEAN, IMAGENET_STD)
    x = torch.stack([t(im) for im in images])
    with torch.no_grad():
        tokens = model.encoder.forward_features(x)
    cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
    return {"cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], -1)}[pool].numpy()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_embed_folder_equals_the_encoder_features_and_names_the_files(pretrained, folder, tmp_path, pool, one_thread):
    out = tmp_path / "feats.npz"
    assert main(["embed", str(pretrained), str(folder), "--out", str(out), "--pool", pool, "--device", "cpu"]) == 0
    saved = np.load(out)
    files = sorted(p for p in folder.rglob("*.png"))
    assert list(saved["ids"]) == [p.relative_to(folder).as_posix() for p in files]
    assert list(saved["classes"]) == ["cat", "dog"]
    assert list(saved["labels"]) == [0 if p.parent.name == "cat" else 1 for p in files]
    expected = own_features(pretrained, [load_image(p) for p in files], pool)
    np.testing.assert_allclose(saved["features"], expected, rtol=1e-5, atol=1e-5)


def test_embed_api_returns_the_array_of_an_unlabelled_npz(pretrained, tmp_path, one_thread):
    x = make_images(6, size=16, seed=4)
    np.savez(tmp_path / "u.npz", x_test=x)
    feats = mimkit.embed(str(pretrained), str(tmp_path / "u.npz"), tmp_path / "f.npy", split="test", device="cpu",
                         progress=False)  # fmt: skip
    expected = own_features(pretrained, [torch.from_numpy(im).permute(2, 0, 1) for im in x], "cls")
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), feats)
    assert (tmp_path / "f.ids.txt").read_text().split() == [str(i) for i in range(6)]


def test_embed_of_a_random_init_preset(folder, tmp_path, one_thread):
    feats = mimkit.embed("none", str(folder), arch="vit_tiny_patch4_32", img_size=16, device="cpu", progress=False)
    assert feats.shape == (5, 192) and np.isfinite(feats).all()


@pytest.mark.parametrize("out, words", [("feats.csv", "suffix '.csv'"), ("feats.parquet", "mimkit[parquet]")])
def test_a_bad_out_is_one_line_before_compute(pretrained, folder, tmp_path, capsys, monkeypatch, out, words):
    import mimkit.eval.embed as em

    if out.endswith(".parquet"):  # as without the extra, installed or not: `import pyarrow` fails
        monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setattr(em, "load_encoder", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["embed", str(pretrained), str(folder), "--out", str(tmp_path / out)]) == 2
    assert words in one_error_line(capsys)


def test_embed_writes_parquet_rows_of_id_label_and_feature(pretrained, folder, tmp_path, one_thread):
    import pyarrow.parquet as pq

    npz = mimkit.embed(str(pretrained), str(folder), tmp_path / "f.npz", device="cpu", progress=False)
    mimkit.embed(str(pretrained), str(folder), tmp_path / "f.parquet", device="cpu", progress=False)
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    saved = np.load(tmp_path / "f.npz")
    assert table["id"] == list(saved["ids"]) and table["label"] == list(saved["labels"])
    np.testing.assert_array_equal(np.array(table["feature"], dtype=np.float32), npz)
