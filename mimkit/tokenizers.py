"""Visual tokenizers for BEiT / mc-BEiT: image -> logits over a vocabulary on the ViT patch grid.

One small interface, :class:`Tokenizer`: an ``nn.Module`` taking (B, 3, H, W) images *in its own
normalisation* (``mean`` / ``std`` applied to pixels in [0, 1]) and returning logits (B, vocab, H/f, W/f),
f = ``downsample``. Tokenizers are frozen: no parameter requires grad, and they stay in eval mode.

Three kinds:

- ``mimkit``: a small Gumbel-softmax discrete VAE that mimkit trains itself (``mimkit tokenizer train``),
  sized for CIFAR-10 on a CPU. Input in [-1, 1]. Saved as a plain dict of tensors and numbers
  (``torch.load(weights_only=True)``-loadable).
- ``dalle``: OpenAI's DALL-E dVAE *encoder* (vocab 8192, downsample 8, input ``map_pixels`` =
  0.8 x + 0.1), rebuilt here from its public structure. OpenAI publishes ``encoder.pkl``, a pickled
  ``nn.Module``: mimkit never unpickles code. Convert it once, in an environment you trust, to a state
  dict (``torch.save(torch.load('encoder.pkl', weights_only=False).state_dict(), 'dalle_encoder.pth')``
  with the ``dall_e`` package installed) and point ``tokenizer.path`` at that (.pt / .pth / .safetensors).
- ``vqgan``: the encoder + ``quant_conv`` + ``quantize.proj`` of a taming-transformers Gumbel-VQGAN
  (``last.ckpt``, a Lightning checkpoint whose ``state_dict`` holds ``encoder.*``, ``quant_conv.*``,
  ``quantize.proj.*`` among others). Input in [-1, 1]. Loaded with ``weights_only=True`` (plus mimkit's
  allowlist of inert classes); a checkpoint that pickles anything else is refused with the conversion to
  do (re-save ``ckpt['state_dict']`` alone).

The DALL-E and taming architectures are read off the state dict (widths, blocks per group / level,
attention levels, vocabulary), so the loaders work for the published files and for any other checkpoint
of the same layout.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.files import InteropError, load_weights_file

log = logging.getLogger("mimkit")

MINUS_ONE_ONE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [0, 1] -> [-1, 1]
DALLE_EPS = 0.1  # map_pixels: x -> (1 - 2 eps) x + eps, written as (x - mean) / std
DALLE_NORM = ((-DALLE_EPS / (1 - 2 * DALLE_EPS),) * 3, (1 / (1 - 2 * DALLE_EPS),) * 3)


class TokenizerError(MimkitError, ValueError):
    """A tokenizer file that cannot be used, naming the file."""


class Tokenizer(nn.Module):
    """Frozen image -> (B, vocab, h, w) logits. Subclasses set vocab_size, downsample, mean, std and
    implement ``logits``; ``interpolation`` is the resampling of the tokenizer's view (BEiT: lanczos)."""

    vocab_size: int
    downsample: int
    mean: tuple[float, float, float] = MINUS_ONE_ONE[0]
    std: tuple[float, float, float] = MINUS_ONE_ONE[1]
    interpolation: str = "bicubic"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def freeze(self) -> Tokenizer:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Tokenizer:  # frozen: always eval (a model.train() leaves it alone)
        return super().train(False)


# =============================================================================================
# (a) mimkit's own Gumbel-softmax dVAE


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


@dataclass
class DVAESpec:
    vocab_size: int = 512
    hidden: int = 64  # width after the first downsampling; doubles at each further one
    downsample: int = 4  # power of two: image side / grid side
    code_dim: int = 64


