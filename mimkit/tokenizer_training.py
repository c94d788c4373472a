"""Training mimkit's own dVAE tokenizer for BEiT / mc-BEiT: `mimkit tokenizer train CONFIG [key=value ...]`."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

from mimkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.data import open_source, resolve_format
from mimkit.engine import StepEngine
from mimkit.logs import progress_bar
from mimkit.loop import due
from mimkit.presets import get_preset
from mimkit.tokenizers import DVAE, MINUS_ONE_ONE, DVAESpec, TokenizerError

log = logging.getLogger("mimkit")


def _tokenizer_batches(cfg, size: int, batch_size: int, g: torch.Generator):
    """Endless batches of random crops (+ flip) of the configured data, in [-1, 1], drawn from `g` alone (so its
    state after a batch is where the stream resumes)."""
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
    n = len(source)
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            yield torch.stack([transform(source.load(int(i))) for i in idx])


def resume_path(path: str | Path) -> Path:
    """Where a tokenizer being trained keeps its progress: beside the tokenizer file."""
    path = Path(path)
    return path.with_name(path.stem + ".resume.pt")


def _settings(cfg) -> dict:
    """What fixes a tokenizer run's result: a resume state written under other settings is refused."""
    t, d = cfg.tokenizer, cfg.data
    skip = {"path", "save_every_steps", "resume", "kind", "interpolation"}
    return {**{f"tokenizer.{k}": v for k, v in t.__dict__.items() if k not in skip},
            "data.path": str(d.path), "data.format": d.format, "data.crop_scale": list(d.crop_scale),
            "data.hflip": d.hflip, "model.arch": cfg.model.arch, "model.img_size": cfg.model.img_size,
            "model.patch_size": cfg.model.patch_size, "train.seed": cfg.train.seed}  # fmt: skip


def _read_resume(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)  # weights_only: plain tensors and containers only
    except CheckpointError as e:
        raise TokenizerError(f"{e}; delete it or set tokenizer.resume=none to start over") from None
    saved = json.loads(state.get("settings", "{}"))
    changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
    if changed:
        k = changed[0]
        raise TokenizerError(f"{path}: a tokenizer run with other settings ({k}: {saved.get(k)!r} there, "
                             f"{settings.get(k)!r} now); delete it or set tokenizer.resume=none to start over")  # fmt: skip
    return state


def train_tokenizer(cfg, log_every: int = 50) -> dict:
    """Train the mimkit dVAE on cfg.data; write tokenizer.path (a weights_only-loadable dict).
    Gumbel temperature anneals exponentially tau_start -> tau_end; Adam with cosine lr decay. Progress is kept
    every tokenizer.save_every_steps steps, and a rerun continues from it bit-identically."""
    t = cfg.tokenizer
    preset = get_preset(cfg.model.arch)
    img, patch = cfg.model.img_size or preset.img_size, cfg.model.patch_size or preset.patch_size
    size = t.size or (img // patch) * t.downsample
    spec = DVAESpec(t.vocab_size, t.hidden, t.downsample, t.code_dim)
    if t.path is None:
        raise TokenizerError("tokenizer.path: where to write the trained tokenizer is required")
    device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.train.device == "auto" else cfg.train.device))  # fmt: skip
    out, settings = Path(t.path), _settings(cfg)
    progress = resume_path(out)
    resumed = _read_resume(progress, settings) if t.resume == "auto" else None
    torch.manual_seed(cfg.train.seed)
    model = DVAE(spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    # one optimizer step per batch, in fp32 (the engine also skips a non-finite one)
    engine = StepEngine(model, opt, device=device, precision="fp32", name="tokenizer", hint="Try a lower tokenizer.lr.")
    data_rng = torch.Generator().manual_seed(cfg.train.seed)
    gumbel = torch.Generator().manual_seed(cfg.train.seed + 1)
    history, first = [], 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        data_rng.set_state(resumed["data_rng"])
        gumbel.set_state(resumed["gumbel_rng"])
        set_rng_state(resumed["rng"])
        history, first = list(resumed["history"]), int(resumed["step"])
        log.info("tokenizer: continuing from step %d (%s)", first, progress)
    batches = _tokenizer_batches(cfg, size, t.batch_size, data_rng)
    start = time.perf_counter()
    bar = (progress_bar(total=t.train_steps, initial=first, desc="tokenizer", unit="step", dynamic_ncols=True)
           if cfg.train.progress else None)  # fmt: skip
    # at low Gumbel temperatures the softmax and its gradient fill with subnormal floats, which CPUs compute slowly
    # (benchmarks/tokenizer_denormals.py: a 1.4-1.5x slower step at tau 1/16); flushed to zero for the loop only
    flushed = torch.set_flush_denormal(True)
    try:
        for step in range(first, t.train_steps):
            frac = step / max(t.train_steps - 1, 1)
            tau = t.tau_start * (t.tau_end / t.tau_start) ** frac
            engine.set_lr(t.lr * 0.5 * (1 + math.cos(math.pi * frac)))
            x = next(batches).to(device)
            codes = []

            def forward(micro: int):
                loss, rec, kl, logits = model.loss(x, tau, t.kl_weight, gumbel)
                codes.append(logits.argmax(1))
                return loss, {"reconstruction": rec, "kl": kl}

            result = engine.step(step, forward)
            used = int(codes[-1].unique().numel())
            rec, kl = result.terms["reconstruction"], result.terms["kl"]
            history.append({"step": step + 1, "loss": result.loss, "reconstruction": rec, "kl": kl, "tau": tau,
                            "codes_used": used})  # fmt: skip
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", codes=used, refresh=False)
                bar.update(1)
            if due(step + 1, log_every) or step + 1 == t.train_steps:
                log.info("tokenizer step %d/%d loss %.4f rec %.4f kl %.3f tau %.3f codes in batch %d (%.1fs)", step + 1,
                         t.train_steps, history[-1]["loss"], rec, kl, tau, used, time.perf_counter() - start)  # fmt: skip
            if due(step + 1, t.save_every_steps) and step + 1 < t.train_steps:
                save_checkpoint(progress, {"step": step + 1, "settings": json.dumps(settings), "history": history,
                                           "model": model.state_dict(), "optimizer": opt.state_dict(),
                                           "data_rng": data_rng.get_state(), "gumbel_rng": gumbel.get_state(),
                                           "rng": rng_state()})  # fmt: skip
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    if bar is not None:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"kind": "mimkit", "spec": dict(spec.__dict__), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
             "image_size": size, "steps": t.train_steps, "final_loss": history[-1]["loss"]}  # fmt: skip
    save_checkpoint(out, state)  # atomic: a kill never leaves a half-written tokenizer
    atomic_write_text(out.with_suffix(".jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    progress.unlink(missing_ok=True)  # only now: a kill before this line repeats the steps since the last save
    return {"path": out, "history": history}
