"""The math under CausalLMModule: perplexity, learning-rate schedule, optimizer groups (losses: test_fusion_losses)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusion.config import OptimConfig
from fusion.modules.metrics import TokenPerplexity
from fusion.modules.optim import build_optimizer, lr_factor


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_token_perplexity_weights_batches_by_tokens():
    metric = TokenPerplexity()
    metric.update(torch.tensor(10.0), torch.tensor(5))  # mean 2.0 over 5 tokens
    metric.update(torch.tensor(1.0), torch.tensor(1))   # mean 1.0 over 1 token
    assert metric.compute().item() == pytest.approx(math.exp(11 / 6), rel=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant", 0.0) == 1.0


def test_weight_decay_skips_biases_and_norms(tiny_llama):
    optimizer, scheduler = build_optimizer(tiny_llama, OptimConfig(lr=1e-3, weight_decay=0.1, warmup_ratio=0.1), 50)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(tiny_llama.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)  # warmup: step 0 of 5


def test_adamw8bit_trains(tiny_llama):
    pytest.importorskip("bitsandbytes")
    model = LlamaForCausalLM(tiny_llama.config)
    optimizer, _ = build_optimizer(model, OptimConfig(name="adamw8bit", lr=1e-2), 10)
    assert type(optimizer).__name__ == "AdamW8bit"
    ids = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
