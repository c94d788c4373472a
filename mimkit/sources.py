"""Image sources, index -> image: ImageFolder trees and flat folders, .npz arrays, the embedded scikit-image
photos; decoding that turns every image into 8-bit RGB and every undecodable file into CorruptImage."""

from __future__ import annotations

import importlib.util
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
from mimkit.extras import install_hint

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


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """An (H, W) or (H, W, C) array as a (C, H, W) tensor: uint8 kept (the transforms scale it), other integers
    divided by their dtype's maximum (16-bit: 65535), floats taken as already on the 0-1 scale (float32)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CorruptImage(f"an image array must be (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = torch.from_numpy(np.array(arr, copy=True))
    elif np.issubdtype(arr.dtype, np.integer):
        out = torch.from_numpy((arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)).astype(np.float32))
    elif np.issubdtype(arr.dtype, np.floating):
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise CorruptImage(f"image arrays must be integer or float, got {arr.dtype}")
    return out.permute(2, 0, 1).contiguous()


def to_channels(img: Image.Image, in_chans: int) -> torch.Tensor:
    """A decoded PIL image as a (C, H, W) tensor keeping its own channels (not converted to RGB): grayscale 8-bit
    as uint8, 16-bit (I;16) scaled by 65535, 32-bit float as is. With in_chans 1, colour images become luminance."""
    if img.mode.startswith("I;16"):
        return array_to_tensor(np.asarray(img, dtype=np.uint16))
    if img.mode == "I":  # PNG 16-bit greyscale often decodes as I: its values are 16-bit ones
        return array_to_tensor(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    if img.mode == "F":
        return array_to_tensor(np.asarray(img, dtype=np.float32))
    if in_chans == 1 and img.mode != "L":
        img = to_rgb(img).convert("L")
    elif img.mode in ("P", "LA", "RGBA", "CMYK", "YCbCr") and in_chans != 4:
        img = to_rgb(img)
    return array_to_tensor(np.asarray(img))


TIFF_SUFFIXES = (".tif", ".tiff")


def read_tiff(path: str | os.PathLike) -> np.ndarray | None:
    """A TIFF's pixels with tifffile (any band count and bit depth), as (H, W, C); None when tifffile is not
    installed (PIL then reads what it can: 8/16-bit one-band and RGB)."""
    try:
        import tifffile
    except ImportError:
        return None
    arr = tifffile.imread(path)
    if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1], arr.shape[2]) and arr.shape[0] <= 32:
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) as tifffile returns it
    return arr


def load_image(path: str | os.PathLike, in_chans: int = 3) -> Image.Image | torch.Tensor:
    """Fully decode an image file, raising CorruptImage on any decoding problem (truncation included). in_chans 3:
    8-bit RGB (a PIL image); otherwise a (C, H, W) tensor with the file's own channels (see to_channels)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if in_chans != 3 and str(path).lower().endswith(TIFF_SUFFIXES):
            arr = read_tiff(path)
            if arr is not None:
                return array_to_tensor(arr)
        with Image.open(path) as img:
            img.load()
            return to_rgb(img) if in_chans == 3 else to_channels(img, in_chans)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        hint = ""
        if in_chans != 3 and str(path).lower().endswith(TIFF_SUFFIXES) and importlib.util.find_spec("tifffile") is None:
            hint = f" (multi-band TIFFs need tifffile: {install_hint('tiff')})"
        raise CorruptImage(f"{path}: {type(e).__name__}: {e}{hint}") from e


def channels_of(image) -> int:
    """The channel count of a loaded image (PIL image or (C, H, W) tensor / (H, W, C) array)."""
    if isinstance(image, Image.Image):
        return len(image.getbands())
    if isinstance(image, torch.Tensor):
        return int(image.shape[0])
    return int(image.shape[-1]) if image.ndim == 3 else 1


def check_channels(source, in_chans: int, what: str = "data.path") -> None:
    """One line when the source's first readable image has another channel count than model.in_chans."""
    for i in range(min(len(source), 20)):
        try:
            image = source.load(i)
        except CorruptImage:
            continue
        c = channels_of(image)
        if c != in_chans:
            raise DataError(f"{what}: {source.describe(i)} has {c} channel(s) but model.in_chans is {in_chans}; "
                            f"set model.in_chans={c} (and data.mean / data.std with {c} values, or auto)")  # fmt: skip
        return


# ---------------------------------------------------------------- sources: index -> image


