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
    micro-batches from the given optimizer step of the epoch on. `stages` ((from_epoch, img_size, mask_inputs), ...):
    train.resolution_stages, each epoch's images cropped to its stage's size, masks drawn on its grid."""

    def __init__(self, cfg, img_size: int, mask_inputs: MaskInputs | None, batch_size: int, accum_steps: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False,
                 second_view: ViewSpec | None = None, device: torch.device | None = None,
                 stages: tuple[tuple[int, int, MaskInputs | None], ...] = ()):  # fmt: skip
        d = cfg.data if hasattr(cfg, "data") else cfg
        in_chans = cfg.model.in_chans if hasattr(cfg, "model") else 3
        self.fmt = resolve_format(d.path, d.format)
        source = None if self.fmt == "webdataset" else open_source(d.path, self.fmt, d.root, d.download, in_chans)
        if in_chans != 3 and source is not None:
            check_channels(source, in_chans)
        if "auto" in (d.mean, d.std):
            resolve_auto_stats(d, source)
        self.d, self.second_view, self.device, self.source = d, second_view, device, source
        self.stages = stages or ((0, img_size, mask_inputs),)
        self.img_size, self.mask_inputs = self.stages[0][1], self.stages[0][2]
        self.transform = self._transform(self.img_size)
        self.num_workers, self.pin_memory = d.num_workers, pin_memory
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
            length = PretrainDataset(source, self.transform, None, d.repeats, d.num_samples).length
            self.sampler = ResumableBatchSampler(length, batch_size, accum_steps, rank, world_size, seed)
            self.steps_per_epoch = self.sampler.steps_per_epoch
        decode = getattr(d, "decode", "auto")
        if in_chans != 3 and decode == "device":
            raise DataError(
                f"data.decode device: nvJPEG decodes RGB only; model.in_chans {in_chans} needs data.decode cpu"
            )
        self.decode = resolve_decode("cpu" if in_chans != 3 else decode, self.fmt, device, self.transform)
        self._build()

    def _transform(self, img_size: int):
        if self.second_view is None:
            return pretrain_transform(img_size, self.d)
        return TwoViewTransform(img_size, self.d, self.second_view)

    def _build(self) -> None:
        """The dataset and loader of the current stage (new loader workers: they hold its transform and masks)."""
        d, workers = self.d, self.num_workers
        # data.decode device: JPEGs decoded and augmented on the training device
        self.device_augment: DeviceAugment | None = None
        if self.decode == "device":
            self.device_augment = DeviceAugment(self.transform, self.device or torch.device("cpu"))
        if self.fmt == "webdataset":
            return  # a stream per epoch (epoch_batches)
        encoded = self.decode == "device" and self.fmt == "folder"
        kind = EncodedFolderDataset if encoded else PretrainDataset
        self.dataset = kind(self.source, self.transform, self.mask_inputs, d.repeats, d.num_samples)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_encoded if encoded
            else None, pin_memory=self.pin_memory and not encoded, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, **loader_rng_and_workers(self.seed, self.rank),
        )  # fmt: skip

    def use_stage(self, epoch: int) -> None:
        """The resolution stage of `epoch` (train.resolution_stages): its transform, masks and loader."""
        _, size, mask_inputs = [s for s in self.stages if s[0] <= epoch][-1]
        if size != self.img_size:
            log.info("epoch %d: pretraining at %d px from here on (train.resolution_stages)", epoch, size)
            self.img_size, self.mask_inputs, self.transform = size, mask_inputs, self._transform(size)
            self._build()

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        self.use_stage(epoch)
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
