"""Standard datasets by name: `data.path=torchvision:NAME[:SPLIT]` (CIFAR10, CIFAR100, STL10, Flowers102, ImageNet,
and any other torchvision dataset class taking `split=` or `train=`), read from `data.root` in torchvision's own
on-disk layout, downloaded by torchvision only when asked (`data.download=true`).

The result is a mimkit image source (`load(i)`, `describe(i)`, `targets`, `classes`, `len`), so pretraining, the
k-NN monitor and the evaluation commands take it like a folder or a .npz.

CIFAR-10 / CIFAR-100 are stored by their authors as Python pickles. torchvision reads them with plain `pickle`;
mimkit reads the same files itself with an unpickler that only admits what those files hold (numpy arrays, lists,
dicts, strings), so a crafted file cannot run code. torchvision still does the download (URL and checksum of its
own class) when `data.download=true`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np

from mimkit.files import NUMERIC_KINDS, numeric_dtype, numeric_scalar
from mimkit.sources import ArrayImages, CorruptImage, DataError, array_to_tensor, to_channels, to_rgb

log = logging.getLogger("mimkit")

PREFIX = "torchvision:"
# split used for pretraining when the path names none; STL-10's 100,000 unlabeled images are meant for it
PRETRAIN_SPLIT = {"STL10": "unlabeled"}


def is_torchvision(path: str) -> bool:
    return str(path).startswith(PREFIX)


def parse(path: str) -> tuple[str, str | None]:
    """'torchvision:CIFAR10' -> ('CIFAR10', None); 'torchvision:STL10:unlabeled' -> ('STL10', 'unlabeled')."""
    rest = str(path)[len(PREFIX) :]
    name, _, split = rest.partition(":")
    return name, split or None


def dataset_class(name: str, path: str):
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if name == "FakeData":  # a class, but a generator of random images: no files, no splits, nothing to learn
        raise DataError(f"data.path: {path}: torchvision's FakeData makes random images in memory; data.path="
                        "torchvision:NAME opens only datasets stored under data.root that take split= or train= "
                        "(e.g. CIFAR10, STL10). For a run without downloaded data use data.path=skimage (the "
                        "quickstart's photos, shipped with scikit-image)")  # fmt: skip
    generic = ("VisionDataset", "ImageFolder", "DatasetFolder")
    if name in generic:  # base classes: a folder of images is data.path=FOLDER (data.format=folder) instead
        raise DataError(f"data.path: {path}: {name} is one of torchvision's generic base classes, not a dataset; for "
                        "a folder of images set data.path to the folder itself")  # fmt: skip
    if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
        known = ", ".join(["CIFAR10", "CIFAR100", "STL10", "Flowers102", "ImageNet", "SVHN", "Food101", "..."])
        raise DataError(f"data.path: {path}: torchvision has no dataset class '{name}' (e.g. {known}; names are "
                        "torchvision.datasets class names, case-sensitive)")  # fmt: skip
    return cls


# ---------------------------------------------------------------- CIFAR: torchvision's files, allow-listed unpickling


def _numeric_dtype(spec, align=False, copy=False) -> np.dtype:
    """``numpy.dtype(spec)``, for plain numeric type codes only."""
    numeric_dtype(spec)  # checks the code
    return np.dtype(spec, align=bool(align), copy=bool(copy))  # a copy, as pickle's: its state sets the byte order


def _empty_array(subtype, shape, dtype):
    """``numpy.core.multiarray._reconstruct``: the empty array an ndarray's pickle starts from."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"an array of type {subtype!r:.60} is not allowed in a CIFAR batch file")
    return np.ndarray.__new__(np.ndarray, (0,), "b")


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The exact (module, name) pairs CIFAR's batches pickle, each bound to a checked stand-in: numpy's own
    reconstructors and ``__setstate__`` trust their input, and a crafted state crashes the interpreter."""
    import codecs

    allowed: dict[tuple[str, str], object] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _empty_array
        allowed[(module, "scalar")] = numeric_scalar
    allowed[("numpy", "ndarray")] = np.ndarray  # only ever handed to _empty_array
    allowed[("numpy", "dtype")] = _numeric_dtype
    allowed[("_codecs", "encode")] = codecs.encode  # how protocol-2 pickles written by Python 3 hold bytes
    return allowed


def _plain_dtype(value) -> bool:
    return (
        isinstance(value, np.dtype) and value.kind in NUMERIC_KINDS and value.fields is None and value.subdtype is None
    )


def _checked_state(target, state) -> None:
    """The state BUILD may apply: a plain numeric dtype's byte order, an ndarray's exact shape, dtype and bytes."""
    if isinstance(target, np.dtype):
        ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
              and state[2:] == (None, None, None, -1, -1, 0) and _plain_dtype(target))  # fmt: skip
    elif type(target) is np.ndarray:
        ok = (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
              and len(state[1]) <= 8 and all(type(d) is int and d >= 0 for d in state[1]) and _plain_dtype(state[2])
              and isinstance(state[3], bool) and isinstance(state[4], (bytes, str))
              and len(state[4]) == int(np.prod(state[1], dtype=np.int64)) * state[2].itemsize)  # fmt: skip
    else:
        raise pickle.UnpicklingError(f"it sets the state of a {type(target).__name__}, which a CIFAR batch never does")
    if not ok:
        raise pickle.UnpicklingError(f"a {type(target).__name__} state that is not a plain numeric one")


class _CifarUnpickler(pickle._Unpickler):
    """pickle's Python unpickler (a dict memo: a crafted memo index cannot make it allocate gigabytes) admitting
    exactly the (module, name) pairs CIFAR's files pickle, with every numpy state checked before it is applied."""

    allowed = _cifar_globals()
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if "." not in name and (module, name) in self.allowed:  # exact pairs only, never an attribute chain
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"'{module}.{name}' is not allowed in a CIFAR batch file")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id is not allowed in a CIFAR batch file")

    def load_build(self):
        if len(self.stack) < 2:
            raise pickle.UnpicklingError("BUILD without an object")
        _checked_state(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]  # typeshed types it for pickle.Unpickler


