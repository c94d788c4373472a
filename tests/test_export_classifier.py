"""Fine-tuned classifiers leave mimkit: `mimkit export` of a `mimkit finetune` checkpoint to timm (head and class
names) and transformers (ViT / Beit ForImageClassification) with the same logits; `mimkit predict` writes top-k."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_images, one_error_line
from PIL import Image

from mimkit.checkpoint import load_checkpoint, save_checkpoint
from mimkit.cli import main
from mimkit.eval import finetune as ft
from mimkit.eval import load_eval_config
from mimkit.train import pretrain

CLASSES = ["ant", "bee", "cow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tree"
    for split, n, seed in (("train", 12, 1), ("test", 6, 2)):
        for i, img in enumerate(make_images(n, size=16, seed=seed)):
            sub = root / split / CLASSES[i % 3]
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(sub / f"{i}.png")
    return root


def finetuned(tmp_path, folder, pool: str, encoder: list[str]):
    """A 1-step `mimkit finetune` checkpoint whose head is then made large (the real one starts at std 2e-5, too
    small for a parity check to mean anything), and the config it was made with."""
    cfg = load_eval_config("finetune", None, [*encoder, f"data.path={folder}", "data.num_workers=0",
                           "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                           f"train.out_dir={tmp_path / 'ft'}", "train.batch_size=4", "train.epochs=1",
                           "train.max_steps=1", "optim.warmup_epochs=0", f"model.global_pool={pool}"])  # fmt: skip
    path = ft.run_finetune(cfg).checkpoint
    state = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    for k in ("head.weight", "head.bias"):
        state["model"][k] = torch.randn(state["model"][k].shape, generator=g)
    save_checkpoint(path, state)
    model, _ = ft.build_finetune_model(cfg, 3)  # the mimkit model, as fine-tuning builds it
    model.load_state_dict(state["model"])
    return path, model.eval()


TINY = ["encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16", "encoder.patch_size=4", "encoder.embed_dim=32",
        "encoder.depth=2", "encoder.num_heads=2"]  # fmt: skip


def check_exports(path, model, tmp_path, hf_class):
    import timm
    import transformers

    assert main(["export", str(path), "--to", "timm", str(tmp_path / "timm")]) == 0
    assert main(["export", str(path), "--to", "hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == CLASSES
    t = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert t.pretrained_cfg["label_names"] == CLASSES
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == dict(enumerate(CLASSES))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, hfs = model(x), t(x), hf(pixel_values=x).logits
    assert ours.abs().max() > 0.1  # logits that can tell a wrong head apart
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hfs, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # sensitivity: a changed head weight breaks the parity
        model.head.weight[0, 0] += 0.5
        assert not torch.allclose(model(x), theirs, rtol=1e-4, atol=1e-4)
        model.head.weight[0, 0] -= 0.5


@pytest.mark.parametrize("pool, hf_class", [("avg", "BeitForImageClassification"),
                                            ("token", "ViTForImageClassification")])  # fmt: skip
def test_vit_classifier_exports_with_identical_logits(tmp_path, folder, pool, hf_class, one_thread):
    path, model = finetuned(tmp_path, folder, pool, TINY)
    check_exports(path, model, tmp_path, hf_class)


def test_beit_classifier_exports_with_identical_logits(tmp_path, folder, tiny_cfg, one_thread):
    beit = pretrain(tiny_cfg("method=beit", "train.max_steps=1", out="beit")).checkpoint
    path, model = finetuned(tmp_path, folder, "avg", [f"encoder.checkpoint={beit}"])
    check_exports(path, model, tmp_path, "BeitForImageClassification")


def test_predict_writes_the_top_k_table_from_a_checkpoint_and_an_export(tmp_path, folder, one_thread):
    path, model = finetuned(tmp_path, folder, "avg", TINY)
    assert main(["export", str(path), "--to", "timm", str(tmp_path / "timm")]) == 0
    images = sorted((folder / "test").rglob("*.png"))
    tables = []
    for source in (path, tmp_path / "timm"):
        out = tmp_path / f"top_{len(tables)}.csv"
        assert main(["predict", str(source), str(folder / "test"), "--top-k", "2", "--out", str(out),
                     "--device", "cpu"]) == 0  # fmt: skip
        tables.append(list(csv.DictReader(out.open())))
    assert tables[0] == tables[1]
    rows = tables[0]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert set(rows[0]) == {"path", "class_1", "probability_1", "class_2", "probability_2"}
    from mimkit.eval.common import eval_transform
    from mimkit.sources import load_image

    t = eval_transform(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        probs = model(torch.stack([t(load_image(p)) for p in images])).softmax(-1)
    for row, p in zip(rows, probs):
        top = p.topk(2)
        assert [row["class_1"], row["class_2"]] == [CLASSES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([float(row["probability_1"]), float(row["probability_2"])], top.values, atol=1e-5)


def test_predict_bad_out_and_a_pretraining_checkpoint_are_one_line(tmp_path, folder, tiny_cfg, capsys):
    assert main(["predict", "x.pt", str(folder), "--out", str(tmp_path / "t.json")]) == 2
    assert "suffix '.json'" in one_error_line(capsys)
    mae = pretrain(tiny_cfg("train.max_steps=1", out="mae")).checkpoint
    assert main(["predict", str(mae), str(folder), "--out", str(tmp_path / "t.csv")]) == 2
    assert "not a fine-tuned checkpoint" in one_error_line(capsys)
