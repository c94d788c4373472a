"""BEiT / mc-BEiT: soft targets, affinity, masked-only loss, tokenizer loaders, timm Beit compatibility,
two views of one crop, tiny pretraining runs that resume exactly, mimkit's own tokenizer training."""

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ENCODER, TINY_MODEL, TINY_TOKENIZER, make_images, tiny_model
from timm.models.beit import Beit

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.data import TwoViewTransform, ViewSpec
from mimkit.losses import soft_cross_entropy
from mimkit.methods import build_model
from mimkit.models import timm_beit_kwargs
from mimkit.targets import affinity, soft_targets, tokenizer_probs
from mimkit.tokenizer_training import train_tokenizer
from mimkit.tokenizers import DalleEncoder, TamingGumbelTokenizer, TokenizerError, load_tokenizer
from mimkit.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method: str, *overrides):
    return build_model(load_config(None, tiny_model(method) + list(overrides)))


# ---------------------------------------------------------------- targets


def test_soft_targets_equal_the_formula_on_a_hand_made_case():
    z = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # (B=1, L=2, V=3)
    p = tokenizer_probs(z, 4.0)
    manual = torch.exp(z / 4) / torch.exp(z / 4).sum(-1, keepdim=True)
    torch.testing.assert_close(p, manual)
    w = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    y = soft_targets(p, w, 0.2)
    for i in range(2):
        expected = 0.2 * (w[0, i, 0] * p[0, 0] + w[0, i, 1] * p[0, 1]) + 0.8 * p[0, i]
        torch.testing.assert_close(y[0, i], expected)
    torch.testing.assert_close(y.sum(-1), torch.ones(1, 2))  # still distributions
    torch.testing.assert_close(soft_targets(p, w, 0.0), p)  # omega = 0: the tokenizer's probabilities
    hard = tokenizer_probs(z, 1e-4)  # tau -> 0: one-hot at the argmax
    torch.testing.assert_close(hard, F.one_hot(z.argmax(-1), 3).float())


def test_affinity_rows_sum_to_one_and_follow_cosine_similarity():
    feats = torch.randn(3, 5, 7)
    w = affinity(feats, 1.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    assert bool((w.argmax(-1) == torch.arange(5)).all())  # self-similarity 1 is the largest cosine
    e = torch.eye(3).unsqueeze(0) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1)  # orthogonal, any norm
    row = torch.softmax(torch.tensor([1.0, 0.0, 0.0]) / 0.5, 0)
    torch.testing.assert_close(affinity(e, 0.5)[0, 0], row)


def test_model_targets_omega_zero_and_stop_gradient():
    model = tiny("mcbeit", "beit.omega=0")
    feats, z = torch.randn(2, 16, 32, requires_grad=True), torch.randn(2, 16, 32)
    torch.testing.assert_close(model.targets(feats, z), torch.softmax(z / 4.0, -1))
    for sg, grad_expected in [(False, True), (True, False)]:
        m = tiny("mcbeit", f"beit.stop_gradient={str(sg).lower()}")
        assert m.targets(feats, z).requires_grad == grad_expected


def test_only_masked_tokens_enter_the_loss():
    logits, targets = torch.randn(2, 6, 5), torch.softmax(torch.randn(2, 6, 5), -1)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.float)
    loss = soft_cross_entropy(logits, targets, mask)
    manual = [
        -(targets[b, i] * F.log_softmax(logits[b, i], -1)).sum() for b in range(2) for i in range(6) if mask[b, i]
    ]
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    changed = logits.clone()
    changed[mask == 0] += 100 * torch.randn_like(changed[mask == 0])
    torch.testing.assert_close(soft_cross_entropy(changed, targets, mask), loss)
    # in the models: perturbing the lm_head output at visible positions changes nothing
    for method in ("beit", "mcbeit"):
        model = tiny(method, "mask.type=block", "mask.ratio=0.4").eval()
        imgs, tok = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
        m = torch.stack([model.mask_inputs(torch.Generator().manual_seed(i))["mask"] for i in range(2)])
        base = model(imgs, mask=m, tokenizer_image=tok).loss

        def perturb(module, inputs, out):
            if out.dim() == 3:  # mc-BEiT: all positions
                return out + 100 * (~m).unsqueeze(-1).float() * torch.randn_like(out)
            return out  # BEiT: lm_head only ever sees masked positions

        handle = model.lm_head.register_forward_hook(perturb)
        torch.testing.assert_close(model(imgs, mask=m, tokenizer_image=tok).loss, base)
        handle.remove()
        assert model(imgs, mask=m, tokenizer_image=tok).logits.shape[0] == int(m.sum())


