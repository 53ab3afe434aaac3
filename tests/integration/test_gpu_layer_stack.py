"""The GPU layer-stack benchmark's machinery on CPU (benchmarks/gpu_layer_stack.py, --tiny shape): the real
megatron-core GPTModel with every linear_qkv wrapped by TiedLoraQKV holding lora, tl6 and the tl6 reference
composition, as the H200 run builds it (there at Llama-2 7B's shape in bf16)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_layer_stack import TINY, Stack, markdown, measure

pytestmark = pytest.mark.integration

LAYERS, RANK, SEQ = 2, 4, 16
D, OUT = TINY["hidden_size"], 64 + 2 * 2 * 16  # GQA: d + 2 * groups * head_dim (4 heads of 16, 2 groups)


@pytest.fixture(scope="module")
def stack():
    built = Stack(shape=TINY, layers=LAYERS, seq=SEQ, rank=RANK, device="cpu", dtype=torch.float32)
    yield built
    built.release()


def _clear(stack) -> None:
    for modules in stack.adapters.values():
        for _, module in modules:
            for tensor in module.factors:
                tensor.grad = None


def _grads(stack, name):
    return [t.grad.clone() for _, module in stack.adapters[name] for t in module.factors if t.grad is not None]


def test_frozen_base_step_gives_no_adapter_a_gradient(stack):
    _clear(stack)
    stack.step("base", update=False)
    assert stack.adapter_grads() == {"lora": [], "tl6": [], "tl6_reference": []}


def test_lora_step_gives_gradients_to_lora_a_and_b_only(stack):
    _clear(stack)
    stack.step("lora", update=False)
    grads = stack.adapter_grads()
    assert grads["lora"] == [f"{f}{i}" for i in range(LAYERS) for f in "AB"]
    assert grads["tl6"] == grads["tl6_reference"] == []


def test_tl6_fused_and_reference_composition_give_the_same_loss_and_gradients(stack):
    """The fused autograd functions against the plain composition of torch ops (functional.tied_lora_update):
    same loss, same gradients of the shared A, B and of every layer's u, v."""
    _clear(stack)
    fused = stack.step("tl6", update=False)
    fused_grads = _grads(stack, "tl6")
    _clear(stack)
    reference = stack.step("tl6_reference", update=False)
    reference_grads = _grads(stack, "tl6_reference")
    assert len(fused_grads) == len(reference_grads) == 4 * LAYERS  # A and B are the same tensors in every layer
    assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    _clear(stack)


def test_tiny_report_rows_ratios_and_trainable_counts():
    """measure() on CPU: one row per configuration, lora's ratio to itself 1, trainable counts of the closed forms
    (LoRA L r (d + out); tl6 d r + out r + L (r + out)), no peak memory on CPU, the targets stated."""
    report = measure(shape=TINY, layers=LAYERS, seq=SEQ, rank=RANK, cycles=2, warmup=1, device="cpu")
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == ["base", "lora", "tl6", "tl6_reference"]
    assert rows["lora"]["x_lora"] == 1.0
    assert rows["base"]["trainable"] == 0
    assert rows["lora"]["trainable"] == LAYERS * RANK * (D + OUT)
    tl6 = D * RANK + OUT * RANK + LAYERS * (RANK + OUT)
    assert rows["tl6"]["trainable"] == rows["tl6_reference"]["trainable"] == tl6
    assert all(row["peak_gb"] is None and len(row["cycles_s"]) == 2 for row in rows.values())
    text = markdown(report)
    assert "tl6 fused step time <= 1.02 x lora" in text and f"{LAYERS} layers" in text
