"""Image sources, index -> image: ImageFolder trees and flat folders, .npz arrays, the embedded scikit-image
photos; decoding that turns every image into 8-bit RGB and every undecodable file into CorruptImage."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from mimkit.errors import MimkitError

log = logging.getLogger("mimkit")



class DataError(MimkitError, ValueError):
    """A problem with the configured data, naming the file or field."""

    def __init__(self, *args):
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        if text.startswith("Caught ") and "Original Traceback" in text:
            # torch's DataLoader re-raises a worker's error with the worker's whole traceback as the message: keep
            # the error's own line (the traceback's last), so the command line still prints one line
            last = [line for line in text.splitlines() if line.strip()][-1]
            args = (last.split(": ", 1)[1] if last.startswith(("mimkit.", "DataError")) and ": " in last else last,)
        super().__init__(*args)


class CorruptImage(MimkitError):
    pass


# ---------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, RGBA, palette, CMYK and 16-bit images become 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "F":
            arr, top = arr - arr.min(), max(float(arr.max() - arr.min()), 1e-12)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):  # composite on white rather than exposing undefined colour under alpha 0
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode an image file, raising CorruptImage on any decoding problem (truncation included)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        raise CorruptImage(f"{path}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- sources: index -> image


class FolderImages(Dataset):
    """An ImageFolder tree (class sub-folders) or a flat folder of images, found recursively."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        exts = tuple(IMG_EXTENSIONS)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise DataError(f"data.path: folder {root} contains no images (extensions: {', '.join(exts)})")
        classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
        self.classes = classes
        class_index = {c: i for i, c in enumerate(classes)}
        self.files = files
        self.targets = [class_index.get(p.relative_to(root).parts[0], -1) if p.parent != root else -1 for p in files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return load_image(self.files[index])

    def describe(self, index: int) -> str:
        return str(self.files[index])


class ArrayImages(Dataset):
    """uint8 images in an (N, H, W, C) array, C in {1, 3, 4}; labels optional."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        self.images, self.targets, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img[:3]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def load_npz(path: str | os.PathLike, split: str = "train") -> ArrayImages:
    """The layout of CIFAR-10 as .npz: x_{split} uint8 (N, H, W, C), optional y_{split}."""
    key = f"x_{split}"
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"data.path: cannot read {path} as .npz: {e}") from e
    with archive:
        if key not in archive.files:
            raise DataError(f"data.path: {path} has no array '{key}' (found: {', '.join(archive.files) or 'none'})")
        try:
            x = archive[key]
            y = archive[f"y_{split}"] if f"y_{split}" in archive.files else None
        except ValueError as e:  # object arrays (e.g. images of mixed sizes) need pickle: refused
            raise DataError(
                f"data.path: {path} '{key}' is not a plain array ({e}); store uint8 images of one size as "
                "(N, H, W, C), or put images of mixed sizes in a folder"
            ) from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"data.path: {path} '{key}' must be uint8 with shape (N, H, W, C), C in 1/3/4; "
            f"got {x.dtype} {x.shape}"
        )
    if len(x) == 0:
        raise DataError(f"data.path: {path} '{key}' holds no images")
    return ArrayImages(x, y, name=f"{path}:{key}")


def skimage_photos() -> ArrayImages:
    """The embedded default dataset: scikit-image's bundled natural photos, square-cropped to 256 px.
    Real images, shipped inside a dependency, so the quickstart needs no download."""
    try:
        from skimage import data as skdata
        from skimage.transform import resize
    except ImportError as e:  # a required dependency, but an environment may lack it
        raise DataError("data.path: skimage (the embedded photos) needs scikit-image, which is not installed: "
                        "pip install scikit-image") from e  # fmt: skip

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "text",
             "clock", "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina",
             "colorwheel", "cell", "microaneurysms"]  # fmt: skip
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                img = getattr(skdata, name)()
            except Exception:  # photos not shipped in this scikit-image version (some need a download)
                continue
            img = np.asarray(img)
            if img.ndim == 2:
                img = np.stack([img] * 3, axis=-1)
            if img.dtype != np.uint8:
                img = (np.clip(img.astype(np.float64) / max(float(img.max()), 1e-12), 0, 1) * 255).astype(np.uint8)
            h, w = img.shape[:2]
            s = min(h, w)
            img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s, :3]
            img = (resize(img, (256, 256), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
            images.append(img)
    if len(images) < 4:
        raise DataError("data.path: skimage: scikit-image's bundled photos were not found; install scikit-image")
    return ArrayImages(np.stack(images), None, name="skimage")