def test_block_masks_default_to_beits_generator_and_the_count_can_fall_short():
    grid14 = ["model.img_size=56", "model.depth=1", "mask.type=block", "mask.ratio=0.4"]  # 14 x 14, 79 targeted
    for method in ("beit", "mcbeit"):
        model = tiny(method, *grid14)
        counts = [int(model.mask_inputs(torch.Generator().manual_seed(s))["mask"].sum()) for s in range(60)]
        assert model.block_generator == "beit" and max(counts) <= model.num_masked and min(counts) < model.num_masked
        exact = tiny(method, *grid14, "mask.block_generator=exact")
        assert {int(exact.mask_inputs(torch.Generator().manual_seed(s))["mask"].sum()) for s in range(20)} == {79}
    # MAE-style encoders keep exact counts; BootMAE's hybrid blocks come from its own exact-count generator (issue 36)
    assert tiny("mae", "mask.type=block").block_generator == "exact"
    assert tiny("bootmae", "mask.type=hybrid").block_generator == "exact"
    with pytest.raises(ConfigError, match="mask.block_generator beit .* method mae"):
        load_config(None, TINY_MODEL + ["method=mae", "mask.type=block", "mask.block_generator=beit"])


def test_losses_average_over_the_masked_patches_actually_in_the_batch():
    imgs, tok = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 5]] = True  # 3 masked in one image, 9 in the other: as BEiT's generator can give
    mask[1, [0, 3, 4, 6, 8, 9, 10, 12, 15]] = True
    for method in ("beit", "mcbeit"):
        model = tiny(method, "mask.type=block", "mask.ratio=0.4").eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(50)  # confident predictions: per-patch losses that differ between images
            out = model(imgs, mask=mask, tokenizer_image=tok)
            feats, z = model.features(imgs, mask)[:, 1:], model.tokenizer_logits(tok)
            logits = model.lm_head(feats).float()
            if method == "beit":
                per_patch = F.cross_entropy(logits.transpose(1, 2), z.argmax(-1), reduction="none")
            else:
                per_patch = -(model.targets(feats, z) * F.log_softmax(logits, -1)).sum(-1)
        pooled = per_patch[mask].sum() / mask.sum()
        per_image = torch.stack([per_patch[b][mask[b]].mean() for b in range(2)]).mean()
        torch.testing.assert_close(out.loss, pooled)
        assert not torch.allclose(pooled, per_image)  # the two averages differ here, so the check has teeth
        empty = model(imgs, mask=torch.zeros_like(mask), tokenizer_image=tok).loss  # nothing masked: 0, not NaN
        assert float(empty.detach()) == 0.0


def test_mcbeit_temperature_warms_up_as_the_official_schedule():
    model = tiny("mcbeit", "beit.omega=0", "beit.temperature=4.0", "beit.temperature_warmup=1.0",
                 "beit.temperature_warmup_epochs=30")  # fmt: skip
    # run_mcbeit_pretraining.py: concatenate(linspace(temp_warmup, temp, 30), ones(epochs - 30) * temp), per epoch
    official = np.concatenate([np.linspace(1.0, 4.0, 30), np.full(20, 4.0)])
    steps_per_epoch, z = 7, torch.randn(1, 16, 32)
    for epoch, expected in enumerate(official):
        for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):  # first / last step
            model.set_progress(step, steps_per_epoch, 50 * steps_per_epoch)
            assert model.current_temperature() == pytest.approx(expected, rel=1e-12), (epoch, step)
        torch.testing.assert_close(model.targets(torch.randn(1, 16, 32), z), torch.softmax(z / expected, -1))
    # no warm-up value: constant, as the released recipe (temp_warmup = temp = 4.0)
    flat = tiny("mcbeit")
    flat.set_progress(0, 1, 100)
    assert flat.current_temperature() == 4.0 and flat.temperature_warmup is None
    with pytest.raises(ConfigError, match="beit.temperature_warmup_epochs must be >= 1"):
        load_config(None, tiny_model("mcbeit") + [*TINY_TOKENIZER, "beit.temperature_warmup_epochs=0"])


# ---------------------------------------------------------------- backbone


