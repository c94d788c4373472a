"""data.decode=device: JPEGs decoded and augmented on the training device give the CPU path's batches.

Tolerances (uint8 levels of the resized crop, before normalisation):
- device=cpu: torchvision.io.decode_jpeg and PIL both use libjpeg-turbo, and the crop is resized by the same
  torchvision kernel: the batches are bit-identical.
- CUDA resizes uint8 in float32 and rounds, where the CPU resizes uint8 natively (fixed point): <= 1 level apart
  (test_float_resampling_is_within_one_level, run on the CPU). nvJPEG's IDCT and chroma upsampling differ from
  libjpeg-turbo by a level or two on photos: on CUDA the whole batch must agree to a mean of <= 1.5 levels and
  99.9% of values to <= 8 levels. Crop boxes, flips and mask inputs are drawn in the workers from the sample
  seed and the JPEG header, so they are identical on every device (a wrong box or flip moves tens of levels).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_images
from PIL import Image
from torchvision.transforms import v2

from mimkit import device_decode
from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.data import ViewSpec, pretrain_transform
from mimkit.device_decode import draw_crop_and_flip, resolve_decode
from mimkit.pipeline import PretrainData
from mimkit.sources import DataError
from mimkit.train import pretrain

LEVEL = 1 / 255


def photo_like(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth images with grain, of assorted sizes and aspect ratios (non-square crops, fallback boxes)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (23, 57), (64, 64), (31, 44), (90, 20), (48, 36)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        base = make_images(1, max(h, w), seed=seed + i)[0][:h, :w].astype(np.float64)
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def write_jpeg_folder(root, n: int = 24, odd: bool = True):
    """JPEGs (colour, 4:2:0 and 4:4:4, progressive, greyscale), plus a PNG and a CMYK JPEG that the device path
    sends through PIL in the worker."""
    for i, arr in enumerate(photo_like(n)):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr)
        if odd and i == 3:
            img.save(folder / f"{i:03d}.png")
        elif odd and i == 5:
            img.convert("CMYK").save(folder / f"{i:03d}.jpg", quality=90)
        elif odd and i == 7:
            img.convert("L").save(folder / f"{i:03d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:03d}.jpg", quality=90, subsampling=i % 3, progressive=i % 4 == 1)
    return root


def data_cfg(path, *overrides: str):
    return load_config(None, TINY_MODEL + [f"data.path={path}", "data.num_workers=0", *overrides])


def batches(data: PretrainData, epoch: int, count: int, start: int = 0) -> list[dict]:
    it = data.epoch_batches(epoch, start)
    return [next(it) for _ in range(count)]


def build(path, decode: str, device: torch.device, *overrides: str, mask_inputs=None, second_view=None,
          batch: int = 8) -> PretrainData:  # fmt: skip
    cfg = data_cfg(path, f"data.decode={decode}", *overrides)
    return PretrainData(cfg, 16, mask_inputs, batch, 1, seed=3, device=device, second_view=second_view)


def assert_same_images(cpu: torch.Tensor, dev: torch.Tensor, std: tuple = (0.229, 0.224, 0.225)) -> None:
    """Compared in uint8 levels (the normalisation divides by std)."""
    assert cpu.shape == dev.shape
    levels = (cpu - dev.cpu()).abs() * torch.tensor(std).view(1, 3, 1, 1) / LEVEL
    if dev.device.type == "cpu":
        assert levels.max().item() < 1e-3, levels.max().item()  # float rounding of the normalisation only
    else:
        assert levels.mean().item() <= 1.5 and torch.quantile(levels.flatten().float(), 0.999).item() <= 8, (
            levels.mean().item(), levels.max().item())  # fmt: skip


def mask_fn(g: torch.Generator) -> dict:
    return {"noise": torch.rand(16, generator=g)}


def test_device_path_equals_cpu_path_on_a_folder(tmp_path, device):
    root = write_jpeg_folder(tmp_path / "imgs")
    cpu = build(root, "cpu", torch.device("cpu"), mask_inputs=mask_fn)
    dev = build(root, "device", device, mask_inputs=mask_fn)
    assert cpu.decode == "cpu" and dev.decode == "device" and dev.device_augment is not None
    for epoch in (0, 1):
        for a, b in zip(batches(cpu, epoch, 3), batches(dev, epoch, 3)):
            assert b["image"].device.type == device.type and b["image"].dtype == torch.float32
            assert_same_images(a["image"], b["image"])
            assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["skipped"], b["skipped"])


def test_decoding_in_several_threads_gives_the_same_batch(tmp_path):
    """On CUDA the batch is split over decode threads (nvJPEG's host-side stage); the result must not depend on it."""
    root = write_jpeg_folder(tmp_path / "imgs", n=16)
    dev = build(root, "device", torch.device("cpu"), mask_inputs=mask_fn)
    one = batches(dev, 0, 2)
    dev.device_augment.decode_threads = 3
    three = batches(dev, 0, 2)
    assert dev.device_augment.pool is not None
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one, three))


