"""A corpus of bad files, generated here: each is skipped and counted, or stops the run before training
with a message naming the culprit."""

import logging

import numpy as np
import PIL.Image
import pytest
from conftest import make_images
from PIL import Image

from mimkit.sources import DataError, load_npz
from mimkit.train import pretrain


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    good = root / "good"
    good.mkdir(parents=True)
    for i, arr in enumerate(make_images(20, 24)):
        Image.fromarray(arr).save(good / f"{i}.jpg")
    bad = root / "bad"
    bad.mkdir()
    jpeg = (good / "0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    Image.fromarray(make_images(1, 24)[0]).save(bad / "corrupt.png")
    png = bytearray((bad / "corrupt.png").read_bytes())
    png[60:120] = b"\x00" * 60  # smash the image data
    (bad / "corrupt.png").write_bytes(bytes(png))
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.png").write_text("hello, I am not a PNG\n")
    Image.new("1", (20000, 20000)).save(bad / "bomb.png")  # 4e8 pixels: PIL's decompression-bomb guard
    (bad / "unreadable.jpg").write_bytes(jpeg)
    odd = root / "odd"  # unusual but valid: must load
    odd.mkdir()
    Image.fromarray(make_images(1, 24)[0]).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(odd / "deep16.png")
    Image.fromarray(make_images(1, 1)[0]).save(odd / "tiny1x1.png")
    (root / "loop").mkdir()
    (root / "loop" / "again").symlink_to(root)  # a symlink loop must not hang the file scan

    real_open = PIL.Image.open

    def guarded_open(fp, *args, **kwargs):  # root can read anything, so simulate EACCES for this one file
        if str(fp).endswith("unreadable.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", guarded_open)
    return root


def test_bad_files_are_skipped_counted_and_named(tiny_cfg, corpus, caplog):
    caplog.set_level(logging.WARNING, logger="mimkit")
    result = pretrain(tiny_cfg(f"data.path={corpus}", "train.batch_size=5", "train.epochs=2"))
    # 29 files, batch 5: 5 steps per epoch cover 25 of them each epoch
    assert result.step == 10 and np.isfinite(result.loss)
    bad = ["truncated.jpg", "corrupt.png", "zero.jpg", "text.png", "bomb.png", "unreadable.jpg"]
    seen = [name for name in bad if name in caplog.text]
    assert seen == bad, f"skips logged only for {seen}"
    assert result.skipped_images >= len(seen)
    for name in ["cmyk.jpg", "deep16.png", "tiny1x1.png"]:
        assert name not in caplog.text  # unusual files that are valid load fine


def test_npz_with_mixed_image_sizes_is_refused_before_training(tmp_path):
    path = tmp_path / "mixed.npz"
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((8, 8, 3), np.uint8), np.zeros((9, 7, 3), np.uint8)
    np.savez(path, x_train=mixed)
    with pytest.raises(DataError, match="mixed.npz 'x_train' is not a plain array"):
        load_npz(path)


def test_npz_that_is_not_an_archive(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_text("nope")
    with pytest.raises(DataError, match="cannot read .*fake.npz as .npz"):
        load_npz(path)


@pytest.mark.parametrize(
    "y_test,message",
    [(np.array([0, 1, 2, -1]), "labels must be >= 0, found -1"),
     (np.array([0, 1, 7, 2]), "'test' has labels absent from 'train': \\[7\\]")],
)  # fmt: skip
def test_labels_out_of_range_stop_evaluation_before_it_starts(tmp_path, y_test, message):
    from mimkit.eval import load_eval_config
    from mimkit.eval.common import open_labelled

    path = tmp_path / "labelled.npz"
    images = make_images(12, 16)
    np.savez(path, x_train=images[:8], y_train=np.array([0, 1, 2, 0, 1, 2, 0, 1]), x_test=images[8:], y_test=y_test)
    cfg = load_eval_config("knn", None, [f"data.path={path}", "encoder.arch=vit_tiny_patch4_32"])
    with pytest.raises(DataError, match=message):
        open_labelled(cfg.data)