def test_encoder_loads_into_timm_beit_unchanged():
    cfg = load_config(None, tiny_model("beit") + [*TINY_TOKENIZER])
    model = build_model(cfg).eval()
    timm_model = Beit(**timm_beit_kwargs(cfg)).eval()
    timm_model.load_state_dict(model.encoder.state_dict(), strict=True)
    assert timm_model.rel_pos_bias is not None and timm_model.pos_embed is None
    assert timm_model.blocks[0].gamma_1 is not None
    x = torch.randn(2, 3, 16, 16)
    no_mask = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(model.features(x, no_mask), timm_model.forward_features(x))
    # masked patches get the mask token's embedding, visible ones their own
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, 3] = True
    assert not torch.allclose(model.features(x, masked), model.features(x, no_mask))
    # BEiT init: attn.proj / mlp.fc2 of deeper blocks are scaled down by sqrt(2l)
    s0, s1 = (model.encoder.blocks[i].mlp.fc2.weight.detach().std() for i in (0, 1))
    assert 0.5 < float(s0 / s1) / (2**0.5) < 2.0
    assert {"mask_token", "lm_head.weight"} <= set(model.state_dict())


def test_tokenizer_is_frozen_and_stays_in_eval():
    model = tiny("beit")
    model.train()
    assert not model.tokenizer.training
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


# ---------------------------------------------------------------- tokenizer loaders (exact published layouts)


def test_dalle_encoder_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=16, n_blk_per_group=2, vocab_size=64).eval()
    sd = enc.state_dict()
    for key in ["blocks.input.w", "blocks.input.b", "blocks.group_1.block_1.res_path.conv_1.w",
                "blocks.group_1.block_2.res_path.conv_4.b", "blocks.group_2.block_1.id_path.w",
                "blocks.group_4.block_2.res_path.conv_3.w", "blocks.output.conv.w", "blocks.output.conv.b"]:  # fmt: skip
        assert key in sd, key
    assert sd["blocks.input.w"].shape == (16, 3, 7, 7) and sd["blocks.output.conv.w"].shape == (64, 128, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in sd  # identity when widths match
    x = torch.rand(2, 3, 32, 32) * 0.8 + 0.1  # map_pixels range
    expected = enc(x)
    assert expected.shape == (2, 64, 4, 4)  # downsample 8
    torch.save(sd, tmp_path / "dalle_encoder.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "dalle_encoder.safetensors")
    for name in ("dalle_encoder.pth", "dalle_encoder.safetensors"):
        tok = load_tokenizer("dalle", str(tmp_path / name))
        torch.testing.assert_close(tok(x), expected)
        assert tok.vocab_size == 64 and tok.downsample == 8 and tok.interpolation == "lanczos"
    # map_pixels as a normalisation: (x - mean) / std == 0.8 x + 0.1
    mean, std = torch.tensor(tok.mean), torch.tensor(tok.std)
    torch.testing.assert_close((torch.tensor(0.3) - mean) / std, torch.full((3,), 0.8 * 0.3 + 0.1))
    # a pickled module (what encoder.pkl is) is refused, never unpickled
    torch.save(enc, tmp_path / "encoder.pkl")
    with pytest.raises(TokenizerError, match="refused"):
        load_tokenizer("dalle", str(tmp_path / "encoder.pkl"))


class _Callback:  # stands for the non-tensor objects real Lightning checkpoints may pickle
    pass


def test_taming_gumbel_vqgan_lightning_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = TamingGumbelTokenizer(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_levels={2}, z_channels=32,
                                embed_dim=32, n_embed=64).eval()  # fmt: skip
    own = tok.state_dict()
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.1.conv2.bias",
                "encoder.down.0.downsample.conv.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "encoder.down.2.attn.1.proj_out.weight", "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight",
                "encoder.norm_out.weight", "encoder.conv_out.weight", "quant_conv.weight", "quantize.proj.weight"]:  # fmt: skip
        assert key in own, key
    assert "encoder.down.2.downsample.conv.weight" not in own  # the last level does not downsample
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = tok(x)
    assert expected.shape == (2, 64, 4, 4)
    state = OrderedDict(own)  # the rest of a GumbelVQ: decoder, codebook, discriminator (ignored by the loader)
    state["decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    state["quantize.embed.weight"] = torch.randn(64, 32)
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}], "lr_schedulers": []}  # fmt: skip
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_tokenizer("vqgan", str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(loaded(x), expected)
    assert loaded.vocab_size == 64 and loaded.downsample == 4
    ckpt["callbacks"] = {"cb": _Callback()}
    torch.save(ckpt, tmp_path / "unsafe.ckpt")
    with pytest.raises(TokenizerError, match="refused"):
        load_tokenizer("vqgan", str(tmp_path / "unsafe.ckpt"))
    with pytest.raises(TokenizerError, match="taming"):
        load_tokenizer("vqgan", _save(tmp_path, {"x": torch.zeros(1)}))


def _save(tmp_path, obj) -> str:
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------- two views of one crop


def test_two_views_come_from_the_same_crop(tiny_cfg):
    d = tiny_cfg().data
    same = TwoViewTransform(16, d, ViewSpec(16, "bicubic", tuple(d.mean), tuple(d.std)))
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 40), dtype=np.uint8))
    for seed in range(4):
        torch.manual_seed(seed)
        views = same(image)
        torch.testing.assert_close(views["image"], views["tokenizer_image"])
    other = TwoViewTransform(16, d, ViewSpec(8, "lanczos", (0.5,) * 3, (0.5,) * 3))
    torch.manual_seed(0)
    views = other(image)
    assert views["image"].shape == (3, 16, 16) and views["tokenizer_image"].shape == (3, 8, 8)
    vit01 = views["image"] * torch.tensor(d.std).view(3, 1, 1) + torch.tensor(d.mean).view(3, 1, 1)
    tok01 = views["tokenizer_image"] * 0.5 + 0.5
    assert float((F.avg_pool2d(vit01[None], 2)[0] - tok01).abs().mean()) < 0.05  # same crop, other size


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("method,mask", [("beit", "block"), ("mcbeit", "random")])
def test_pretrains_and_resumes_bit_identically(tiny_cfg, method, mask):
    args = [f"method={method}", f"mask.type={mask}", "mask.ratio=0.4", *TINY_TOKENIZER]
    straight = pretrain(tiny_cfg(*args, "train.max_steps=4", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=2", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=4", out="b"))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("tokenizer.") for k in a)
    last = json.loads(straight.metrics.read_text().splitlines()[-1])
    assert "mlm_acc" in last and np.isfinite(last["loss"])


