"""CLI habits: flags anywhere among the overrides, `train.*` for knn's output section too, and errors that name the
key to change (too few images for a step, a missing split, torchvision:FakeData, an offline download that leaves
nothing behind). Each user error is one line, `mimkit: error: ...`, exit 2."""

import urllib.error

import numpy as np
import pytest
import torchvision
import yaml
from conftest import TINY_MODEL, make_images, one_error_line
from PIL import Image

from mimkit.cli import build_parser, flags_first, main
from mimkit.datasets import open_torchvision
from mimkit.eval import load_eval_config
from mimkit.sources import DataError
from mimkit.typed_config import ConfigError

TINY_ENCODER = ["encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16",
                "encoder.patch_size=4", "encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2"]  # fmt: skip


@pytest.fixture
def labelled_npz(tmp_path):
    path = tmp_path / "labelled.npz"
    x = make_images(24, size=16, seed=5)
    np.savez(path, x_train=x, y_train=np.arange(24) % 3)  # no test split
    return str(path)


def test_flags_anywhere_among_the_overrides():
    parser = build_parser()
    args = parser.parse_args(flags_first(["pretrain", "configs/quickstart.yaml", "--dry-run", "train.out_dir=x"]))
    assert (args.config, args.overrides, args.dry_run, args.print_config) == ("configs/quickstart.yaml",
                                                                              ["train.out_dir=x"], True, False)  # fmt: skip
    args = parser.parse_args(flags_first(["knn", "a.yaml", "run.k=1", "--print-config", "data.path=y"]))
    assert (args.config, args.overrides, args.print_config) == ("a.yaml", ["run.k=1", "data.path=y"], True)
    assert flags_first(["export", "c.pt", "--to", "timm", "out"]) == ["export", "c.pt", "--to", "timm", "out"]
    assert flags_first(["pretrain", "--", "--dry-run"]) == ["pretrain", "--", "--dry-run"]
    # the image-list commands take their one-value options anywhere among the images
    args = parser.parse_args(flags_first(["visualize", "c.pt", "a.png", "--out", "o", "b.png", "--seed=3", "c.png"]))
    assert (args.checkpoint, args.images, args.out, args.seed) == ("c.pt", ["a.png", "b.png", "c.png"], "o", 3)
    args = parser.parse_args(flags_first(["attention", "c.pt", "a.png", "--scale", "2", "b.png"]))
    assert (args.images, args.scale) == (["a.png", "b.png"], 2)
    assert flags_first(["visualize", "c.pt", "--", "--out"]) == ["visualize", "c.pt", "--", "--out"]


