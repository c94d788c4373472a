"""Pictures of what a pretrained model does: reconstruction grids (original, masked input,
reconstruction, reconstruction with the visible patches pasted back) and attention / feature maps.

Everything here is deterministic for a given seed, runs the model in eval mode under no_grad and
never touches the global RNG, so it can be called from inside a training loop (TensorBoard grids)
without changing the run.

A method is drawable when its model has ``patch_size``, ``mask_inputs(generator)`` and a forward
``model(imgs, **mask_inputs)`` returning ``.pred`` (B, L, p*p*3 per-patch pixels, in MAE's
patchify order) and ``.mask`` (B, L, 1 = masked); ``norm_pix_loss`` (optional, default False)
says the predictions are per-patch normalised.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mimkit.interop import InteropError, load_mimkit_checkpoint
from mimkit.models import encoder_of, unpatchify
from mimkit.registry import encoder_family, method_spec
from mimkit.sources import CorruptImage, DataError, array_to_tensor, load_image, to_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_PIX_EPS = 1e-6  # MAE's norm_pix target: (t - mean) / sqrt(var_unbiased + 1e-6)
MASK_GRAY = 0.5

PANEL_LABELS = {
    "original": "original",
    "masked": "masked input",
    "reconstruction": "reconstruction",
    "pasted": "reconstruction + visible patches pasted back",
}
NORM_PIX_NOTE = "(norm_pix: un-normalised with the ground-truth patch mean/std)"


# =============================================================================================
# Images in


def prepare_image(image, size: int, in_chans: int = 3) -> torch.Tensor:
    """An image file path, PIL image, uint8 (C, H, W) tensor or uint8 (H, W, C) array -> (3, size,
    size) float tensor in [0, 1]: shorter side resized to ``size`` (bicubic, antialiased, rounded
    to uint8), centre-cropped. Values are exactly k / 255, so a panel converts back to the same bytes. `in_chans`
    other than 3: the image's own C channels are kept (uint8 as k / 255, 16-bit and float on their 0-1 scale)."""
    from torchvision.transforms.v2 import functional as F

    if in_chans != 3:
        return _prepare_channels(image, size, in_chans)

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)  # CorruptImage names the file
    if isinstance(image, Image.Image):
        t = F.pil_to_tensor(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[..., None]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    t = t[:3]
    t = F.resize(t, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    t = F.center_crop(t, [size, size])
    return t.float() / 255.0


def _prepare_channels(image, size: int, in_chans: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    if isinstance(image, (str, os.PathLike)):
        image = np.load(image, allow_pickle=False) if str(image).endswith(".npy") else load_image(image, in_chans)
    if isinstance(image, Image.Image):
        image = to_channels(image, in_chans)
    elif isinstance(image, np.ndarray):
        image = array_to_tensor(image)
    t = F.to_dtype(F.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)
    if t.shape[0] != in_chans:
        raise ValueError(f"the image has {t.shape[0]} channel(s) but the model reads {in_chans} (model.in_chans)")
    t = F.resize(t, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(t, [size, size]).clamp(0.0, 1.0)


def display_bands(in_chans: int, bands: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The 1-based bands a C-band picture is drawn with as (R, G, B): `bands`, checked, or the first three; None for
    1 (drawn gray) and 3 (RGB) channels without a choice."""
    if bands is None:
        return None if in_chans in (1, 3) else (1, 2, 3)
    if len(bands) != 3 or not all(1 <= b <= in_chans for b in bands):
        raise InteropError(f"--bands {','.join(map(str, bands))}: give three band numbers in 1..{in_chans} "
                         f"(the model reads {in_chans} channels), e.g. 3,2,1")  # fmt: skip
    return tuple(bands)


def to_display(img: torch.Tensor, bands: tuple[int, ...] | None = None) -> torch.Tensor:
    """(C, H, W) -> (3, H, W) to draw: one channel as gray, the chosen bands (1-based) as R, G, B, else as is."""
    if bands is not None:
        return img[[b - 1 for b in bands]]
    if img.shape[0] == 1:
        return img.expand(3, -1, -1)
    return img


def preview_images(source, img_size: int, count: int = 4) -> torch.Tensor:
    """``count`` images of a mimkit data source (``mimkit.data.open_source``), spread evenly over
    it, as a fixed (B, 3, S, S) batch in [0, 1] for TensorBoard grids. Corrupt images are skipped."""
    n = len(source)
    images = []
    for i in np.linspace(0, n - 1, num=min(count, n)).round().astype(int):
        for j in range(int(i), n):
            try:
                images.append(prepare_image(source.load(j), img_size, getattr(source, "in_chans", 3)))
                break
            except CorruptImage:
                continue
    if not images:
        raise DataError(
            f"no readable image in the data source ({getattr(source, 'name', None) or type(source).__name__}): "
            f"all {n} failed to decode"
        )
    return torch.stack(images)


# =============================================================================================
# Reconstruction


@dataclass
class Reconstruction:
    original: torch.Tensor  # (3, S, S) in [0, 1]: the input pixels
    masked: torch.Tensor  # masked patches gray
    reconstruction: torch.Tensor  # the model's prediction of every patch, in [0, 1]
    pasted: torch.Tensor  # reconstruction where masked, the original pixels where visible
    mask: torch.Tensor  # (S, S) bool, True = masked pixel
    patch_mask: torch.Tensor  # (L,) 1 = masked patch
    loss: float
    norm_pix: bool
    seed: int


def _stats(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s


def _stack_inputs(inputs: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in inputs]).to(device) for k in inputs[0]}


@torch.no_grad()
def reconstruct(
    model, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0
) -> list[Reconstruction]:
    """Run ``model`` on (B, 3, S, S) images in [0, 1] (normalised with mean/std first). Image i is
    masked with ``model.mask_inputs(Generator(seed + i))``. norm_pix predictions are mapped back
    to pixels with each patch's ground-truth mean and unbiased std (eps 1e-6, as in the target)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            x01 = images.to(device=device, dtype=torch.float32)
            m, s = _stats(mean, std, device)
            x = (x01 - m) / s
            inputs = _stack_inputs(
                [model.mask_inputs(torch.Generator().manual_seed(seed + i)) for i in range(len(x))], device
            )
            with torch.autocast(device_type=device.type, enabled=False):
                out = model(x, **inputs)
    finally:
        model.train(was_training)
    p = int(model.patch_size)
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    raw_pred, out_mask = out.pred.float(), out.mask
    if raw_pred.dim() == 4:  # EMAE: (B, K, L, P) parts; show part 0 (MAE's random mask for the same noise)
        raw_pred, out_mask = raw_pred[:, 0], out_mask[:, 0]
    norm_pix = model.norm_pix_loss
    pred = model.pixels_from_pred(raw_pred, x)  # undoes the method's target normalisation with the ground truth's
    rec01 = (unpatchify(pred, p, grid, channels=x.shape[1]) * s + m).clamp(0.0, 1.0)
    patch_mask = out_mask.float()
    pix = patch_mask.view(-1, *grid).repeat_interleave(p, dim=1).repeat_interleave(p, dim=2).bool()  # (B, S, S)
    pix3 = pix.unsqueeze(1).expand_as(x01)
    masked = torch.where(pix3, torch.full_like(x01, MASK_GRAY), x01)
    pasted = torch.where(pix3, rec01, x01)
    per_image = _per_image_loss(model, x, raw_pred, patch_mask)
    return [
        Reconstruction(
            x01[i].cpu(),
            masked[i].cpu(),
            rec01[i].cpu(),
            pasted[i].cpu(),
            pix[i].cpu(),
            patch_mask[i].cpu(),
            float(per_image[i]),
            norm_pix,
            seed + i,
        )
        for i in range(len(x))
    ]


def _per_image_loss(model, x, pred, mask) -> torch.Tensor:
    """MSE over masked patches, per image, in the space the model predicts (as its loss)."""
    target = model.target(x)
    per_patch = (pred - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum(1) / mask.sum(1).clamp_min(1)


# =============================================================================================
# Grids


@dataclass
class Grid:
    image: np.ndarray  # (H, W, 3) uint8
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # panel -> (top, left, height, width)
    scale: int = 1
    pad: int = 4
    title_height: int = 0
    caption_height: int = 0
    captions: dict[str, str] = field(default_factory=dict)  # panel -> caption drawn above it

    def panel(self, name: str) -> np.ndarray:
        top, left, h, w = self.boxes[name]
        return self.image[top : top + h, left : left + w]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image).save(path)
        return path


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 (round to nearest)."""
    return (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _space(draw: ImageDraw.ImageDraw, font) -> float:
    """Pillow's default font has 2-px spaces that kerning can swallow ("clsattention"): words are placed
    one by one, a third of the font size apart."""
    return max(draw.textlength(" ", font=font), 0.35 * getattr(font, "size", 10))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    words = text.split(" ")
    return round(sum(draw.textlength(w, font=font) for w in words) + _space(draw, font) * (len(words) - 1))


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font) -> None:
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=(0, 0, 0), font=font)
        x += draw.textlength(word, font=font) + _space(draw, font)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and _text_width(draw, trial, font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def render_panels(
    panels: list[tuple[str, str, np.ndarray]], title: str = "", scale: int = 1, max_cols: int = 8, pad: int = 4
) -> Grid:
    """Lay out (name, caption, HxWx3 uint8) panels of one size in rows of at most ``max_cols``,
    each upscaled ``scale`` x (nearest: pixels are repeated, never blended), captions above."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2  # whole pixels, which Pillow types as float
    h0, w0 = panels[0][2].shape[:2]
    ph, pw = h0 * scale, w0 * scale
    cols = min(max_cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = cols * pw + (cols + 1) * pad
    wrapped = [_wrap(probe, caption, font, pw) for _, caption, _ in panels]
    caption_h = max(len(w) for w in wrapped) * line_h
    title_lines = _wrap(probe, title, font, width - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + (pad if title_lines else 0)
    row_h = caption_h + ph + pad
    height = pad + title_h + rows * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(title_lines):
        _draw_text(draw, (pad, pad + j * line_h), line, font)
    boxes = {}
    for n, ((name, _, pixels), lines) in enumerate(zip(panels, wrapped, strict=True)):
        if pixels.shape[:2] != (h0, w0):
            raise ValueError(f"panel '{name}' is {pixels.shape[:2]}, others {h0}x{w0}")
        r, c = divmod(n, cols)
        left = pad + c * (pw + pad)
        top = pad + title_h + r * row_h
        for j, line in enumerate(lines):
            _draw_text(draw, (left, top + j * line_h), line, font)
        big = pixels.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels
        canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (left, top + caption_h))
        boxes[name] = (top + caption_h, left, ph, pw)
    captions = {name: caption for name, caption, _ in panels}
    return Grid(np.asarray(canvas).copy(), boxes, scale, pad, title_h, caption_h, captions)


def default_scale(size: int, target: int = 192) -> int:
    """Integer upscaling so small (e.g. 32 px) images get readable panels and captions."""
    return max(1, math.ceil(target / size))


def reconstruction_grid(
    rec: Reconstruction, title: str = "", scale: int | None = None, bands: tuple[int, ...] | None = None
) -> Grid:
    """`bands`: the 1-based bands of a C-band image drawn as R, G, B (default: the first three; one channel: gray)."""
    size = rec.original.shape[-1]
    c = rec.original.shape[0]
    bands = display_bands(c, bands)
    if bands is not None:
        said = f"bands {','.join(map(str, bands))} of {c} as R,G,B"
        title = f"{title} | {said}" if title else said
    scale = scale or default_scale(size)
    captions = dict(PANEL_LABELS)
    if rec.norm_pix:
        captions["reconstruction"] += f" {NORM_PIX_NOTE}"
        captions["pasted"] += f" {NORM_PIX_NOTE}"
    panels = [(name, captions[name], to_uint8(to_display(getattr(rec, name), bands))) for name in PANEL_LABELS]
    return render_panels(panels, title=title, scale=scale)


def describe(rec: Reconstruction, name: str = "") -> str:
    masked = int(rec.patch_mask.sum())
    parts = [name] if name else []
    parts += [
        f"mask seed {rec.seed}",
        f"{masked}/{rec.patch_mask.numel()} patches masked",
        f"loss on masked patches {rec.loss:.4f}" + (" (norm_pix)" if rec.norm_pix else ""),
    ]
    return " | ".join(parts)


@dataclass
class Visualization:
    path: Path  # the PNG written
    grid: Grid  # exactly what the PNG holds
    reconstruction: Reconstruction


def visualize(
    ckpt: str | Path,
    images: list[str | Path],
    out_dir: str | Path = "visualizations",
    seed: int = 0,
    scale: int | None = None,
    bands: tuple[int, ...] | None = None,
) -> list[Visualization]:
    """One PNG grid per image (files, or folders searched recursively): OUT/<image stem>_reconstruction.png.
    `bands`: for a C-band model, the three 1-based bands drawn as R, G, B (said on the panel's title)."""
    model, cfg, state = load_mimkit_checkpoint(ckpt)
    spec = method_spec(cfg.method)
    if not spec.pixels(cfg):
        raise InteropError(f"{ckpt}: this {cfg.method} model does not predict pixels ({spec.summary}), so it has no "
                           "reconstruction to draw; `mimkit visualize` takes checkpoints of runs with pixel targets")  # fmt: skip
    size = encoder_of(model).patch_embed.img_size[0]
    in_chans = encoder_of(model).patch_embed.proj.in_channels
    bands = display_bands(in_chans, tuple(bands) if bands else None)  # a bad choice fails before any image
    out_dir = Path(out_dir)
    done = []
    for path in expand_images(images):
        rec = reconstruct(model, prepare_image(path, size, in_chans), cfg.data.mean, cfg.data.std, seed)[0]
        title = describe(rec, f"{Path(path).name} | {Path(ckpt).name} step {state.get('step', '?')}")
        grid = reconstruction_grid(rec, title, scale, bands)
        done.append(Visualization(grid.save(out_dir / f"{Path(path).stem}_reconstruction.png"), grid, rec))
    return done


def expand_images(images: list[str | Path]) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    out = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*IMG_EXTENSIONS, ".npy"))
            if not found:
                raise FileNotFoundError(f"no images in folder {p}")
            out += found
        elif not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        else:
            out.append(p)
    return out


def log_reconstruction_grid(
    writer,
    model,
    images: torch.Tensor,
    step: int,
    seed: int = 0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    tag: str = "reconstruction",
) -> list[Grid]:
    """Add one reconstruction grid per image to a TensorBoard ``SummaryWriter`` as
    ``{tag}/{i}`` at ``step``. ``images``: a fixed (B, 3, S, S) batch in [0, 1] (see
    :func:`preview_images`); ``model``: the unwrapped model (not the DDP wrapper). Same seed ->
    same masks at every call, so grids are comparable across epochs. Leaves the model's train/eval
    mode and every RNG as it found them."""
    grids = []
    for i, rec in enumerate(reconstruct(model, images, mean, std, seed)):
        grid = reconstruction_grid(rec, describe(rec, f"step {step} | image {i}"))
        writer.add_image(f"{tag}/{i}", grid.image, step, dataformats="HWC")
        grids.append(grid)
    return grids


# =============================================================================================
# Attention and feature maps


@dataclass
class AttentionMaps:
    image: torch.Tensor  # (3, S, S) in [0, 1]
    weights: torch.Tensor  # (heads, N, N) last block's attention (softmax rows), N = 1 + L
    cls_attention: torch.Tensor  # (heads, gh, gw): cls token's attention to each patch
    pca: torch.Tensor  # (3, gh, gw) in [0, 1]: top-3 principal components of final patch features
    explained: torch.Tensor  # (3,) fraction of variance of each component


def attention_weights(attn, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a timm ``Attention`` module for its input ``x``: (B, heads, N, N)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_maps(encoder, image01: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> AttentionMaps:
    """Full (unmasked) image through the encoder; the last block's attention is computed from the
    input its attention module receives (captured with a forward pre-hook)."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    captured: dict[str, torch.Tensor] = {}
    hook = encoder.blocks[-1].attn.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    try:
        m, s = _stats(mean, std, device)
        x = (image01.unsqueeze(0).to(device).float() - m) / s
        feats = encoder.forward_features(x)
    finally:
        hook.remove()
        encoder.train(was_training)
    weights = attention_weights(encoder.blocks[-1].attn, captured["x"])[0].float().cpu()
    gh, gw = encoder.patch_embed.grid_size
    prefix = feats.shape[1] - gh * gw
    cls = weights[:, 0, prefix:].reshape(-1, gh, gw)
    patches = feats[0, prefix:].float().cpu()
    centred = patches - patches.mean(dim=0, keepdim=True)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = centred @ vh[:3].T  # (L, 3)
    comps = comps * torch.sign(comps.sum(dim=0, keepdim=True) + 1e-12)  # deterministic sign
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-12)).T.reshape(-1, gh, gw)
    if rgb.shape[0] < 3:
        rgb = torch.cat([rgb, torch.zeros(3 - rgb.shape[0], gh, gw)])
    var = sv.pow(2)
    explained = var[:3] / var.sum().clamp_min(1e-12)
    return AttentionMaps(image01.cpu(), weights, cls, rgb, explained)


_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB, a 5-stop approximation of viridis."""
    v = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def _upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
    gh = grid_map.shape[0]
    return grid_map.repeat(size // gh, axis=0).repeat(size // grid_map.shape[1], axis=1)


def attention_grid(maps: AttentionMaps, title: str = "", scale: int | None = None) -> Grid:
    size = maps.image.shape[-1]
    panels = [("image", "image", to_uint8(maps.image))]
    heads = maps.cls_attention.numpy()
    for h, a in enumerate(heads):
        panels.append(
            (f"head{h + 1}", f"head {h + 1}: cls attention, 0 to {a.max():.3f}",
             colormap(_upsample(a / max(a.max(), 1e-12), size)))
        )  # fmt: skip
    mean = heads.mean(axis=0)
    panels.append(("mean", f"mean over heads, 0 to {mean.max():.3f}",
                   colormap(_upsample(mean / max(mean.max(), 1e-12), size))))  # fmt: skip
    # the colour scale: bottom = attention 0, top = the map's own maximum (in its caption)
    ramp = np.repeat(np.linspace(1.0, 0.0, size)[:, None], size, axis=1)
    scale_panel = colormap(ramp)
    scale_panel[:, : size // 2] = 255  # a bar on the right half, white left of it
    uniform = 1 / (heads.shape[-1] * heads.shape[-2])
    panels.append(("scale", f"colour scale: bottom 0, top the map's max (uniform = {uniform:.3f})", scale_panel))
    ex = ", ".join(f"{100 * float(e):.0f}%" for e in maps.explained)
    pca = _upsample(maps.pca.permute(1, 2, 0).numpy(), size)
    panels.append(("pca", f"PCA of patch features -> RGB ({ex} var.)", (pca * 255).round().astype(np.uint8)))
    return render_panels(panels, title=title, scale=scale or default_scale(size, 128), max_cols=min(len(panels), 7))


def attention_figure(
    ckpt: str | Path, image: str | Path, out: str | Path | None = None, scale: int | None = None
) -> tuple[Path, AttentionMaps]:
    model, cfg, state = load_mimkit_checkpoint(ckpt)
    if encoder_family(cfg.method) == "beit":  # its attention adds a relative position bias the maps would leave out
        raise InteropError(f"{ckpt}: attention maps of timm Beit encoders ({cfg.method}) are not supported yet; "
                         "they cover timm VisionTransformer encoders (MAE, EMAE, BootMAE)")  # fmt: skip
    encoder = encoder_of(model)
    size = encoder.patch_embed.img_size[0]
    if not Path(image).is_file():
        raise FileNotFoundError(f"image not found: {image}")
    maps = attention_maps(encoder, prepare_image(image, size), cfg.data.mean, cfg.data.std)
    title = (
        f"{Path(image).name} | {Path(ckpt).name} step {state.get('step', '?')} | "
        f"last block ({len(encoder.blocks)}) attention of the cls token, unmasked input"
    )
    out = Path(out) if out else Path(f"{Path(image).stem}_attention.png")
    return attention_grid(maps, title, scale).save(out), maps
