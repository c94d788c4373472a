"""CrossMAE's decoder (mae.decoder=crossmae): queries at a random reconstruct_ratio of the masked patches, each decoded
on its own by cross-attention to the visible tokens; the loss on those patches only; several encoder blocks mixed
per decoder block; full reconstructions outside training (pictures); config checks. Training, resuming and k-NN
through the real loop: tests/test_compositions.py (mae+crossmae*)."""

import re

import pytest
import timm
import torch
from conftest import TINY_MODEL

from mimkit.config import ConfigError, load_config
from mimkit.decoders import CrossAttentionBlock, CrossMAEDecoder
from mimkit.interop import export_timm, load_mimkit_checkpoint
from mimkit.methods import build_model
from mimkit.models import transformer_blocks, unpatchify
from mimkit.train import pretrain
from mimkit.visualize import IMAGENET_MEAN, IMAGENET_STD, reconstruct

CROSSMAE = ["mae.decoder=crossmae", "mae.reconstruct_ratio=0.25"]
MASKS = {"random": [], "block": ["mask.type=block"],
         "hybrid": ["mask.type=hybrid", "mask.hybrid_block_ratio=0.4", "mask.hybrid_max_block_ratio=0.25"]}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_crossmae(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config(None, TINY_MODEL + CROSSMAE + list(overrides)))


