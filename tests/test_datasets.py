"""Datasets by name (`data.path=torchvision:NAME`): tiny copies in torchvision's own on-disk layout, no network.

* CIFAR-10 / CIFAR-100 python batches are read pixel-exactly, with labels and class names, through an unpickler
  that admits only numpy arrays (a crafted batch file is refused and its payload never runs);
* pretraining, the k-NN monitor and `mimkit knn` take `torchvision:CIFAR10` with `data.root`;
* a missing dataset is one line naming data.root, torchvision's expected folder and `data.download=true`;
  `data.download=true` asks torchvision's own class to download (stubbed here: no network in tests);
* any other torchvision class (ImageNet folder layout here) goes through torchvision itself.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_MODEL, make_images

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data import open_source
from mimkit.eval import evaluate, open_labelled_split
from mimkit.sources import DataError
from mimkit.train import pretrain

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, per_batch: int = 8, hundred: bool = False) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py (or cifar-100-python) layout: pickled dicts of uint8 rows in CHW order."""
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    images = {}
    label_key = "fine_labels" if hundred else "labels"
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        parts = []
        for j, (name, _) in enumerate(files):
            x = make_images(per_batch, size=32, seed=100 * (split == "test") + j)
            rows = x.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # CIFAR stores R plane, G plane, B plane
            labels = [(j * per_batch + i) % 10 for i in range(per_batch)]
            with open(folder / name, "wb") as f:
                pickle.dump({"batch_label": name, "data": rows, label_key: labels}, f, protocol=2)
            parts.append(x)
        images[split] = np.concatenate(parts)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: CLASSES}, f, protocol=2)
    return images


@pytest.fixture
def cifar_root(tmp_path):
    root = tmp_path / "tv"
    return root, write_cifar(root)


def test_cifar10_reads_torchvision_layout_exactly(cifar_root):
    root, images = cifar_root
    train = open_source("torchvision:CIFAR10", root=str(root))
    assert len(train) == 5 * 8
    for i in (0, 9, 39):
        assert torch.equal(train.load(i), torch.from_numpy(images["train"][i]).permute(2, 0, 1))
    test = open_labelled_split("torchvision:CIFAR10", "test", root=str(root))
    assert len(test) == 8 and test.classes == CLASSES
    assert test.targets.tolist() == [i % 10 for i in range(8)]
    assert torch.equal(test.load(3), torch.from_numpy(images["test"][3]).permute(2, 0, 1))
    explicit = open_source("torchvision:CIFAR10:test", root=str(root))  # the split in the name
    assert torch.equal(explicit.load(3), test.load(3))


def test_cifar100_fine_labels(tmp_path):
    images = write_cifar(tmp_path, per_batch=4, hundred=True)
    train = open_labelled_split("torchvision:CIFAR100", "train", root=str(tmp_path))
    assert len(train) == len(images["train"]) == 4 and train.targets.tolist() == [0, 1, 2, 3]


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_cifar_batch_is_refused_without_running_it(cifar_root, tmp_path):
    root, _ = cifar_root
    Payload.marker = str(tmp_path / "ran")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch.*not allowed"):
        open_labelled_split("torchvision:CIFAR10", "test", root=str(root))
    assert not (tmp_path / "ran").exists()


