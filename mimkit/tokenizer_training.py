"""Training mimkit's own dVAE tokenizer for BEiT / mc-BEiT: `mimkit tokenizer train CONFIG [key=value ...]`."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torchvision.transforms import v2
from tqdm.auto import tqdm

from mimkit.checkpoint import save_checkpoint
from mimkit.data import open_source, resolve_format
from mimkit.presets import get_preset
from mimkit.tokenizers import DVAE, MINUS_ONE_ONE, DVAESpec, TokenizerError

log = logging.getLogger("mimkit")


def _tokenizer_batches(cfg, size: int, batch_size: int, seed: int):
    """Endless seeded batches of random crops (+ flip) of the configured data, in [-1, 1]."""
    d = cfg.data
    if resolve_format(d.path, d.format) == "webdataset":
        raise TokenizerError("mimkit tokenizer train reads indexable data (folder, .npz, skimage), not WebDataset")
    source = open_source(d.path, d.format, d.root, d.download)
    ops = [v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(d.crop_scale),
                                              interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]  # fmt: skip
    if d.hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MINUS_ONE_ONE[0]), list(MINUS_ONE_ONE[1]))]
    transform = v2.Compose(ops)
    g = torch.Generator().manual_seed(seed)
    n = len(source)
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            yield torch.stack([transform(source.load(int(i))) for i in idx])


def train_tokenizer(cfg, log_every: int = 50) -> dict:
    """Train the mimkit dVAE on cfg.data; write tokenizer.path (a weights_only-loadable dict).
    Gumbel temperature anneals exponentially tau_start -> tau_end; Adam with cosine lr decay."""
    t = cfg.tokenizer
    preset = get_preset(cfg.model.arch)
    img, patch = cfg.model.img_size or preset.img_size, cfg.model.patch_size or preset.patch_size
    size = t.size or (img // patch) * t.downsample
    spec = DVAESpec(t.vocab_size, t.hidden, t.downsample, t.code_dim)
    if t.path is None:
        raise TokenizerError("tokenizer.path: where to write the trained tokenizer is required")
    device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.train.device == "auto" else cfg.train.device))  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = DVAE(spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    batches = _tokenizer_batches(cfg, size, t.batch_size, cfg.train.seed)
    gumbel = torch.Generator().manual_seed(cfg.train.seed + 1)
    history, start = [], time.perf_counter()
    bar = tqdm(total=t.train_steps, desc="tokenizer", unit="step", dynamic_ncols=True) if cfg.train.progress else None
    for step in range(t.train_steps):
        frac = step / max(t.train_steps - 1, 1)
        tau = t.tau_start * (t.tau_end / t.tau_start) ** frac
        for group in opt.param_groups:
            group["lr"] = t.lr * 0.5 * (1 + math.cos(math.pi * frac))
        x = next(batches).to(device)
        loss, rec, kl, logits = model.loss(x, tau, t.kl_weight, gumbel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used = int(logits.argmax(1).unique().numel())
        history.append({"step": step + 1, "loss": float(loss.detach()), "reconstruction": float(rec), "kl": float(kl),
                        "tau": tau, "codes_used": used})  # fmt: skip
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", codes=used, refresh=False)
            bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == t.train_steps:
            log.info("tokenizer step %d/%d loss %.4f rec %.4f kl %.3f tau %.3f codes in batch %d (%.1fs)", step + 1,
                     t.train_steps, history[-1]["loss"], float(rec), float(kl), tau, used, time.perf_counter() - start)  # fmt: skip
    if bar is not None:
        bar.close()
    out = Path(t.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"kind": "mimkit", "spec": dict(spec.__dict__), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
             "image_size": size, "steps": t.train_steps, "final_loss": history[-1]["loss"]}  # fmt: skip
    save_checkpoint(out, state)  # atomic: a kill never leaves a half-written tokenizer
    (out.with_suffix(".jsonl")).write_text("".join(json.dumps(h) + "\n" for h in history))
    return {"path": out, "history": history}
