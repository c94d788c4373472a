import pytest
import timm
import torch
from conftest import TINY_MODEL

from mimkit.config import load_config
from mimkit.losses import masked_mse, per_patch_normalize
from mimkit.methods import build_model
from mimkit.methods.mae import MAE
from mimkit.models import create_encoder, patchify, sincos_2d_pos_embed, unpatchify
from mimkit.presets import PRESETS, get_preset


def tiny_mae(*overrides):
    return build_model(load_config(None, TINY_MODEL + list(overrides)))


@pytest.mark.parametrize("arch", ["vit_tiny_patch4_32", "vit_small_patch16_224"])
def test_encoder_state_dict_loads_into_timm_create_model(arch):
    p = get_preset(arch)
    enc = create_encoder(arch)
    ref = timm.create_model(p.timm_name, pretrained=False, img_size=p.img_size, patch_size=p.patch_size, num_classes=0)
    missing, unexpected = ref.load_state_dict(enc.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 3, p.img_size, p.img_size)
    enc.eval(), ref.eval()
    torch.testing.assert_close(ref(x), enc(x))


def test_presets_cover_the_paper_sizes():
    assert {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
            "vit_huge_patch14_224", "vit_tiny_patch4_32", "vit_tiny_patch2_32"} <= set(PRESETS)  # fmt: skip
    assert (PRESETS["vit_huge_patch14_224"].embed_dim, PRESETS["vit_huge_patch14_224"].depth) == (1280, 32)
    assert PRESETS["vit_large_patch16_224"].num_heads == 16


def test_img_size_must_be_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        create_encoder("vit_tiny_patch4_32", img_size=30)


def test_sincos_table_matches_the_mae_layout():
    dim, grid = 16, 3
    table = sincos_2d_pos_embed(dim, grid)[0]
    assert table.shape == (grid * grid + 1, dim) and torch.all(table[0] == 0)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    row, col = 1, 2  # token index 1 + row * grid + col
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(table[1 + row * grid + col], expect.float())


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right block; its element 0..2 are the 3 channels of pixel (0, 4)
    torch.testing.assert_close(patches[0, 1, :3], imgs[0, :, 0, 4])
    torch.testing.assert_close(unpatchify(patches, 4), imgs)


def test_official_initialisation():
    model = tiny_mae()
    assert not model.encoder.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed, sincos_2d_pos_embed(32, 4))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.bias == 0), name
            bound = (6 / (mod.in_features + mod.out_features)) ** 0.5
            assert mod.weight.abs().max() <= bound + 1e-6, name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-6, name
    assert 0.005 < float(model.encoder.cls_token.detach().std()) < 0.05


def test_loss_uses_masked_patches_only():
    pred, target = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    base = masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[:, 12:] += 100.0  # visible patches: no effect
    assert torch.equal(masked_mse(pred2, target, mask), base)
    expect = ((pred[:, :12] - target[:, :12]) ** 2).mean()
    torch.testing.assert_close(base, expect)


def test_norm_pix_target_uses_unbiased_variance():
    t = torch.randn(2, 5, 12) * 3 + 1
    n = per_patch_normalize(t)
    torch.testing.assert_close(
        n, (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    )


def test_forward_shapes_and_noise_determinism():
    model = tiny_mae().eval()
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    out = model(imgs, noise=noise)
    assert out.pred.shape == (3, 16, 48) and out.mask.shape == (3, 16) and out.loss.ndim == 0
    assert torch.equal(out.mask.sum(1), torch.full((3,), 12.0))
    torch.testing.assert_close(model(imgs, noise=noise).loss, out.loss)
    # the encoder sees visible patches only: changing masked pixels leaves visible-token predictions' inputs alone
    masked_pixels = unpatchify(out.mask[..., None].expand(-1, -1, 48), 4) > 0
    imgs2 = torch.where(masked_pixels, torch.randn_like(imgs), imgs)
    torch.testing.assert_close(model(imgs2, noise=noise).pred, out.pred)


def test_block_mask_type_drives_the_same_model():
    model = tiny_mae("mask.type=block", "mask.ratio=0.5")
    inputs = model.mask_inputs(torch.Generator().manual_seed(0))
    assert set(inputs) == {"mask"} and int(inputs["mask"].sum()) == 8
    out = model(torch.randn(2, 3, 16, 16), mask=torch.stack([inputs["mask"]] * 2))
    assert torch.isfinite(out.loss)
    assert isinstance(model, MAE)
