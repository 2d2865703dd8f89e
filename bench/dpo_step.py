"""Benchmark: what a DPO and a WRPO step cost next to a plain causal-LM step over the same sequences.

The preference step with reference log-probs precomputed (`fusion.modules.dpo`): one forward over the ``k·B``
responses (chosen + rejected; WRPO: + the source's), summed log-probs by the chunked head (`fusion.modules.logps`),
the loss, backward. The baseline is the project's own causal-LM step (`CausalLMModule.training_loss`, the chunked CE
that matches HF's step time, `bench/fusion_step.py`) over the very same ``k·B`` sequences and labels. The preference
step computes each chunk's logits once more in backward (its per-sequence weights are known only after the forward),
so the head's share of the step bounds what it can cost extra.

Shapes: on CUDA a random-weight model of Llama-3.2-1B's shape (16 layers, hidden 2,048, V = 128,256), 2 pairs of
2,048-token sequences, bf16-mixed with gradient checkpointing; on CPUs (2 cores cannot run that shape many times) a
Llama of hidden 1,024 and 8 layers at V = 32,000 (the head a quarter of the forward's work, as at 1B), 2 pairs of
128 tokens, float32. ``FUSION_BENCH_TOKENS`` and ``FUSION_BENCH_PAIRS`` change the length and the pairs; the CPU at
users' length: ``FUSION_BENCH_TOKENS=2048 FUSION_BENCH_PAIRS=1 FUSION_BENCH_STEPS=3 FUSION_BENCH_WARMUP=1``.
Responses are the second half of each sequence. Variants alternate in one process (`bench.fusion_step.alternate`);
``spread`` is the ratio's range over the rounds.
"""

from __future__ import annotations

import os

import torch

from bench.fusion_step import REPEATS, STEPS, WARMUP, alternate, ratio

GPU_SHAPE = {"model": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
             "pairs": 2, "tokens": 2048, "name": "Llama-3.2-1B shape"}
CPU_SHAPE = {"model": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                       "num_attention_heads": 16, "num_key_value_heads": 4, "tie_word_embeddings": False},
             "pairs": 2, "tokens": 128, "name": "Llama, hidden 1,024, 8 layers, V = 32k"}


def run() -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion.config import OptimConfig
    from fusion.modules.base import CausalLMModule
    from fusion.modules.dpo import DPOModule
    from fusion.modules.losses import IGNORE_INDEX
    from fusion.modules.wrpo import WRPOModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(**shape["model"], use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if device == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pairs = int(os.environ.get("FUSION_BENCH_PAIRS", shape["pairs"]))
    length = int(os.environ.get("FUSION_BENCH_TOKENS", shape["tokens"]))
    g = torch.Generator(device).manual_seed(0)

    def batch(responses: int) -> dict:
        ids = torch.randint(0, config.vocab_size, (responses * pairs, length), device=device, generator=g)
        labels = ids.clone()
        labels[:, :length // 2] = IGNORE_INDEX  # the prompt
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "ref_logps": -length / 2 * torch.rand(responses * pairs, device=device, generator=g) - 5}

    def module(cls, **extra):
        m = cls(model_path="unused", optim=OptimConfig(), **extra)
        m.model = model
        return m

    def step(loss_fn):
        def run_step() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run_step

    pair, triple = batch(2), batch(3)
    clm, dpo, wrpo = module(CausalLMModule), module(DPOModule), module(WRPOModule, alpha=0.1, dynamic_alpha=False)
    variants = {"clm_pairs": step(lambda: clm.training_loss(pair)), "dpo": step(lambda: dpo.training_loss(pair)),
                "clm_triples": step(lambda: clm.training_loss(triple)),
                "wrpo": step(lambda: wrpo.training_loss(triple))}
    results = alternate(variants, device)
    about = {"model": f"{shape['name']}, random weights", "pairs": pairs, "tokens": length,
             "precision": "bf16-mixed" if device == "cuda" else "32-true", "steps": STEPS, "repeats": REPEATS,
             "warmup": WARMUP, "device": torch.cuda.get_device_name() if device == "cuda" else device,
             "reference": "precomputed"}
    figures = []
    for name, base in (("dpo", "clm_pairs"), ("wrpo", "clm_triples")):
        r = ratio(results, name, base)
        figures.append({"bench": "dpo_step", "metric": f"{name}_step_time_ratio", "value": round(r["time"], 3),
                        "spread": r["spread"], "unit": f"x CLM step over the same {base.split('_')[1]}",
                        "step_ms": r["ms"], "baseline_ms": r["base_ms"], "mem_ratio": round(r["mem"], 3), **about})
    return figures
