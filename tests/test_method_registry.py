"""Each method declares itself once (mimkit.registry): a method written outside mimkit, in this file, registers
and then pretrains, resumes bit-identically, runs k-NN and exports to timm with no edit under mimkit/; every
registered method refuses a value set in a section it does not read, in one line naming the key and the method."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from conftest import METHODS, tiny_model, trains_resumes_evaluates_and_exports
from torch import nn

from mimkit.config import BUILTIN_METHOD_SECTIONS, Config, ConfigError, load_config, sections_used, to_dict
from mimkit.losses import masked_mse
from mimkit.masking import VisibleTokenMasks, visible_token_masks
from mimkit.methods import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.models import encode_visible, patchify
from mimkit.registry import MethodSpec, method_names, method_spec, register, unregister

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a method from outside mimkit


@dataclass
class ToyConfig:
    """The toy method's own section, `toy:` in YAML and `toy.key=value` on the command line."""

    head_bias: bool = True
    smooth: float = 0.0  # added to the target before the loss (something to set)


class ToyOutput(NamedTuple):
    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    masked_share: torch.Tensor  # logged beside the loss, not a part of it


class Toy(MIMMethod):
    """The encoder sees the visible patches; one linear layer per token predicts every patch's pixels from the
    mean visible token plus a learned position code; MSE on the masked patches."""

    def __init__(self, encoder, mask_ratio: float, head_bias: bool, smooth: float):
        super().__init__()
        self.encoder, self.smooth, self.mask_ratio = encoder, smooth, mask_ratio
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        self.masks = VisibleTokenMasks("random", tuple(encoder.patch_embed.grid_size), mask_ratio)
        self.position = nn.Parameter(torch.zeros(1, self.num_patches, encoder.embed_dim))
        nn.init.normal_(self.position, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size**2 * 3, bias=head_bias)

    def mask_inputs(self, generator):
        return self.masks(generator)

    def forward(self, imgs, noise=None):
        masking = visible_token_masks(imgs.shape[0], self.num_patches, self.mask_ratio, noise=noise, device=imgs.device)
        latent = encode_visible(self.encoder, imgs, masking.ids_keep)
        pred = self.head(latent[:, 1:].mean(1, keepdim=True) + self.position)
        target = patchify(imgs.float(), self.patch_size) + self.smooth
        loss = masked_mse(pred, target, masking.mask)
        return ToyOutput(loss, pred.clone(), masking.mask, masking.mask.mean().detach())


def build_toy(cfg) -> Toy:
    return set_layer_norm_eps(Toy(vit_encoder(cfg), cfg.mask.ratio, cfg.toy.head_bias, cfg.toy.smooth),
                              cfg.model.layer_norm_eps)  # fmt: skip


def check_toy(cfg) -> None:
    if cfg.toy.smooth < 0:
        raise ConfigError(f"toy.smooth must be >= 0, got {cfg.toy.smooth}")


@pytest.fixture
def toy():
    spec = register(MethodSpec(name="toy", build=build_toy, check=check_toy, reads=("toy",), section=ToyConfig,
                               summary="a test's own method", logged=("masked_share",)))  # fmt: skip
    yield spec
    unregister("toy")


def test_a_method_defined_outside_mimkit_pretrains_resumes_evaluates_and_exports(toy, tiny_cfg, tmp_path):
    assert "toy" in method_names() and method_spec("toy") is toy
    a, checkpoint = trains_resumes_evaluates_and_exports(tiny_cfg, tmp_path, "method=toy", "toy.smooth=0.5",
                                                         "model.drop_path_rate=0.1")  # fmt: skip
    assert a["method"] == "toy" and {"position", "head.weight", "head.bias"} <= set(a["model"])
    # its section is saved with the run, and its logged value reaches the metrics
    assert a["config"]["toy"] == {"head_bias": True, "smooth": 0.5} and "mae" not in a["config"]
    config, metrics = checkpoint.parent / "config.yaml", checkpoint.parent / "metrics.jsonl"
    assert "masked_share:" not in config.read_text() and "toy:\n" in config.read_text()
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert records and all(abs(r["masked_share"] - 0.75) < 1e-6 for r in records)
    knn = json.loads((tmp_path / "knn" / "metrics.json").read_text())  # `mimkit knn` scored its checkpoint
    assert 0.0 <= knn["top1"] <= 100.0 and knn["feature_dim"] == 32


