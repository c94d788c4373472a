"""benchmarks/throughput.py: its GEMM list matches its FLOP count, the HF baseline builds the same network
as mimkit, and the input-pipeline timer runs. Small shapes only: no timing is checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.models import set_attention_kernel

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
_spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
throughput = importlib.util.module_from_spec(_spec)
sys.modules["throughput"] = throughput  # its dataclasses look their module up there
_spec.loader.exec_module(throughput)


@pytest.mark.parametrize("name", list(throughput.MODELS))
def test_gemm_list_matches_the_analytic_linear_flops(name):
    spec, batch = throughput.MODELS[name], 3
    flops = throughput.mae_flops_per_image(spec)
    p = throughput.get_preset(spec.arch)
    enc_tokens = throughput.num_visible(p.grid**2, throughput.MASK_RATIO) + 1
    dec_tokens = p.grid**2 + 1
    attention = p.depth * 4 * enc_tokens**2 * p.embed_dim + spec.decoder_depth * 4 * dec_tokens**2 * spec.decoder_dim
    expected = flops["forward"] - flops["patch_embed"] - attention  # what the ceiling's GEMMs cover
    layers = throughput.step_linear_layers(spec, batch)
    assert sum(2 * x.rows * x.in_features * x.out_features * x.count for x in layers) == pytest.approx(batch * expected)
    for layer in layers:  # the two backward products have the forward's FLOPs
        sizes = {m * k * n for m, k, n, _ in throughput.linear_gemms(layer)}
        assert sizes == {layer.rows * layer.in_features * layer.out_features}


@pytest.mark.parametrize("impl", ["mimkit", "mimkit-decode-visible", "mimkit-crossmae"])
def test_the_analytic_count_is_torchs_count_of_the_real_forward(impl):
    from torch.utils.flop_counter import FlopCounterMode

    spec = throughput.MODELS["tiny"]
    model = throughput.build_mae(impl, spec).train()
    set_attention_kernel(model, "eager")  # attention as matmuls, which the counter sees on every device
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    flops = throughput.flops_per_image(spec, impl)
    skipped = 2 * spec.decoder_dim * 4 * 4 * 3 if impl == "mimkit-decode-visible" else 0  # no pixel head at cls
    if impl == "mimkit":  # the official step's count, less the last decoder block and the head at cls + visible rows
        rows, tokens, d = 1 + 16, 1 + 64, spec.decoder_dim  # 64 patches, 16 visible
        skipped = rows * (20 * d * d + 4 * tokens * d + 2 * d * 4 * 4 * 3)  # q, proj, MLP; QK^T, AV; pixel head
    assert counter.get_total_flops() == flops["forward"] - skipped
    if impl == "mimkit-crossmae":  # a quarter of the masked patches, no self-attention: well under half MAE's decoder
        assert flops["decoder"] < throughput.mae_flops_per_image(spec)["decoder"] / 2


@pytest.mark.parametrize("layout", ["x@W^T", "g@W", "g^T@x"])
def test_gemm_rate_runs_every_layout(layout):
    rate = throughput.gemm_gflops(8, 16, 24, layout, torch.float32, torch.device("cpu"), min_seconds=0.001, trials=1)
    assert rate > 0


@pytest.mark.parametrize("name", list(throughput.MODELS))
def test_hf_baseline_has_mimkit_parameters(name):
    spec = throughput.MODELS[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        counts = {impl: throughput.parameter_counts(throughput.build_mae(impl, spec, "fp32", torch.device("meta")))
                  for impl in throughput.IMPLS + throughput.OPTIONAL_IMPLS}  # fmt: skip
    assert all(c == counts["mimkit"] for c in counts.values()), counts


def test_ablation_impls_set_their_kernel():
    spec = throughput.MODELS["tiny"]
    with torch.device("meta"):
        eager = throughput.build_mae("mimkit-eager", spec, "fp32")
        auto_bf16 = throughput.build_mae("mimkit", spec, "bf16")
        sdpa = throughput.build_mae("mimkit-sdpa", spec, "bf16")
    fused = lambda m: {a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")}  # noqa: E731
    assert fused(eager) == {False} and fused(auto_bf16) == {False} and fused(sdpa) == {True}


def test_input_pipeline_timer(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    spec = throughput.MODELS["tiny"]
    # 24 images / batch 4 = 6 batches an epoch: 2 untimed + 5 timed crosses an epoch boundary
    result = throughput.time_input_pipeline(path, spec, batch=4, batches=5, warmup=0, device=torch.device("cpu"))
    assert result["images_per_second"] > 0 and result["num_workers"] == 2 and result["steps_per_epoch"] == 6


def test_profile_prints_the_ops_of_a_step(capsys):
    throughput.profile_training_step(throughput.MODELS["tiny"], "mimkit", "fp32", torch.device("cpu"), batch=2,
                                     warmup=1, rows=5)  # fmt: skip
    out = capsys.readouterr().out
    assert "one training step of mimkit ViT-T/4@32" in out and "aten::" in out and "outside any op" in out
    throughput.profile_training_step(throughput.MODELS["tiny"], "mimkit", "fp32", torch.device("cpu"), batch=2,
                                     warmup=1, rows=5, by_shape=True)  # fmt: skip
    assert "Input Shapes" in capsys.readouterr().out  # split by input shape


def test_interleaved_rounds_time_every_impl_in_rotated_order(monkeypatch):
    calls = []
    real = throughput.timed
    monkeypatch.setattr(
        throughput, "timed", lambda step, steps, device: calls.append(step) or real(step, steps, device)
    )
    out = throughput.time_interleaved(throughput.MODELS["tiny"], ["mimkit", "hf-sdpa"], "fp32", torch.device("cpu"),
                                      batch=2, steps=1, warmup=0, rounds=3)  # fmt: skip
    assert set(out) == {"mimkit", "hf-sdpa"} and all(len(t["per_round"]) == 3 for t in out.values())
    assert all(t["seconds_per_step"] == sorted(t["per_round"])[1] for t in out.values())  # the median
    assert out["mimkit"]["parameters"] == out["hf-sdpa"]["parameters"]
    first, second = calls[0], calls[1]  # round 0: mimkit, hf; round 1: hf, mimkit; round 2: mimkit, hf
    assert calls[2:] == [second, first, first, second] and first is not second
