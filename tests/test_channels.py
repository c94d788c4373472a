"""Any number of channels (model.in_chans): grayscale PNG folders, 16-bit PNGs and C-band .npz arrays pretrain,
resume, draw pictures, evaluate and export; data.mean / data.std auto are measured on the data and recorded; a
channel mismatch is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, make_images, tiny_model
from PIL import Image

from mimkit.config import ConfigError, load_config
from mimkit.data import channel_stats, open_source
from mimkit.train import pretrain

REPO = Path(__file__).resolve().parents[1]


def gray_folder(root, n: int = 24, size: int = 16):
    """Grayscale 8-bit PNGs in two class folders, and one 16-bit PNG."""
    images = make_images(n, size)[..., 0]
    for i, img in enumerate(images):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(root / f"c{i % 2}" / f"{i:03d}.png")
    sixteen = images[0].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(root / "c0" / "sixteen.png")
    return root


def bands_npz(path, n: int = 32, size: int = 16, bands: int = 5):
    rgb = make_images(n, size).astype(np.uint16) * 257
    x = np.concatenate([rgb, rgb[..., :2] // 2], axis=-1)[..., :bands]
    np.savez(path, x_train=x, y_train=np.arange(n) % 4)
    return x


def channel_cfg(tmp_path, data, in_chans, *overrides, out="run"):
    return load_config(
        None,
        TINY_MODEL
        + [
            f"data.path={data}",
            f"model.in_chans={in_chans}",
            "data.mean=auto",
            "data.std=auto",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.epochs=1",
            "train.precision=fp32",
            "train.progress=false",
            "train.tensorboard=false",
            "optim.warmup_epochs=0",
            f"train.out_dir={tmp_path / out}",
            *overrides,
        ],
    )


def test_gray_folder_sources_keep_one_channel(tmp_path):
    root = gray_folder(tmp_path / "g")
    source = open_source(str(root), in_chans=1)
    shapes = {tuple(source.load(i).shape) for i in range(len(source))}
    assert shapes == {(1, 16, 16)}
    sixteen = source.load(source.files.index(root / "c0" / "sixteen.png"))
    assert sixteen.dtype == torch.float32 and float(sixteen.max()) <= 1.0
    rgb = open_source(str(root))  # in_chans 3: unchanged, grayscale as RGB
    assert rgb.load(0).mode == "RGB"


def test_auto_statistics_match_numpy(tmp_path):
    x = bands_npz(tmp_path / "b.npz")
    mean, std, used = channel_stats(open_source(str(tmp_path / "b.npz"), in_chans=5))
    ref = x.astype(np.float64) / 65535
    assert used == len(x)
    np.testing.assert_allclose(mean, ref.mean((0, 1, 2)), atol=2e-6)
    np.testing.assert_allclose(std, ref.std((0, 1, 2)), atol=2e-6)


@pytest.mark.parametrize("kind", ["gray", "bands"])
def test_pretrain_resume_records_statistics(tmp_path, kind, caplog):
    if kind == "gray":
        data, c = gray_folder(tmp_path / "g"), 1
    else:
        x = bands_npz(tmp_path / "b.npz")
        data, c = tmp_path / "b.npz", 5
    with caplog.at_level("INFO", logger="mimkit"):
        result = pretrain(channel_cfg(tmp_path, data, c))
    saved = yaml.safe_load(Path(result.config).read_text())
    assert saved["model"]["in_chans"] == c
    assert len(saved["data"]["mean"]) == c and len(saved["data"]["std"]) == c
    images = 25 if kind == "gray" else 32
    assert f"data.mean / data.std auto: measured on {images} of {images} training images" in caplog.text
    if kind == "bands":  # config.yaml holds numpy's numbers for the same data
        ref = x.astype(np.float64) / 65535
        np.testing.assert_allclose(saved["data"]["mean"], ref.mean((0, 1, 2)), atol=2e-6)
        np.testing.assert_allclose(saved["data"]["std"], ref.std((0, 1, 2)), atol=2e-6)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == c
    again = pretrain(
        channel_cfg(tmp_path, data, c, "train.epochs=2", "train.resume_allow=train.epochs")
    )  # resumes from its checkpoint
    assert again.step > result.step


def test_channel_mismatch_is_one_line(tmp_path):
    bands_npz(tmp_path / "b.npz")
    with pytest.raises(Exception) as e:
        pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", 1))
    assert "5 channel" in str(e.value) and "model.in_chans is 1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Exception) as e:
        load_config(None, TINY_MODEL + ["model.in_chans=1"])
    assert "data.mean has 3 values but model.in_chans is 1" in str(e.value)


def test_visualize_band_triple_and_gray(tmp_path):
    import tifffile

    from mimkit.cli import main

    x = bands_npz(tmp_path / "b.npz")
    result = pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", 5, "train.batch_size=16"))
    tifffile.imwrite(tmp_path / "tile.tif", x[0])  # a 5-band 16-bit TIFF
    assert (
        main(
            [
                "visualize",
                str(result.checkpoint),
                str(tmp_path / "tile.tif"),
                "--bands",
                "3,2,1",
                "--out",
                str(tmp_path / "vis"),
            ]
        )
        == 0
    )
    png = np.asarray(Image.open(tmp_path / "vis" / "tile_reconstruction.png"))
    assert png.ndim == 3 and png.shape[-1] == 3

    from mimkit.visualize import visualize

    done = visualize(result.checkpoint, [tmp_path / "tile.tif"], tmp_path / "vis2", bands=(5, 4, 1))[0]
    assert done.reconstruction.original.shape[0] == 5
    original = done.grid.panel("original")
    want = (done.reconstruction.original[[4, 3, 0]].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert original.shape[-1] == 3 and np.array_equal(
        original[:: original.shape[0] // want.shape[0]][: want.shape[0], :: original.shape[1] // want.shape[1]][
            :, : want.shape[1]
        ],
        want,
    )
    with pytest.raises(Exception, match="three band numbers in 1..5"):
        visualize(result.checkpoint, [tmp_path / "tile.tif"], tmp_path / "vis3", bands=(6, 2, 1))

    gray = gray_folder(tmp_path / "g")
    run = pretrain(channel_cfg(tmp_path, gray, 1, out="gray"))
    done = visualize(run.checkpoint, [gray / "c0" / "000.png"], tmp_path / "vis4")[0]
    panel = done.grid.panel("original")
    assert np.array_equal(panel[..., 0], panel[..., 1]) and np.array_equal(panel[..., 0], panel[..., 2])  # gray


@pytest.mark.parametrize("bands", [1, 5])
def test_knn_evaluates_with_the_checkpoint_channels(tmp_path, bands):
    from conftest import knn_cli

    if bands == 1:
        x = make_images(32, 16)[..., 0]  # (N, H, W): one band
        np.savez(tmp_path / "b.npz", x_train=x, y_train=np.arange(32) % 4)
    else:
        bands_npz(tmp_path / "b.npz")
    result = pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", bands))
    assert knn_cli(result.checkpoint, tmp_path / "b.npz", tmp_path / "knn") == 0
    saved = yaml.safe_load(Path(result.config).read_text())
    evaluated = yaml.safe_load(Path(tmp_path / "knn" / "config.yaml").read_text())
    assert evaluated["data"]["mean"] == pytest.approx(saved["data"]["mean"])


@pytest.mark.parametrize("bands", [1, 5])
def test_export_timm_and_hf_carry_in_chans(tmp_path, bands):
    import json

    import timm

    from mimkit.interop import load_mimkit_checkpoint
    from mimkit.interop.export import export_timm

    if bands == 1:
        gray = gray_folder(tmp_path / "g")
        result = pretrain(channel_cfg(tmp_path, gray, 1))
    else:
        bands_npz(tmp_path / "b.npz")
        result = pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", 5))
    model, _, _ = load_mimkit_checkpoint(result.checkpoint)
    export_timm(result.checkpoint, tmp_path / "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["model_args"]["in_chans"] == bands and config["pretrained_cfg"]["input_size"][0] == bands
    assert len(config["pretrained_cfg"]["mean"]) == bands and len(config["pretrained_cfg"]["std"]) == bands
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, bands, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.encoder.forward_features(x))

    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("Hugging Face export needs transformers >= 5")
    from transformers import ViTModel

    from mimkit.interop.export import export_hf

    written = export_hf(result.checkpoint, tmp_path / "hf")
    vit = ViTModel.from_pretrained(written["vit"], add_pooling_layer=False).eval()
    assert vit.config.num_channels == bands
    with torch.no_grad():
        hf = vit(pixel_values=x).last_hidden_state
        torch.testing.assert_close(hf, model.encoder.forward_features(x), atol=1e-5, rtol=1e-5)


def fake_fashion_mnist(root, n: int = 32):
    """torchvision's FashionMNIST layout (raw idx files) with n generated 28 px images per split."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = make_images(n, 28)[..., 0]
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], dtype=">i4").tobytes() + (np.arange(n) % 4).astype(np.uint8).tobytes()
        )


