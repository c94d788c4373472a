"""`mimkit import` of official BEiT / mc-BEiT checkpoints into timm's Beit, relative position bias kept (tiny models,
CPU, seconds).

The sources are written here in the BEiT release's layout: a timm ``Beit`` of a tiny size with random weights (the
release's key names are timm's Beit names: ``rel_pos_bias.relative_position_bias_table`` or
``blocks.N.attn.relative_position_bias_table``, ``attn.q_bias`` / ``attn.v_bias``, ``gamma_1`` / ``gamma_2``), plus
what the release's pretraining checkpoints also hold: the ``relative_position_index`` buffers, the encoder-side
``mask_token`` and the ``lm_head``, under ``model`` next to an argparse ``args``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from conftest import TINY_TOKENIZER, knn_cli, tiny_model
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit, checkpoint_filter_fn

from mimkit.cli import main
from mimkit.config import ConfigError, config_from_dict, dump_yaml, load_config
from mimkit.eval import load_eval_config
from mimkit.eval.encoders import load_encoder
from mimkit.interop import ImportOptions, import_checkpoint, load_mimkit_checkpoint
from mimkit.methods import build_model
from mimkit.train import pretrain

D, DEPTH, HEADS, P, SIZE, VOCAB = 32, 2, 2, 4, 16, 64


def reference_beit(shared: bool, size: int = SIZE, abs_pos: bool = False, **options) -> Beit:
    """A tiny timm Beit with every tensor (biases, bias tables, layer scale) non-trivial."""
    torch.manual_seed(0)
    beit = Beit(**{"img_size": size, "patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS,
                   "num_classes": 0, "global_pool": "", "init_values": 0.1, "use_abs_pos_emb": abs_pos,
                   "use_rel_pos_bias": not shared, "use_shared_rel_pos_bias": shared, **options})  # fmt: skip
    with torch.no_grad():
        for p in beit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return beit.eval()


def official_state_dict(beit: Beit, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {prefix + k: v.clone() for k, v in beit.state_dict().items()}
    for name, buffer in beit.named_buffers():  # the release saves its index buffers (timm rebuilds them)
        if name.endswith("relative_position_index"):
            sd[prefix + name] = buffer.clone()
    g = torch.Generator().manual_seed(1)
    sd["mask_token"] = torch.randn(1, 1, D, generator=g)
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(VOCAB, D, generator=g), torch.randn(VOCAB, generator=g)
    return sd


def save_official(path, sd: dict, wrapper: str = "model"):
    args = argparse.Namespace(model="beit_tiny_patch4_16_8k_vocab", mask_ratio=0.4)
    torch.save({wrapper: sd, "args": args, "epoch": 799}, path)
    return path


def features(encoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval().forward_features(x)


def images(size: int = SIZE) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "shared,wrapper,prefix",
    [(True, "model", ""), (False, "module", "beit."), (True, "model", "encoder.")],
    ids=["shared", "per_block-module-beit_prefix", "shared-encoder_prefix"],
)
def test_official_beit_imports_into_timm_beit_with_its_relative_position_bias(tmp_path, shared, wrapper, prefix):
    beit = reference_beit(shared)
    sd = official_state_dict(beit, prefix)
    assert ("rel_pos_bias.relative_position_bias_table" in beit.state_dict()) == shared
    src = save_official(tmp_path / "beit.pth", sd, wrapper)
    assert main(["import", str(src), str(tmp_path / "beit.pt"), "--num-heads", str(HEADS), "--strict"]) == 0
    model, cfg, raw = load_mimkit_checkpoint(tmp_path / "beit.pt")
    assert isinstance(model.encoder, Beit) and model.tokenizer is None
    assert (cfg.method, cfg.tokenizer.kind, cfg.tokenizer.vocab_size) == ("beit", "none", VOCAB)
    assert cfg.beit.shared_rel_pos_bias == shared and not cfg.beit.abs_pos_emb and cfg.model.img_size == SIZE
    x = images()
    torch.testing.assert_close(features(model.encoder, x), features(beit, x), rtol=0, atol=1e-6)
    assert torch.equal(model.mask_token.detach(), sd["mask_token"])
    assert torch.equal(model.lm_head.weight.detach(), sd["lm_head.weight"])
    # laid out as a checkpoint of mimkit's own BEiT (minus the tokenizer it does not have)
    own = build_model(load_config(None, tiny_model("beit") + [*TINY_TOKENIZER,
                                                      f"beit.shared_rel_pos_bias={str(shared).lower()}"]))  # fmt: skip
    assert set(raw["model"]) == {k for k in own.state_dict() if not k.startswith("tokenizer.")}
    report = raw["imported_from"]
    assert report["missing"] == [] and report["unexpected"] == {} and report["initialized"] == []
    assert any("relative_position_index buffers not imported" in n for n in report["notes"])


def test_a_source_without_layer_scale_or_qv_bias_imports_exactly(tmp_path):
    """Official options that leave tensors out (layer_scale_init_value 0, no qkv bias): identity values fill them."""
    beit = reference_beit(shared=True, init_values=None, qkv_bias=False)
    sd = official_state_dict(beit)
    assert not any(k.endswith(("gamma_1", "q_bias")) for k in sd)
    report = import_checkpoint(save_official(tmp_path / "b.pth", sd), tmp_path / "b.pt", ImportOptions(num_heads=HEADS))
    assert report.missing == [] and any("gamma_1 / gamma_2 of ones" in n for n in report.notes)
    x = images()
    torch.testing.assert_close(features(load_mimkit_checkpoint(tmp_path / "b.pt")[0].encoder, x), features(beit, x),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_one_changed_bias_entry_changes_the_imported_features(tmp_path):
    """The bias is imported, not dropped: the same source with one bias-table entry changed gives other features."""
    beit = reference_beit(shared=True)
    sd = official_state_dict(beit)
    import_checkpoint(save_official(tmp_path / "a.pth", sd), tmp_path / "a.pt", ImportOptions(num_heads=HEADS))
    sd["rel_pos_bias.relative_position_bias_table"][0, 0] += 1.0  # the corner-to-corner offset of head 0
    import_checkpoint(save_official(tmp_path / "b.pth", sd), tmp_path / "b.pt", ImportOptions(num_heads=HEADS))
    x = images()
    a, b = (features(load_mimkit_checkpoint(tmp_path / n)[0].encoder, x) for n in ("a.pt", "b.pt"))
    assert (a - b).abs().max() > 1e-3


def test_another_resolution_resizes_the_bias_tables_with_timms_filter(tmp_path):
    beit16 = reference_beit(shared=False, abs_pos=True)
    sd = official_state_dict(beit16)
    report = import_checkpoint(save_official(tmp_path / "beit.pth", sd), tmp_path / "b24.pt",
                               ImportOptions(num_heads=HEADS, img_size=24))  # fmt: skip
    model, cfg, _ = load_mimkit_checkpoint(tmp_path / "b24.pt")
    assert cfg.model.img_size == 24 and report.missing == [] and report.unexpected == {}
    table = model.encoder.blocks[1].attn.relative_position_bias_table.detach()
    source = sd["blocks.1.attn.relative_position_bias_table"]
    assert source.shape == ((2 * 4 - 1) ** 2 + 3, HEADS) and table.shape == ((2 * 6 - 1) ** 2 + 3, HEADS)
    assert torch.equal(table, resize_rel_pos_bias_table(source, new_window_size=(6, 6), new_bias_shape=table.shape))
    assert any("checkpoint_filter_fn" in n and "relative_position_bias_table" in n for n in report.notes)
    # what timm itself loads into a 24 px Beit from the same file
    beit24 = reference_beit(shared=False, size=24, abs_pos=True)
    encoder_keys = {k: v for k, v in sd.items() if k not in ("mask_token", "lm_head.weight", "lm_head.bias")}
    beit24.load_state_dict(checkpoint_filter_fn(encoder_keys, beit24), strict=True)
    x = images(24)
    torch.testing.assert_close(features(model.encoder, x), features(beit24, x), rtol=0, atol=1e-6)


def test_the_imported_checkpoint_evaluates_and_exports_like_mimkits_own(tmp_path, npz_data):
    beit = reference_beit(shared=True)
    src = save_official(tmp_path / "beit.pth", official_state_dict(beit))
    ckpt = tmp_path / "beit.pt"
    import_checkpoint(src, ckpt, ImportOptions(num_heads=HEADS))
    x = images()
    expected = features(beit, x)
    # k-NN on the command line
    assert knn_cli(ckpt, npz_data, tmp_path / "knn") == 0
    metrics = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert metrics["key_report"]["missing"] == [] and metrics["key_report"]["unexpected"] == []
    assert 0 <= metrics["top1"] <= 100
    # linprobe / finetune build their encoder the same way: a timm Beit with every tensor from the checkpoint
    for command in ("linprobe", "finetune"):
        ecfg = load_eval_config(command, None, [f"encoder.checkpoint={ckpt}", f"data.path={npz_data}"]).encoder
        encoder, key_report = load_encoder(ecfg)
        assert isinstance(encoder, Beit) and key_report.missing == [] and key_report.unexpected == []
        torch.testing.assert_close(features(encoder, x), expected, rtol=0, atol=1e-6)
    # export --to timm: timm.create_model loads it with identical features
    assert main(["export", str(ckpt), "--to", "timm", str(tmp_path / "timm")]) == 0
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert isinstance(exported, Beit) and exported.rel_pos_bias is not None
    torch.testing.assert_close(features(exported, x), expected, rtol=0, atol=1e-6)
    # export --to hf: a transformers BeitModel with the same features
    from transformers import BeitModel

    assert main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        hf = BeitModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_pretraining_from_the_imported_checkpoint_says_what_it_needs(tmp_path, capsys, npz_data):
    src = save_official(tmp_path / "beit.pth", official_state_dict(reference_beit(shared=True)))
    ckpt = tmp_path / "beit.pt"
    import_checkpoint(src, ckpt, ImportOptions(num_heads=HEADS))
    cfg = config_from_dict(load_mimkit_checkpoint(ckpt)[2]["config"])
    with pytest.raises(ConfigError, match=r"tokenizer\.kind none.*set tokenizer\.kind=mimkit\|dalle\|vqgan"):
        pretrain(cfg)
    recipe = tmp_path / "imported.yaml"
    recipe.write_text(dump_yaml(cfg))
    run = [f"data.path={npz_data}", "data.num_workers=0", f"train.out_dir={tmp_path / 'run'}", "train.batch_size=8"]
    assert main(["pretrain", str(recipe), *run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit: error: tokenizer.kind none") and "\n" not in err
    assert not (tmp_path / "run").exists()
    # with a tokenizer set, a resume from the imported weights is refused: they hold no training state
    assert main(["pretrain", str(recipe), *run, *TINY_TOKENIZER[:1], f"train.resume={ckpt}"]) == 2
    assert "written by `mimkit import`" in capsys.readouterr().err
