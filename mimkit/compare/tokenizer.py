"""The codebook statistics of a BEiT study's tokenizer."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mimkit.files import load_weights_file
from mimkit.tokenizers import DVAE, DVAESpec, load_tokenizer


@torch.no_grad()
def tokenizer_stats(path: str, kind: str, grid: int, test_source, history: Path | None, batch_size: int = 128) -> dict:
    """Codebook usage and reconstruction error of a BEiT tokenizer on the test images: distinct codes per batch and
    over the set, the perplexity exp(entropy) of the code histogram, and (mimkit dVAE) the pixel MSE, in [-1, 1], of
    decoding each image's argmax codes, also as a fraction of the pixel variance. Its view: the ViT grid x its
    downsampling (a mimkit file's own size). `history`: its training log."""
    tok = load_tokenizer(kind, path)
    dvae, view = None, grid * tok.downsample
    if kind == "mimkit":
        saved = load_weights_file(path)
        dvae = DVAE(DVAESpec(**saved["spec"])).eval()
        dvae.load_state_dict(saved["state_dict"])
        view = int(saved.get("image_size") or view)
    transform = v2.Compose([v2.ToImage(), v2.Resize(view, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(view), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(tok.mean), list(tok.std))])  # fmt: skip
    counts, per_batch, squared, total, variance = torch.zeros(tok.vocab_size), [], 0.0, 0, []
    for lo in range(0, len(test_source), batch_size):
        x = torch.stack([transform(test_source.load(i)) for i in range(lo, min(lo + batch_size, len(test_source)))])
        codes = tok.logits(x).argmax(1)
        per_batch.append(int(codes.unique().numel()))
        counts += torch.bincount(codes.flatten(), minlength=tok.vocab_size).float()
        if dvae is not None:
            rec = dvae.decode(F.one_hot(codes, tok.vocab_size).permute(0, 3, 1, 2).float())
            squared, total = squared + float(((rec - x) ** 2).sum()), total + x.numel()
            variance.append(float(x.var()))
    p = counts[counts > 0] / counts.sum()
    stats = {"path": str(path), "kind": kind, "vocab_size": tok.vocab_size, "view_px": view,
             "test_images": len(test_source), "batch_size": batch_size,
             "codes_per_batch": round(statistics.mean(per_batch), 1), "codes_used": int((counts > 0).sum()),
             "perplexity": round(float(torch.exp(-(p * p.log()).sum())), 1)}  # fmt: skip
    if dvae is not None:
        stats["reconstruction_mse"] = round(squared / total, 5)
        stats["reconstruction_vs_variance"] = round(squared / total / statistics.mean(variance), 4)
    if history is not None and history.is_file():
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 10) :]  # the last tenth of training
        stats["train_steps"] = len(rows)
        stats["train_codes_per_batch"] = round(statistics.mean(r["codes_used"] for r in tail), 1)
        stats["train_reconstruction"] = round(statistics.mean(r["reconstruction"] for r in tail), 5)
    return stats
