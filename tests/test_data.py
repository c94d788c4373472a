"""Data sources, decoding edge cases, and errors raised before training starts."""

import logging

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from mimkit.data import ResumableBatchSampler, open_source
from mimkit.sources import DataError, FolderImages, load_image
from mimkit.train import pretrain


def write_folder(root, n=24, size=20):
    imgs = make_images(n, size)
    for i, arr in enumerate(imgs):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"img{i}.jpg", quality=90)
    return root


def test_missing_path_fails_before_training(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match=f"data.path: {tmp_path / 'nope'} does not exist"):
        pretrain(tiny_cfg(f"data.path={tmp_path / 'nope'}"))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_empty_folder(tiny_cfg, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="folder .*empty contains no images"):
        pretrain(tiny_cfg(f"data.path={tmp_path / 'empty'}"))


def test_npz_without_x_train(tiny_cfg, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="bad.npz has no array 'x_train' \\(found: images\\)"):
        pretrain(tiny_cfg(f"data.path={path}"))


def test_npz_with_wrong_dtype(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="must be uint8 with shape"):
        open_source(str(path))


def test_too_few_samples_for_one_step(tiny_cfg):
    with pytest.raises(DataError, match="cannot fill one optimizer step of 128"):
        pretrain(tiny_cfg("train.batch_size=128"))


def test_image_folder_tree_trains(tiny_cfg, tmp_path):
    root = write_folder(tmp_path / "imgs")
    src = FolderImages(root)
    assert len(src) == 24 and src.classes == ["class0", "class1"]
    result = pretrain(tiny_cfg(f"data.path={root}", "train.max_steps=2"))
    assert result.step == 2 and np.isfinite(result.loss)


def test_corrupt_and_truncated_jpegs_are_skipped_and_counted(tiny_cfg, tmp_path, caplog):
    root = write_folder(tmp_path / "imgs")
    good = (root / "class0" / "img0.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class1" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    caplog.set_level(logging.WARNING, logger="mimkit")
    # 26 files, batch 8: 3 steps per epoch x 2 epochs touch every file at least once per epoch
    result = pretrain(tiny_cfg(f"data.path={root}"))
    assert result.step == 6
    assert result.skipped_images >= 4  # each bad file at least once per epoch
    assert "truncated.jpg" in caplog.text and "garbage.jpg" in caplog.text
    records = result.metrics.read_text()
    assert f'"skipped_images": {result.skipped_images}' in records


def test_truncated_jpeg_raises_in_load_image(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(make_images(1, 64)[0]).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(Exception, match="t.jpg"):
        load_image(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(make_images(1, 12)[0])
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert img.mode.startswith("I;16")
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"img.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (12, 12)
    if mode == "I;16":  # 16-bit is rescaled, not clipped: mid-grey stays mid-grey
        assert np.allclose(np.asarray(out)[..., 0], np.asarray(rgb.convert("L")), atol=1)


def test_image_smaller_than_the_crop_works(tiny_cfg, tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    for i, arr in enumerate(make_images(16, 5)):
        Image.fromarray(arr).save(root / f"{i}.png")
    result = pretrain(tiny_cfg(f"data.path={root}", "train.max_steps=1"))
    assert np.isfinite(result.loss)


def test_sampler_partitions_each_step_across_ranks_and_micro_steps():
    single = list(ResumableBatchSampler(64, 8, seed=3))
    ranks = [list(ResumableBatchSampler(64, 2, accum_steps=2, rank=r, world_size=2, seed=3)) for r in range(2)]
    for step in range(8):
        pieces = [ranks[r][step * 2 + a] for r in range(2) for a in range(2)]
        assert sorted(sum(pieces, [])) == sorted(single[step])
    # seeds follow the sample, whatever the layout
    seeds = dict(sum(single, []))
    assert all(seeds[i] == s for batch in ranks[0] for i, s in batch)


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    s = ResumableBatchSampler(40, 4, seed=0)
    full = list(s)
    s.set_epoch(0, start_step=3)
    assert list(s) == full[3:] and len(s) == 7
    s.set_epoch(1)
    assert list(s) != full


def test_embedded_default_dataset_is_real_photos():
    src = open_source("skimage")
    assert len(src) >= 10
    img = src.load(0)
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and img.float().std() > 20