def test_config_requires_a_tokenizer_file():
    with pytest.raises(ConfigError, match="tokenizer.path is required"):
        load_config(None, ["method=beit"])
    with pytest.raises(ConfigError, match="beit.omega"):
        load_config(None, ["method=mcbeit", "tokenizer.kind=random", "beit.omega=1.5"])


def test_mimkit_tokenizer_trains_and_loads(tiny_cfg, tmp_path):
    path = tmp_path / "tok" / "tokenizer.pt"
    few = tmp_path / "few.npz"  # 8 images: a few dozen steps visibly lower the reconstruction error
    np.savez(few, x_train=make_images(8, size=16))
    cfg = tiny_cfg(f"data.path={few}", "data.hflip=false", "tokenizer.vocab_size=64", "tokenizer.hidden=8", "tokenizer.code_dim=8", "tokenizer.downsample=4",
                   "tokenizer.train_steps=50", "tokenizer.batch_size=8", "tokenizer.lr=1e-2", "tokenizer.kl_weight=0",
                   "data.crop_scale=[1.0,1.0]", f"tokenizer.path={path}", also_reads=("tokenizer",))  # fmt: skip
    result = train_tokenizer(cfg, log_every=1000)
    rec = [h["reconstruction"] for h in result["history"]]
    assert np.mean(rec[-5:]) < 0.85 * np.mean(rec[:5])
    obj = torch.load(path, weights_only=True)
    assert obj["kind"] == "mimkit"
    tok = load_tokenizer("mimkit", str(path))
    assert tok(torch.zeros(1, 3, 16, 16)).shape == (1, 64, 4, 4)
    # and a BEiT run reads it (16 px, patch 4 -> 4x4 grid = 16 px / downsample 4)
    model = build_model(load_config(None, TINY_ENCODER + ["method=beit", f"tokenizer.path={path}"]))
    assert model.second_view.size == 16 and model.tokenizer.vocab_size == 64


