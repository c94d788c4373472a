"""Pretraining methods. Each is one file composing an encoder, a mask generator, a target and a loss, and
declaring itself once with a `MethodSpec` (mimkit.registry) that everything else reads."""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from typing import cast

from torch import nn

from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder  # noqa: F401 (the contract, for users)
from mimkit.registry import MethodSpec, method_names, method_spec, register  # noqa: F401
from mimkit.typed_config import ConfigError

# every file of this package but the contract declares its method(s) when imported: a new method is a new file here
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")


def build_model(cfg) -> MIMMethod:
    """The method `cfg.method` names, built from its registered spec (every method is a MIMMethod)."""
    return cast(MIMMethod, method_spec(cfg.method).build(cfg))


def no_weight_decay_names(model: nn.Module, cfg) -> set[str]:
    """Names of the parameters `optim.no_weight_decay` exempts (default: the method's official set, its spec's
    `no_weight_decay`), for timm's ``param_groups_weight_decay(..., no_weight_decay_list=...)``, which also exempts
    1-D params and biases."""
    patterns = cfg.optim.no_weight_decay
    chosen_by_user = patterns is not None
    if patterns is None:
        patterns = method_spec(cfg.method).no_weight_decay
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