class DVAE(nn.Module):
    """Conv encoder to (vocab) logits on the grid, Gumbel-softmax relaxation over a codebook, conv decoder.
    Trained with pixel MSE (in [-1, 1]) + kl_weight * KL(q || uniform), as DALL-E / taming's GumbelQuantize."""

    def __init__(self, spec: DVAESpec):
        super().__init__()
        stages = int(round(math.log2(spec.downsample)))
        if 2**stages != spec.downsample or stages < 1:
            raise ValueError(f"tokenizer.downsample must be a power of two >= 2, got {spec.downsample}")
        self.spec = spec
        widths = [spec.hidden * 2**i for i in range(stages)]
        enc: list[nn.Module] = []
        cin = 3
        for w in widths:
            enc += [nn.Conv2d(cin, w, 4, stride=2, padding=1), ResBlock(w)]
            cin = w
        enc += [nn.ReLU(), nn.Conv2d(cin, spec.vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(spec.vocab_size, spec.code_dim)
        dec: list[nn.Module] = [nn.Conv2d(spec.code_dim, widths[-1], 1), ResBlock(widths[-1])]
        for i in reversed(range(stages)):
            cout = widths[i - 1] if i > 0 else spec.hidden
            dec += [nn.ReLU(), nn.ConvTranspose2d(widths[i], cout, 4, stride=2, padding=1)]
            if i > 0:
                dec.append(ResBlock(cout))
        dec += [nn.ReLU(), nn.Conv2d(spec.hidden, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def decode(self, soft_one_hot: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bnhw,nd->bdhw", soft_one_hot, self.codebook.weight)
        return self.decoder(z)

    def loss(self, x: torch.Tensor, tau: float, kl_weight: float, generator: torch.Generator | None = None):
        logits = self.encoder(x)
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).to(logits).clamp(1e-9, 1 - 1e-9)))
        soft = F.softmax((logits + gumbel) / tau, dim=1)
        rec = F.mse_loss(self.decode(soft), x)
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * (logq + math.log(self.spec.vocab_size))).sum(1).mean()
        return rec + kl_weight * kl, rec.detach(), kl.detach(), logits.detach()


class MimkitTokenizer(Tokenizer):
    """The encoder of a :class:`DVAE` (kind ``mimkit``); input in [-1, 1]."""

    def __init__(self, spec: DVAESpec):
        super().__init__()
        self.vocab_size, self.downsample, self.spec = spec.vocab_size, spec.downsample, spec
        self.dvae = DVAE(spec)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.dvae.encoder(x)


# =============================================================================================
# (b1) DALL-E dVAE encoder (openai/DALL-E dall_e/encoder.py), parameters named 'w' / 'b'


class DalleConv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw**2)))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class DalleEncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv2d(n_hid, n_out, 1)),
        ]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(Tokenizer):
    """4 groups of n_blk_per_group blocks at widths n_hid x (1, 2, 4, 8), max-pool 2 after groups 1-3
    (downsample 8), 7x7 input conv, ReLU + 1x1 output conv to the vocabulary. Input: map_pixels(x)."""

    mean, std = DALLE_NORM
    interpolation = "lanczos"

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, input_channels: int = 3):
        super().__init__()
        self.vocab_size, self.downsample = vocab_size, 8
        n_layers = 4 * n_blk_per_group

        def group(n_in: int, n_out: int, pool: bool) -> nn.Sequential:
            blocks: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DalleEncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                for i in range(n_blk_per_group)
            ]
            if pool:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(blocks))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(input_channels, n_hid, 7)),
            ("group_1", group(n_hid, n_hid, True)),
            ("group_2", group(n_hid, 2 * n_hid, True)),
            ("group_3", group(2 * n_hid, 4 * n_hid, True)),
            ("group_4", group(4 * n_hid, 8 * n_hid, False)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DalleConv2d(8 * n_hid, vocab_size, 1))]))),
        ]))  # fmt: skip

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).float()


def dalle_from_state_dict(sd: dict[str, torch.Tensor], path: str = "") -> DalleEncoder:
    try:
        n_hid = sd["blocks.input.w"].shape[0]
        vocab = sd["blocks.output.conv.w"].shape[0]
    except KeyError as e:
        raise TokenizerError(f"{path}: not a DALL-E encoder state dict (missing {e}; expected blocks.input.w, "
                             "blocks.group_N.block_M.res_path.conv_K.w, blocks.output.conv.w)") from None  # fmt: skip
    n_blk = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
    return _build_exact(lambda: DalleEncoder(n_hid, n_blk, vocab), sd, path, "DALL-E encoder")


