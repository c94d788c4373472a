"""BootMAE: momentum-encoder feature target, target-aware (cross-attention) decoders, schedules, exact resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.masking import block_mask_for, hybrid_mask, parallel_masks
from mimkit.methods import build_model
from mimkit.methods.bootmae import BootMAE
from mimkit.models import patchify
from mimkit.train import pretrain

P, S, L = 4, 16, 16  # tiny model: patch 4 on 16 px, a 4 x 4 grid


def tiny_bootmae(*overrides) -> BootMAE:
    torch.manual_seed(0)
    return build_model(load_config(None, TINY_MODEL + ["method=bootmae", *overrides]))


def batch_inputs(model, n: int, seed: int = 0) -> dict:
    drawn = [model.mask_inputs(torch.Generator().manual_seed(seed + i)) for i in range(n)]
    return {k: torch.stack([d[k] for d in drawn]) for k in drawn[0]}


def test_ema_starts_as_the_student_and_updates_by_the_formula():
    model = tiny_bootmae()
    student = dict(model.encoder.named_parameters())
    for name, e in model.ema_encoder.named_parameters():
        assert torch.equal(e, student[name]) and not e.requires_grad
    with torch.no_grad():  # stand-in for an optimizer step
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    old = {n: p.clone() for n, p in model.ema_encoder.named_parameters()}
    model.set_progress(37, 10, 1000)  # epoch 3 of 100
    d = model.current_momentum(37)
    assert d == pytest.approx(0.999 + 3 / 100 * (0.9999 - 0.999), abs=1e-15)
    model.after_step(37)
    for name, e in model.ema_encoder.named_parameters():
        if student[name].requires_grad:
            assert torch.equal(e, old[name] * d + student[name] * (1 - d)), name
        else:  # the frozen sin-cos table stays bit-equal
            assert torch.equal(e, old[name]) and torch.equal(e, student[name]), name


def test_ema_encoder_gets_no_gradient_and_runs_in_eval_mode_on_the_full_image():
    from timm.optim import param_groups_weight_decay

    model = tiny_bootmae("model.drop_path_rate=0.2").train()
    seen = []
    model.ema_encoder.blocks[0].register_forward_pre_hook(
        lambda mod, args: seen.append((mod.training, torch.is_grad_enabled(), tuple(args[0].shape)))
    )
    student_seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: student_seen.append(mod.training))
    out = model(torch.randn(3, 3, S, S), **batch_inputs(model, 3))
    out.loss.backward()
    assert seen == [(False, False, (3, 1 + L, 32))] and student_seen == [True]
    assert all(p.grad is None and not p.requires_grad for p in model.ema_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    in_optimizer = {id(p) for g in param_groups_weight_decay(model, 0.05) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.ema_encoder.parameters()}
    model.eval().train()
    assert model.encoder.training and not model.ema_encoder.training


def test_cross_attention_keys_come_from_visible_tokens_only():
    model = tiny_bootmae("mask.type=hybrid").eval()
    calls = {}
    for name, mod in model.named_modules():
        if name.endswith("cross_attn"):
            mod.register_forward_hook(lambda mod, args, out, name=name: calls.setdefault(name, []).append(
                (args[1].detach().clone(), out.detach().clone())))  # fmt: skip
    imgs, mask = torch.randn(2, 3, S, S), batch_inputs(model, 2)["mask"]
    out = model(imgs, mask=mask)
    keep = int((mask[0] == 0).sum())
    assert len(calls) == 2  # one block per decoder (TINY_MODEL: mae.decoder_depth=1)
    for name, [(context, _)] in calls.items():
        assert context.shape == (2, 1 + keep, 32), name  # cls + visible tokens, never the masked ones
    # pixel decoder <- output of block 0, feature decoder <- output of the last block before the final norm
    enc = model.encoder
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    visible = torch.stack([(m == 0).nonzero().squeeze(1) for m in mask])
    x = torch.stack([x[i, visible[i]] for i in range(2)])
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    block0 = enc.blocks[0](x)
    # (the cross-attention receives its context after the block's LayerNorm)
    pixel_context = model.pixel_decoder.blocks[0].norm_context(block0)
    torch.testing.assert_close(calls["pixel_decoder.blocks.0.cross_attn"][0][0], pixel_context)
    torch.testing.assert_close(calls["feature_decoder.blocks.0.cross_attn"][0][0],
                               model.feature_decoder.blocks[0].norm_context(enc.blocks[1](block0)))  # fmt: skip
    # new pixels in the masked patches: the decoders' cross-attention inputs and outputs do not move
    pix = mask.view(2, 1, 4, 4).repeat_interleave(P, 2).repeat_interleave(P, 3).bool().expand(-1, 3, -1, -1)
    out2 = model(torch.where(pix, torch.randn_like(imgs) * 5, imgs), mask=mask)
    for name, [(c1, o1), (c2, o2)] in calls.items():
        assert torch.equal(c1, c2) and torch.equal(o1, o2), name
    assert torch.equal(out.pred, out2.pred) and torch.equal(out.feature_pred, out2.feature_pred)
    assert not torch.equal(out.loss, out2.loss)  # only the targets saw the change


def test_only_mask_tokens_get_decoder_position_embeddings():
    imgs = torch.randn(2, 3, S, S)
    for pos_only in (True, False):
        model = tiny_bootmae(f"bootmae.mask_pos_only={str(pos_only).lower()}").eval()
        mask = batch_inputs(model, 2)["noise"]
        base, m = model(imgs, noise=mask)[1:3]  # pred, mask
        visible_pos = (m.sum(0) == 0).nonzero()[0, 0]  # visible in both images
        masked_pos = (m[0] == 1).nonzero()[0, 0]
        with torch.no_grad():
            model.pixel_decoder.pos_embed[0, 1 + visible_pos] += 3.0
        assert torch.equal(model(imgs, noise=mask).pred, base) is pos_only
        with torch.no_grad():
            model.pixel_decoder.pos_embed[0, 1 + masked_pos] += 3.0
        assert not torch.equal(model(imgs, noise=mask).pred, base)


def test_loss_weight_ramp_and_momentum_schedules_follow_the_formulas():
    model = tiny_bootmae()
    for epoch in (0, 1, 4, 9, 10, 11, 39):
        model.set_progress(epoch * 5 + 4, 5, 200)  # 40 epochs of 5 steps, last step of the epoch
        assert model.current_feature_weight() == pytest.approx(min(4 * 1.0 * (epoch + 1) / 40, 1.0))
    model.set_progress(12, 5, 200)
    out = model(torch.randn(2, 3, S, S), **batch_inputs(model, 2))
    assert out.feature_weight == pytest.approx(0.3)  # epoch 2: 4 * 3 / 40
    torch.testing.assert_close(out.loss, out.reconstruction + 0.3 * out.feature)
    assert tiny_bootmae("bootmae.feature_weight=2", "bootmae.feature_weight_ramp=0").current_feature_weight() == 2.0

    vit_b = tiny_bootmae("bootmae.momentum_final=0.99999")  # ViT-B's dynamic schedule
    vit_l = tiny_bootmae()
    for epoch in (0, 1, 50, 99, 100, 101, 250, 399, 400, 700):
        ramp = 0.999 + epoch / 100 * (0.9999 - 0.999)
        b = ramp if epoch < 100 else 0.9999 + min(300, epoch - 100) / 300 * (0.99999 - 0.9999)
        lm = ramp if epoch < 100 else 0.9999
        for model, want in ((vit_b, b), (vit_l, lm)):
            model.set_progress(0, 7, 7 * 800)
            assert model.current_momentum(epoch * 7 + 6) == pytest.approx(want, abs=1e-12)


def test_full_loss_matches_an_independent_computation():
    """Section 5.4 recomputed with plain torch ops in image space on the model's own outputs and weights."""
    model = tiny_bootmae("mask.type=hybrid").eval()
    with torch.no_grad():  # a momentum encoder that differs from the student
        for p, s in zip(model.ema_encoder.parameters(), model.encoder.parameters()):
            p.add_(0.05 * torch.randn_like(p) * s.requires_grad)  # as an EMA moves: not the frozen pos-embed
    model.set_progress(10, 5, 80)  # epoch 2 of 16
    imgs, mask = torch.randn(2, 3, S, S), batch_inputs(model, 2, seed=3)["mask"]
    out = model(imgs, mask=mask)
    m = mask.float().view(2, 4, 4)

    # pixel target: every 4x4 patch and channel by its mean and biased std, eps 1e-5 in the root
    x = imgs.view(2, 3, 4, P, 4, P)
    mu = x.mean(dim=(3, 5), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(3, 5), keepdim=True)
    target = ((x - mu) / torch.sqrt(var + 1e-5)).view(2, 3, S, S)
    # prediction: (row-in-patch, col-in-patch, channel) per token, tokens row-major -> image
    pred = out.pred.view(2, 4, 4, P, P, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, S, S)
    # centre weights: 1 + masked fraction of the zero-padded 3x3 neighbourhood, on masked tokens only
    padded = F.pad(m, (1, 1, 1, 1))
    neighbours = sum(padded[:, 1 + dy : 5 + dy, 1 + dx : 5 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    w = m + m * neighbours / 9
    up = lambda t: t.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1)  # noqa: E731
    pixel = (up(w) * (pred - target) ** 2).mean() / up(m).expand(-1, 3, -1, -1).mean()

    # feature target: the momentum encoder on all patches, last block, no final norm; both sides LN without affine
    ema = model.ema_encoder
    tokens = F.conv2d(imgs, ema.patch_embed.proj.weight, ema.patch_embed.proj.bias, stride=P).flatten(2).transpose(1, 2)
    h = torch.cat([ema.cls_token.expand(2, -1, -1), tokens], 1) + ema.pos_embed
    for blk in ema.blocks:
        h = blk(h)

    def ln(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)

    sq = ((ln(h[:, 1:]) - ln(out.feature_pred)) ** 2).view(2, 4, 4, 32)
    feature = (w.unsqueeze(-1) * sq).mean() / m.mean()

    lam = min(4 * 1.0 * (2 + 1) / 16, 1.0)
    torch.testing.assert_close(out.reconstruction, pixel)
    torch.testing.assert_close(out.feature, feature)
    torch.testing.assert_close(out.loss, pixel + lam * feature)
    assert out.feature_weight == pytest.approx(0.75)


def test_centre_weights_on_known_masks():
    from mimkit.losses import center_weights

    lone = torch.zeros(1, 16)
    lone[0, 5] = 1
    assert torch.allclose(center_weights(lone, (4, 4))[0, 5], torch.tensor(1 + 1 / 9))
    full = center_weights(torch.ones(1, 16), (4, 4)).view(4, 4)
    assert torch.allclose(full[1, 1], torch.tensor(2.0)) and torch.allclose(full[0, 0], torch.tensor(1 + 4 / 9))


@pytest.mark.parametrize("kind", ["beit", "exact"])
def test_hybrid_mask_is_blocks_topped_up_at_random(kind):
    rolls = set()
    for seed in range(12):  # the paper's numbers: 14 x 14 patches, 120 in blocks of <= 60, 147 masked
        mask = hybrid_mask((14, 14), 147, 120, max_block=60, generator=torch.Generator().manual_seed(seed),
                           block_generator=kind)  # fmt: skip
        blocks = block_mask_for(kind, (14, 14), 120, max_block=60, generator=torch.Generator().manual_seed(seed))
        assert int(mask.sum()) == 147
        revealed = int((blocks & ~mask).sum())  # block patches the roll made visible
        assert 0 <= revealed <= 3
        rolls.add(revealed)
    assert len(rolls) > 1
    model = tiny_bootmae("mask.type=hybrid")
    assert model.mask_inputs(torch.Generator().manual_seed(0))["mask"].sum() == 12


def test_each_ablation_is_one_override():
    imgs = torch.randn(2, 3, S, S)
    none = tiny_bootmae("bootmae.feature_target=none")
    assert none.ema_encoder is None and none.feature_decoder is None
    assert not any(k.startswith(("ema_encoder.", "feature_decoder.")) for k in none.state_dict())
    out = none(imgs, **batch_inputs(none, 2))
    assert torch.equal(out.loss, out.reconstruction) and out.feature_pred is None
    assert not any("cross_attn" in n for n, _ in tiny_bootmae("bootmae.cross_attention=false").named_modules())
    assert set(tiny_bootmae("mask.type=random").mask_inputs(torch.Generator())) == {"noise"}
    flat = tiny_bootmae("bootmae.center_weight=false").eval()
    noise = batch_inputs(flat, 2)["noise"]
    out = flat(imgs, noise=noise)
    err = (out.pred - flat.target(imgs)).pow(2).mean(-1)
    torch.testing.assert_close(out.reconstruction, (err * out.mask).sum() / out.mask.sum())
    # reconstruction pictures: the prediction of the exact target maps back to the pixels
    torch.testing.assert_close(flat.pixels_from_pred(flat.target(imgs), imgs), patchify(imgs, P), atol=1e-5, rtol=0)
    for bad, message in [
        (["method=simmim", "mask.type=hybrid"], "does not compose with method simmim"),
        (["method=bootmae", "bootmae.momentum=1.5"], "bootmae.momentum"),
        (["method=bootmae", "mask.type=parallel", "mask.ratio=0.7"], "whole K"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, TINY_MODEL + bad)


def test_parallel_masks_compose_with_bootmae_targets():
    model = tiny_bootmae("mask.type=parallel", "emae.consistency_weight=0").eval()
    calls = []
    model.ema_encoder.blocks[0].register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    imgs, noise = torch.randn(2, 3, S, S), torch.rand(2, L)
    out = model(imgs, noise=noise)
    assert calls == [(2, 1 + L, 32)]  # the momentum target: once per image, shared by the K = 4 parts
    assert out.pred.shape == (2, 4, L, P * P * 3) and out.mask.shape == (2, 4, L)
    masks = parallel_masks(2, L, 4, noise=noise).mask
    single = BootMAE.forward  # each part alone, through the mask path (same model, K = 1 sequences)
    parts = [single(model, imgs, mask=masks[:, k]) for k in range(4)]
    for k in range(4):
        torch.testing.assert_close(out.pred[:, k], parts[k].pred)
    torch.testing.assert_close(out.loss, torch.stack([p.loss for p in parts]).mean())
    with_sc = tiny_bootmae("mask.type=parallel", "emae.consistency_weight=0.5")(imgs, noise=noise)
    assert with_sc.consistency > 0


def test_bootmae_trains_and_resumes_bit_identically(tiny_cfg):
    args = ("method=bootmae", "mask.type=hybrid", "train.epochs=8", "data.num_samples=32")  # 4 steps per epoch
    straight = pretrain(tiny_cfg(*args, "train.max_steps=6", out="a"))
    pretrain(tiny_cfg(*args, "train.max_steps=3", out="b"))
    resumed = pretrain(tiny_cfg(*args, "train.max_steps=6", out="b"))
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the EMA moved, by about (1 - d) of the student's way per step (d = 0.999 here)
    torch.manual_seed(0)  # pretrain seeds with train.seed before building the model
    init = build_model(load_config(None, TINY_MODEL + list(args))).state_dict()
    ema_keys = sorted(k for k in a if k.startswith("ema_encoder."))
    assert ema_keys == sorted("ema_" + k for k in init if k.startswith("encoder."))
    key = "encoder.blocks.0.mlp.fc1.weight"
    ema_moved, student_moved = (a["ema_" + key] - init[key]).norm(), (a[key] - init[key]).norm()
    assert 0 < ema_moved < 0.05 * student_moved
    records = [json.loads(line) for line in straight.metrics.read_text().splitlines() if '"step"' in line]
    for r in records:  # 4 steps per epoch; 8 epochs: lambda(e) = min(4 (e + 1) / 8, 1)
        epoch = (r["step"] - 1) // 4
        assert r["feature_weight"] == pytest.approx(min(4 * (epoch + 1) / 8, 1.0))
        assert r["momentum"] == pytest.approx(0.999 + epoch / 100 * (0.9999 - 0.999))
        assert {"reconstruction", "feature"} <= set(r)
    assert {r["feature_weight"] for r in records} == {0.5, 1.0}


# ---------------------------------------------------------------- fidelity to the official code (issue 16)

D, DEPTH, HEADS, DEC = 32, 2, 2, 32  # TINY_MODEL: encoder 32 x 2 blocks x 2 heads, decoders 32 wide, 1 block


def official_sincos(dim: int, grid: int) -> torch.Tensor:
    """MoCo v3's table as BootMAE builds it, written here from its description: meshgrid(w, h) with ij indexing
    (so the flattened 'w' coordinate is the row), four channel groups sin(w o), cos(w o), sin(h o), cos(h o),
    o_k = 1 / 10000^(k / (dim/4)), computed in float32; the cls row is zero."""
    a, b = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")  # fmt: skip
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_a, out_b = a.flatten()[:, None] * omega, b.flatten()[:, None] * omega
    table = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def official_bootmae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The parameter names and shapes of the released ``VisionTransformerForMaskedImageModeling``
    (modeling_pretrain_bootmae.py) at the tiny size: BEiT-style q / v biases, Decode_Block with norm3 / norm4 and
    c_attn (q, fused kv, q_bias, v_bias), ``down`` / ``decode_norm`` / ``lm_head`` (ConvTranspose2d) and their
    ``_1`` feature-decoder twins; the fixed tables as the official code computes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    norm = lambda prefix, dim: {f"{prefix}.weight": 1 + r(dim), f"{prefix}.bias": r(dim)}  # noqa: E731
    linear = lambda prefix, o, i: {f"{prefix}.weight": r(o, i), f"{prefix}.bias": r(o)}  # noqa: E731

    def attention(prefix, dim, inner):
        return {f"{prefix}.qkv.weight": r(3 * inner, dim), f"{prefix}.q_bias": r(inner), f"{prefix}.v_bias": r(inner),
                **linear(f"{prefix}.proj", dim, inner)}  # fmt: skip

    def decode_block(prefix, dim, context):
        inner = dim // HEADS * HEADS
        return {**norm(f"{prefix}.norm1", dim), **attention(f"{prefix}.attn", dim, inner),
                **norm(f"{prefix}.norm3", dim), **norm(f"{prefix}.norm4", context),
                f"{prefix}.c_attn.q.weight": r(inner, dim), f"{prefix}.c_attn.kv.weight": r(2 * inner, context),
                f"{prefix}.c_attn.q_bias": r(inner), f"{prefix}.c_attn.v_bias": r(inner),
                **linear(f"{prefix}.c_attn.proj", dim, inner), **norm(f"{prefix}.norm2", dim),
                **linear(f"{prefix}.mlp.fc1", 4 * dim, dim), **linear(f"{prefix}.mlp.fc2", dim, 4 * dim)}  # fmt: skip

    sd = {"cls_token": r(1, 1, D), "pos_embed": official_sincos(D, S // P), "patch_embed.proj.weight": r(D, 3, P, P),
          "patch_embed.proj.bias": r(D), **norm("norm", D)}  # fmt: skip
    for i in range(DEPTH):
        b = f"blocks.{i}"
        sd.update({**norm(f"{b}.norm1", D), **attention(f"{b}.attn", D, D), **norm(f"{b}.norm2", D),
                   **linear(f"{b}.mlp.fc1", 4 * D, D), **linear(f"{b}.mlp.fc2", D, 4 * D)})  # fmt: skip
    sd.update({**decode_block("decode_blocks.0", DEC, D), **norm("decode_norm", DEC), **linear("down", DEC, D),
               "mask_token": r(1, 1, DEC), "de_pos_embed": official_sincos(DEC, S // P),
               "lm_head.proj.weight": r(DEC, 3, P, P), "lm_head.proj.bias": r(3)})  # fmt: skip
    sd.update({**decode_block("decode_blocks_1.0", D, D), **norm("decode_norm_1", D), **linear("down_1", D, D),
               "mask_token_1": r(1, 1, D), **linear("lm_head_1", D, D)})  # fmt: skip
    return sd


def test_official_bootmae_weights_give_the_same_loss_with_mimkits_own_tables():
    from mimkit.interop import convert_bootmae_official

    sd = official_bootmae_state_dict()
    conv = convert_bootmae_official(sd, P)
    model = tiny_bootmae("mask.type=hybrid").eval()
    assert set(conv.tensors) == set(model.state_dict()) and not conv.unexpected
    model.load_state_dict(conv.tensors, strict=True)
    fresh = tiny_bootmae("mask.type=hybrid")  # what mimkit builds from scratch beside imported weights
    tables = ["encoder.pos_embed", "ema_encoder.pos_embed", "pixel_decoder.pos_embed", "feature_decoder.pos_embed"]
    for name in tables:  # the official tables are row-first (MoCo v3); mimkit's fixed tables now are too
        torch.testing.assert_close(fresh.state_dict()[name], model.state_dict()[name], rtol=0, atol=1e-6)
    imgs, inputs = torch.randn(2, 3, S, S), batch_inputs(model, 2)
    with torch.no_grad():
        imported = model(imgs, **inputs)
        for name in tables:
            model.state_dict()[name].copy_(fresh.state_dict()[name])
        rebuilt = model(imgs, **inputs)
    torch.testing.assert_close(rebuilt.loss, imported.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(rebuilt.feature, imported.feature, rtol=1e-6, atol=0)
    torch.testing.assert_close(rebuilt.pred, imported.pred, rtol=1e-5, atol=1e-5)


def test_official_pixel_head_is_the_default_and_loads_official_weights_exactly():
    """Issue 36: the default pixel head is BootMAE's ConvTranspose2d (3 biases, one per colour channel): official
    weights load into it bit for bit, it computes the transposed convolution, and its gradients are the
    convolution's (so AdamW keeps the 3 biases shared, as the official head does). per_pixel keeps p*p*3 biases."""
    from mimkit.decoders import ChannelBiasHead
    from mimkit.interop import convert_bootmae_official
    from mimkit.models import unpatchify

    sd = official_bootmae_state_dict(seed=1)
    model = tiny_bootmae("mask.type=hybrid")
    head = model.pixel_decoder.head
    assert isinstance(head, ChannelBiasHead) and model.pixel_head == "official" and head.bias.shape == (3,)
    model.load_state_dict(convert_bootmae_official(sd, P).tensors, strict=True)
    assert torch.equal(head.bias, sd["lm_head.proj.bias"])  # exactly, no repetition
    deconv_w = sd["lm_head.proj.weight"]  # (dim, 3, p, p) -> rows in patchify order (i, j, c)
    assert torch.equal(head.weight, deconv_w.permute(2, 3, 1, 0).reshape(-1, DEC))
    deconv = torch.nn.ConvTranspose2d(DEC, 3, kernel_size=P, stride=P)
    deconv.load_state_dict({"weight": deconv_w, "bias": sd["lm_head.proj.bias"]})
    tokens, upstream = torch.randn(2, L, DEC), torch.randn(2, 3, S, S)
    official = deconv(tokens.transpose(1, 2).reshape(2, DEC, S // P, S // P))
    ours = unpatchify(head(tokens), P)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    (official * upstream).sum().backward()
    (ours * upstream).sum().backward()
    torch.testing.assert_close(head.bias.grad, deconv.bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, deconv.weight.grad.permute(2, 3, 1, 0).reshape(-1, DEC),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # the switch: mimkit's per-pixel head, the 3 official biases repeated over the p*p pixels
    per_pixel = tiny_bootmae("mask.type=hybrid", "bootmae.pixel_head=per_pixel")
    per_pixel.load_state_dict(convert_bootmae_official(sd, P, pixel_head="per_pixel").tensors, strict=True)
    assert isinstance(per_pixel.pixel_decoder.head, torch.nn.Linear)
    assert torch.equal(per_pixel.pixel_decoder.head.bias, sd["lm_head.proj.bias"].repeat(P * P))
    with torch.no_grad():
        torch.testing.assert_close(unpatchify(per_pixel.pixel_decoder.head(tokens), P), official, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="pixel_decoder.head.bias"):  # the layouts do not mix silently
        model.load_state_dict(per_pixel.state_dict())


def test_a_checkpoint_config_from_before_the_switch_keeps_its_per_pixel_head():
    from mimkit.config import config_from_dict, to_dict

    saved = to_dict(load_config(None, TINY_MODEL + ["method=bootmae"]))
    del saved["bootmae"]["pixel_head"]  # what every mimkit before bootmae.pixel_head wrote
    assert config_from_dict(saved).bootmae.pixel_head == "per_pixel"
    assert config_from_dict({"method": "bootmae", "bootmae": {"feature_weight": 0.5}}).bootmae.pixel_head == "official"


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = tiny_bootmae("mae.decoder_dim=256", "bootmae.feature_decoder_dim=256")
    tokens = torch.cat([model.pixel_decoder.mask_token.flatten(), model.feature_decoder.mask_token.flatten()]).detach()
    # N(0, 0.02) truncated at +-1 sigma: all within 0.02, std 0.02 * 0.5396 (the truncated normal's)
    assert float(tokens.abs().max()) <= 0.02 and 0.009 < float(tokens.std()) < 0.0125
    assert not bool((tokens.abs() == 0.02).any())  # drawn strictly inside the bounds: no clamped value
    # pixel head: ConvTranspose2d's default init, U(+-1/sqrt(3 p^2)) for the weights and the 3 channel biases
    head, bound = model.pixel_decoder.head, 1 / (3 * P * P) ** 0.5
    assert 0.9 * bound < float(head.weight.detach().abs().max()) <= bound
    biases = head.bias.detach()
    assert biases.shape == (3,) and 0 < float(biases.abs().min()) <= float(biases.abs().max()) <= bound
    # the per_pixel switch: those 3 biases repeated over the patch's pixels (tied at init, free in training)
    torch.manual_seed(0)
    per_pixel = tiny_bootmae("bootmae.pixel_head=per_pixel").pixel_decoder.head.bias.detach().view(P * P, 3)
    assert torch.equal(per_pixel, per_pixel[:1].expand(P * P, 3))
    assert 0 < float(per_pixel.abs().min()) and float(per_pixel.abs().max()) <= bound
