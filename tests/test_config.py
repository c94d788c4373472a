import pytest
import yaml

from mimkit.config import ConfigError, load_config, parse_overrides, to_dict


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
    for recipe in recipes:
        load_config(recipe)


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