# =============================================================================================
# (b2) taming-transformers Gumbel-VQGAN encoder (taming/modules/diffusionmodules/model.py)


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=ch, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class TamingResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # dropout 0 in the released configs
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TamingAttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class TamingDownsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class TamingEncoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_levels: Set[int],
                 z_channels: int, in_channels: int = 3):  # fmt: skip
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(TamingResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if level in attn_levels:
                    down.attn.append(TamingAttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = TamingDownsample(block_in)
            self.down.append(down)
        self.mid: Any = nn.Module()  # a namespace of taming's state-dict names
        self.mid.block_1 = TamingResnetBlock(block_in, block_in)
        self.mid.attn_1 = TamingAttnBlock(block_in)
        self.mid.block_2 = TamingResnetBlock(block_in, block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in cast(Iterable[Any], self.down):  # namespace modules: block, attn, downsample (taming's names)
            for i in range(self.num_res_blocks):
                h = down.block[i](h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class _GumbelProj(nn.Module):
    def __init__(self, z_channels: int, n_embed: int):
        super().__init__()
        self.proj = nn.Conv2d(z_channels, n_embed, 1)


class TamingGumbelTokenizer(Tokenizer):
    """logits = quantize.proj(quant_conv(encoder(x))): the pre-Gumbel logits of taming's GumbelQuantize.
    Input in [-1, 1]; the released OpenImages f=8 model has 8192 codes (ch 128, ch_mult 1,1,2,4)."""

    interpolation = "lanczos"

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 4), num_res_blocks: int = 2,
                 attn_levels: Set[int] = frozenset({3}), z_channels: int = 256, embed_dim: int = 256,
                 n_embed: int = 8192):  # fmt: skip
        super().__init__()
        self.vocab_size, self.downsample = n_embed, 2 ** (len(ch_mult) - 1)
        self.encoder = TamingEncoder(ch, tuple(ch_mult), num_res_blocks, set(attn_levels), z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = _GumbelProj(embed_dim, n_embed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.proj(self.quant_conv(self.encoder(x))).float()


TAMING_PREFIXES = ("encoder.", "quant_conv.", "quantize.proj.")


def taming_from_state_dict(sd: dict[str, torch.Tensor], path: str = "") -> TamingGumbelTokenizer:
    sd = {k: v for k, v in sd.items() if k.startswith(TAMING_PREFIXES)}
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        z_channels = sd["encoder.conv_out.weight"].shape[0]
        embed_dim = sd["quant_conv.weight"].shape[0]
        n_embed = sd["quantize.proj.weight"].shape[0]
    except KeyError as e:
        raise TokenizerError(f"{path}: not a taming Gumbel-VQGAN state dict (missing {e}; expected encoder.*, "
                             "quant_conv.*, quantize.proj.*)") from None  # fmt: skip
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    ch_mult = tuple(sd[f"encoder.down.{lv}.block.0.conv1.weight"].shape[0] // ch for lv in levels)
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    attn_levels = {lv for lv in levels if f"encoder.down.{lv}.attn.0.q.weight" in sd}
    return _build_exact(lambda: TamingGumbelTokenizer(ch, ch_mult, num_res_blocks, attn_levels, z_channels, embed_dim,
                                                      n_embed), sd, path, "taming Gumbel-VQGAN encoder")  # fmt: skip


# =============================================================================================
# loading


def _build_exact(build, sd: dict[str, torch.Tensor], path: str, what: str, part=lambda m: m):
    """build() holding exactly the tensors of `sd` (in part(model)): the layout is checked on a model built on the
    meta device first, so sizes read from a file never allocate a model larger than the file's own tensors."""
    with torch.device("meta"):
        _check_exact(part(build()), sd, path, what)
    model = build()
    _load_exact(part(model), sd, path, what)
    return model


def _check_exact(model: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise TokenizerError(
            f"{path}: does not match the {what} layout: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {bad[:5]}"
        )


def _load_exact(model: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    _check_exact(model, sd, path, what)
    model.load_state_dict(sd)


def _read(path: str | Path) -> Any:
    try:
        return load_weights_file(path)
    except InteropError as e:
        raise TokenizerError(str(e)) from None


def load_tokenizer(kind: str, path: str | None = None, spec: DVAESpec | None = None, seed: int = 0) -> Tokenizer:
    """A frozen tokenizer. kind: mimkit | dalle | vqgan (weights from `path`) or random (an untrained
    mimkit dVAE encoder built from `spec` and `seed`: a baseline and for tests)."""
    if kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MimkitTokenizer(spec or DVAESpec()).freeze()
    if path is None:
        raise TokenizerError(f"tokenizer.path is required for tokenizer.kind {kind}")
    if not Path(path).is_file():
        hint = ("; train one with `mimkit tokenizer train configs/tokenizer_cifar10.yaml` (it writes tokenizer.path)"
                if kind == "mimkit" else "")  # fmt: skip
        raise FileNotFoundError(f"tokenizer.path: {path} does not exist{hint}")
    obj = _read(path)
    try:
        tok = _from_file(kind, obj, path)
    except MimkitError:
        raise
    except Exception as e:  # a file that loads but does not describe a tokenizer (odd sizes, wrong types)
        detail = " ".join(str(e).split())[:200]
        raise TokenizerError(f"{path}: not a usable {kind} tokenizer ({type(e).__name__}: {detail})") from None
    return tok.freeze()


_SPEC_LIMITS = {"vocab_size": (2, 1 << 20), "hidden": (1, 4096), "downsample": (2, 64), "code_dim": (1, 4096)}


def _from_file(kind: str, obj: Any, path) -> Tokenizer:
    if kind == "mimkit":
        if not (isinstance(obj, dict) and obj.get("kind") == "mimkit" and "state_dict" in obj):
            raise TokenizerError(f"{path}: not a mimkit tokenizer (write one with `mimkit tokenizer train`)")
        spec = obj.get("spec")
        if not isinstance(spec, dict) or set(spec) - set(_SPEC_LIMITS):
            raise TokenizerError(f"{path}: not a mimkit tokenizer ('spec' must be a dict of {', '.join(_SPEC_LIMITS)})")
        for key, value in spec.items():
            lo, hi = _SPEC_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise TokenizerError(f"{path}: spec {key} {value!r} is not an integer in [{lo}, {hi}]")
        if not isinstance(obj["state_dict"], dict):
            raise TokenizerError(f"{path}: not a mimkit tokenizer ('state_dict' is not a dict)")
        return _build_exact(lambda: MimkitTokenizer(DVAESpec(**spec)), obj["state_dict"], str(path), "mimkit dVAE",
                            part=lambda tok: tok.dvae)  # fmt: skip
    if kind == "dalle":
        return dalle_from_state_dict(_state_dict_of(obj, path), str(path))
    if kind == "vqgan":
        return taming_from_state_dict(_state_dict_of(obj, path), str(path))
    raise TokenizerError(f"unknown tokenizer.kind {kind!r}")


def _state_dict_of(obj: Any, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TokenizerError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint with 'state_dict')")
    return dict(obj)
