"""MAE's training forward decodes the masked patches only (mae.decode_visible false): the last decoder block's
queries and MLP and the pixel head skip the cls token and the visible patches, whose outputs the loss never reads.
Same loss and gradients as the official full decode; eval mode still predicts every patch."""

import pytest
import torch
from timm.models.vision_transformer import Block

from mimkit.config import load_config
from mimkit.decoders import block_at_rows
from mimkit.masking import take_patches
from mimkit.methods import build_model


@pytest.mark.parametrize("fused", [True, False])
def test_block_at_rows_is_the_block_at_those_rows(fused):
    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True).eval()
    block.attn.fused_attn = fused
    x = torch.randn(3, 9, 32, requires_grad=True)
    rows = torch.stack([torch.randperm(9)[:5].sort().values for _ in range(3)])
    ours = block_at_rows(block, x, rows)
    ref = take_patches(block(x), rows)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((ours * g).sum(), [x, *block.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *block.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # rows matter: other rows give other outputs
    assert not torch.allclose(block_at_rows(block, x, rows.flip(1)), ours)


def mae_pair():
    cfg = lambda visible: load_config(None, ["model.arch=vit_tiny_patch4_32", "model.img_size=16",  # noqa: E731
                                             "mae.decoder_dim=64", "mae.decoder_depth=2", "mae.decoder_heads=4",
                                             f"mae.decode_visible={visible}"])  # fmt: skip
    torch.manual_seed(0)
    skipping = build_model(cfg("false"))
    official = build_model(cfg("true"))
    official.load_state_dict(skipping.state_dict())
    return skipping.train(), official.train()


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_training_loss_and_gradients_equal_the_full_decode(grad_checkpointing):
    skipping, official = mae_pair()
    for m in (skipping, official):
        m.set_grad_checkpointing(grad_checkpointing)
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    ours, ref = skipping(imgs, noise=noise), official(imgs, noise=noise)
    assert torch.equal(ours.mask, ref.mask) and ours.loss_mask is None
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-6, atol=0)
    masked = ref.mask.bool()
    torch.testing.assert_close(ours.pred[masked], ref.pred[masked], rtol=1e-5, atol=1e-6)
    assert bool((ours.pred[~masked] == 0).all()) and bool((ref.pred[~masked] != 0).all())
    ours.loss.backward()
    ref.loss.backward()
    for (name, a), b in zip(skipping.named_parameters(), official.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
    # one changed weight of the last decoder block changes the loss (the check can fail)
    with torch.no_grad():
        skipping.decoder.decoder_blocks[-1].mlp.fc2.weight[0, 0] += 1.0
    assert abs(skipping(imgs, noise=noise).loss.item() - ref.loss.item()) > 1e-4


def test_eval_mode_predicts_every_patch():
    skipping, official = mae_pair()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        ours, ref = skipping.eval()(imgs, noise=noise), official.eval()(imgs, noise=noise)
    assert torch.equal(ours.pred, ref.pred) and torch.equal(ours.loss, ref.loss)
