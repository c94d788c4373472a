"""Image sources (ImageFolder trees, .npz arrays, WebDataset shards, the embedded scikit-image photos),
the MAE pretraining transform, and a resumable, rank-aware batch sampler.

Reproducibility: every sample gets a seed drawn from (run seed, epoch); its augmentation and its mask
are drawn from that seed alone. A batch is therefore the same whatever the number of workers or
processes, and a run resumed in the middle of an epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from mimkit.datasets import open_torchvision
from mimkit.extras import install_hint
from mimkit.sources import CorruptImage, DataError, FolderImages, check_channels, load_npz, skimage_photos, to_rgb  # noqa: F401

log = logging.getLogger("mimkit")

MaskInputs = Callable[[torch.Generator], dict[str, torch.Tensor]]


def resolve_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path == "skimage":
        return "skimage"
    if path.startswith("torchvision:"):
        return "torchvision"
    if path.endswith((".npz", ".npy")):
        return "npz"
    if path.endswith(".tar") or "{" in path or "::" in path:
        return "webdataset"
    p = Path(path)
    if p.is_dir() and any(p.glob("*.tar")) and not any(f.suffix.lower() in IMG_EXTENSIONS for f in p.rglob("*")):
        return "webdataset"
    return "folder"


def open_source(path: str, fmt: str = "auto", root: str = "data", download: bool = False, in_chans: int = 3):
    """Check the configured data exists and is usable, before any model is built. `in_chans` (model.in_chans): 3
    reads every image as RGB; another count keeps the images' own channels (grayscale, 16-bit, C bands)."""
    fmt = resolve_format(path, fmt)
    if fmt == "skimage":
        if in_chans != 3:
            raise DataError(f"data.path: skimage (the embedded photos) is RGB, but model.in_chans is {in_chans}")
        return skimage_photos()
    if fmt == "torchvision":  # torchvision:NAME[:SPLIT] under root (mimkit/datasets.py)
        source = open_torchvision(path, None, root, download)
        source.in_chans = in_chans
        return source
    if fmt == "webdataset":
        if in_chans != 3:
            raise DataError(f"data.path: WebDataset shards are read as RGB; model.in_chans {in_chans} needs a folder, "
                            ".npz / .npy or torchvision dataset")  # fmt: skip
        return None  # streamed; checked by webdataset_urls
    if not Path(path).exists():
        raise DataError(f"data.path: {path} does not exist")
    if fmt == "npz":
        return load_npz(path, in_chans=in_chans)
    if not Path(path).is_dir():
        raise DataError(f"data.path: {path} is not a folder (format 'folder')")
    return FolderImages(path, in_chans)


AUTO_STATS_IMAGES = 1000  # images data.mean / data.std auto are measured on (evenly spaced over the source)