class FolderImages(Dataset):
    """An ImageFolder tree (class sub-folders) or a flat folder of images, found recursively."""

    def __init__(self, root: str | os.PathLike, in_chans: int = 3):
        root, self.in_chans = Path(root), in_chans
        exts = tuple(IMG_EXTENSIONS)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise DataError(f"data.path: folder {root} contains no images (extensions: {', '.join(exts)})")
        classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
        self.classes = classes
        class_index = {c: i for i, c in enumerate(classes)}
        self.files = files
        self.targets: list[int] | np.ndarray = [  # an int64 array once the evaluation's labelled split checked it
            class_index.get(p.relative_to(root).parts[0], -1) if p.parent != root else -1 for p in files
        ]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image | torch.Tensor:
        image = load_image(self.files[index], self.in_chans)
        if isinstance(image, torch.Tensor) and image.shape[0] != self.in_chans:  # in_chans 3: RGB; a corrupt image is
            raise CorruptImage(f"{self.files[index]}: {image.shape[0]} channel(s), model.in_chans is {self.in_chans}")
        return image

    def describe(self, index: int) -> str:
        return str(self.files[index])


class ArrayImages(Dataset):
    """Images in an (N, H, W, C) array; labels optional. in_chans 3: uint8, C in {1, 3, 4}, as RGB; otherwise
    C bands of uint8 / uint16 / float kept as they are (see array_to_tensor)."""

    classes: list[str] | None  # class names, where the loader knows them (CIFAR's meta file)

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array", in_chans: int = 3):
        self.images, self.targets, self.name, self.in_chans = images, labels, name, in_chans

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> torch.Tensor:
        if self.in_chans != 3 or self.images.dtype != np.uint8:
            return array_to_tensor(self.images[index])
        img = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img[:3]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def load_npz(path: str | os.PathLike, split: str = "train", in_chans: int = 3) -> ArrayImages:
    """The layout of CIFAR-10 as .npz: x_{split} uint8 (N, H, W, C), optional y_{split}. With in_chans other than
    3: C bands of uint8 / uint16 / float, (N, H, W) for one band; a .npy file is the x array alone."""
    key = f"x_{split}"
    if in_chans != 3 or str(path).endswith(".npy"):
        return _load_bands(path, key, in_chans)
    x, y, name = _read_arrays(path, key, "store uint8 images of one size as (N, H, W, C), or put images of mixed "
                              "sizes in a folder")  # fmt: skip
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"data.path: {path} '{key}' must be uint8 with shape (N, H, W, C), C in 1/3/4; "
            f"got {x.dtype} {x.shape}"
            + (
                f" (for {x.shape[-1]} bands set model.in_chans={x.shape[-1]})"
                if x.ndim == 4 and x.shape[-1] not in (1, 3, 4)
                else ""
            )
        )
    if len(x) == 0:
        raise DataError(f"data.path: {path} '{key}' holds no images")
    return ArrayImages(x, y, name=name)


def _read_arrays(path: str | os.PathLike, key: str, hint: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(x, y or None, name) of a .npz (x = archive[key], y = its y_ twin) or a .npy (x alone), without pickle."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"data.path: cannot read {path} as .npz / .npy: {e}") from e
    if isinstance(archive, np.ndarray):
        return archive, None, str(path)
    with archive:
        if key not in archive.files:
            raise DataError(f"data.path: {path} has no array '{key}' (found: {', '.join(archive.files) or 'none'})")
        try:
            y_key = f"y_{key[2:]}"
            return archive[key], archive[y_key] if y_key in archive.files else None, f"{path}:{key}"
        except ValueError as e:  # object arrays (e.g. images of mixed sizes) need pickle: refused
            raise DataError(f"data.path: {path} '{key}' is not a plain array ({e}); {hint}") from e


def _load_bands(path: str | os.PathLike, key: str, in_chans: int) -> ArrayImages:
    x, y, name = _read_arrays(path, key, "store (N, H, W, C)")
    if x.ndim == 3:
        x = x[..., None]
    numeric = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if x.ndim != 4 or not numeric:
        raise DataError(f"data.path: {name} must be (N, H, W, C) uint8 / uint16 / float; got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise DataError(f"data.path: {name} holds no images")
    if x.shape[-1] != in_chans:
        raise DataError(f"data.path: {name} has {x.shape[-1]} channel(s) (shape {tuple(x.shape)}) but model.in_chans "
                        f"is {in_chans}; set model.in_chans={x.shape[-1]}")  # fmt: skip
    return ArrayImages(x, y, name=name, in_chans=in_chans)


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