def test_cli_tokenizer_train(tiny_cfg, tmp_path, npz_data):
    from mimkit.cli import main

    path = tmp_path / "cli_tok.pt"
    rc = main(["tokenizer", "train", f"data.path={npz_data}", "data.num_workers=0", "model.img_size=16",
               "model.patch_size=4", "tokenizer.hidden=8", "tokenizer.code_dim=8", "tokenizer.vocab_size=16",
               "tokenizer.train_steps=2", "tokenizer.batch_size=4", f"tokenizer.path={path}"])  # fmt: skip
    assert rc == 0 and path.is_file() and path.with_suffix(".jsonl").is_file()


def test_beit_checkpoint_exports_to_timm_beit_and_hf_beit_with_identical_features(tiny_cfg, tmp_path, capsys):
    import timm

    from mimkit.interop import export_hf, export_timm, load_mimkit_checkpoint, timm_create_kwargs

    args = ["method=mcbeit", "mask.type=random", "mask.ratio=0.4", *TINY_TOKENIZER]
    ckpt = pretrain(tiny_cfg(*args, "train.max_steps=2", out="mc")).checkpoint
    model, _, _ = load_mimkit_checkpoint(ckpt)
    export_timm(ckpt, tmp_path / "timm")
    name, kwargs = timm_create_kwargs(tmp_path / "timm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.encoder.forward_features(x)
        for loaded in (timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True),
                       timm.create_model(name, **kwargs)):  # fmt: skip
            assert isinstance(loaded, Beit)
            torch.testing.assert_close(loaded.eval().forward_features(x), ref, rtol=0, atol=0)
    # --to hf: a transformers BeitModel folder (features identical) and a BeitForMaskedImageModeling one
    from transformers import AutoModel, BeitForMaskedImageModeling, BeitModel

    written = export_hf(ckpt, tmp_path / "hf")
    assert written["beit"] == tmp_path / "hf" and written["beit_mim"] == tmp_path / "hf" / "beit_mim"
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6, 9]] = True
    with torch.no_grad():
        for loader in (BeitModel, AutoModel):
            hf = loader.from_pretrained(written["beit"]).eval()
            assert isinstance(hf, BeitModel)
            torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hf(pixel_values=x, bool_masked_pos=mask).last_hidden_state,
                                       model.features(x, mask), rtol=1e-5, atol=1e-5)  # fmt: skip
        mim = BeitForMaskedImageModeling.from_pretrained(written["beit_mim"]).eval()
        torch.testing.assert_close(mim(pixel_values=x, bool_masked_pos=mask).logits,
                                   model.lm_head(model.features(x, mask)[:, 1:]), rtol=1e-5, atol=1e-5)  # fmt: skip
    # the command line names the classes to load the folders with
    from mimkit.cli import main

    assert main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf_cli")]) == 0
    printed = capsys.readouterr().out
    assert "BeitModel.from_pretrained" in printed and "BeitForMaskedImageModeling.from_pretrained" in printed
    assert "ViTModel" not in printed


def test_visualize_and_attention_refuse_beit_checkpoints_with_a_message(tiny_cfg, tmp_path, capsys):
    from PIL import Image

    from mimkit.cli import main

    args = ["method=beit", "mask.type=block", "mask.ratio=0.4", *TINY_TOKENIZER]
    ckpt = pretrain(tiny_cfg(*args, "train.max_steps=1", out="b")).checkpoint
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert main(["visualize", str(ckpt), str(image), "--out", str(tmp_path / "vis")]) == 2
    assert "does not predict pixels (BEiT" in capsys.readouterr().err
    assert main(["attention", str(ckpt), str(image)]) == 2
    assert "not supported yet" in capsys.readouterr().err


