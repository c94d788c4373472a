"""MAE decoder token assembly, forward + backward: the official code's cat + gather + cat against mimkit's one
gather from a table of kept rows and the mask token (mimkit.decoders.unshuffle_tokens), at the decoder shapes of
ViT-T/4@32 (batch 256) and ViT-B/16@224 (batch 16). Both give the same tokens bit for bit; the table says how
long each takes and checks that.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/decoder_assembly.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from mimkit.decoders import unshuffle_tokens
from mimkit.machine import cpu_flags, cpu_model


def official_assembly(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    b, num = ids_restore.shape
    patches = torch.cat([x[:, 1:], mask_token.expand(b, num + 1 - x.shape[1], -1)], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


def seconds(fn, args, grad: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).backward(grad)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {cpu_model()} ({', '.join(cpu_flags())}) | {args.threads} thread(s) | torch {torch.__version__} | best of {args.repeats}"
    )
    print(
        "| decoder shape | official cat+gather+cat ms | mimkit one gather ms | speed-up | identical tokens and x grad |"
    )
    print("|---|---:|---:|---:|---|")
    for label, batch, patches, keep, dim in [("ViT-T/4@32 (dec 128), batch 256", 256, 64, 16, 128),
                                             ("ViT-B/16@224 (dec 512), batch 16", 16, 196, 49, 512)]:  # fmt: skip
        torch.manual_seed(0)
        ids_restore = torch.argsort(torch.argsort(torch.rand(batch, patches), dim=1), dim=1)
        x = torch.randn(batch, keep + 1, dim, requires_grad=True)
        token = torch.randn(1, 1, dim, requires_grad=True)
        ref, new = official_assembly(x, token, ids_restore), unshuffle_tokens(x, token, ids_restore)
        grad = torch.randn_like(ref)
        same = torch.equal(ref, new) and torch.equal(*(torch.autograd.grad(t, x, grad)[0] for t in (ref, new)))
        t_ref = seconds(official_assembly, (x, token, ids_restore), grad, args.repeats)
        t_new = seconds(unshuffle_tokens, (x, token, ids_restore), grad, args.repeats)
        print(f"| {label} | {t_ref * 1e3:.2f} | {t_new * 1e3:.2f} | {t_ref / t_new:.2f}x | {same} |")


if __name__ == "__main__":
    main()