def read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except OSError as e:
        raise DataError(f"data.path: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, struct / Unicode / Value / Type / AttributeError, ...
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"data.path: {path} is not a CIFAR batch file: {detail}") from None
    if not isinstance(entry, dict):
        raise DataError(f"data.path: {path} is not a CIFAR batch file (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _missing_hint(path: str, root: Path, expected: Path) -> str:
    return (f"data.path: {path}: not found: torchvision's layout expects {expected} under data.root {root}; "
            "add data.download=true to download it there (torchvision), or set data.root")  # fmt: skip


def _one_line(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e  # URLError: its reason
    return (str(reason).strip().splitlines() or [type(e).__name__])[0][:200]


def downloading(path: str, name: str, root: Path, where: str, download) -> None:
    """Run torchvision's `download()`; when it fails (no network, a refused or broken file) remove what it left
    under data.root (the folders it made, partial archives, half-extracted files) and say in one line which dataset
    failed and where its files go when they are put there by hand."""
    made = [p for p in (root, *root.parents) if not p.exists()]  # the folders this download creates
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        download()
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; torchvision's checks: RuntimeError
        if root.is_dir():
            for entry in set(root.iterdir()) - before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"data.path: {path}: downloading torchvision's {name} failed ({_one_line(e)}); nothing was "
                        f"kept. Offline, put its files in {where} yourself (torchvision's layout, e.g. from a machine "
                        "that ran with data.download=true) and run without data.download") from None  # fmt: skip


def open_cifar(cls, path: str, root: Path, split: str, download: bool) -> ArrayImages:
    if split not in ("train", "test"):
        raise DataError(f"data.path: {path}: split '{split}' is not one of CIFAR's: train, test")
    folder = root / cls.base_folder
    files = [folder / name for name, _ in (cls.train_list if split == "train" else cls.test_list)]
    if not all(f.is_file() for f in files) and download:
        downloader = cls.__new__(cls)
        downloader.root = str(root)
        # torchvision: its URL, md5-checked, extracted under root
        downloading(path, cls.__name__, root, f"{folder} (or its archive {root / cls.filename})", downloader.download)
    if not all(f.is_file() for f in files):
        missing = next(f for f in files if not f.is_file())
        raise DataError(_missing_hint(path, root, missing.relative_to(root)))
    images: list[np.ndarray] = []
    labels: list[int] = []
    for f in files:
        entry = read_cifar_pickle(f)
        key = "labels" if "labels" in entry else "fine_labels"
        if "data" not in entry or key not in entry:
            raise DataError(f"data.path: {f} has no 'data' / '{key}' entries (found: {', '.join(map(str, entry))})")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(x) for x in entry[key])
    source = ArrayImages(np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, dtype=np.int64),
                         name=f"{path}:{split}")  # fmt: skip
    meta = folder / cls.meta["filename"]
    source.classes = list(read_cifar_pickle(meta).get(cls.meta["key"], [])) if meta.is_file() else None
    return source