def test_tokenizer_training_resumes_bit_identically_and_refuses_other_settings(tiny_cfg, tmp_path, monkeypatch):
    from mimkit.tokenizer_training import resume_path
    from mimkit.tokenizers import DVAE, TokenizerError

    def cfg(name, *extra):
        return tiny_cfg("tokenizer.vocab_size=16", "tokenizer.hidden=8", "tokenizer.code_dim=8", "tokenizer.train_steps=6",
                        "tokenizer.batch_size=4", "tokenizer.save_every_steps=2", f"tokenizer.path={tmp_path / name / 'tok.pt'}",
                        *extra, also_reads=("tokenizer",))  # fmt: skip

    straight = train_tokenizer(cfg("a"), log_every=1000)
    assert not resume_path(tmp_path / "a" / "tok.pt").exists()  # removed once the tokenizer is written

    calls, real_loss = [0], DVAE.loss

    def dies_at_step_5(self, *args):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt  # a kill during step 5: the progress of step 4 is on disk
        return real_loss(self, *args)

    monkeypatch.setattr(DVAE, "loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg("b"), log_every=1000)
    monkeypatch.setattr(DVAE, "loss", real_loss)
    progress = resume_path(tmp_path / "b" / "tok.pt")
    assert torch.load(progress, weights_only=True)["step"] == 4

    with pytest.raises(TokenizerError, match=r"tok.resume.pt: a tokenizer run with other settings \(tokenizer.lr"):
        train_tokenizer(cfg("b", "tokenizer.lr=2e-3"), log_every=1000)
    resumed = train_tokenizer(cfg("b"), log_every=1000)
    assert resumed["history"] == straight["history"]
    a, b = (torch.load(tmp_path / n / "tok.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resume=none ignores a step-4 progress file and starts over: the same history as the uninterrupted run
    monkeypatch.setattr(DVAE, "loss", dies_at_step_5)
    calls[0] = 0
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg("c"), log_every=1000)
    monkeypatch.setattr(DVAE, "loss", real_loss)
    fresh = train_tokenizer(cfg("c", "tokenizer.resume=none"), log_every=1000)
    assert fresh["history"] == straight["history"]


# ---------------------------------------------------------------- initialisation (issue 36)


@pytest.mark.parametrize("method", ["beit", "mcbeit"])
def test_init_follows_the_official_bounds_and_never_sits_on_one(method):
    """The official BEiT / mc-BEiT code draws trunc_normal_(std=0.02) with bounds +-std (one sigma, absolute): std
    0.5396 x 0.02 = 0.0108, every |w| < 0.02; attn.proj / mlp.fc2 of block l then / sqrt(2l). timm's helper (bounds
    +-2) gave std 0.02 and, once, an lm_head weight of exactly 2.0 (its clamp); no weight may sit on a bound."""
    torch.manual_seed(0)
    model = tiny(method, "model.embed_dim=64", "tokenizer.vocab_size=256")
    enc, bound, cut_std = model.encoder, 0.02, 0.02 * 0.5396
    drawn = [enc.patch_embed.proj.weight, enc.cls_token, model.mask_token, model.lm_head.weight]
    drawn += [p for blk in enc.blocks for p in (blk.attn.qkv.weight, blk.mlp.fc1.weight)]
    values = torch.cat([p.detach().flatten() for p in drawn])
    assert values.numel() > 40_000
    assert abs(float(values.std()) / cut_std - 1) < 0.02 and abs(float(values.mean())) < 1e-4
    assert float(values.abs().max()) < bound and not bool((values.abs() == bound).any())
    assert float(values.abs().max()) > 0.99 * bound  # the tails reach the cut: not a narrower distribution
    for layer, blk in enumerate(enc.blocks, start=1):  # the depth rescaling, after the draw
        for w in (blk.attn.proj.weight.detach(), blk.mlp.fc2.weight.detach()):
            scaled = w * math.sqrt(2 * layer)
            assert float(scaled.abs().max()) < bound and abs(float(scaled.std()) / cut_std - 1) < 0.1
    for p in (model.lm_head.bias, enc.patch_embed.proj.bias, enc.blocks[0].attn.proj.bias):
        assert not bool(p.detach().any())  # zero biases
    assert not bool(enc.rel_pos_bias.relative_position_bias_table.detach().any())  # zero, as the official table


def test_the_one_sigma_sampler_has_the_truncated_normals_moments_and_no_bound_value():
    from mimkit.models import trunc_normal_sigma_

    torch.manual_seed(0)
    w = trunc_normal_sigma_(torch.empty(1_000_000), 0.02)
    assert abs(float(w.std()) / (0.02 * 0.5396) - 1) < 0.003 and abs(float(w.mean())) < 3e-5
    assert float(w.abs().max()) < 0.02 and not bool((w.abs() == 0.02).any())
    # the share within half a sigma: (Phi(0.5) - Phi(-0.5)) / (Phi(1) - Phi(-1)) = 0.3829 / 0.6827
    assert abs(float((w.abs() < 0.01).float().mean()) - 0.3829 / 0.6827) < 0.003
    meta = trunc_normal_sigma_(torch.empty(3, device="meta"), 0.02)  # a meta-device model builds without values
    assert meta.is_meta
