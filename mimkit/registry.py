"""The method registry: each pretraining method declares itself once, in its own file, with a `MethodSpec`.

Everything that needs to know what a method is — config validation (which sections and mask types it takes,
its own checks, keys it never reads), the weight-decay groups, the training loop's logged values, the report,
evaluation and export (its backbone family), the study harness and the tests — reads the registry, so a new
method is one file plus a recipe. A user registers a method from their own module the same way:

    from mimkit.registry import MethodSpec, register
    register(MethodSpec(name="toy", build=build_toy, reads=("toy",), section=ToyConfig))
    mimkit.pretrain(mimkit.load_config(None, ["method=toy", "toy.width=8"]))

This module sits on the runtime floor: the config reads it, and the methods (two floors up) fill it in when
`mimkit.methods` is imported (the package's `__init__` does that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from mimkit.typed_config import ConfigError

# The config sections every method reads; the method sections (mae, emae, bootmae, beit, simmim, tokenizer and
# the sections users register) are read only by the methods whose spec names them.
COMMON_SECTIONS = ("model", "mask", "data", "optim", "train", "distributed")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, said once.

    Fields:
        name: the value of the config's `method`
        build: config -> the method (an `nn.Module` following mimkit.methods.base.MIMMethod, encoder included)
        summary: one line for the CLI, the docs and the report
        reads: config sections ("mae") or single keys ("beit.temperature") the method reads besides the common
            sections; or a function of the config returning them (when a composition changes what is read). A
            value set elsewhere in a method section is refused.
        mask_types: the mask.type values that compose with it
        reads_mask: False when it draws its own masks from its own section (I-JEPA): a value set in mask.* is refused
        family: the encoder: "vit" (timm VisionTransformer) or "beit" (timm Beit)
        no_weight_decay: parameter names (fnmatch patterns) the official code exempts from weight decay besides
            1-D parameters and biases (the default of optim.no_weight_decay)
        loss_terms: output fields that are parts of the loss, logged and plotted beside it
        logged: other output fields logged each step but not parts of the loss (weights, momenta, accuracies)
        check: the method's own config checks (raise ConfigError with the key), run after the common ones
        block_generator: what mask.block_generator auto means for it (beit | exact)
        needs_tokenizer: pretraining needs a visual tokenizer (tokenizer.kind none is refused)
        rgb_only: it reads 3-channel images only (model.in_chans other than 3 is refused): a tokenizer trained on RGB
            (BEiT, mc-BEiT), a 3-channel head (BootMAE's per-colour bias)
        predicts_pixels: its output `pred` holds per-patch pixels (reconstruction pictures); or a function of the
            config (MAE with mae.target hog predicts HOG features)
        mask_count: takes mask.count (a fixed number of masked patches) instead of mask.ratio
        teachers: state-dict prefixes of frozen copies of the encoder (EMA teachers, e.g. "ema_encoder."): started
            from the encoder's weights when train.init_from gives the encoder only
        section: a config section of its own, a dataclass read under the method's name (for methods defined
            outside mimkit; built-in sections are fields of mimkit.config.Config)
        pool: how evaluation pools its encoder's tokens by default: "cls" (the cls token) or "mean" (the patch
            tokens' mean: encoders without a cls token, I-JEPA); fine-tuning's global pool follows it
        evaluated: the module (attribute and state-dict prefix) that evaluation, embedding and export read: the
            trained "encoder", or a frozen copy of it the paper evaluates (I-JEPA: "target_encoder", its EMA)
        resolution_stages: it pretrains on images smaller than model.img_size (train.resolution_stages): its
            forward takes them, and `mask_inputs_at(img_size)` draws their masks; or a function of the config
    """

    name: str
    build: Callable[[Any], Any]
    summary: str = ""
    reads: tuple[str, ...] | Callable[[Any], Iterable[str]] = ()
    mask_types: tuple[str, ...] = ("random",)
    reads_mask: bool = True
    family: Literal["vit", "beit"] = "vit"
    no_weight_decay: tuple[str, ...] = ()
    loss_terms: tuple[str, ...] = ()
    logged: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    block_generator: Literal["beit", "exact"] = "exact"
    needs_tokenizer: bool = False
    predicts_pixels: bool | Callable[[Any], bool] = True
    rgb_only: bool = False
    mask_count: bool = True
    teachers: tuple[str, ...] = ()
    section: type | None = None
    pool: Literal["cls", "mean"] = "cls"
    evaluated: str = "encoder"
    resolution_stages: bool | Callable[[Any], bool] = False

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"method name {self.name!r} must be an identifier (it is a config value and a section)")
        if self.section is not None and not dataclasses.is_dataclass(self.section):
            raise ValueError(f"method {self.name}: section must be a dataclass, got {self.section!r}")

    def pixels(self, cfg) -> bool:
        """Whether this config's run predicts pixels (pictures of its reconstructions can be drawn)."""
        return bool(self.predicts_pixels(cfg) if callable(self.predicts_pixels) else self.predicts_pixels)

    def takes_resolution_stages(self, cfg) -> bool:
        """Whether this config's run can pretrain on smaller images first (train.resolution_stages)."""
        stages = self.resolution_stages
        return bool(stages(cfg) if callable(stages) else stages)

    def sections_read(self, cfg) -> tuple[str, ...]:
        """The method sections / keys this config's run reads (besides COMMON_SECTIONS)."""
        return tuple(self.reads(cfg) if callable(self.reads) else self.reads)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method. Registering a name twice is refused unless `replace` (e.g. a notebook cell run again)."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered ({_REGISTRY[spec.name].summary or 'built in'})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Registered method names, in alphabetical order."""
    return tuple(sorted(_REGISTRY))


def method_spec(name: str) -> MethodSpec:
    """The spec of a registered method; a one-line ConfigError naming the registered ones otherwise."""
    if name not in _REGISTRY:
        known = ", ".join(method_names()) or "none (import mimkit.methods to register the built-in ones)"
        raise ConfigError(f"method: {name!r} is not a registered method; allowed: {known}")
    return _REGISTRY[name]


def encoder_family(method: str) -> str:
    """ "vit" (timm VisionTransformer) or "beit" (timm Beit): the encoder a method's checkpoints hold; "vit" for a
    name no registered method has (evaluation and export read a checkpoint's encoder only)."""
    spec = _REGISTRY.get(method)
    return spec.family if spec is not None else "vit"


def method_pool(method: str) -> str:
    """How evaluation pools a method's encoder by default (MethodSpec.pool): "cls", or "mean" for an encoder without a
    cls token; "cls" for a name no registered method has."""
    spec = _REGISTRY.get(method)
    return spec.pool if spec is not None else "cls"


def custom_sections() -> dict[str, type]:
    """Sections declared by registered methods (name -> dataclass)."""
    specs = (_REGISTRY[name] for name in method_names())
    return {spec.name: spec.section for spec in specs if spec.section is not None}