# ---------------------------------------------------------------- any other torchvision dataset


class TorchvisionImages:
    """A torchvision dataset as a mimkit image source: images as RGB PIL images, labels as `targets`."""

    def __init__(self, dataset, name: str, in_chans: int = 3):
        self.dataset, self.name, self.in_chans = dataset, name, in_chans
        labels = next((getattr(dataset, a) for a in ("targets", "labels", "_labels") if hasattr(dataset, a)), None)
        if labels is None and hasattr(dataset, "samples"):  # ImageFolder-like
            labels = [t for _, t in dataset.samples]
        self.targets = np.asarray(labels, dtype=np.int64).reshape(-1) if labels is not None else None
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        try:
            image = self.dataset[index][0]
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptImage(f"{self.describe(index)}: {type(e).__name__}: {e}") from e
        if isinstance(image, np.ndarray):
            return image if self.in_chans == 3 else array_to_tensor(image)
        return to_rgb(image) if self.in_chans == 3 else to_channels(image, self.in_chans)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def _split_kwargs(cls, name: str, path: str, split: str) -> dict:
    params = inspect.signature(cls.__init__).parameters
    if "split" in params:
        return {"split": split}
    if "train" in params:
        if split not in ("train", "test"):
            raise DataError(f"data.path: {path}: split '{split}' is not one of {name}'s: train, test")
        return {"train": split == "train"}
    raise DataError(f"data.path: {path}: torchvision's {name} takes neither split= nor train=; not supported")


def open_torchvision(path: str, split: str | None, root: str | Path, download: bool = False, *,
                     purpose: str = "pretrain"):  # fmt: skip
    """The image source of `torchvision:NAME[:SPLIT]`: SPLIT from the path, else `split` (evaluation: the config's
    train / val split), else for pretraining the dataset's training split ('unlabeled' for STL10)."""
    import torchvision.datasets as tvd

    if not is_torchvision(path):
        raise DataError(f"data.path: {path}: data.format torchvision takes data.path=torchvision:NAME[:SPLIT] "
                        "(e.g. torchvision:CIFAR10)")  # fmt: skip
    name, named_split = parse(path)
    cls = dataset_class(name, path)
    split = named_split or split or PRETRAIN_SPLIT.get(name, "train")
    root = Path(root).expanduser()
    if issubclass(cls, tvd.CIFAR10):  # CIFAR10 and CIFAR100
        return open_cifar(cls, path, root, split, download)
    kwargs = _split_kwargs(cls, name, path, split)
    if "download" in inspect.signature(cls.__init__).parameters:
        kwargs["download"] = download
    elif download:
        log.warning("data.download: torchvision cannot download %s; reading it from %s", name, root)
    try:
        if kwargs.get("download"):
            found: list = []
            downloading(path, name, root, f"{root} (torchvision.datasets.{name}'s layout)",
                        lambda: found.append(cls(str(root), **kwargs)))  # fmt: skip
            dataset = found[0]
        else:
            dataset = cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError) as e:  # torchvision: "Dataset not found or corrupted ..."
        raise DataError(f"data.path: {path}: cannot open it under data.root {root} ({e}); "
                        + ("add data.download=true to download it there (torchvision), or set data.root"
                           if "download" in kwargs else "put torchvision's files there")) from None  # fmt: skip
    except ValueError as e:  # e.g. an unknown split
        raise DataError(f"data.path: {path}: {e}") from None
    source = TorchvisionImages(dataset, f"{path}:{split}")
    if purpose == "labelled" and source.targets is None:
        raise DataError(f"data.path: {path}: split '{split}' has no labels")
    return source
