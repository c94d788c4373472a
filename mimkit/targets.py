"""Targets the methods predict, and their inverses for pictures: normalised pixels (MAE's norm-pix per patch,
BootMAE's per patch and channel), MaskFeat's HOG features, a tokenizer's soft codes (mc-BEiT). A momentum encoder's
features (BootMAE, data2vec 2.0) are mimkit.teachers'.

The per-patch targets are parts behind one small interface, `Target`: `width(patch_size, in_chans)` values per
patch, `target(imgs)` (B, L, width), and `pixels_from(pred, imgs)` where the target maps back to pixels
(`PREDICTS_PIXELS`); `make_target(name, patch_size)` builds one by its config name (`mae.target`)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from mimkit.losses import per_patch_normalize
from mimkit.models import patchify

NORM_PIX_EPS = 1e-6  # MAE: eps added to the unbiased variance of each patch
PATCH_CHANNEL_EPS = 1e-5  # BootMAE: eps added to the biased variance of each patch and channel


def pixel_target(imgs: torch.Tensor, patch_size: int, norm: str = "patch") -> torch.Tensor:
    """(B, L, p*p*3) in patchify layout. patch: MAE's norm_pix (each patch by its mean and unbiased std, eps 1e-6
    inside the root); patch_channel: BootMAE's (each patch and RGB channel by its mean and biased std, eps 1e-5);
    none: raw pixels."""
    target = patchify(imgs.float(), patch_size)
    if norm == "patch":
        return per_patch_normalize(target, NORM_PIX_EPS)
    if norm == "patch_channel":
        b, num, _ = target.shape
        t = target.view(b, num, patch_size * patch_size, 3)
        mean, var = t.mean(dim=2, keepdim=True), t.var(dim=2, unbiased=False, keepdim=True)
        return ((t - mean) / (var + PATCH_CHANNEL_EPS).sqrt()).view(b, num, -1)
    return target


def pixels_from_target(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm: str = "patch") -> torch.Tensor:
    """Predictions in `pixel_target`'s space back to pixels, with the ground truth's own statistics."""
    if norm == "none":
        return pred
    raw = patchify(imgs.float(), patch_size)
    if norm == "patch":
        return pred * (raw.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5 + raw.mean(dim=-1, keepdim=True)
    b, num, _ = raw.shape
    t, p = raw.view(b, num, -1, 3), pred.reshape(b, num, -1, 3)
    std = (t.var(2, unbiased=False, keepdim=True) + PATCH_CHANNEL_EPS).sqrt()
    return (p * std + t.mean(2, keepdim=True)).view(pred.shape)


class Target:
    """A per-patch target: `width(patch_size, in_chans)` values per patch, `target(imgs)` (B, L, width) from
    normalised images (B, C, H, W) in fp32, and `pixels_from(pred, imgs)` -> (B, L, p*p*C) pixels (normalised image
    space) where `PREDICTS_PIXELS` (reconstruction pictures); targets that are not pixels have none."""

    name = ""
    PREDICTS_PIXELS = True

    def __init__(self, patch_size: int, in_chans: int = 3):
        self.patch_size, self.in_chans = patch_size, in_chans

    def width(self, patch_size: int | None = None, in_chans: int | None = None) -> int:
        raise NotImplementedError

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixels_from(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} target does not map back to pixels")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, patch_size={self.patch_size}, width={self.width()})"


class PixelTarget(Target):
    """The patch's pixels in patchify layout (`pixel_target`): norm none (raw), patch (MAE's norm_pix) or
    patch_channel (BootMAE's)."""

    NAMES: ClassVar[dict[str, str]] = {"none": "pixels", "patch": "norm_pix", "patch_channel": "patch_channel"}

    def __init__(self, patch_size: int, norm: str = "patch", in_chans: int = 3):
        if norm not in self.NAMES:
            raise ValueError(f"pixel norm must be one of {', '.join(self.NAMES)}, got {norm!r}")
        if norm == "patch_channel" and in_chans != 3:
            raise ValueError("the patch_channel pixel target is defined for 3 channels")
        super().__init__(patch_size, in_chans)
        self.norm, self.name = norm, self.NAMES[norm]

    def width(self, patch_size: int | None = None, in_chans: int | None = None) -> int:
        return (patch_size or self.patch_size) ** 2 * (in_chans or self.in_chans)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        return pixel_target(imgs, self.patch_size, self.norm)

    def pixels_from(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        return pixels_from_target(pred, imgs, self.patch_size, self.norm)


HOG_BINS = 9  # MaskFeat: 9 orientation bins over 180 degrees (unsigned gradients)


def _gaussian_window(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) separable gaussian centred on the window, std size / 2, summing to 1."""
    n = torch.arange(size, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size / 2)) ** 2)
    w = g[:, None] * g[None, :]
    return w / w.sum()


def hog_features(imgs: torch.Tensor, patch_size: int, bins: int = HOG_BINS, cell: int | None = None,
                 gradient: str = "sobel", window: bool = True) -> torch.Tensor:  # fmt: skip
    """MaskFeat's HOG target (Wei et al., CVPR 2022), per colour channel: Sobel gradients (reflect-padded), each
    pixel's magnitude weighted by a gaussian window over its patch (std = patch / 2) and added to the bin of its
    unsigned orientation (hard binning; `bins` over 180 degrees, bin 0 = gradients along the image's vertical axis, i.e.
    horizontal edges), summed in square cells of `cell` pixels (default patch / 2: 8x8 at patch 16, 2x2 cells per
    patch), each cell's histogram L2-normalised. (B, C, H, W) -> (B, L, C * bins * (patch / cell)^2), per patch in
    (channel, bin, cell row, cell column) order; fp32, no gradient. `gradient` central (a [-1, 0, 1] difference) and
    `window` False give scikit-image's `hog` per channel (cells_per_block 1, L2), on the transposed image: it
    measures orientations from the horizontal axis (tests/test_maskfeat.py)."""
    cell = cell or patch_size // 2
    b, c, h, w = imgs.shape
    if cell < 1 or patch_size % cell or h % patch_size or w % patch_size:
        raise ValueError(f"HOG cells of {cell} px must tile the {patch_size} px patches of a {h}x{w} image")
    with torch.no_grad(), torch.autocast(imgs.device.type, enabled=False):  # fp32 even in a bf16 step
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")
        smooth = [1.0, 2.0, 1.0] if gradient == "sobel" else [0.0, 1.0, 0.0]
        kernel = torch.tensor(smooth, device=x.device)[:, None] * torch.tensor([-1.0, 0.0, 1.0], device=x.device)
        gx = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)  # d/dx (columns), per channel
        gy = F.conv2d(x, kernel.t().expand(c, 1, 3, 3), groups=c)  # d/dy (rows)
        magnitude = torch.sqrt(gx * gx + gy * gy)
        if window:
            magnitude = magnitude * _gaussian_window(patch_size, x.device).repeat(h // patch_size, w // patch_size)
        orientation = torch.remainder(torch.atan2(gx, gy), math.pi)  # from the vertical axis, in [0, pi]
        index = torch.floor(orientation * (bins / math.pi)).long().clamp_(0, bins - 1)
        hc, wc = h // cell, w // cell
        # one bin at a time, summed per cell by a reshape: fixed summation order (no scatter atomics), small peak memory
        hist = torch.stack([(magnitude * (index == k)).view(b, c, hc, cell, wc, cell).sum(dim=(3, 5))
                            for k in range(bins)], dim=2)  # (B, C, bins, hc, wc)  # fmt: skip
        hist = F.normalize(hist, p=2, dim=2)
        u = patch_size // cell
        gh, gw = h // patch_size, w // patch_size
        hist = hist.reshape(b, c * bins, gh, u, gw, u).permute(0, 2, 4, 1, 3, 5)
        return hist.reshape(b, gh * gw, c * bins * u * u)


class HOGTarget(Target):
    """MaskFeat's HOG features of each patch (`hog_features`); not pixels, so no pictures."""

    name = "hog"
    PREDICTS_PIXELS = False

    def __init__(self, patch_size: int, in_chans: int = 3, bins: int = HOG_BINS, cell: int | None = None):
        super().__init__(patch_size, in_chans)
        self.bins, self.cell = bins, cell or patch_size // 2
        if self.cell < 1 or patch_size % self.cell:
            raise ValueError(f"the hog target needs an even patch size (cells of patch / 2 px), got {patch_size}")

    def width(self, patch_size: int | None = None, in_chans: int | None = None) -> int:
        p = patch_size or self.patch_size
        cells = (p // (self.cell if patch_size is None else max(p // 2, 1))) ** 2
        return (in_chans or self.in_chans) * self.bins * cells

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        return hog_features(imgs, self.patch_size, self.bins, self.cell)


TARGET_NAMES = ("norm_pix", "pixels", "hog")  # mae.target (besides auto)


def make_target(name: str, patch_size: int, in_chans: int = 3) -> Target:
    """The per-patch target by its config name: norm_pix, pixels, patch_channel (BootMAE's) or hog."""
    norms = {v: k for k, v in PixelTarget.NAMES.items()}
    if name in norms:
        return PixelTarget(patch_size, norms[name], in_chans)
    if name == "hog":
        return HOGTarget(patch_size, in_chans)
    raise ValueError(f"unknown target {name!r}: one of {', '.join((*norms, 'hog'))}")


def tokenizer_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) tokenizer logits -> softmax(logits / temperature), in fp32."""
    return F.softmax(logits.float() / temperature, dim=-1)


def affinity(features: torch.Tensor, sim_temperature: float = 1.0) -> torch.Tensor:
    """(B, L, D) features -> W (B, L, L) = row-softmax(cosine similarity / sim_temperature); rows sum to 1."""
    f = F.normalize(features.float(), dim=-1)
    return F.softmax(f @ f.transpose(1, 2) / sim_temperature, dim=-1)


def soft_targets(probs: torch.Tensor, weights: torch.Tensor, omega: float) -> torch.Tensor:
    """mc-BEiT's refined target: omega * W p + (1 - omega) p, over every patch. probs (B, L, V), W (B, L, L)."""
    return omega * torch.bmm(weights, probs) + (1.0 - omega) * probs