def test_missing_dataset_names_root_and_download(tmp_path, capsys):
    code = main(["pretrain", *TINY_MODEL, "data.path=torchvision:CIFAR10", f"data.root={tmp_path / 'nothing'}",
                 f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "cifar-10-batches-py" in err and str(tmp_path / "nothing") in err and "data.download=true" in err
    with pytest.raises(DataError, match="no dataset class 'CIFAR11'"):
        open_source("torchvision:CIFAR11", root=str(tmp_path))
    with pytest.raises(DataError, match="takes data.path=torchvision:NAME"):
        open_source(str(tmp_path), "torchvision", root=str(tmp_path))


def test_download_is_torchvisions_and_only_on_request(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):  # torchvision's CIFAR10.download, without the network
        calls.append(self.root)
        write_cifar(Path(self.root))

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", fake_download)
    with pytest.raises(DataError):
        open_source("torchvision:CIFAR10", root=str(tmp_path))
    assert calls == []
    assert len(open_source("torchvision:CIFAR10", root=str(tmp_path), download=True)) == 40
    assert calls == [str(tmp_path)]
    open_source("torchvision:CIFAR10", root=str(tmp_path), download=True)  # present now: no second download
    assert calls == [str(tmp_path)]


def test_pretrain_knn_monitor_and_knn_eval_on_torchvision_cifar(cifar_root, tmp_path, one_thread):
    root, _ = cifar_root
    cfg = load_config(None, TINY_MODEL + [
        "data.path=torchvision:CIFAR10", f"data.root={root}", "data.num_workers=0", "train.batch_size=8",
        "train.epochs=1", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.knn_every_epochs=1", f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    result = pretrain(cfg)
    assert result.step == 5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"knn_top1"' in lines and '"knn_val_images": 8' in lines
    out = evaluate("knn", None, [f"encoder.checkpoint={result.checkpoint}", "data.path=torchvision:CIFAR10",
                                 f"data.root={root}", "data.num_workers=0", "train.progress=false",
                                 "train.tensorboard=false", f"train.out_dir={tmp_path / 'knn'}"])  # fmt: skip
    assert out.metrics["train_images"] == 40 and out.metrics["val_images"] == 8 and out.metrics["num_classes"] == 10


def test_other_torchvision_classes_through_torchvision(tmp_path):
    """torchvision.datasets.ImageNet: meta.bin (torch.save'd, read with weights_only) + one folder per wnid."""
    root = tmp_path / "imagenet"
    from PIL import Image

    wnids = ["n01440764", "n01443537"]
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(make_images(1, size=24, seed=10 * c + i)[0]).save(root / "train" / wnid / f"{wnid}_{i}.png")
    torch.save(({wnids[0]: ("tench",), wnids[1]: ("goldfish",)}, []), root / "meta.bin")
    source = open_labelled_split("torchvision:ImageNet", "train", root=str(root))
    assert len(source) == 6 and source.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(np.asarray(source.load(4)), make_images(1, size=24, seed=11)[0])
    with pytest.raises(DataError, match="ImageNet"):
        open_labelled_split("torchvision:ImageNet", "val", root=str(root))  # no val folder, no devkit archive


REPO = Path(__file__).resolve().parent.parent


def test_cifar_recipes_work_from_a_fresh_clone_given_torchvision_cifar10(tmp_path, monkeypatch, capsys, one_thread):
    """The README's evaluation command, as written, with only data/cifar-10-batches-py in the current folder."""
    write_cifar(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    recipes = sorted((REPO / "configs").glob("*cifar10.yaml"))
    assert len(recipes) >= 6
    for (
        recipe
    ) in recipes:  # every CIFAR recipe reads torchvision's CIFAR-10 from ./data (the tokenizer's: its command's)
        cfg = load_config(recipe, also_reads=("tokenizer",) if recipe.stem.startswith("tokenizer") else ())
        assert (cfg.data.path, cfg.data.root) == ("torchvision:CIFAR10", "data"), recipe
        assert len(open_source(cfg.data.path, cfg.data.format, cfg.data.root)) == 40
    code = main(["knn", str(REPO / "configs/eval/knn_vit_tiny_cifar10.yaml"), "train.progress=false",
                 "train.tensorboard=false", "data.num_workers=0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (
        "done: knn top-1" in capsys.readouterr().out and (tmp_path / "runs/knn_vit_tiny_cifar10/metrics.json").is_file()
    )
    for command in ("linprobe", "finetune"):
        assert main([command, str(REPO / f"configs/eval/{command}_vit_tiny_cifar10.yaml"), "--print-config"]) == 0
        assert "path: torchvision:CIFAR10" in capsys.readouterr().out


def test_the_readme_python_evaluate_example(tmp_path, monkeypatch, npz_data, one_thread):
    """docs/getting-started.md "The same from Python": the evaluate lines, on a tiny checkpoint, CIFAR-10 in data/."""
    import re

    write_cifar(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "eval").mkdir(parents=True)
    shutil.copy(REPO / "configs/eval/knn_vit_tiny_cifar10.yaml", tmp_path / "configs/eval")
    result = pretrain(load_config(None, TINY_MODEL + [f"data.path={npz_data}", "data.num_workers=0", "train.max_steps=1",
                                                      "train.precision=fp32", "train.progress=false",
                                                      "train.tensorboard=false", "train.out_dir=run"]))  # fmt: skip
    readme = (REPO / "docs" / "getting-started.md").read_text()
    lines = re.search(r"\nfrom mimkit\.eval import evaluate.*?\nprint\(ev\.metrics.*?\n", readme, re.S).group(0)
    lines = lines.replace('checkpoint={result.checkpoint}"]', 'checkpoint={result.checkpoint}", *quiet]')
    quiet = ["train.progress=false", "train.tensorboard=false", "data.num_workers=0"]
    scope = {"result": result, "quiet": quiet}
    exec(lines, scope)  # noqa: S102 - the README's own example
    assert scope["ev"].metrics["val_images"] == 8 and scope["ev"].metrics_path.is_file()