def test_a_registered_method_checks_its_own_section(toy):
    with pytest.raises(ConfigError, match=r"^toy.smooth must be >= 0, got -1.0$"):
        load_config(None, tiny_model("toy") + ["toy.smooth=-1"])
    with pytest.raises(ConfigError, match=r"^toy.smooth: method mae does not read it"):
        load_config(None, tiny_model("mae") + ["toy.smooth=0.5"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'toy.smoth'"):
        load_config(None, tiny_model("toy") + ["toy.smoth=0.5"])


def test_registering_a_name_twice_is_refused(toy):
    with pytest.raises(ValueError, match="method 'toy' is already registered"):
        register(MethodSpec(name="toy", build=build_toy))
    with pytest.raises(
        ConfigError,
        match="^" + re.escape(f"method: 'tyo' is not a registered method; allowed: {', '.join(method_names())}") + "$",
    ):
        load_config(None, ["method=tyo"])
    assert {"mae", "simmim", "toy"} <= set(method_names())


# ---------------------------------------------------------------- keys a method does not read


def _another_value(tp, default):
    """A valid value of a config field other than its default, or None when there is no simple one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next((a for a in args if a != default), None)
    if origin in (typing.Union, types.UnionType):
        simple = [a for a in args if a in (bool, int, float, str) or typing.get_origin(a) is typing.Literal]
        return _another_value(simple[0], default) if simple else None
    if tp is bool:
        return not default
    if tp in (int, float):
        return (default or 0) + 1
    return None


@pytest.mark.parametrize("method", METHODS)
def test_a_value_in_a_section_the_method_does_not_read_is_refused_in_one_line(method):
    cfg = load_config(None, tiny_model(method))
    used = sections_used(cfg)
    hints = typing.get_type_hints(Config)
    refused = 0
    for section in BUILTIN_METHOD_SECTIONS:
        keys = used.get(section, set())
        if keys is None:
            continue
        section_type = hints[section]
        field_types = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            value = _another_value(field_types[f.name], getattr(section_type(), f.name))
            if f.name in keys or value is None:
                continue
            override = f"{section}.{f.name}={str(value).lower() if isinstance(value, bool) else value}"
            with pytest.raises(ConfigError) as e:
                load_config(None, tiny_model(method) + [override])
            message = str(e.value)
            assert message.startswith(f"{section}.{f.name}: method {method} does not read it") and "\n" not in message
            refused += 1
            break  # one key per section keeps the test fast; every section is tried
    assert refused >= 3, f"{method}: only {refused} unread sections tried"
    # and the config it saves holds only what it reads
    saved = to_dict(cfg)
    assert {k for k in saved if k in BUILTIN_METHOD_SECTIONS} == {k for k in used if k in BUILTIN_METHOD_SECTIONS}


def test_a_saved_config_of_an_earlier_version_with_every_section_still_loads():
    from mimkit.config import config_from_dict

    full = {**to_dict(load_config(None, tiny_model("simmim"))), "mae": {"decoder_dim": 64}, "beit": {"omega": 0.5}}
    cfg = config_from_dict(full)  # the sections simmim never read are reset: they changed nothing then either
    assert cfg.method == "simmim" and cfg.mae.decoder_dim == 512 and cfg.beit.omega == 0.2


def test_mimkit_methods_lists_every_registered_method(toy, capsys):
    from mimkit.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(method_names()) and lines[-1].split()[0] == "toy"
    assert "a test's own method" in lines[-1] and lines[method_names().index("beit")].split()[1] == "beit"


def test_a_method_that_draws_its_own_masks_refuses_mask_keys():
    """I-JEPA's masks come from its own section (ijepa.*): a mask.* value would do nothing."""
    assert not method_spec("ijepa").reads_mask and method_spec("mae").reads_mask
    with pytest.raises(ConfigError, match=r"^mask.ratio: method ijepa does not read it"):
        load_config(None, tiny_model("ijepa") + ["mask.ratio=0.5"])
    from mimkit.config import config_from_dict, resolved

    saved = to_dict(resolved(load_config(None, tiny_model("ijepa"))))  # the resolved block generator is written out
    assert config_from_dict(saved).method == "ijepa" and load_config(None, tiny_model("ijepa")).mask.ratio == 0.75
