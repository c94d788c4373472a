import pytest
import torch
import yaml
from conftest import TINY_MODEL, tiny_model

from mimkit.config import ConfigError, load_config, to_dict
from mimkit.typed_config import parse_overrides


def test_defaults_follow_the_mae_paper():
    cfg = load_config()
    assert cfg.mask.ratio == 0.75 and cfg.mae.norm_pix_loss
    assert (cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (512, 8, 16)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.blr == 1.5e-4
    assert cfg.data.crop_scale == (0.2, 1.0)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 4\noptim:\n  betas: [0.9, 0.98]\n")
    cfg = load_config(path, ["train.epochs=5", "optim.lr=0.001", "optim.clip_grad=null"])
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 4
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.lr == 0.001 and cfg.optim.clip_grad is None
    # the dumped config loads back to the same config
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(again) == cfg


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:  # the tokenizer recipe is `mimkit tokenizer train`'s, which reads tokenizer.* too
        load_config(recipe, also_reads=("tokenizer",) if recipe.stem.startswith("tokenizer") else ())


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batchsize=4", "unknown config key 'train.batchsize'.*allowed keys in train: .*batch_size"),
        ("trian.epochs=4", "unknown config key 'trian'"),
        ("mask.ratio=1.0", r"mask.ratio must be in \(0, 1\)"),
        ("mask.ratio=0", r"mask.ratio must be in \(0, 1\)"),
        ("mask.type=grid", "mask.type: 'grid' is not allowed; allowed: 'random', 'block'"),
        ("model.img_size=30", "model.img_size 30 is not divisible by the patch size 4"),
        ("model.arch=vit_giant", "model.arch: unknown 'vit_giant'"),
        ("train.epochs=two", "train.epochs: expected an integer, got 'two'"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.precision=fp8", "train.precision: 'fp8' is not allowed"),
        ("optim.betas=[0.9]", r"optim.betas: expected a list of 2 values"),
        ("data.crop_scale=[0.5,0.2]", "data.crop_scale must satisfy"),
        ("mae.decoder_heads=3", "mae.decoder_dim 512 must be divisible by mae.decoder_heads 3"),
        ("train.device=tpu", "train.device: 'tpu' is not allowed"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: vit_tiny_patch4_32\n  dropout: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.dropout'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["train.epochs"])


# ---------------------------------------------------------------- weight-decay sets (issue 16, item 3)


def _decay_groups(method: str, *overrides: str) -> tuple[set[str], set[str], set[str]]:
    """(decayed, not decayed, not optimised) parameter names of a tiny model, as the training loop groups them."""
    from timm.optim import param_groups_weight_decay

    from mimkit.methods import build_model, no_weight_decay_names

    torch.manual_seed(0)
    cfg = load_config(None, tiny_model(method) + list(overrides))
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=no_weight_decay_names(model, cfg))
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decayed, exempt, set(names.values()) - decayed - exempt


def test_weight_decay_sets_default_to_the_official_ones():
    # MAE: only 1-D params and biases are exempt; its cls and mask tokens are decayed, the fixed tables frozen
    decayed, exempt, frozen = _decay_groups("mae")
    assert {"encoder.cls_token", "decoder.mask_token"} <= decayed and frozen == {
        "encoder.pos_embed",
        "decoder.decoder_pos_embed",
    }
    assert all(n.endswith("bias") or "norm" in n for n in exempt) and "encoder.blocks.0.attn.qkv.weight" in decayed
    # BootMAE: pos_embed and cls_token exempt (the former frozen anyway); both decoders' mask tokens decayed
    decayed, exempt, frozen = _decay_groups("bootmae")
    assert "encoder.cls_token" in exempt and {"pixel_decoder.mask_token", "feature_decoder.mask_token"} <= decayed
    assert "encoder.pos_embed" in frozen and not any(n.startswith("ema_encoder.") for n in decayed | exempt)
    # BEiT / mc-BEiT: cls exempt; the [MASK] embedding and the shared relative position bias table decayed
    for method in ("beit", "mcbeit"):
        decayed, exempt, _ = _decay_groups(method)
        assert "encoder.cls_token" in exempt and "encoder.blocks.0.gamma_1" in exempt
        assert {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table", "lm_head.weight"} <= decayed


def test_weight_decay_exempt_set_is_a_config_key():
    # the pre-issue-16 mimkit behaviour, spelled as patterns
    old = "optim.no_weight_decay=['*pos_embed','*cls_token','*mask_token']"
    decayed, exempt, _ = _decay_groups("bootmae", old)
    assert {"encoder.cls_token", "pixel_decoder.mask_token", "feature_decoder.mask_token"} <= exempt
    decayed, exempt, _ = _decay_groups("mae", "optim.no_weight_decay=[decoder.mask_token]")
    assert "decoder.mask_token" in exempt and "encoder.cls_token" in decayed
    with pytest.raises(ConfigError, match=r"optim.no_weight_decay: 'decoder.mask_tokn' matches no parameter"):
        _decay_groups("mae", "optim.no_weight_decay=[decoder.mask_tokn]")
    for bad, message in [("optim.no_weight_decay=cls_token", "optim.no_weight_decay: expected a list"),
                         ("optim.no_weight_decay=[1]", r"optim.no_weight_decay\[0\]: expected a string"),
                         ("optim.no_weight_decay=['']", "optim.no_weight_decay: names must be non-empty")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, TINY_MODEL + [bad])
    assert load_config(None, TINY_MODEL + ["optim.no_weight_decay=[]"]).optim.no_weight_decay == ()


def test_training_loop_uses_the_method_weight_decay_set(tiny_cfg):
    from mimkit.train import pretrain

    result = pretrain(tiny_cfg("method=mae", "train.max_steps=1", "train.epochs=1"))
    groups = torch.load(result.checkpoint, weights_only=True)["optimizer"]["param_groups"]  # keyed by names
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["params"]}
    assert {"encoder.cls_token", "decoder.mask_token"} <= decayed


# ---------------------------------------------------------------- mask.count (issue 36)


def test_mask_count_overrides_the_ratio_in_every_method_that_takes_it():
    from mimkit.methods import build_model

    torch.manual_seed(0)
    grid = ["model.img_size=32"]  # 8 x 8 = 64 patches; ratio 0.75 would mask 48
    for method, extra in [("mae", ["mask.type=random"]), ("mae", ["mask.type=block"]),
                          ("bootmae", ["mask.type=hybrid"]), ("beit", ["mask.type=block"]),
                          ("mcbeit", ["mask.type=random"])]:  # fmt: skip
        cfg = load_config(None, tiny_model(method) + grid + [*extra, "mask.ratio=0.75", "mask.count=40"])
        model = build_model(cfg)
        drawn = model.mask_inputs(torch.Generator().manual_seed(0))
        if "mask" in drawn and method in ("mae", "bootmae"):
            assert int(drawn["mask"].sum()) == 40, (method, extra)
        if method in ("mae", "bootmae"):  # the forward's masking: 40 masked, 24 kept, from noise or the given mask
            out = model(torch.randn(2, 3, 32, 32), **{k: torch.stack([v, v]) for k, v in drawn.items()})
            assert out.mask.sum(1).tolist() == [40.0, 40.0], (method, extra)
        else:
            assert model.num_masked == 40 and int(drawn["mask"].sum()) <= 40
    assert load_config(None, TINY_MODEL + grid + ["mask.type=hybrid", "mask.count=40"]).mask.count == 40


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mask.count=64"], r"^mask.count must be in \[1, 63\] \(patches masked of the 64 given by model.img_size 32"),
        (["mask.count=0"], r"^mask.count must be in \[1, 63\]"),
        (["mask.count=-5"], r"^mask.count must be in \[1, 63\]"),
        (["mask.count=1.5"], r"^mask.count: expected an integer"),
        (["method=emae", "mask.count=48"], r"^mask.count does not compose with method emae"),
        (
            ["method=simmim", "simmim.mask_patch_size=8", "mask.count=30"],
            r"^mask.count does not compose with method simmim",
        ),
        (["mask.type=parallel", "mask.count=48"], r"^mask.count does not compose with method mae / mask.type parallel"),
        (
            ["mask.type=hybrid", "mask.count=20", "mask.hybrid_block_ratio=0.5"],
            r"^mask.hybrid_block_ratio must be in \(0, mask.count / patches 0.3125\]",
        ),
    ],
)
def test_mask_count_is_validated_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, TINY_MODEL + ["model.img_size=32", *overrides])
    assert "\n" not in str(err.value)