def batch_inputs(model, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the data pipeline gives: each sample's mask inputs from its own generator, stacked."""
    inputs = [model.mask_inputs(torch.Generator().manual_seed(seed + i)) for i in range(count)]
    return {k: torch.stack([d[k] for d in inputs]) for k in inputs[0]}


@pytest.mark.parametrize("ratio,decoded", [(0.25, 3), (0.3, 4), (0.5, 6), (1.0, 12)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_a_round_ratio_of_the_masked_patches_is_decoded(mask, ratio, decoded):
    model = tiny_crossmae(*MASKS[mask], f"mae.reconstruct_ratio={ratio}")
    inputs = batch_inputs(model, 4)
    assert set(inputs) == {"mask" if mask != "random" else "noise", "select_noise"}
    out = model(torch.randn(4, 3, 16, 16), **inputs)
    assert out.pred.shape == (4, 16, 48) and out.mask.shape == out.loss_mask.shape == (4, 16)
    assert torch.equal(out.mask.sum(1), torch.full((4,), 12.0))  # 16 patches - int(16 * 0.25) visible
    assert torch.equal(out.loss_mask.sum(1), torch.full((4,), float(decoded)))
    assert torch.all(out.loss_mask <= out.mask)  # only masked patches are decoded
    predicted = out.pred.abs().sum(-1) > 0
    assert torch.equal(predicted, out.loss_mask.bool())  # pred: zeros where nothing was decoded (training)
    if decoded < 12:  # each sample draws its own selection
        assert len({tuple(row.tolist()) for row in out.loss_mask}) > 1


def test_the_mask_is_maes_and_the_selection_follows_its_noise():
    plain, cross = build_model(load_config(None, TINY_MODEL)), tiny_crossmae()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(
            plain.mask_inputs(torch.Generator().manual_seed(seed))["noise"], cross.mask_inputs(g)["noise"]
        )
    inputs, imgs = batch_inputs(cross, 2), torch.randn(2, 3, 16, 16)
    a, b = cross(imgs, **inputs), cross(imgs, **inputs)
    assert torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.loss, b.loss)
    other = cross(
        imgs, noise=inputs["noise"], select_noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(9))
    )
    assert torch.equal(other.mask, a.mask) and not torch.equal(other.loss_mask, a.loss_mask)
    fresh = cross(imgs, noise=inputs["noise"])  # no select_noise: drawn in the forward
    assert torch.equal(fresh.loss_mask.sum(1), a.loss_mask.sum(1))


def test_the_loss_sees_the_decoded_patches_only(monkeypatch):
    model = tiny_crossmae()
    inputs, imgs = batch_inputs(model, 1), torch.randn(1, 3, 16, 16)
    out = model(imgs, **inputs)
    selected = out.loss_mask[0].nonzero().flatten().tolist()
    unselected = ((out.mask[0] - out.loss_mask[0]) > 0).nonzero().flatten().tolist()
    visible = (out.mask[0] == 0).nonzero().flatten().tolist()
    target = model.target(imgs)

    def loss_with_target_changed_at(patch: int) -> torch.Tensor:
        changed = target.clone()
        changed[:, patch] += 1.0
        monkeypatch.setattr(model, "target", lambda _: changed)
        return model(imgs, **inputs).loss

    assert all(torch.equal(loss_with_target_changed_at(p), out.loss) for p in unselected + visible)
    assert all(not torch.equal(loss_with_target_changed_at(p), out.loss) for p in selected)
    monkeypatch.undo()
    # end to end: the pixels of a masked patch that is not decoded reach neither the encoder nor the loss
    patch_pixels = unpatchify(torch.nn.functional.one_hot(torch.tensor([unselected[0]]), 16)[..., None]
                              .expand(-1, -1, 48).float(), 4).bool()  # fmt: skip
    assert torch.equal(model(torch.where(patch_pixels, imgs + 3.0, imgs), **inputs).loss, out.loss)


def test_queries_do_not_see_each_other():
    model = tiny_crossmae()
    dec = model.decoder
    latent = torch.randn(2, 5, 32)
    ids = torch.tensor([[3, 7, 11, 0], [1, 2, 15, 9]])
    out = dec(latent, ids)
    assert out.shape == (2, 4, 48)
    moved = ids.clone()
    moved[:, 0] = torch.tensor([5, 6])  # another position for query 0 only
    again = dec(latent, moved)
    torch.testing.assert_close(again[:, 1:], out[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(again[:, 0], out[:, 0])
    # a query's own input changed inside the decoder (its mask token + position) moves no other query
    hook = dec.decoder_blocks[0].register_forward_pre_hook(
        lambda _, args: (args[0] + torch.nn.functional.one_hot(torch.tensor(0), 4)[None, :, None], args[1])
    )
    try:
        perturbed = dec(latent, ids)
    finally:
        hook.remove()
    torch.testing.assert_close(perturbed[:, 1:], out[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(perturbed[:, 0], out[:, 0])
    # decoding a subset gives the same predictions as decoding every patch (what eval mode does for pictures)
    every = dec(latent, torch.arange(16).expand(2, -1))
    torch.testing.assert_close(out, torch.gather(every, 1, ids[..., None].expand(-1, -1, 48)), rtol=0, atol=1e-5)


def test_several_encoder_blocks_are_mixed_with_learned_weights():
    model = tiny_crossmae("model.depth=3", "mae.decoder_depth=2", "mae.decoder_context_blocks=all")
    dec = model.decoder
    assert dec.context_blocks == (0, 1) and len(dec.context_norms) == 2
    weights = [blk.context_weights for blk in dec.decoder_blocks]
    assert all(w.shape == (3,) and torch.allclose(w, torch.full((3,), 1 / 3)) for w in weights)
    inputs, imgs = batch_inputs(model, 2), torch.randn(2, 3, 16, 16)
    out = model(imgs, **inputs)
    out.loss.backward()
    assert all(w.grad is not None and bool((w.grad != 0).all()) for w in weights)
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in dec.context_norms)
    with torch.no_grad():
        weights[1].copy_(torch.tensor([1.0, 0.0, 0.0]))  # the last decoder block reads block 0 only
    assert not torch.equal(model(imgs, **inputs).loss, out.loss)
    negative = tiny_crossmae("model.depth=3", "mae.decoder_context_blocks=[-2]").decoder
    assert negative.context_blocks == (1,) and negative.decoder_blocks[0].context_weights.shape == (2,)
    assert tiny_crossmae().decoder.decoder_blocks[0].context_weights is None  # one context: nothing to mix


def test_blocks_are_transformer_blocks_and_checkpoint_the_same():
    model = tiny_crossmae("mae.decoder_depth=2")
    crossblocks = [b for b in transformer_blocks(model) if isinstance(b, CrossAttentionBlock)]
    assert len(crossblocks) == 2 and len(transformer_blocks(model)) == 2 + 2
    inputs, imgs = batch_inputs(model, 2), torch.randn(2, 3, 16, 16)
    plain = model(imgs, **inputs)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.decoder.grad_checkpointing
    again = model(imgs, **inputs)
    again.loss.backward()
    assert torch.equal(again.loss, plain.loss)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def test_pictures_show_the_predictions_training_makes_for_every_patch():
    model = tiny_crossmae("mae.reconstruct_ratio=0.5")
    imgs = torch.rand(2, 3, 16, 16)
    inputs = batch_inputs(model, 2)  # reconstruct() masks image i with mask_inputs(Generator(seed + i))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (imgs - mean) / std  # reconstruct()'s normalisation
    trained = model.train()(x, **inputs)
    shown = model.eval()(x, **inputs)
    decoded = trained.loss_mask.bool()
    # eval mode predicts every patch, and the masked patches training decodes get the very same predictions
    assert bool((shown.pred.abs().sum(-1) > 0).all()) and shown.loss_mask.sum() == shown.mask.sum()
    torch.testing.assert_close(shown.pred[decoded], trained.pred[decoded], rtol=0, atol=1e-5)
    recs = reconstruct(model, imgs, seed=0)
    for i, rec in enumerate(recs):
        assert torch.equal(rec.patch_mask, shown.mask[i])
        expect = (unpatchify(model.pixels_from_pred(shown.pred, x), 4, (4, 4))[i] * std + mean).clamp(0, 1)
        torch.testing.assert_close(rec.reconstruction, expect, rtol=0, atol=1e-5)
        assert torch.equal(rec.pasted[:, ~rec.mask], rec.original[:, ~rec.mask])
        assert torch.equal(rec.pasted[:, rec.mask], rec.reconstruction[:, rec.mask])
    with torch.no_grad():
        first = model.eval()(x[:1], **{k: v[:1] for k, v in inputs.items()})
    assert recs[0].loss == pytest.approx(float(first.loss))


def test_a_crossmae_checkpoint_exports_its_encoder_to_timm(tiny_cfg, tmp_path):
    run = pretrain(tiny_cfg(*CROSSMAE, "mae.decoder_context_blocks=[0]", "train.max_steps=2", out="run"))
    model, cfg, _ = load_mimkit_checkpoint(run.checkpoint)
    assert isinstance(model.decoder, CrossMAEDecoder) and cfg.mae.decoder_context_blocks == (0,)
    export_timm(run.checkpoint, tmp_path / "timm")
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(timm_model.forward_features(x), model.encoder.eval().forward_features(x))


@pytest.mark.parametrize("overrides,message", [
    (["mae.reconstruct_ratio=0"], "mae.reconstruct_ratio must be in (0, 1]"),
    (["mae.reconstruct_ratio=1.5"], "mae.reconstruct_ratio must be in (0, 1]"),
    (["mae.reconstruct_ratio=0.02"], "decode at least one of the 12 masked patches"),
    (["method=bootmae"], "mae.decoder: method bootmae does not read it"),
    (["method=emae"], "mae.decoder: method emae does not read it"),
    (["mask.type=parallel"], "mae.decoder crossmae does not compose with mask.type parallel"),
    (["mae.decoder_context_blocks=[1]"], "mae.decoder_context_blocks [1] must be all or distinct blocks before"),
    (["mae.decoder_context_blocks=[0, -2]"], "distinct blocks before the last of the 2-block encoder"),
    (["mae.decoder_context_blocks=[5]"], "mae.decoder_context_blocks"),
    (["mae.decoder_context_blocks=some"], "mae.decoder_context_blocks"),
    (["mae.decoder=mae"], "mae.reconstruct_ratio: method mae does not read it"),
])  # fmt: skip
def test_config_errors_name_the_key_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, TINY_MODEL + CROSSMAE + overrides)
    assert "\n" not in str(err.value)
