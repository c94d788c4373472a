"""Kernel choices of the training loop change speed, never the numbers: train.attention (fused SDPA or plain
matmul-softmax-matmul) and train.compile (blocks compiled in place, same names)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import mimkit.models
from mimkit.methods import build_model
from mimkit.models import (
    compile_blocks,
    cpu_compiler,
    resolve_attention,
    resolve_compile,
    set_attention_kernel,
    transformer_blocks,
)
from mimkit.train import pretrain


def assert_same_training_step(reference: torch.nn.Module, other: torch.nn.Module) -> None:
    """Same loss and gradients for one forward / backward on the same images and masking noise."""
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    losses = []
    for model in (reference, other):
        torch.manual_seed(1)
        out = model(imgs, noise=noise)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_ref), (_, p_other) in zip(reference.named_parameters(), other.named_parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_other.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, "bf16") == "eager" and resolve_attention("auto", cpu, "fp16") == "eager"
    assert resolve_attention("auto", cpu, "fp32") == "sdpa" and resolve_attention("auto", cuda, "bf16") == "sdpa"
    assert resolve_attention("sdpa", cpu, "bf16") == "sdpa"


@pytest.mark.parametrize("method", ["mae", "bootmae"])
def test_attention_kernels_give_the_same_step(tiny_cfg, method):
    torch.manual_seed(0)
    fused = build_model(tiny_cfg(f"method={method}"))
    eager = copy.deepcopy(fused)
    blocks = transformer_blocks(eager)
    count = set_attention_kernel(eager, "eager")
    assert count >= len(blocks)  # every block's attention (BootMAE: its cross-attention too)
    if method == "bootmae":
        assert any(type(m).__name__ == "CrossAttention" and not m.fused_attn for m in eager.modules())
    assert not any(m.fused_attn for m in eager.modules() if hasattr(m, "fused_attn"))
    assert set_attention_kernel(fused, "sdpa") == count
    assert_same_training_step(fused, eager)


def test_compile_policy():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile(True, torch.device("cpu")) is True
    assert resolve_compile(False, torch.device("cuda")) is False


@pytest.mark.parametrize("method", ["mae", "bootmae"])
def test_compiled_blocks_cover_every_block_and_keep_names(tiny_cfg, method, monkeypatch):
    monkeypatch.setattr(mimkit.models, "cpu_compiler", lambda: "/usr/bin/g++")  # names only: nothing is run
    model = build_model(tiny_cfg(f"method={method}"))
    names = list(model.state_dict())
    blocks = transformer_blocks(model)
    if method == "mae":
        assert len(blocks) == 2 + 1  # encoder depth 2 + decoder depth 1
    else:  # encoder, EMA target encoder, pixel and feature decoders
        assert len(blocks) > 3 and any(type(b).__name__ == "DecoderBlock" for b in blocks)
    assert compile_blocks(model) == len(blocks)
    assert list(model.state_dict()) == names


def test_compiled_step_matches_eager(tiny_cfg):
    torch.manual_seed(0)
    eager = build_model(tiny_cfg())
    compiled = copy.deepcopy(eager)
    if cpu_compiler() is None:  # this machine cannot compile: the user hears it up front
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
            compile_blocks(compiled)
        return
    compile_blocks(compiled)
    assert_same_training_step(eager, compiled)


def test_compile_without_a_compiler_fails_before_training(tiny_cfg, monkeypatch):
    monkeypatch.setattr(mimkit.models, "cpu_compiler", lambda: None)
    cfg = tiny_cfg("train.compile=true", "train.epochs=1")
    with pytest.raises(RuntimeError, match="train.compile=false"):
        pretrain(cfg)
    assert not list(Path(cfg.train.out_dir).glob("checkpoint-*"))


def test_pretrain_with_compile_on(tiny_cfg):
    cfg = tiny_cfg("train.compile=true", "train.epochs=1")
    if cpu_compiler() is None:  # as above, on a machine that really has none
        with pytest.raises(RuntimeError, match="train.compile=false"):
            pretrain(cfg)
        return
    result = pretrain(cfg)
    records = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert result.checkpoint is not None
