"""Pretraining methods. Each is one file composing an encoder, a mask generator, a target and a loss."""

from __future__ import annotations

import fnmatch

from torch import nn

from mimkit.config import BEIT_METHODS, ConfigError
from mimkit.methods import beit, bootmae, emae, mae, simmim
from mimkit.models import create_encoder


def build_model(cfg) -> nn.Module:
    if cfg.method in BEIT_METHODS:  # timm Beit backbone, built by the method
        return beit.build(cfg)
    m = cfg.model
    encoder = create_encoder(m.arch, m.img_size, m.patch_size, m.drop_path_rate, m.embed_dim, m.depth, m.num_heads)
    builders = {"mae": mae.build, "emae": emae.build, "bootmae": bootmae.build, "simmim": simmim.build}
    if cfg.method == "mae" and cfg.mask.type == "parallel":  # MAE's parts + parallel masks + consistency = EMAE
        return set_layer_norm_eps(emae.build(cfg, encoder), m.layer_norm_eps)
    return set_layer_norm_eps(builders[cfg.method](cfg, encoder), m.layer_norm_eps)


def set_layer_norm_eps(module: nn.Module, eps: float) -> nn.Module:
    """Every LayerNorm module of `module` with this eps (model.layer_norm_eps; 1e-6 is what the builders use)."""
    if eps != 1e-6:
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.eps = eps
    return module


# Parameters the official code exempts from weight decay besides 1-D ones and biases (which it never decays) and
# frozen ones (never optimised), in mimkit's names. MAE: timm's add_weight_decay with an empty skip list, so its cls
# and mask tokens are decayed. BootMAE, BEiT, mc-BEiT: the model's no_weight_decay() = {pos_embed, cls_token}, the
# encoder's (mask tokens, and BEiT's relative position bias table, are decayed). EMAE has no public code: MAE's.
OFFICIAL_NO_WEIGHT_DECAY: dict[str, tuple[str, ...]] = {
    "mae": (),
    "emae": (),
    "bootmae": ("encoder.pos_embed", "encoder.cls_token"),
    "beit": ("encoder.pos_embed", "encoder.cls_token"),
    "mcbeit": ("encoder.pos_embed", "encoder.cls_token"),
    "simmim": ("encoder.pos_embed", "encoder.cls_token", "mask_token"),  # its model's no_weight_decay()
}


def no_weight_decay_names(model: nn.Module, cfg) -> set[str]:
    """Names of the parameters `optim.no_weight_decay` exempts (default: the method's official set), for
    timm's ``param_groups_weight_decay(..., no_weight_decay_list=...)``, which also exempts 1-D params and biases."""
    patterns = cfg.optim.no_weight_decay
    chosen_by_user = patterns is not None
    if patterns is None:
        patterns = OFFICIAL_NO_WEIGHT_DECAY[cfg.method]
    names = [name for name, _ in model.named_parameters()]
    exempt: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if chosen_by_user and not hits:
            examples = ", ".join(n for n in names if n.count(".") <= 1)[:200]
            raise ConfigError(f"optim.no_weight_decay: {pattern!r} matches no parameter of the {cfg.method} model "
                              f"(names look like: {examples})")  # fmt: skip
        exempt.update(hits)
    return exempt
