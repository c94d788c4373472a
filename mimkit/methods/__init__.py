"""Pretraining methods. Each is one file composing an encoder, a mask generator, a target and a loss."""

from __future__ import annotations

from torch import nn

from mimkit.methods import mae


def build_model(cfg) -> nn.Module:
    from mimkit.models import create_encoder

    encoder = create_encoder(cfg.model.arch, cfg.model.img_size, cfg.model.patch_size, cfg.model.drop_path_rate)
    builders = {"mae": mae.build}
    return builders[cfg.method](cfg, encoder)
