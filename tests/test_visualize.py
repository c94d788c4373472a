"""Reconstruction grids and attention maps (tiny models, generated images, CPU, a few seconds).

* ``mimkit visualize`` writes one PNG per image with the expected grid size; the PNG holds exactly
  the array the function returns.
* In the pasted panel, visible patches are the input pixels exactly (on the returned tensors and
  on the uint8 grid), masked patches are the reconstruction.
* norm_pix predictions are mapped back with the ground-truth patch mean/std: an oracle model that
  predicts its own target reconstructs the input (norm_pix on and off), and the panel says so.
* Same seed, same mask; no RNG or train/eval state is disturbed (safe inside a training loop).
* The attention map is the one the last block uses (its output is reproduced from it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_images
from PIL import Image
from torch import nn

import mimkit
from mimkit.checkpoint import save_checkpoint
from mimkit.cli import main
from mimkit.config import load_config, to_dict
from mimkit.methods import build_model
from mimkit.methods.mae import MAEOutput
from mimkit.sources import ArrayImages
from mimkit.visualize import (
    NORM_PIX_NOTE,
    attention_maps,
    attention_weights,
    log_reconstruction_grid,
    prepare_image,
    preview_images,
    reconstruct,
    reconstruction_grid,
    visualize,
)

SIZE, PATCH = 16, 4  # TINY_MODEL: 16 px images, 4 px patches, 4x4 grid


def tiny_model(*overrides: str, seed: int = 0):
    cfg = load_config(None, TINY_MODEL + list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # move biases / norms / tokens off their init so outputs are non-trivial
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_token"):
                p.add_(0.1 * torch.randn_like(p))
    return model, cfg


def write_checkpoint(path, *overrides: str):
    model, cfg = tiny_model(*overrides)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "step": 7,
            "mimkit_version": mimkit.__version__,
            "method": cfg.method,
        },
    )
    return model.eval(), cfg


def write_image(path, size: int = 20, seed: int = 0):
    Image.fromarray(make_images(1, size, seed)[0]).save(path)
    return path


def upscale(mask: torch.Tensor, k: int) -> np.ndarray:
    return mask.numpy().repeat(k, axis=0).repeat(k, axis=1)


def test_visualize_png_grid_and_exact_paste(tmp_path):
    model, cfg = write_checkpoint(tmp_path / "ck.pt")
    img = write_image(tmp_path / "photo.png", size=20)
    [done] = visualize(tmp_path / "ck.pt", [img], tmp_path / "vis", seed=3, scale=5)
    png, grid, rec = done.path, done.grid, done.reconstruction
    assert png == tmp_path / "vis" / "photo_reconstruction.png" and png.is_file()

    # the same as running the model directly with that seed
    direct = reconstruct(model, prepare_image(img, SIZE), cfg.data.mean, cfg.data.std, seed=3)[0]
    assert torch.equal(direct.mask, rec.mask) and torch.equal(direct.pasted, rec.pasted)
    num_patches = (SIZE // PATCH) ** 2
    assert int(rec.patch_mask.sum()) == num_patches - int(num_patches * (1 - cfg.mask.ratio))

    # tensors: visible pixels of the pasted panel ARE the input pixels; masked ones the reconstruction
    visible = ~rec.mask
    assert torch.equal(rec.pasted[:, visible], rec.original[:, visible])
    assert torch.equal(rec.pasted[:, rec.mask], rec.reconstruction[:, rec.mask])
    assert not torch.equal(rec.reconstruction[:, visible], rec.original[:, visible])  # a real prediction
    assert torch.all(rec.masked[:, rec.mask] == 0.5) and torch.equal(rec.masked[:, visible], rec.original[:, visible])

    # the PNG is the returned grid, byte for byte, at the expected size: 4 panels of 16 px x 5 in a row
    saved = np.asarray(Image.open(png).convert("RGB"))
    panel = SIZE * 5
    assert grid.image.shape == (
        grid.pad + grid.title_height + grid.caption_height + panel + grid.pad,
        4 * panel + 5 * grid.pad,
        3,
    )
    assert np.array_equal(saved, grid.image)
    assert [grid.boxes[n][2:] for n in ("original", "masked", "reconstruction", "pasted")] == [(panel, panel)] * 4

    # uint8 grid: the original panel is the resized input image, and pasted == original where visible
    resized = (prepare_image(img, SIZE) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(grid.panel("original"), resized.repeat(5, 0).repeat(5, 1))
    vis_px = upscale(visible, 5)
    assert np.array_equal(grid.panel("pasted")[vis_px], grid.panel("original")[vis_px])
    assert not np.array_equal(grid.panel("pasted")[~vis_px], grid.panel("original")[~vis_px])

    # norm_pix is on in the default config: the reconstruction panels say how they were un-normalised
    assert (
        rec.norm_pix and NORM_PIX_NOTE in grid.captions["reconstruction"] and NORM_PIX_NOTE in grid.captions["pasted"]
    )


class Oracle(nn.Module):
    """Predicts exactly its own training target: a perfect reconstruction must come back out."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae
        self.patch_size, self.norm_pix_loss = mae.patch_size, mae.norm_pix_loss

    def mask_inputs(self, generator):
        return self.mae.mask_inputs(generator)

    def target(self, imgs):
        return self.mae.target(imgs)

    def pixels_from_pred(self, pred, imgs):
        return self.mae.pixels_from_pred(pred, imgs)

    def forward(self, imgs, **mask_inputs):
        out = self.mae(imgs, **mask_inputs)
        return MAEOutput(out.loss, self.mae.target(imgs), out.mask)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_predictions_are_unnormalised_with_patch_statistics(norm_pix):
    model, cfg = tiny_model(f"mae.norm_pix_loss={str(norm_pix).lower()}")
    images = torch.stack([prepare_image(torch.from_numpy(a).permute(2, 0, 1), SIZE) for a in make_images(2, 20)])
    recs = reconstruct(Oracle(model), images, cfg.data.mean, cfg.data.std, seed=0)
    for rec in recs:
        assert rec.norm_pix is norm_pix and rec.loss == pytest.approx(0.0, abs=1e-10)
        torch.testing.assert_close(rec.reconstruction, rec.original, rtol=0, atol=1e-5)
    grid = reconstruction_grid(recs[0])
    assert (NORM_PIX_NOTE in grid.captions["reconstruction"]) is norm_pix


