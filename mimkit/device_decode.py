"""Decode-on-device input path (`data.decode`): JPEG bytes are read by the DataLoader workers, decoded in
batches on the training device (nvJPEG through torchvision.io.decode_jpeg on CUDA), then cropped, resized,
flipped and normalised there.

At several thousand images per second per GPU, PIL decoding on a handful of cores is the bottleneck of the
CPU path; here the workers only read bytes, parse the JPEG header (size, colour mode) and draw each sample's
crop box, flip and mask inputs from its own seed, in the same order as the CPU transform draws them. So the
same seed gives the same crop box and flip on both paths, and resume stays exact. The pixels differ only by
decoding (nvJPEG vs libjpeg-turbo) and resampling (CUDA resizes uint8 in float32 and rounds; the CPU resizes
uint8 natively): tests/test_device_decode.py states the tolerances.

Anything the device path cannot decode (PNG and other formats, CMYK / YCCK JPEGs, files without an end-of-image
marker) is decoded on the CPU in the worker, as the CPU path does it, and joins the batch as pixels. A JPEG whose
header parses but whose device and CPU decodes both fail stands in with another image of its batch (logged,
counted in 'skipped'), since the batch is already fixed by then.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from mimkit.data import (
    _INTERPOLATION,
    CorruptImage,
    DataError,
    MaskInputs,
    PretrainDataset,
    TwoViewTransform,
    WebDatasetStream,
    to_rgb,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("mimkit")

DEVICE_FORMATS = ("folder", "webdataset")  # sources that hold encoded files
_JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as PIL does; CMYK / YCCK go through PIL


# ---------------------------------------------------------------- choosing the path


def resolve_decode(setting: str, fmt: str, device: torch.device | None, transform) -> str:
    """`data.decode`: auto = on the device for folder / WebDataset sources when training on CUDA, else the CPU
    path; device forces it (also on a CPU device, where it runs the same code: tests); cpu never."""
    supported, why = device_transform_supported(transform)
    if setting == "device":
        if fmt not in DEVICE_FORMATS:
            raise DataError(
                f"data.decode: 'device' needs encoded files (data.format folder or webdataset); data.path "
                f"is format '{fmt}', which is decoded already: use data.decode=auto or cpu"
            )
        if not supported:
            raise DataError(f"data.decode: 'device' cannot {why}; use data.decode=auto or cpu")
        return "device"
    if setting == "auto" and device is not None and device.type == "cuda" and fmt in DEVICE_FORMATS and supported:
        return "device"
    return "cpu"


def device_transform_supported(transform) -> tuple[bool, str]:
    if isinstance(transform, TwoViewTransform) and transform.second.interpolation == "lanczos":
        return False, "resample the tokenizer view with lanczos (PIL only)"
    return True, ""


# ---------------------------------------------------------------- per-sample draws (in the workers)


def _crop_op(transform) -> v2.RandomResizedCrop:
    return next(t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop))


def draw_crop_and_flip(transform, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (top, left, height, width) and flip the CPU `transform` would draw for an image of this size,
    from the current torch RNG, in the same order (crop first, then flip). No pixels are needed."""
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)  # size without memory
    if isinstance(transform, TwoViewTransform):
        box = transform.get_params(shape_only, transform.scale, (3 / 4, 4 / 3))
        flip = transform.hflip and bool(torch.rand(1) < 0.5)
        top, left, height, width = (int(x) for x in box)
        return (top, left, height, width), flip
    crop = _crop_op(transform)
    params = crop.make_params([shape_only]) if hasattr(crop, "make_params") else crop._get_params([shape_only])
    box = (params["top"], params["left"], params["height"], params["width"])
    flips = [t for t in transform.transforms if isinstance(t, v2.RandomHorizontalFlip)]
    flip = bool(flips) and not bool(torch.rand(1) >= flips[0].p)  # v2 skips the flip when rand >= p
    top, left, height, width = (int(x) for x in box)
    return (top, left, height, width), flip


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) when nvJPEG can decode these bytes to what PIL would give (a complete RGB / grey JPEG),
    else None (the sample is decoded on the CPU instead)."""
    if data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-1024:]:  # not a JPEG, or truncated
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG" or img.mode not in _JPEG_MODES:
                return None
            return img.height, img.width
    except Exception:
        return None


def encode_sample(data: bytes, name: str, seed: int, transform, mask_inputs: MaskInputs | None) -> dict:
    """A worker's share of one sample: its JPEG bytes (or CPU-decoded pixels), crop box, flip and mask inputs,
    all drawn from `seed` as `seeded_sample` draws them. Raises CorruptImage for undecodable data."""
    size = jpeg_header(data)
    pixels = None
    if size is None:  # decode here, exactly as the CPU path does
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                pixels = v2.functional.pil_to_tensor(to_rgb(img))
        except Exception as e:
            raise CorruptImage(f"{name}: {type(e).__name__}: {e}") from e
        size = tuple(pixels.shape[-2:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        box, flip = draw_crop_and_flip(transform, *size)
    out = {"jpeg": None if pixels is not None else torch.frombuffer(bytearray(data), dtype=torch.uint8),
           "pixels": pixels, "box": torch.tensor(box), "flip": torch.tensor(flip), "name": name}  # fmt: skip
    if mask_inputs is not None:
        out.update(mask_inputs(torch.Generator().manual_seed(seed ^ 0x5DEECE66D)))
    return out


def collate_encoded(samples: list[dict]) -> dict:
    """One batch for the trip from a worker: all JPEG bytes in one flat tensor (one shared-memory transfer),
    CPU-decoded pixels as a list, everything else stacked."""
    jpegs = [s.pop("jpeg") for s in samples]
    pixels = [s.pop("pixels") for s in samples]
    names = [s.pop("name") for s in samples]
    present = [j for j in jpegs if j is not None]
    out = default_collate(samples)
    out["jpeg_bytes"] = torch.cat(present) if present else torch.empty(0, dtype=torch.uint8)
    out["jpeg_lengths"] = torch.tensor([0 if j is None else len(j) for j in jpegs])
    out["pixels"] = [p if p is not None else torch.empty(0, dtype=torch.uint8) for p in pixels]
    out["names"] = names
    return out


class EncodedFolderDataset(PretrainDataset):
    """PretrainDataset of a folder source for the device path: (index, seed) -> encoded sample. Unreadable files
    are skipped to the next index, as PretrainDataset does."""

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        n = len(self.source)
        for skipped in range(min(n, 100)):
            i = (index + skipped) % n
            path = self.source.files[i]
            try:
                sample = encode_sample(path.read_bytes(), str(path), seed, self.transform, self.mask_inputs)
            except (CorruptImage, OSError) as e:
                log.warning("skipping corrupt image %s", e)
                continue
            sample["skipped"] = skipped
            return sample
        raise DataError(f"data.path: 100 consecutive unreadable images starting at {self.source.describe(index)}")


class EncodedWebDatasetStream(WebDatasetStream):
    """WebDatasetStream yielding encoded samples (same shard order, keys and per-sample seeds)."""

    def make_sample(self, name: str, data: bytes, seed: int) -> dict:
        return encode_sample(data, name, seed, self.transform, self.mask_inputs)


# ---------------------------------------------------------------- on the device (main process)


class DeviceAugment:
    """Turns a collated encoded batch into the CPU path's batch: decode (batched), crop + resize per sample
    with torchvision's resized_crop (the CPU transform's own kernel), flip, to float, normalise. Outputs live
    on `device`; mask inputs stay where they are (the training loop moves them)."""

    def __init__(self, transform, device: torch.device, decode_threads: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # nvJPEG does part of its work (Huffman decoding of small images) on the host: several threads, each
        # decoding a share of the batch, keep more of it in flight (torch releases the GIL inside ops)
        self.decode_threads = decode_threads or (4 if self.device.type == "cuda" else 1)
        self.pool: ThreadPoolExecutor | None = None
        if isinstance(transform, TwoViewTransform):
            self.views = [("image", transform.img_size, "bicubic", transform.norm.mean, transform.norm.std),
                          (transform.second.key, transform.second.size, transform.second.interpolation,
                           transform.second.mean, transform.second.std)]  # fmt: skip
        else:
            crop = _crop_op(transform)
            norm = next(t for t in transform.transforms if isinstance(t, v2.Normalize))
            self.views = [("image", crop.size[0], crop.interpolation.value, norm.mean, norm.std)]
        self.stats = {
            key: (torch.tensor(mean, device=self.device).view(1, 3, 1, 1),
                  torch.tensor(std, device=self.device).view(1, 3, 1, 1))
            for key, _, _, mean, std in self.views
        }  # fmt: skip

    def decode(self, batch: dict) -> tuple[list[torch.Tensor | None], list[int]]:
        """Every sample's uint8 (3, H, W) image on the device (None where it failed), and the positions that had to be
        stood in for."""
        lengths = batch["jpeg_lengths"].tolist()
        chunks = torch.split(batch["jpeg_bytes"], [n for n in lengths if n])
        jpeg_at = [i for i, n in enumerate(lengths) if n]
        decoded: dict[int, torch.Tensor | None] = {}
        if jpeg_at:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision >= 0.29 flags its image decoders as deprecated
                try:
                    decoded.update(zip(jpeg_at, self._decode_all(list(chunks))))
                except RuntimeError:  # no partial results from a batch: decode one at a time
                    for i, data in zip(jpeg_at, chunks):
                        decoded[i] = self._decode_one(data, batch["names"][i])
        images: list[torch.Tensor | None] = []
        failed: list[int] = []
        for i, n in enumerate(lengths):
            img = decoded.get(i) if n else batch["pixels"][i].to(self.device, non_blocking=True)
            if img is None:
                failed.append(i)
            images.append(img)
        if len(failed) == len(images):
            raise DataError(f"data.path: no image of a batch could be decoded (first: {batch['names'][0]})")
        return images, failed

    def _decode_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        threads = min(self.decode_threads, len(chunks))
        if threads <= 1:
            return _decode_jpegs(chunks, self.device)
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="mimkit-decode")
        share = (len(chunks) + threads - 1) // threads
        parts = [chunks[i : i + share] for i in range(0, len(chunks), share)]
        images = [img for part in self.pool.map(self._decode_part, parts) for img in part]
        if self.device.type == "cuda":  # allocated on the decode threads' streams, read on this one's
            current = torch.cuda.current_stream(self.device)
            for img in images:
                img.record_stream(current)
        return images

    def _decode_part(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = _decode_jpegs(chunks, self.device)
        if self.device.type == "cuda":  # decoded on this thread's stream: done before another stream reads them
            torch.cuda.current_stream(self.device).synchronize()
        return images

    def _decode_one(self, data: torch.Tensor, name: str) -> torch.Tensor | None:
        try:
            return _decode_jpegs([data], self.device)[0]
        except RuntimeError:
            pass
        try:  # the device decoder refused it: PIL, as the CPU path
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                img.load()
                return v2.functional.pil_to_tensor(to_rgb(img)).to(self.device)
        except Exception as e:
            log.warning("skipping corrupt image %s: %s (stood in for by another image of its batch)", name, e)
            return None

    def __call__(self, batch: dict) -> dict:
        decoded, failed = self.decode(batch)
        boxes, flips = batch["box"].tolist(), batch["flip"].clone()
        skipped = batch["skipped"].clone()
        for i in failed:  # a copy of the nearest decoded sample of the batch (its crop box and flip)
            donor = next(j for j in sorted(range(len(decoded)), key=lambda j: abs(j - i)) if j not in failed)
            decoded[i], boxes[i], flips[i] = decoded[donor], boxes[donor], flips[donor]
            skipped[i] += 1
        images = cast(list[torch.Tensor], decoded)  # every failed position filled above
        out = {}
        for key, size, interpolation, _, _ in self.views:
            mode = _INTERPOLATION[interpolation]
            crops = torch.stack([v2.functional.resized_crop(img, *box, [size, size], interpolation=mode, antialias=True)
                                 for img, box in zip(images, boxes)])  # fmt: skip
            flip = flips.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            crops = torch.where(flip, crops.flip(-1), crops)
            mean, std = self.stats[key]
            out[key] = (crops.float().div_(255.0) - mean) / std
        for key, value in batch.items():
            if key not in ("jpeg_bytes", "jpeg_lengths", "pixels", "names", "box", "flip", "skipped"):
                out[key] = value
        out["skipped"] = skipped
        return out


def _decode_jpegs(chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def augmented(batches: Iterator[dict], augment: DeviceAugment, prefetch: int | None = None) -> Iterator[dict]:
    """`augment` applied to each batch. On CUDA (prefetch default 2) a background thread decodes ahead on its own
    stream, so nvJPEG's host-side work and the crops overlap the training step; elsewhere it runs inline unless
    `prefetch` asks for the thread (tests)."""
    if prefetch is None:
        prefetch = 2 if augment.device.type == "cuda" else 0
    if prefetch < 1:
        return (augment(b) for b in batches)
    return _Prefetcher(batches, augment, prefetch)


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(batches: Iterator[dict], augment: DeviceAugment, stream, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread. It holds no reference to its _Prefetcher, so an abandoned one (an endless WebDataset
    epoch, max_steps mid-epoch) is collected, sets `stop`, and this thread lets go of the DataLoader and its workers."""
    try:
        if stream is not None:
            torch.cuda.set_device(augment.device)  # the current device is per thread
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for batch in batches:
                out = augment(batch)
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                if not _put(q, stop, ("batch", out, event)):
                    return
    except BaseException as e:  # handed to the consumer, raised there
        _put(q, stop, ("error", e, None))
        return
    _put(q, stop, ("end", None, None))


class _Prefetcher:
    def __init__(self, batches: Iterator[dict], augment: DeviceAugment, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop, self.device = threading.Event(), augment.device
        stream = torch.cuda.Stream(device=augment.device) if augment.device.type == "cuda" else None
        self.thread = threading.Thread(target=_produce, args=(batches, augment, stream, self.queue, self.stop),
                                       daemon=True, name="mimkit-device-decode")  # fmt: skip
        self.thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.stop.is_set():
            raise StopIteration
        kind, out, event = self.queue.get()
        if kind != "batch":
            self.stop.set()
            if kind == "error":
                raise out
            raise StopIteration
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for value in out.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(current)  # the side stream's allocator must not reuse it too early
        return out

    def __del__(self):
        self.stop.set()
