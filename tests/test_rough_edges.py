"""The rough edges a new user hit (issue 17), each with the behaviour it has now:
--version, pretrain --help, --print-config with resolved preset values, the BEiT tokenizer hint, `attention` on
several images with a colour scale, panel text that keeps its spaces, the tokenizer progress bar, the Python API
(docstring example, logging, evaluate), warnings for implausible settings, the cached probe keeping the epoch's
remainder, no view tensors out of the methods' forward (FSDP2 warned about them), a corrupt image reported once,
and the `hf` extra named when transformers is missing."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import METHODS, TINY_MODEL, TINY_TOKENIZER, make_images, tiny_model
from PIL import Image, ImageDraw
from test_visualize import write_checkpoint, write_image

import mimkit
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data import PretrainDataset, ResumableBatchSampler
from mimkit.methods import build_model
from mimkit.sources import ArrayImages, CorruptImage
from mimkit.train import pretrain
from mimkit.visualize import _font, attention_grid, attention_maps, colormap, prepare_image, render_panels

REPO = Path(__file__).resolve().parent.parent


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mimkit {mimkit.__version__}"


def test_pretrain_help_names_the_methods_and_every_config_section(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    assert "(MAE);" not in text and all(m in text for m in ("emae", "bootmae", "beit", "mcbeit"))
    flat = " ".join(text.split())
    for section, key in [("model", "arch, img_size"), ("data", "path, format, root, download"),
                         ("optim", "blr, lr"), ("distributed", "strategy")]:  # fmt: skip
        assert re.search(rf"\b{section} +{re.escape(key)}", flat), section


def test_print_config_shows_the_values_the_preset_resolves(capsys, tmp_path):
    assert main(["pretrain", "method=bootmae", "model.arch=vit_tiny_patch16_224", "--print-config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["model"] == {"arch": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16, "embed_dim": 192,
                                  "depth": 12, "num_heads": 3, "drop_path_rate": 0.0, "in_chans": 3, "layer_norm_eps": 1e-6}  # fmt: skip
    b = data["bootmae"]
    assert (b["feature_decoder_dim"], b["feature_decoder_depth"], b["feature_decoder_heads"]) == (192, 8, 3)
    # the printed config is a valid recipe for the same model
    (tmp_path / "printed.yaml").write_text(printed)
    same, default = load_config(tmp_path / "printed.yaml"), load_config(None, ["method=bootmae",
                                                                              "model.arch=vit_tiny_patch16_224"])  # fmt: skip
    shapes = lambda cfg: {k: v.shape for k, v in build_model(cfg).state_dict().items()}  # noqa: E731
    assert shapes(same) == shapes(default)


def test_beit_without_a_tokenizer_points_at_tokenizer_train(tmp_path, npz_data, capsys):
    code = main(["pretrain", *tiny_model("beit"), f"data.path={npz_data}", "tokenizer.kind=mimkit",
                 f"tokenizer.path={tmp_path / 'missing.pt'}", f"train.out_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "missing.pt does not exist" in err and "mimkit tokenizer train" in err


def test_attention_takes_several_images_and_has_a_colour_scale(tmp_path, capsys):
    model, cfg = write_checkpoint(tmp_path / "ck.pt")
    images = [write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png")]
    assert main(["attention", str(tmp_path / "ck.pt"), *map(str, images), "--out", str(tmp_path / "att")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "att" / f"{s}_attention.png") for s in "ab"]
    assert all((tmp_path / "att" / f"{s}_attention.png").is_file() for s in "ab")

    maps = attention_maps(model.encoder, prepare_image(str(images[0]), 16), cfg.data.mean, cfg.data.std)
    grid = attention_grid(maps, scale=1)
    heads = maps.cls_attention.numpy()
    for h, a in enumerate(heads):  # each map says what its brightest colour means
        assert grid.captions[f"head{h + 1}"].endswith(f"0 to {a.max():.3f}")
    bar = grid.panel("scale")[:, -1]  # right column of the bar, top to bottom: the colour map from 1 to 0
    assert (bar[0] == colormap(np.array(1.0))).all() and (bar[-1] == colormap(np.array(0.0))).all()


def widest_gap(caption: str) -> int:
    """Widest run of blank columns inside the ink of a rendered caption."""
    grid = render_panels([("p", caption, np.zeros((4, 200, 3), np.uint8))], pad=0)
    text = grid.image[: grid.caption_height].min(axis=2) < 128  # dark pixels
    cols = np.flatnonzero(text.any(axis=0))
    blank = np.diff(cols) - 1
    return int(blank.max()) if len(blank) else 0


def test_panel_text_keeps_its_spaces():
    space = 0.35 * _font().size  # mimkit's word spacing (the default font's own space is 2 px)
    assert ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(" ", font=_font()) < space
    assert widest_gap("clsattention") < space <= widest_gap("cls attention")
    assert widest_gap("checkpoint-00000072.pt step 72") >= space


def test_tokenizer_training_shows_a_progress_bar(tiny_cfg, tmp_path, capsys):
    from mimkit.tokenizer_training import train_tokenizer

    cfg = tiny_cfg(*TINY_TOKENIZER[1:], "tokenizer.kind=mimkit", "tokenizer.train_steps=3", "tokenizer.batch_size=4",
                   f"tokenizer.path={tmp_path / 'tok.pt'}", "train.progress=true", also_reads=("tokenizer",))  # fmt: skip
    train_tokenizer(cfg)
    assert re.search(r"tokenizer: 100%.*3/3", capsys.readouterr().err)


def test_the_python_api_examples_run(tmp_path, npz_data, monkeypatch):
    """The examples of mimkit.run's docstring and of the README, with a tiny model appended."""
    monkeypatch.chdir(REPO)
    tiny = TINY_MODEL + [f"data.path={npz_data}", "data.num_workers=0", "train.max_steps=1", "train.precision=fp32",
                         "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    docstring = re.search(r"`(mimkit\.run\(.*?\))`", mimkit.run.__doc__).group(1)
    readme = re.search(r"result = (mimkit\.run\(.*?\))", (REPO / "README.md").read_text()).group(1)
    for i, example in enumerate((docstring, readme)):
        call = example.replace('"])', '", *tiny, "train.out_dir=" + out])')
        result = eval(call, {"mimkit": mimkit, "tiny": tiny, "out": str(tmp_path / f"run{i}")})  # noqa: S307 - our own docs
        assert result.step == 1 and result.checkpoint.is_file()
    if docstring != readme:  # another schedule into the first example's folder: refused, not mixed into that run
        with pytest.raises(mimkit.MimkitError, match="would change how it trains: train.epochs"):
            eval(
                readme.replace('"])', '", *tiny, "train.out_dir=" + out])'),
                {"mimkit": mimkit, "tiny": tiny, "out": str(tmp_path / "run0")},
            )  # noqa: S307
    cfg = mimkit.load_config("configs/quickstart.yaml", ["train.epochs=1", *tiny, "train.resume=none"])
    assert mimkit.pretrain(cfg).step == 1  # the docstring's equivalent form


def test_logging_when_called_from_python(tmp_path, npz_data):
    tiny = TINY_MODEL + [f"data.path={npz_data}", "data.num_workers=0", "train.max_steps=1", "train.precision=fp32",
                         "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    code = f"import mimkit; mimkit.run(None, {tiny!r})"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert f"INFO mimkit {mimkit.__version__} | mae" in plain.stderr
    # a program that set up logging itself (here pytest, on the root logger) keeps its setup: no handler added
    assert logging.getLogger().handlers
    mimkit.run(None, tiny + ["train.resume=none"])
    assert logging.getLogger("mimkit").handlers == []


def test_evaluate_names_its_commands():
    from mimkit.config import ConfigError
    from mimkit.eval import evaluate

    assert "knn" in evaluate.__doc__ and "linprobe" in evaluate.__doc__ and ".metrics" in evaluate.__doc__
    with pytest.raises(ConfigError, match="allowed: knn, linprobe, finetune"):
        evaluate("probe")


@pytest.mark.parametrize("override, words", [("optim.blr=1e6", "implausibly high"),
                                             ("optim.warmup_epochs=100", "never reaches its peak")])  # fmt: skip
def test_questionable_settings_warn_and_train(tiny_cfg, caplog, override, words):
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        result = pretrain(tiny_cfg(override, "train.max_steps=1"))
    assert result.step == 1
    assert any(words in r.getMessage() for r in caplog.records)


def test_plausible_settings_do_not_warn(tiny_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        pretrain(tiny_cfg("train.max_steps=1"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("n, batch, world, accum", [(500, 256, 1, 1), (20, 256, 1, 1), (611, 64, 2, 2)])
def test_cached_probe_sampler_keeps_the_epochs_remainder(n, batch, world, accum):
    seen, sizes = [], set()
    for rank in range(world):
        s = ResumableBatchSampler(n, batch, accum, rank, world, seed=3, keep_partial=True)
        for micro in s:
            seen += [i for i, _ in micro]
            sizes.add(len(micro))
    lost = n % (batch * world * accum) % (accum * world)  # an equal split over ranks and micro-steps cannot place these
    assert len(seen) == len(set(seen)) == n - lost
    assert min(sizes) >= 2  # BatchNorm needs two images per rank
    old_kept = n // (batch * world * accum) * (batch * world * accum)  # whole steps only
    assert n - lost > old_kept


def test_linprobe_cached_on_fewer_images_than_a_batch(tmp_path):
    from mimkit.eval import evaluate

    data = tmp_path / "small.npz"
    x = make_images(20)
    np.savez(data, x_train=x, y_train=np.arange(20) % 2, x_test=x[:6], y_test=np.arange(6) % 2)
    result = evaluate("linprobe", None, ["encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32",
                                         "encoder.img_size=16", "encoder.embed_dim=32", "encoder.depth=1",
                                         "encoder.num_heads=2", f"data.path={data}", "data.num_workers=0",
                                         "probe.mode=cached", "train.batch_size=256", "train.epochs=2",
                                         "train.progress=false", "train.tensorboard=false", "train.precision=fp32",
                                         f"train.out_dir={tmp_path / 'probe'}"])  # fmt: skip
    assert result.metrics["steps"] == 2 and result.metrics["train_images"] == 20


@pytest.mark.parametrize("method", METHODS)
def test_forward_outputs_are_not_views(method):
    """FSDP2 hooks the root module's outputs and warns about views ("returned a view tensor ... wrong
    gradients"): the methods return their own tensors."""
    model = build_model(load_config(None, tiny_model(method)))
    inputs = [model.mask_inputs(torch.Generator().manual_seed(i)) for i in range(2)]
    batch = {k: torch.stack([d[k] for d in inputs]) for k in inputs[0]}
    view = getattr(model, "second_view", None)
    if view is not None:
        batch[view.key] = torch.randn(2, 3, view.size, view.size)
    out = model(torch.randn(2, 3, 16, 16), **batch)
    grads = {n: v for n, v in zip(out._fields, out) if isinstance(v, torch.Tensor) and v.requires_grad}
    assert "loss" in grads and all(v._base is None for v in grads.values()), {
        n: v._base is not None for n, v in grads.items()
    }


def test_a_corrupt_image_is_reported_once(caplog):
    class OneBad(ArrayImages):
        def load(self, index):
            if index == 1:
                raise CorruptImage("bad.png: truncated")
            return super().load(index)

    source = OneBad(make_images(4))
    dataset = PretrainDataset(source, lambda img: img.float())
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        for _epoch in range(3):
            assert dataset[(1, 0)]["skipped"] == 1
    assert len([r for r in caplog.records if "bad.png" in r.getMessage()]) == 1


def test_export_hf_without_transformers_names_the_extra(tmp_path, monkeypatch, capsys):
    write_checkpoint(tmp_path / "ck.pt")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["export", str(tmp_path / "ck.pt"), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'mimkit[hf]'" in err


def test_hf_vitmae_import_keeps_its_layer_norm_eps(tmp_path):
    """HF ViTMAE's default LayerNorm eps is 1e-12; with tokens of tiny variance (weak patch embedding) eps 1e-6
    would change every output. The import carries the config's eps into model.layer_norm_eps, and back out."""
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from mimkit.interop import export_hf, import_checkpoint, load_mimkit_checkpoint

    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                          decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=128, image_size=16, patch_size=4, mask_ratio=0.75)  # fmt: skip
    assert config.layer_norm_eps == 1e-12
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        for name, p in hf.named_parameters():  # tokens of variance ~1e-10: far below 1e-6
            if name.startswith("vit.embeddings"):
                p.mul_(1e-5)
    hf.save_pretrained(tmp_path / "hf")
    report = import_checkpoint(tmp_path / "hf", tmp_path / "imported.pt")
    assert any("eps 1e-12" in n for n in report.notes)
    model, cfg, _ = load_mimkit_checkpoint(tmp_path / "imported.pt")
    assert cfg.model.layer_norm_eps == 1e-12 and model.encoder.norm.eps == 1e-12
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        ours, ref = model(x, noise=noise), hf(pixel_values=x, noise=noise)
        torch.testing.assert_close(ours.pred, ref.logits, rtol=1e-5, atol=1e-5)
        from mimkit.methods import set_layer_norm_eps

        set_layer_norm_eps(model, 1e-6 + 1e-9)  # what mimkit did before: LayerNorm eps about 1e-6
        assert (model(x, noise=noise).pred - ref.logits).abs().max() > 1e-2
    written = export_hf(tmp_path / "imported.pt", tmp_path / "back")
    assert json.loads((written["vit_mae"] / "config.json").read_text())["layer_norm_eps"] == 1e-12


def test_the_warmup_warning_names_the_highest_lr_the_run_reaches(tiny_cfg):
    """It said 'never reaches its peak 0.00075 (it ends at 0.00075)' when the warmup ended with the run."""
    from mimkit.schedules import lr_at
    from mimkit.train import questionable_settings

    cfg = tiny_cfg("optim.warmup_epochs=2", "train.epochs=2", "optim.lr=0.001")  # 8 steps per epoch, 16 in all
    (note,) = questionable_settings(cfg, 0.001, 8)
    assert "never reaches its peak 0.001 (the highest it gets is 0.000937, at the last step)" in note
    assert lr_at(15, 8, cfg, 0.001) == pytest.approx(0.001 * 15 / 16)
    assert questionable_settings(tiny_cfg("optim.warmup_epochs=1", "train.epochs=2"), 0.001, 8) == []
