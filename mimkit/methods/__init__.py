"""Pretraining methods. Each is one file composing an encoder, a mask generator, a target and a loss."""

from __future__ import annotations

from torch import nn

from mimkit.config import BEIT_METHODS

from mimkit.methods import beit, bootmae, emae, mae


def build_model(cfg) -> nn.Module:
    from mimkit.models import create_encoder

    if cfg.method in BEIT_METHODS:  # timm Beit backbone, built by the method
        return beit.build(cfg)
    m = cfg.model
    encoder = create_encoder(m.arch, m.img_size, m.patch_size, m.drop_path_rate, m.embed_dim, m.depth, m.num_heads)
    builders = {"mae": mae.build, "emae": emae.build, "bootmae": bootmae.build}
    return builders[cfg.method](cfg, encoder)