def test_prefetch_thread_yields_the_same_batches_raises_errors_and_stops_when_dropped(tmp_path):
    """The background decoding of CUDA runs (its stream handling is CUDA's; the thread logic is checked here)."""
    import gc

    root = write_jpeg_folder(tmp_path / "imgs", n=16, odd=False)
    dev = build(root, "device", torch.device("cpu"), mask_inputs=mask_fn, batch=4)
    augment = dev.device_augment
    inline = list(device_decode.augmented(dev._encoded_batches(0, 0), augment))
    threaded = list(device_decode.augmented(dev._encoded_batches(0, 0), augment, prefetch=2))
    assert len(inline) == len(threaded) == 4
    for a, b in zip(inline, threaded):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["noise"], b["noise"])

    def broken(batch):
        raise ValueError("decoder exploded")

    with pytest.raises(ValueError, match="decoder exploded"):
        next(device_decode.augmented(dev._encoded_batches(0, 0), broken_augment(augment, broken), prefetch=2))

    def endless():
        while True:
            yield from dev._encoded_batches(0, 0)

    stream = device_decode.augmented(endless(), augment, prefetch=2)
    next(stream)
    thread = stream.thread
    del stream
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def broken_augment(augment, call):
    class Broken:
        device = augment.device

        def __call__(self, batch):
            return call(batch)

    return Broken()


def test_device_path_resumes_mid_epoch_like_the_cpu_path(tmp_path):
    root = write_jpeg_folder(tmp_path / "imgs", odd=False)
    dev = build(root, "device", torch.device("cpu"))
    whole = batches(dev, 2, 3)
    resumed = batches(dev, 2, 1, start=2)
    assert torch.equal(whole[2]["image"], resumed[0]["image"])