def test_fixed_seed_and_no_side_effects():
    model, _ = tiny_model()
    model.train()
    images = prepare_image(torch.from_numpy(make_images(1, 20)[0]).permute(2, 0, 1), SIZE)
    rng = torch.get_rng_state()
    a = reconstruct(model, images, seed=5)[0]
    b = reconstruct(model, images, seed=5)[0]
    c = reconstruct(model, images, seed=6)[0]
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pasted, b.pasted)
    assert not torch.equal(a.mask, c.mask)


def test_block_masking_models_are_drawn_too():
    model, _ = tiny_model("mask.type=block", "mask.ratio=0.5")
    images = torch.rand(2, 3, SIZE, SIZE)
    recs = reconstruct(model, images, seed=0)
    assert [int(r.patch_mask.sum()) for r in recs] == [8, 8]
    for r in recs:
        assert torch.equal(r.pasted[:, ~r.mask], r.original[:, ~r.mask])


def test_tensorboard_grids():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_image(self, tag, img, step, dataformats):
            self.calls.append((tag, img, step, dataformats))

    model, _ = tiny_model()
    writer = Writer()
    images = preview_images(ArrayImages(make_images(9, 20)), SIZE, count=3)  # images 0, 4 and 8
    assert images.shape == (3, 3, SIZE, SIZE)
    rng = torch.get_rng_state()
    grids = log_reconstruction_grid(writer, model, images, step=40, seed=1)
    again = log_reconstruction_grid(writer, model, images, step=80, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [c[0] for c in writer.calls] == ["reconstruction/0", "reconstruction/1", "reconstruction/2"] * 2
    assert all(c[1].dtype == np.uint8 and c[1].ndim == 3 and c[3] == "HWC" for c in writer.calls)
    assert all(np.array_equal(g.panel("pasted"), h.panel("pasted")) for g, h in zip(grids, again, strict=True))


def test_attention_maps_are_the_ones_the_last_block_uses(tmp_path):
    model, cfg = write_checkpoint(tmp_path / "ck.pt")
    enc = model.encoder
    image = prepare_image(torch.from_numpy(make_images(1, 20)[0]).permute(2, 0, 1), SIZE)
    maps = attention_maps(enc, image, cfg.data.mean, cfg.data.std)
    heads, grid = enc.blocks[-1].attn.num_heads, SIZE // PATCH
    assert maps.cls_attention.shape == (heads, grid, grid) and maps.pca.shape == (3, grid, grid)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(heads, 1 + grid * grid))
    assert 0 <= maps.pca.min() and maps.pca.max() <= 1

    # recompute the last attention's output from these weights: it must equal the module's own output
    captured = {}
    hook = enc.blocks[-1].attn.register_forward_hook(lambda m, a, o: captured.update(x=a[0], out=o))
    with torch.no_grad():
        m, s = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
        enc.forward_features((image.unsqueeze(0) - m) / s)
        hook.remove()
        attn = enc.blocks[-1].attn
        x = captured["x"]
        w = attention_weights(attn, x)
        torch.testing.assert_close(w[0], maps.weights)
        v = attn.qkv(x).reshape(1, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)[2]
        out = attn.proj((w @ v).transpose(1, 2).reshape(1, x.shape[1], -1))
    torch.testing.assert_close(out, captured["out"], rtol=1e-5, atol=1e-6)

    img = write_image(tmp_path / "cat.png")
    assert main(["attention", str(tmp_path / "ck.pt"), str(img), "--out", str(tmp_path / "att.png")]) == 0
    png = Image.open(tmp_path / "att.png")
    assert png.size[0] > SIZE * 4 and png.mode == "RGB"


def test_cli_visualize_and_errors_name_the_file(tmp_path, capsys):
    write_checkpoint(tmp_path / "ck.pt")
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", seed=1)
    write_image(folder / "b.jpg", seed=2)
    assert main(["visualize", str(tmp_path / "ck.pt"), str(folder), "--out", str(tmp_path / "o"), "--seed", "2"]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"a_reconstruction.png", "b_reconstruction.png"}

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["visualize", str(tmp_path / "ck.pt"), str(tmp_path / "broken.png")]) == 2
    assert "broken.png" in capsys.readouterr().err

    torch.save({"model": {}}, tmp_path / "plain.pt")
    assert main(["visualize", str(tmp_path / "plain.pt"), str(folder / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "plain.pt" in err and "'config'" in err and "mimkit import" in err

    assert main(["visualize", str(tmp_path / "missing.pt"), str(folder / "a.png")]) == 2
    assert "missing.pt" in capsys.readouterr().err