def test_print_config_and_dry_run_between_overrides(tmp_path, npz_data, capsys, one_thread):
    base = [*TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8", "train.precision=fp32",
            "train.progress=false", "train.tensorboard=false"]  # fmt: skip
    assert main(["pretrain", base[0], "--print-config", *base[1:], f"train.out_dir={tmp_path / 'p'}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["out_dir"] == str(tmp_path / "p") and printed["model"]["depth"] == 2
    assert main(["pretrain", *base[:3], "--dry-run", *base[3:], f"train.out_dir={tmp_path / 'd'}"]) == 0
    assert "dry run OK" in capsys.readouterr().out
    assert main(["knn", *TINY_ENCODER[:2], "--print-config", *TINY_ENCODER[2:], "data.path=x.npz",
                 "train.out_dir=elsewhere"]) == 0  # fmt: skip
    assert yaml.safe_load(capsys.readouterr().out)["train"]["out_dir"] == "elsewhere"


def test_knn_takes_train_keys_as_its_run_section(tmp_path):
    cfg = load_eval_config("knn", None, [*TINY_ENCODER, "data.path=x.npz", "train.out_dir=o", "train.batch_size=7"])
    assert (cfg.train.out_dir, cfg.train.batch_size) == ("o", 7)
    recipe = tmp_path / "knn.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"path": "x.npz"}, "train": {"out_dir": "from_yaml", "seed": 3}}))
    cfg = load_eval_config("knn", recipe, [*TINY_ENCODER, "run.out_dir=from_override"])
    assert (cfg.train.out_dir, cfg.train.seed) == ("from_override", 3)  # the later layer wins, whatever its name
    cfg = load_eval_config("knn", "configs/eval/knn_vit_tiny_cifar10.yaml", ["train.out_dir=o2"])  # a run: recipe
    assert cfg.train.out_dir == "o2"
    with pytest.raises(ConfigError, match="run.out_dir and train.out_dir are the same setting"):
        load_eval_config("knn", None, [*TINY_ENCODER, "data.path=x.npz", "train.out_dir=a", "run.out_dir=b"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epochs'"):
        load_eval_config("knn", None, [*TINY_ENCODER, "data.path=x.npz", "train.epochs=3"])


def test_too_few_images_for_a_probe_step_names_eval_keys(tmp_path, labelled_npz, capsys, one_thread):
    code = main(["linprobe", *TINY_ENCODER, f"data.path={labelled_npz}", "data.val_split=train", "data.num_workers=0",
                 "probe.mode=augment", "train.batch_size=64", "train.precision=fp32", "train.progress=false",
                 "train.tensorboard=false", f"train.out_dir={tmp_path / 'lp'}"])  # fmt: skip
    line = one_error_line(capsys)
    assert code == 2 and "data.repeats" not in line and "lower train.batch_size" in line, line
    assert "data.train_split" in line or "data.train_samples" in line, line


def test_a_missing_val_split_names_data_val_split(tmp_path, labelled_npz, capsys):
    args = ["knn", *TINY_ENCODER, "data.num_workers=0", "train.progress=false", f"train.out_dir={tmp_path / 'k'}"]
    assert main([*args, f"data.path={labelled_npz}"]) == 2
    line = one_error_line(capsys)
    assert "x_test" in line and "data.val_split is 'test'" in line, line
    for split in ("train",):
        for c in range(2):
            (tmp_path / "imgs" / split / f"c{c}").mkdir(parents=True)
            Image.fromarray(make_images(1, size=16, seed=c)[0]).save(tmp_path / "imgs" / split / f"c{c}" / "a.png")
    assert main([*args, f"data.path={tmp_path / 'imgs'}"]) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "imgs" / "test") in line and "data.val_split is 'test'" in line, line


def test_fakedata_says_what_is_allowed(tmp_path):
    with pytest.raises(
        DataError, match=r"FakeData makes random images in memory; .*split= or train=.*data.path=skimage"
    ):
        open_torchvision("torchvision:FakeData", None, tmp_path)
    with pytest.raises(DataError, match="generic base classes"):
        open_torchvision("torchvision:ImageFolder", None, tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_offline_download_names_the_dataset_and_leaves_nothing(tmp_path, monkeypatch, capsys, existing):
    root = tmp_path / "data" / "sets"
    if existing:
        root.mkdir(parents=True)
        (root / "mine.txt").write_text("kept")

    def offline(self):  # torchvision's download: partway, then the network fails
        (root / "cifar-10-python.tar.gz").parent.mkdir(parents=True, exist_ok=True)
        (root / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    code = main(["pretrain", *TINY_MODEL, "data.path=torchvision:CIFAR10", f"data.root={root}", "data.download=true",
                 "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    line = one_error_line(capsys)
    assert code == 2 and "downloading torchvision's CIFAR10 failed (" in line and "Name or service not known" in line
    assert str(root / "cifar-10-batches-py") in line and "run without data.download" in line, line
    if existing:
        assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]
    else:
        assert not (tmp_path / "data").exists()


def test_done_lines_name_the_files_the_loggers_wrote(tmp_path, npz_data, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
                 "train.precision=fp32", "train.progress=false", "train.max_steps=2", "train.loggers=csv",
                 f"train.out_dir={out}"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"(CSV: {out / 'metrics.csv'})" in text and "TensorBoard" not in text, text
    assert (out / "metrics.csv").read_text().startswith("step,")