def test_fashion_mnist_recipe_end_to_end(tmp_path):
    fake_fashion_mnist(tmp_path / "data")
    cfg = load_config(
        str(REPO / "configs/mae_vit_tiny_fashionmnist.yaml"),
        [
            f"data.root={tmp_path / 'data'}",
            "data.num_workers=0",
            "model.embed_dim=32",
            "model.depth=2",
            "model.num_heads=2",
            "mae.decoder_dim=32",
            "mae.decoder_depth=1",
            "mae.decoder_heads=2",
            "train.epochs=1",
            "train.batch_size=8",
            "train.precision=fp32",
            "train.progress=false",
            "train.tensorboard=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.model.in_chans == 1 and cfg.model.img_size == 28
    result = pretrain(cfg)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == 1
    from mimkit.cli import main

    assert (
        main(
            [
                "knn",
                str(REPO / "configs/eval/knn_vit_tiny_fashionmnist.yaml"),
                f"encoder.checkpoint={result.checkpoint}",
                f"data.root={tmp_path / 'data'}",
                "data.num_workers=0",
                "train.precision=fp32",
                "train.progress=false",
                "train.tensorboard=false",
                "train.batch_size=16",
                f"train.out_dir={tmp_path / 'knn'}",
            ]
        )
        == 0
    )


def test_tensorboard_pictures_of_a_one_channel_run(tmp_path):
    pytest.importorskip("tensorboard")
    gray = gray_folder(tmp_path / "g")
    result = pretrain(
        channel_cfg(tmp_path, gray, 1, "train.tensorboard=true", "train.vis_every_epochs=1", "train.vis_images=2")
    )
    assert result.step > 0 and any((tmp_path / "run").rglob("events.out.tfevents*"))


def test_mismatch_on_the_command_line_is_one_line(tmp_path, capsys):
    from conftest import one_error_line

    from mimkit.cli import main

    bands_npz(tmp_path / "b.npz")
    assert (
        main(
            [
                "pretrain",
                *TINY_MODEL,
                f"data.path={tmp_path / 'b.npz'}",
                "model.in_chans=3",
                f"train.out_dir={tmp_path / 'run'}",
            ]
        )
        != 0
    )
    line = one_error_line(capsys)
    assert "(N, H, W, C), C in 1/3/4" in line and "set model.in_chans=5" in line
    assert (
        main(
            [
                "pretrain",
                *TINY_MODEL,
                f"data.path={tmp_path / 'b.npz'}",
                "model.in_chans=2",
                "data.mean=auto",
                "data.std=auto",
                f"train.out_dir={tmp_path / 'run2'}",
            ]
        )
        != 0
    )
    line = one_error_line(capsys)
    assert "has 5 channel(s)" in line and "model.in_chans is 2" in line
    assert main(["pretrain", *TINY_MODEL, "model.in_chans=1", f"train.out_dir={tmp_path / 'run3'}"]) != 0
    assert "data.mean has 3 values but model.in_chans is 1" in one_error_line(capsys)


@pytest.mark.parametrize("bands", [1, 5])
def test_linear_probe_and_fine_tune(tmp_path, bands):
    from mimkit.eval import finetune as ft
    from mimkit.eval import linprobe as lp
    from mimkit.eval.config import load_eval_config

    if bands == 1:
        np.savez(tmp_path / "b.npz", x_train=make_images(32, 16)[..., 0], y_train=np.arange(32) % 4)
    else:
        bands_npz(tmp_path / "b.npz")
    ckpt = pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", bands)).checkpoint
    base = [
        f"encoder.checkpoint={ckpt}",
        f"data.path={tmp_path / 'b.npz'}",
        "data.val_split=train",
        "data.num_workers=0",
        "train.precision=fp32",
        "train.progress=false",
        "train.tensorboard=false",
        "train.batch_size=8",
        "train.epochs=1",
        "optim.warmup_epochs=0",
    ]
    for mode in ("augment", "cached"):
        lp.run_linprobe(
            load_eval_config("linprobe", None, base + [f"probe.mode={mode}", f"train.out_dir={tmp_path / mode}"])
        )
    finetune = load_eval_config("finetune", None, base + [f"train.out_dir={tmp_path / 'ft'}"])
    if bands == 1:
        ft.run_finetune(finetune)
    else:  # timm's PIL training transform: 1 or 3 channels; refused in one line before any model is built
        with pytest.raises(Exception, match="reads 5 channels; fine-tuning augments with timm's"):
            ft.run_finetune(finetune)


def test_the_knn_monitor_and_other_methods_take_the_channels(tmp_path):
    """The k-NN trend monitor reads the run's channels; SimMIM and I-JEPA pretrain on 5 bands; BootMAE says why not."""
    x = bands_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "l.npz", x_train=x, y_train=np.arange(len(x)) % 4, x_test=x[:8], y_test=np.arange(8) % 4)
    result = pretrain(
        channel_cfg(tmp_path, tmp_path / "l.npz", 5, "train.knn_every_epochs=1", "train.knn_samples=[16,8]")
    )
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert any("knn_top1" in r for r in records)
    for method, extra in (("simmim", ["simmim.mask_patch_size=8"]), ("ijepa", [])):
        cfg = load_config(None, [*tiny_model(method), *extra, f"data.path={tmp_path / 'b.npz'}", "model.in_chans=5",
                                 "data.mean=auto", "data.std=auto", "data.num_workers=0", "train.batch_size=8",
                                 "train.max_steps=2", "train.precision=fp32", "train.progress=false",
                                 "train.tensorboard=false", f"train.out_dir={tmp_path / method}"])  # fmt: skip
        assert np.isfinite(pretrain(cfg).loss), method
    with pytest.raises(
        ConfigError, match=r"^model.in_chans 5: method bootmae reads RGB images only .* one of .*simmim"
    ):
        load_config(None, [*tiny_model("bootmae"), "model.in_chans=5", "data.mean=auto", "data.std=auto"])


def test_embed_reads_the_checkpoint_channels_and_statistics(tmp_path):
    from mimkit.eval.embed import embed_images
    from mimkit.interop import load_mimkit_checkpoint

    bands_npz(tmp_path / "b.npz")
    result = pretrain(channel_cfg(tmp_path, tmp_path / "b.npz", 5, "train.max_steps=2"))
    e = embed_images(str(result.checkpoint), str(tmp_path / "b.npz"), progress=False)
    model, cfg, _ = load_mimkit_checkpoint(result.checkpoint)
    source = open_source(str(tmp_path / "b.npz"), "auto", in_chans=5)
    x = torch.stack([source.load(i) for i in range(2)]) if torch.is_tensor(source.load(0)) else None
    assert e.features.shape == (32, 32) and x is not None and x.shape[1] == 5
    mean, std = torch.tensor(cfg.data.mean).view(1, 5, 1, 1), torch.tensor(cfg.data.std).view(1, 5, 1, 1)
    with torch.no_grad():
        expected = model.encoder.eval().forward_features((x - mean) / std)[:, 0]
    np.testing.assert_allclose(e.features[:2], expected.numpy(), atol=1e-5)