def test_crop_and_flip_draws_match_the_cpu_transform():
    cfg = data_cfg("skimage")
    transform = pretrain_transform(16, cfg.data)
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    for seed in range(40):
        torch.manual_seed(seed)
        box, flip = draw_crop_and_flip(transform, 37, 53)
        crop = v2.functional.resized_crop(
            img, *box, [16, 16], interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        expected = v2.functional.to_dtype(crop, torch.float32, scale=True)
        expected = expected.flip(-1) if flip else expected
        expected = v2.functional.normalize(expected, list(cfg.data.mean), list(cfg.data.std))
        torch.manual_seed(seed)
        assert torch.equal(transform(img), expected), seed
    flips = set()
    for seed in range(40):
        torch.manual_seed(seed)
        flips.add(draw_crop_and_flip(transform, 37, 53)[1])
    assert flips == {True, False}


def test_float_resampling_is_within_one_level():
    """What CUDA does (uint8 -> float32 resize -> round) against the CPU's native uint8 kernel."""
    img = torch.from_numpy(np.ascontiguousarray(photo_like(1)[0])).permute(2, 0, 1).contiguous()
    worst = 0
    for box in [(0, 0, 40, 30), (3, 2, 20, 25), (10, 5, 17, 9)]:
        for size in (16, 32, 224):
            native = v2.functional.resized_crop(img, *box, [size, size], interpolation=v2.InterpolationMode.BICUBIC,
                                                antialias=True)  # fmt: skip
            floated = v2.functional.resized_crop(img.float(), *box, [size, size], antialias=True,
                                                 interpolation=v2.InterpolationMode.BICUBIC)  # fmt: skip
            floated = floated.clamp(0, 255).round().to(torch.uint8)
            worst = max(worst, (native.int() - floated.int()).abs().max().item())
    assert worst <= 1


def test_two_view_transform_on_the_device(tmp_path, device):
    """BEiT's two views (bicubic ViT view, bilinear tokenizer view): same boxes and flips as the CPU path. The CPU
    path resizes PIL images with PIL's filters here (bicubic a=-0.5) where torch uses a=-0.75: mean <= 2 levels."""
    root = write_jpeg_folder(tmp_path / "imgs", n=16, odd=False)
    second = ViewSpec(8, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cpu = build(root, "cpu", torch.device("cpu"), second_view=second)
    dev = build(root, "device", device, second_view=second)
    a, b = batches(cpu, 0, 1)[0], batches(dev, 0, 1)[0]
    for key, std in (("image", (0.229, 0.224, 0.225)), ("tokenizer_image", (0.5, 0.5, 0.5))):
        levels = (a[key] - b[key].cpu()).abs() * torch.tensor(std).view(1, 3, 1, 1) / LEVEL
        assert levels.mean().item() <= 2.0, (key, levels.mean().item())
    with pytest.raises(DataError, match="lanczos"):
        build(root, "device", device, second_view=second._replace(interpolation="lanczos"))


def test_decode_setting(tmp_path, npz_data):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    transform = pretrain_transform(16, data_cfg("skimage").data)
    assert resolve_decode("auto", "folder", cuda, transform) == "device"
    assert resolve_decode("auto", "webdataset", cuda, transform) == "device"
    assert resolve_decode("auto", "folder", cpu, transform) == "cpu"
    assert resolve_decode("auto", "npz", cuda, transform) == "cpu"
    assert resolve_decode("cpu", "folder", cuda, transform) == "cpu"
    assert resolve_decode("device", "folder", cpu, transform) == "device"
    with pytest.raises(DataError, match="data.decode: 'device' needs encoded files .* format 'npz'"):
        PretrainData(data_cfg(npz_data, "data.decode=device"), 16, None, 8, 1, device=cpu)
    with pytest.raises(ConfigError, match="data.decode: 'gpu' is not allowed; allowed: 'auto', 'cpu', 'device'"):
        data_cfg(npz_data, "data.decode=gpu")
    assert PretrainData(data_cfg(npz_data), 16, None, 8, 1, device=cpu).device_augment is None


def test_an_image_no_decoder_reads_is_stood_in_for(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "imgs", n=8, odd=False)
    dev = build(root, "device", torch.device("cpu"), batch=4)
    bad = {0}
    real = device_decode._decode_jpegs

    def flaky(chunks, device):  # the batch fails, then one image fails alone, also through PIL (garbage bytes)
        if len(chunks) > 1:
            raise RuntimeError("batch decode failed")
        if bad:
            bad.pop()
            chunks[0][100:] = 7
            raise RuntimeError("nvjpeg error")
        return real(chunks, device)

    monkeypatch.setattr(device_decode, "_decode_jpegs", flaky)
    batch = batches(dev, 0, 1)[0]
    assert batch["skipped"].tolist() == [1, 0, 0, 0]
    assert torch.equal(batch["image"][0], batch["image"][1])  # its neighbour, with the neighbour's crop


def test_pretrain_with_device_decode_resumes_bit_identically(tmp_path):
    root = write_jpeg_folder(tmp_path / "imgs", n=32)
    common = TINY_MODEL + [f"data.path={root}", "data.decode=device", "train.device=cpu", "data.num_workers=0",
                           "train.batch_size=8", "train.epochs=2", "train.precision=fp32", "train.progress=false",
                           "train.tensorboard=false", "optim.warmup_epochs=1"]  # fmt: skip
    straight = pretrain(load_config(None, common + ["train.max_steps=6", f"train.out_dir={tmp_path / 'a'}"]))
    pretrain(load_config(None, common + ["train.max_steps=3", f"train.out_dir={tmp_path / 'b'}"]))
    resumed = pretrain(load_config(None, common + ["train.max_steps=6", f"train.out_dir={tmp_path / 'b'}"]))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.skipped_images == 0


def test_webdataset_jpegs_on_the_device_match_the_cpu_path(tmp_path, device):
    wds = pytest.importorskip("webdataset")
    root = tmp_path / "shards"
    root.mkdir()
    imgs = photo_like(24)
    for s in range(2):
        with wds.TarWriter(str(root / f"train-{s:03d}.tar")) as sink:
            for i in range(s * 12, (s + 1) * 12):
                buf = io.BytesIO()
                Image.fromarray(imgs[i]).save(buf, format="JPEG", quality=90)
                data = buf.getvalue() if i != 4 else b"corrupt bytes"
                sink.write({"__key__": f"{i:05d}", "jpg": data})
    path = f"{root}/train-{{000..001}}.tar"
    cpu = build(path, "cpu", torch.device("cpu"), "data.num_samples=24", mask_inputs=mask_fn, batch=4)
    dev = build(path, "device", device, "data.num_samples=24", mask_inputs=mask_fn, batch=4)
    got_cpu, got_dev = batches(cpu, 1, 5), batches(dev, 1, 5)
    assert sum(int(b["skipped"].sum()) for b in got_dev) == sum(int(b["skipped"].sum()) for b in got_cpu) == 1
    for a, b in zip(got_cpu, got_dev):
        assert_same_images(a["image"], b["image"])
        assert torch.equal(a["noise"], b["noise"])
    assert torch.equal(batches(dev, 1, 1, start=3)[0]["image"].cpu(), got_dev[3]["image"].cpu())