def channel_stats(source, max_images: int = AUTO_STATS_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and standard deviation (0-1 scale, over every pixel) of up to `max_images` images of the
    source, evenly spaced; corrupt images are skipped. Returns (mean, std, images used)."""
    n = len(source)
    picks = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images)).round().tolist()})
    total = total_sq = None
    pixels, used = 0, 0
    for i in picks:
        try:
            image = source.load(i)
        except CorruptImage:
            continue
        x = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True).double()
        x = x.reshape(x.shape[0], -1)
        s, sq = x.sum(1), (x * x).sum(1)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        pixels, used = pixels + x.shape[1], used + 1
    if not used:
        raise DataError("data.mean / data.std auto: no readable image in the sample of the training data")
    assert total is not None and total_sq is not None  # summed over the `used` images
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std), used


def webdataset_urls(path: str) -> list[str]:
    missing = []
    for name in ("webdataset", "braceexpand"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:  # the webdataset extra: npz / folder / torchvision training runs without it
        raise DataError(f"data.path: {path} is WebDataset shards, which need the {' and '.join(missing)} package(s): "
                        f"{install_hint('webdataset')}")  # fmt: skip
    import braceexpand

    p = Path(path)
    urls = sorted(str(f) for f in p.glob("*.tar")) if p.is_dir() else list(braceexpand.braceexpand(path))
    if not urls:
        raise DataError(f"data.path: no .tar shards found at {path}")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise DataError(f"data.path: WebDataset shard {missing[0]} does not exist ({len(missing)} missing)")
    return urls


# ---------------------------------------------------------------- transform and per-sample seeding


def pretrain_transform(img_size: int, cfg) -> v2.Compose:
    ops = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            img_size, scale=tuple(cfg.crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
    ]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(ops)


class ViewSpec(NamedTuple):
    """A second view of the same crop (BEiT's tokenizer view): its side, resampling and normalisation."""

    size: int
    interpolation: str  # bicubic | bilinear | lanczos
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: str = "tokenizer_image"


_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                  "lanczos": v2.InterpolationMode.LANCZOS}  # fmt: skip


class TwoViewTransform:
    """One RandomResizedCrop (+ flip) of the image resized twice: the ViT view (img_size, bicubic, data.mean /
    std, key 'image') and `second` (its own size, resampling and normalisation), as BEiT's two-picture crop.
    Lanczos resamples through PIL (torchvision supports it for PIL images only)."""

    def __init__(self, img_size: int, cfg, second: ViewSpec):
        from torchvision.transforms import RandomResizedCrop

        self.img_size, self.second, self.hflip = img_size, second, cfg.hflip
        self.scale, self.get_params = tuple(cfg.crop_scale), RandomResizedCrop.get_params
        self.norm = v2.Normalize(list(cfg.mean), list(cfg.std))
        self.norm2 = v2.Normalize(list(second.mean), list(second.std))

    def _view(self, img, box, size: int, interpolation: str) -> torch.Tensor:
        if interpolation == "lanczos" and not isinstance(img, Image.Image):
            img = v2.functional.to_pil_image(img)
        out = v2.functional.resized_crop(img, *box, [size, size], interpolation=_INTERPOLATION[interpolation],
                                         antialias=True)  # fmt: skip
        return v2.functional.to_dtype(v2.functional.to_image(out), torch.float32, scale=True)

    def __call__(self, image) -> dict[str, torch.Tensor]:
        img = image if isinstance(image, Image.Image) else v2.functional.to_image(image)
        box = self.get_params(img, self.scale, (3 / 4, 4 / 3))
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        views = {"image": self.norm(self._view(img, box, self.img_size, "bicubic")),
                 self.second.key: self.norm2(self._view(img, box, self.second.size, self.second.interpolation))}  # fmt: skip
        return {k: v.flip(-1) if flip else v for k, v in views.items()}


def seeded_sample(image, seed: int, transform: Callable, mask_inputs: MaskInputs | None) -> dict:
    """Augment and draw mask inputs from the sample's own seed, leaving the process RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        view = transform(image)  # a tensor, or a dict of views with 'image' (TwoViewTransform)
        out = dict(view) if isinstance(view, dict) else {"image": view}
    if mask_inputs is not None:
        out.update(mask_inputs(torch.Generator().manual_seed(seed ^ 0x5DEECE66D)))
    return out


class PretrainDataset(Dataset):
    """Indexed by (index, seed) pairs from :class:`ResumableBatchSampler`. A corrupt image is skipped
    (the next index is used instead), logged with its path, and counted in the sample's 'skipped'."""

    def __init__(self, source, transform: Callable, mask_inputs: MaskInputs | None = None, repeats: int = 1,
                 num_samples: int | None = None):  # fmt: skip
        self.source, self.transform, self.mask_inputs = source, transform, mask_inputs
        self.warned: set[int] = set()  # corrupt images already reported (by this process / loader worker)
        self.length = len(source) * repeats
        if num_samples is not None:
            self.length = min(self.length, num_samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        n = len(self.source)
        for skipped in range(min(n, 100)):
            i = (index + skipped) % n
            try:
                image = self.source.load(i)
            except CorruptImage as e:
                if i not in self.warned:  # once per run, not every epoch
                    self.warned.add(i)
                    log.warning("skipping corrupt image %s (skipped every epoch; reported once)", e)
                continue
            sample = seeded_sample(image, seed, self.transform, self.mask_inputs)
            sample["skipped"] = skipped
            return sample
        raise DataError(f"data.path: 100 consecutive unreadable images starting at {self.source.describe(index)}")


class ResumableBatchSampler(Sampler):
    """Yields this rank's micro-batches of (index, seed) pairs.

    An optimizer step consumes a global chunk of batch_size * world_size * accum_steps indices of the
    epoch's permutation; micro-step a takes the a-th slice of batch_size * world_size, and rank r
    takes every world_size-th element of it. So 2 ranks x B equals 1 rank x 2B, and 2 micro-steps
    of B/2 equal one of B. Incomplete final steps are dropped (static shapes), unless `keep_partial`: then the
    epoch's remainder is one more, smaller step, split equally over micro-steps and ranks with at least
    `min_per_rank` images each (only the few images such an equal split cannot place are left out). `remedy`:
    the config change the error for too few samples suggests.
    """

    def __init__(self, num_samples: int, batch_size: int, accum_steps: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, keep_partial: bool = False,
                 min_per_rank: int = 2, remedy: str = "lower train.batch_size or raise data.repeats"):  # fmt: skip
        self.n, self.batch_size, self.accum_steps = num_samples, batch_size, accum_steps
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_step_size = batch_size * world_size * accum_steps
        # images per rank and micro-step in the final partial step (0: none)
        remainder = num_samples % self.global_step_size
        self.partial_per_rank = remainder // (accum_steps * world_size) if keep_partial else 0
        if self.partial_per_rank < min_per_rank:
            self.partial_per_rank = 0
        if num_samples < self.global_step_size and not self.partial_per_rank:
            raise DataError(
                f"data: {num_samples} samples cannot fill one optimizer step of {self.global_step_size} "
                f"(train.batch_size {batch_size} x {world_size} processes x train.accum_steps {accum_steps}); "
                f"{remedy}"
            )
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_step_size + (1 if self.partial_per_rank else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return order, seeds

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = self.epoch_order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            full = step < self.n // self.global_step_size
            micro = (self.batch_size if full else self.partial_per_rank) * self.world_size
            for a in range(self.accum_steps):
                lo = step * self.global_step_size + a * micro
                chunk = order[lo : lo + micro][self.rank :: self.world_size]
                yield [(int(i), int(seeds[i])) for i in chunk]


def stable_seed(*parts) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def no_image_in_shards(shards: list[str], samples: int, keys: tuple[str, ...]) -> str:
    """The one-line error of a WebDataset reader whose shards held no decodable image in a whole pass."""
    named = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
    what = (f"{samples} samples read, none with a decodable image entry ({', '.join(keys)})" if samples else
            "no sample could be read: not a tar archive of WebDataset samples?")  # fmt: skip
    return f"data.path: no decodable image in WebDataset shard(s) {named} after a whole pass ({what})"


class WebDatasetStream(IterableDataset):
    """Tar shards streamed with `webdataset`. Each (rank, worker) reads its own shards of the epoch's
    seeded shard order (or, with fewer shards than readers, every reader-th sample). The stream is
    endless; the training loop takes exactly steps_per_epoch batches. Per-sample seeds come from
    (seed, epoch, pass, shard, key), so a resumed stream replays the same batches."""

    IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")

    def __init__(self, urls: list[str], transform: Callable, mask_inputs: MaskInputs | None, seed: int,
                 epoch: int, rank: int, world_size: int):  # fmt: skip
        self.urls, self.transform, self.mask_inputs = urls, transform, mask_inputs
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        readers, me = self.world_size * workers, self.rank * workers + worker
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = [self.urls[i] for i in torch.randperm(len(self.urls), generator=g)]
        split_shards = len(order) >= readers
        shards = order[me::readers] if split_shards else order
        skipped, passes = 0, 0
        while True:
            stream = wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                    empty_check=False, handler=wds.warn_and_continue)  # fmt: skip
            seen = yielded = 0
            for i, sample in enumerate(stream):
                if not split_shards and i % readers != me:
                    continue
                seen += 1
                name = f"{sample.get('__url__')}:{sample.get('__key__')}"
                data = next((sample[k] for k in self.IMAGE_KEYS if k in sample), None)
                try:
                    if data is None:
                        raise CorruptImage(f"{name}: no image entry ({', '.join(self.IMAGE_KEYS)})")
                    out = self.make_sample(name, data, stable_seed(self.seed, self.epoch, passes, name))
                except CorruptImage as e:
                    log.warning("skipping corrupt image %s: %s", name, e)
                    skipped += 1
                    continue
                out["skipped"], skipped = skipped, 0
                yielded += 1
                yield out
            if not yielded:  # a whole pass without one image: another pass would spin forever
                raise DataError(no_image_in_shards(shards, seen, self.IMAGE_KEYS))
            passes += 1

    def make_sample(self, name: str, data: bytes, seed: int) -> dict:
        """One training sample from an entry's image bytes (mimkit.device_decode overrides this)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = to_rgb(img)
        except Exception as e:
            raise CorruptImage(f"{name}: {type(e).__name__}: {e}") from e
        return seeded_sample(image, seed, self.transform, self.mask_inputs)


def die_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader worker init: the kernel kills the worker the moment its parent dies (a SIGKILLed run),
    instead of torch's watchdog noticing seconds later (Linux; a no-op elsewhere)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    ignore_stop_signals_of_others(parent_pid)


def ignore_stop_signals_of_others(parent_pid: int) -> None:
    """A stop signal sent to the whole process group (Ctrl-C, SLURM, `kill -- -PGID`) is the parent's to act on:
    it finishes its step with this worker's batches, then shuts the worker down. SIGTERM from the parent itself
    (multiprocessing's terminate) still ends the worker: a thread takes SIGTERM with sigwaitinfo, which names the
    sender."""
    import signal
    import threading

    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit the mask

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent_pid or os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm-from-parent", daemon=True).start()


def loader_rng_and_workers(seed: int, rank: int = 0, epoch: int = 0) -> dict:
    """DataLoader keywords: a private generator, so that starting an iterator (which draws the workers' base
    seed) never consumes the global torch RNG that drop path and the methods use, which would shift their
    streams after a mid-epoch resume; and workers that die with their parent. Samples are seeded per sample,
    so the base seed does not affect them."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + epoch) % 2**63)
    return {"generator": g, "worker_init_fn": functools.partial(die_with_parent, os.getpid())}
