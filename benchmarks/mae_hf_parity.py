"""How close mimkit's MAE is to Hugging Face's ``ViTMAEForPreTraining`` (which reproduces the official code), with
identical weights and masking noise: the cases of tests/test_parity_hf.py (two sizes, norm-pix on / off, HF's SDPA
and eager attention), fp32 on the CPU. Per case: masks equal; the loss's relative difference; the largest absolute
difference of the predictions (at every patch in eval mode, where mimkit decodes every patch as the official
code; at the masked patches in training mode, where mimkit's last decoder block and pixel head skip the cls
token and the visible patches); and the gradients after loss.backward() in training mode, per parameter as
max |g_mimkit - g_hf| / max |g_hf| (the largest over parameters; a fused qkv as one tensor).

    OMP_NUM_THREADS=1 python benchmarks/mae_hf_parity.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from mimkit.machine import cpu_model

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
_spec = importlib.util.spec_from_file_location("test_parity_hf", TESTS / "test_parity_hf.py")
parity = importlib.util.module_from_spec(_spec)
sys.modules["test_parity_hf"] = parity  # its dataclasses look their module up there
_spec.loader.exec_module(parity)


def measure(case, norm_pix: bool, attn: str) -> dict[str, float]:
    mae, hf = parity.build_pair(case, norm_pix, attn)
    imgs, noise = parity.inputs(mae)
    with torch.no_grad():  # eval mode: every patch decoded by both
        ours, ref = mae(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, ref.mask)
    out = {
        "eval pred max abs": (ours.pred - ref.logits).abs().max().item(),
        "eval loss rel": abs(ours.loss.item() - ref.loss.item()) / abs(ref.loss.item()),
    }
    mae.train()
    hf.train()  # no dropout, no drop path: train mode changes only mimkit's readout
    ours, ref = mae(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    masked = ours.mask.bool()
    out["train masked pred max abs"] = (ours.pred[masked] - ref.logits[masked]).abs().max().item()
    out["train masked pred max rel"] = out["train masked pred max abs"] / ref.logits[masked].abs().max().item()
    out["train loss rel"] = abs(ours.loss.item() - ref.loss.item()) / abs(ref.loss.item())
    ours.loss.backward()
    ref.loss.backward()
    worst, where = 0.0, ""
    mapping = parity.key_map(len(mae.encoder.blocks), len(mae.decoder.decoder_blocks))
    theirs: dict[str, list] = {}  # mimkit name -> HF grads in its layout (fused qkv: the q, k, v chunks in order)
    for hf_key, (mk_key, _chunk) in sorted(mapping.items(), key=lambda kv: kv[1][1] or 0):
        theirs.setdefault(mk_key, []).append(hf.get_parameter(hf_key).grad)
    for mk_key, param in mae.named_parameters():
        if param.grad is None:  # the frozen sin-cos tables
            continue
        g_ref = torch.cat(theirs[mk_key]) if len(theirs[mk_key]) > 1 else theirs[mk_key][0]
        rel = (param.grad - g_ref).abs().max().item() / g_ref.abs().max().item()
        if rel > worst:  # the k part of a qkv bias has no gradient (softmax ignores it): rounding on both sides
            worst, where = rel, mk_key
    out["grad max rel"], out["grad worst"] = worst, where
    return out


def main() -> None:
    torch.set_num_threads(1)
    import transformers

    print(f"# {cpu_model()} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | fp32, 1 thread")  # fmt: skip
    print(
        "| case | eval: loss rel | eval: pred max abs | train: loss rel | train: masked pred max abs (rel) | "
        "train: grad max rel (parameter) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, case in parity.CASES.items():
        for norm_pix in (True, False):
            for attn in ("sdpa", "eager"):
                r = measure(case, norm_pix, attn)
                print(f"| {name}, {'norm-pix' if norm_pix else 'raw pixels'}, HF {attn} | {r['eval loss rel']:.1e} | "
                      f"{r['eval pred max abs']:.1e} | {r['train loss rel']:.1e} | "
                      f"{r['train masked pred max abs']:.1e} ({r['train masked pred max rel']:.1e}) | "
                      f"{r['grad max rel']:.1e} ({r['grad worst']}) |")  # fmt: skip


if __name__ == "__main__":
    main()
