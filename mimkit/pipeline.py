"""The training loop's batches: `PretrainData` puts a data source, its transforms and the method's per-sample
mask inputs behind a resumable sampler, on the CPU path (PIL in the workers) or the device-decode path."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from mimkit.data import (
    AUTO_STATS_IMAGES,
    DataError,
    MaskInputs,
    PretrainDataset,
    ResumableBatchSampler,
    TwoViewTransform,
    ViewSpec,
    WebDatasetStream,
    channel_stats,
    check_channels,
    loader_rng_and_workers,
    open_source,
    pretrain_transform,
    resolve_format,
    webdataset_urls,
)
from mimkit.device_decode import (
    DeviceAugment,
    EncodedFolderDataset,
    EncodedWebDatasetStream,
    augmented,
    collate_encoded,
    resolve_decode,
)

log = logging.getLogger("mimkit")


def resolve_auto_stats(d, source) -> None:
    """data.mean / data.std `auto`: measured on a sample of the training data, written into the config in place (so the
    run's config.yaml and its checkpoints hold the numbers, and a resume reads them back)."""
    if source is None:
        raise DataError("data.mean / data.std auto: WebDataset shards cannot be sampled up front; give the numbers")
    mean, std, used = channel_stats(source, AUTO_STATS_IMAGES)
    if d.mean == "auto":
        d.mean = mean
    if d.std == "auto":
        d.std = std
    log.info("data.mean / data.std auto: measured on %d of %d training images: mean %s, std %s", used, len(source),
             list(d.mean), list(d.std))  # fmt: skip


class PretrainData:
    """Batches for the training loop: `epoch_batches(epoch, start_step)` yields this rank's
    micro-batches from the given optimizer step of the epoch on."""

    def __init__(self, cfg, img_size: int, mask_inputs: MaskInputs | None, batch_size: int, accum_steps: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False,
                 second_view: ViewSpec | None = None, device: torch.device | None = None):  # fmt: skip
        d = cfg.data if hasattr(cfg, "data") else cfg
        in_chans = cfg.model.in_chans if hasattr(cfg, "model") else 3
        self.fmt = resolve_format(d.path, d.format)
        source = None if self.fmt == "webdataset" else open_source(d.path, self.fmt, d.root, d.download, in_chans)
        if in_chans != 3 and source is not None:
            check_channels(source, in_chans)
        if "auto" in (d.mean, d.std):
            resolve_auto_stats(d, source)
        self.transform = (
            pretrain_transform(img_size, d) if second_view is None else TwoViewTransform(img_size, d, second_view)
        )
        self.mask_inputs, self.num_workers, self.pin_memory = mask_inputs, d.num_workers, pin_memory
        self.batch_size, self.accum_steps, self.rank, self.world_size, self.seed = (
            batch_size, accum_steps, rank, world_size, seed)  # fmt: skip
        self.global_step_size = batch_size * world_size * accum_steps
        if self.fmt == "webdataset":
            if d.num_samples is None:
                raise DataError("data.num_samples is required for WebDataset shards (it sets the epoch length)")
            self.urls = webdataset_urls(d.path)
            if d.num_samples < self.global_step_size:
                raise DataError(
                    f"data.num_samples {d.num_samples} cannot fill one optimizer step of {self.global_step_size}"
                )
            self.steps_per_epoch = d.num_samples // self.global_step_size
        else:
            self.dataset = PretrainDataset(source, self.transform, mask_inputs, d.repeats, d.num_samples)
            self.sampler = ResumableBatchSampler(len(self.dataset), batch_size, accum_steps, rank, world_size, seed)
            self.steps_per_epoch = self.sampler.steps_per_epoch
            self.loader = DataLoader(
                self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers, pin_memory=pin_memory,
                persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers > 0 else None,
                **loader_rng_and_workers(seed, rank),
            )  # fmt: skip
        self.device_augment: DeviceAugment | None = (
            None  # data.decode: JPEGs decoded and augmented on the training device
        )
        decode = getattr(d, "decode", "auto")
        if in_chans != 3 and decode == "device":
            raise DataError(
                f"data.decode device: nvJPEG decodes RGB only; model.in_chans {in_chans} needs data.decode cpu"
            )
        self.decode = resolve_decode("cpu" if in_chans != 3 else decode, self.fmt, device, self.transform)
        if self.decode == "device":
            self._use_device_decode(device or torch.device("cpu"))

    def _use_device_decode(self, device: torch.device) -> None:
        self.device_augment = DeviceAugment(self.transform, device)
        if self.fmt == "folder":
            encoded = EncodedFolderDataset(self.dataset.source, self.transform, self.mask_inputs)
            encoded.length = self.dataset.length  # data.repeats / data.num_samples as resolved above
            self.dataset = encoded
            self.loader = DataLoader(
                self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers, collate_fn=collate_encoded,
                persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers > 0 else None,
                **loader_rng_and_workers(self.seed, self.rank),
            )  # fmt: skip

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        if self.device_augment is not None:
            return augmented(self._encoded_batches(epoch, start_step), self.device_augment)
        if self.fmt != "webdataset":
            self.sampler.set_epoch(epoch, start_step)
            return iter(self.loader)
        stream = WebDatasetStream(self.urls, self.transform, self.mask_inputs, self.seed, epoch, self.rank,
                                  self.world_size)  # fmt: skip
        loader = DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **loader_rng_and_workers(self.seed, self.rank, epoch))  # fmt: skip
        # streams cannot seek: replay and drop the micro-batches already consumed (exact, costs decoding)
        return itertools.islice(iter(loader), start_step * self.accum_steps, None)

    def _encoded_batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        """The device path's worker batches: the same samples, order and seeds as the CPU path's."""
        if self.fmt != "webdataset":
            self.sampler.set_epoch(epoch, start_step)
            return iter(self.loader)
        stream = EncodedWebDatasetStream(self.urls, self.transform, self.mask_inputs, self.seed, epoch, self.rank,
                                         self.world_size)  # fmt: skip
        loader = DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_encoded, **loader_rng_and_workers(self.seed, self.rank, epoch))  # fmt: skip
        return itertools.islice(iter(loader), start_step * self.accum_steps, None)
