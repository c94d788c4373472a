"""The CUDA branches of training, run on every device the machine has (the `device` fixture: cpu, and cuda where
present; benchmarks/gpu_check.sh runs this module on a GPU).

Precision: the method steps run in bf16 on both devices. On this project's CPUs (no AVX512-BF16 / AMX) bf16
autocast is slower than fp32 but the models here are tiny, so it costs seconds and exercises the same autocast
branches as CUDA does.

Resume bit-identity on CUDA needs torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG=:4096:8,
which gpu_check.sh exports before Python starts): without it, atomics in cuBLAS split-K reductions, the
gather / scatter-add backward of masking and the fused attention backward may sum in any order. It holds on
one GPU model and software stack only; across GPU models or library versions results are not bit-identical.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import METHODS as REGISTERED

from mimkit.checkpoint import load_checkpoint
from mimkit.methods import build_model
from mimkit.models import compile_blocks
from mimkit.train import pretrain

METHODS = {m: [f"method={m}"] for m in REGISTERED}  # every registered method, its defaults


def on(device: torch.device, *overrides: str) -> list[str]:
    return [f"train.device={device.type}", "train.compile=false", *overrides]


def step_losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, result.metrics.read_text().splitlines()) if "loss" in r}


@pytest.fixture
def deterministic(device, monkeypatch):
    if device.type != "cuda":
        yield
        return
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_in_bf16(tiny_cfg, device, method):
    """Two optimizer steps under bf16 autocast: a finite loss that is the fp32 loss to bf16 accuracy (same weights,
    images and masks at step 1), and weights that moved."""
    args = [*METHODS[method], "train.max_steps=2"]
    bf16 = pretrain(tiny_cfg(*on(device, "train.precision=bf16", *args), out=f"{method}-bf16"))
    fp32 = pretrain(tiny_cfg(*on(device, "train.precision=fp32", *args), out=f"{method}-fp32"))
    lb, lf = step_losses(bf16), step_losses(fp32)
    assert all(torch.isfinite(torch.tensor(list(lb.values()))))
    assert abs(lb[1] - lf[1]) <= 0.05 * abs(lf[1]), (lb[1], lf[1])
    state = load_checkpoint(bf16.checkpoint)
    assert state["config"]["train"]["precision"] == "bf16" and state["step"] == 2
    torch.manual_seed(0)  # the weights the run started from (pretrain seeds with train.seed=0 before building)
    initial = build_model(tiny_cfg(*args)).state_dict()
    moved = [k for k, v in state["model"].items()
             if k in initial and v.is_floating_point() and not torch.equal(v, initial[k])]  # fmt: skip
    assert any(k.startswith("encoder.") for k in moved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical(tiny_cfg, device, deterministic, precision):
    common = on(device, f"train.precision={precision}", "train.keep_last=10")
    straight = pretrain(tiny_cfg(*common, "train.max_steps=6", out="straight"))
    pretrain(tiny_cfg(*common, "train.max_steps=3", out="resumed"))  # 8 steps an epoch: stops mid-epoch
    resumed = pretrain(tiny_cfg(*common, "train.max_steps=6", out="resumed"))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la, lb = step_losses(straight), step_losses(resumed)
    assert [la[s] for s in range(4, 7)] == [lb[s] for s in range(4, 7)]


@pytest.mark.parametrize("case", ["tiny", "small"])
def test_forward_matches_hf_vitmae_in_fp32(device, case, no_tf32):
    """tests/test_parity_hf.py on `device`. cuDNN's TF32 convolutions (on by default for the patch embedding) are
    switched off: fp32 means fp32. On CUDA mimkit's fused qkv and HF's three projections run different GEMM
    kernels (other summation orders), so the bounds are 2e-5 in norm and 1e-4 per element instead of 1e-5."""
    parity = pytest.importorskip("test_parity_hf")
    mae, hf = parity.build_pair(parity.CASES[case], norm_pix_loss=True, attn="sdpa")
    imgs, noise = parity.inputs(mae)
    mae, hf, imgs, noise = mae.to(device), hf.to(device), imgs.to(device), noise.to(device)
    with torch.no_grad():
        ours, ref = mae(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, ref.mask) and ours.pred.std() > 0.1
    assert parity.rel_err(ours.pred, ref.logits) < (parity.RTOL if device.type == "cpu" else 2e-5)
    rtol = parity.RTOL if device.type == "cpu" else 1e-4
    torch.testing.assert_close(ours.pred, ref.logits, rtol=rtol, atol=parity.ATOL_PRED)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("device", ["cuda"], indirect=True)  # CPU: tests/test_kernels.py (inductor's C++ build is slow)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["mae"])  # BootMAE's blocks: test_kernels.py on the CPU (compile time, here)
def test_compiled_blocks_give_the_eager_loss(tiny_cfg, device, method, precision):
    torch.manual_seed(0)
    eager = build_model(tiny_cfg(*METHODS[method])).to(device)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, device)
    imgs, noise = torch.randn(8, 3, 16, 16, device=device), torch.rand(8, 16, device=device)
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(imgs, noise=noise)
        out.loss.backward()
        losses.append(out.loss.float())
    # bf16: fused kernels keep intermediates in fp32 where eager rounds them to bf16 between ops
    loss_rtol, grad_tol = (1e-5, (1e-3, 1e-5)) if precision == "fp32" else (1e-2, (5e-2, 5e-3))
    torch.testing.assert_close(losses[1], losses[0], rtol=loss_rtol, atol=1e-6)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=grad_tol[0], atol=grad_tol[1], msg=name)
