"""Benchmark: what the fusion objective costs next to a plain causal-LM step, at the shapes users run.

(a) **The loss alone** (any device): logits of 2 x 2,048 tokens at V = 32,000 (Llama-2) and 151,936
    (Qwen2.5), bf16 on CUDA (as a bf16 model's head returns them) and float32 on CPUs; forward +
    backward to the logits. Variants, alternated in one process:

      hf_clm       HF's causal-LM loss: ``F.cross_entropy(logits.float(), targets)`` (the baseline)
      ours_clm     `vocab_loss` on the logits, CLM only
      ours_fusion  `vocab_loss` on the logits, 0.9 x CLM + 0.1 x CE to 10 fused teacher candidates

    ``fusion_loss_time_ratio`` / ``fusion_loss_mem_ratio`` = ours_fusion / hf_clm (``vs_our_clm``: /
    ours_clm). Memory is growth during the step over what existed before it (the logits themselves):
    CUDA's peak allocation, or on CPUs the resident set sampled every millisecond.

(b) **The whole step** (CUDA only): a random-weight model of Qwen2.5-1.5B's shape (28 layers, hidden
    1,536, V = 151,936, tied embeddings), 4 x 2,048 tokens, bf16-mixed (float32 weights, bf16
    autocast), gradient checkpointing; forward + backward. Variants: ``hf`` (``model(..., labels=)``),
    ``liger`` (liger-kernel's fused linear + cross-entropy on the hidden states, when installed),
    ``ours_clm`` and ``ours_fusion`` (`CausalLMModule` / `FuseLLMModule` training losses, 3 teachers x
    top-10 fused by MinCE) at several ``loss_chunk_size``. Memory: peak growth over the weights.

Every variant runs ``STEPS`` timed steps (after ``WARMUP`` untimed ones per round), split into ``REPEATS`` rounds in
rotating order; ``spread`` is the range of the ratio over the rounds. ``FUSION_BENCH_STEPS`` and
``FUSION_BENCH_WARMUP`` change STEPS and WARMUP (one warm-up step is enough on CPUs, where a step of long sequences
takes tens of seconds).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

STEPS = int(os.environ.get("FUSION_BENCH_STEPS", 51))
WARMUP = int(os.environ.get("FUSION_BENCH_WARMUP", 2))
REPEATS = 3
LOSS_TOKENS = (2, 2048)
VOCABS = (32000, 151936)
TEACHERS, TOP_K = 3, 10
STEP_SHAPE = {"batch": 4, "tokens": 2048}
QWEN_1_5B = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "tie_word_embeddings": True}
CHUNKS = (None, 512, 2048)  # None: the default (1,024 tokens at this vocabulary) first


class Growth:
    """Peak memory growth over the level at ``start()``: CUDA's allocator, or the CPU resident set."""

    def __init__(self, device: str) -> None:
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = self.peak = self._rss()
        self.done = threading.Event()

        def sample() -> None:  # CPU tensors this large are mmap'd and unmapped on free: RSS is what they cost
            while not self.done.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self.done.set()
        self.thread.join()
        return max(self.peak, self._rss()) - self.base


def alternate(variants: dict[str, Callable[[], None]], device: str) -> dict[str, dict]:
    """Time and measure every variant's step, ``STEPS`` each, in ``REPEATS`` rotating rounds."""
    growth = Growth(device)
    out = {name: {"times": [[] for _ in range(REPEATS)], "growth": []} for name in variants}
    names = list(variants)
    for rnd in range(REPEATS):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            step = variants[name]
            for _ in range(WARMUP):
                step()
            for _ in range(-(-STEPS // REPEATS)):
                growth.start()
                start = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                out[name]["times"][rnd].append(time.perf_counter() - start)
                out[name]["growth"].append(growth.stop())
    return out


def ratio(results: dict, name: str, base: str) -> dict:
    """Median-time ratio over all steps, its range over the rounds, and the peak-growth ratio."""
    t, b = results[name], results[base]
    every = [statistics.median(sum(x["times"], [])) for x in (t, b)]
    rounds = [statistics.median(a) / statistics.median(c) for a, c in zip(t["times"], b["times"])]
    return {"time": every[0] / every[1], "spread": [round(min(rounds), 3), round(max(rounds), 3)],
            "ms": round(every[0] * 1e3, 2), "base_ms": round(every[1] * 1e3, 2),
            "mem": max(t["growth"]) / max(max(b["growth"]), 1), "mb": round(max(t["growth"]) / 2**20, 1),
            "base_mb": round(max(b["growth"]) / 2**20, 1)}


def loss_variants(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                  probs: torch.Tensor) -> dict[str, Callable[[], None]]:
    """(a)'s three steps on ``logits [n, V]``: forward + backward, then the gradient dropped."""
    from fusion.modules.losses import vocab_loss

    n = len(targets)
    losses = {
        "hf_clm": lambda: F.cross_entropy(logits.float(), targets),
        "ours_clm": lambda: vocab_loss(logits, None, targets, clm_weight=1 / n).loss,
        "ours_fusion": lambda: vocab_loss(logits, None, targets, clm_weight=0.9 / n, ids=ids, probs=probs,
                                          distill_weight=0.1 / n).loss,
    }

    def step(loss_fn):
        def run() -> None:
            loss_fn().backward()
            logits.grad = None
        return run

    return {name: step(fn) for name, fn in losses.items()}


def loss_alone(device: str) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = LOSS_TOKENS[0] * LOSS_TOKENS[1]
    figures = []
    for vocab in VOCABS:
        g = torch.Generator(device).manual_seed(0)
        logits = torch.randn(n, vocab, device=device, generator=g).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (n,), device=device, generator=g)
        ids = torch.randint(0, vocab, (n, TOP_K), device=device, generator=g)
        probs = torch.softmax(torch.randn(n, TOP_K, device=device, generator=g), -1)
        results = alternate(loss_variants(logits, targets, ids, probs), device)
        shape = {"vocab": vocab, "tokens": n, "dtype": str(dtype).split(".")[-1], "device": device,
                 "steps": STEPS, "repeats": REPEATS}
        for who in ("fusion", "clm"):
            r, mine = ratio(results, f"ours_{who}", "hf_clm"), ratio(results, f"ours_{who}", "ours_clm")
            figures.append({"bench": "fusion_step", "metric": f"{who}_loss_time_ratio", "value": round(r["time"], 3),
                            "spread": r["spread"], "unit": "x HF CLM loss", "ms": r["ms"], "hf_clm_ms": r["base_ms"],
                            **({"vs_our_clm": round(mine["time"], 3)} if who == "fusion" else {}), **shape})
            figures.append({"bench": "fusion_step", "metric": f"{who}_loss_mem_ratio", "value": round(r["mem"], 3),
                            "unit": "x HF CLM loss (growth)", "mb": r["mb"], "hf_clm_mb": r["base_mb"],
                            **({"vs_our_clm": round(mine["mem"], 3)} if who == "fusion" else {}), **shape})
        del logits, ids, probs, targets
    return figures


def whole_step(device: str = "cuda", model_shape: dict = QWEN_1_5B, step_shape: dict = STEP_SHAPE) -> list[dict]:
    """(b): a realistic-shape model's forward + backward (CUDA; other shapes and devices test this code)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fusion.config import FusionConfig, OptimConfig
    from fusion.modules.base import CausalLMModule
    from fusion.modules.fusellm import FuseLLMModule
    from fusion.modules.losses import auto_chunk_size

    torch.manual_seed(0)
    config = Qwen2Config(**model_shape, use_cache=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # float32 weights: bf16-mixed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    b, length = step_shape["batch"], step_shape["tokens"]
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, length), device=device, generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "teacher_ids": torch.randint(0, config.vocab_size, (b, TEACHERS, length, TOP_K), device=device,
                                          generator=g),
             "teacher_logprobs": torch.randn(b, TEACHERS, length, TOP_K, device=device, generator=g).log_softmax(-1),
             "teacher_ce": torch.rand(b, TEACHERS, device=device, generator=g)}

    def module(cls, chunk: int, **extra):
        m = cls(model_path="unused", optim=OptimConfig(), fused_head=True, loss_chunk_size=chunk, **extra)
        m.model = model
        return m

    def step(loss_fn):
        def run() -> None:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def hf_loss():
        return model(input_ids=ids, labels=ids).loss

    variants = {"hf": step(hf_loss)}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        targets = F.pad(ids[:, 1:], (0, 1), value=-100).reshape(-1)

        def liger_loss():
            hidden = model.model(input_ids=ids).last_hidden_state
            return liger(model.lm_head.weight, hidden.reshape(-1, config.hidden_size), targets)

        step(liger_loss)()  # a liger that does not run on this torch/triton is left out, with the reason
        variants["liger"] = step(liger_loss)
    except Exception as err:  # ImportError where it is not installed; a kernel error where it does not fit
        print(f"liger-kernel left out: {type(err).__name__}: {err}", file=sys.stderr)
    clm = module(CausalLMModule, CHUNKS[0])
    variants["ours_clm"] = step(lambda: clm.training_loss(batch))
    for chunk in CHUNKS:
        fuse = module(FuseLLMModule, chunk, fusion=FusionConfig())
        variants[f"ours_fusion_chunk{chunk or auto_chunk_size(config.vocab_size)}"] = step(
            lambda m=fuse: m.training_loss(batch))
    lambda1 = module(FuseLLMModule, CHUNKS[0], fusion=FusionConfig(clm_weight=1.0))
    figures = [agreement(model, device, {"hf": hf_loss, "hf_again": hf_loss,
                                         "ours_clm": lambda: clm.training_loss(batch),
                                         "ours_fusion_lambda1": lambda: lambda1.training_loss(batch)})]
    results = alternate(variants, device)
    name = "Qwen2.5-1.5B shape" if model_shape == QWEN_1_5B else f"Qwen2 {model_shape}"
    shape = {**step_shape, "model": f"{name}, random weights", "precision": "bf16-mixed",
             "gradient_checkpointing": True, "steps": STEPS, "repeats": REPEATS,
             "device": torch.cuda.get_device_name() if device == "cuda" else device,
             "weights_gb": round(sum(p.numel() * 4 for p in model.parameters()) / 2**30, 2)}
    figures[0].update(shape)
    for name in variants:
        r = ratio(results, name, "hf")
        figures.append({"bench": "fusion_step", "metric": "step_time_ratio", "variant": name,
                        "value": round(r["time"], 3), "spread": r["spread"], "unit": "x HF step", "step_ms": r["ms"],
                        "hf_step_ms": r["base_ms"], **shape})
        figures.append({"bench": "fusion_step", "metric": "step_mem_growth_gb", "variant": name,
                        "value": round(r["mb"] / 1024, 2), "unit": "GB over the weights",
                        "hf_gb": round(r["base_mb"] / 1024, 2), "ratio_to_hf": round(r["mem"], 3), **shape})
    return figures


def agreement(model: torch.nn.Module, device: str, losses: dict[str, Callable[[], torch.Tensor]]) -> dict:
    """Gradients of a few weights after one step of each loss, relative to HF's (``hf_again``: HF's own
    run-to-run difference, the floor under bf16 and non-deterministic kernels)."""
    watched = {"head/embedding": model.get_output_embeddings().weight,
               "last layer down_proj": model.model.layers[-1].mlp.down_proj.weight,
               "first layer q_proj": model.model.layers[0].self_attn.q_proj.weight}
    grads = {}
    for name, loss_fn in losses.items():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        grads[name] = {key: p.grad.float().clone() for key, p in watched.items()}
        model.zero_grad(set_to_none=True)
    ref = grads["hf"]
    errors = {name: {key: round(((g - ref[key]).norm() / ref[key].norm()).item(), 5) for key, g in grads[name].items()}
              for name in losses if name != "hf"}
    return {"bench": "fusion_step", "metric": "step_grad_rel_error", "value": max(errors["ours_clm"].values()),
            "unit": "max relative L2 error of the watched gradients vs HF", "errors": errors}


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = loss_alone(device)
    if device == "cuda":
        figures += whole_step()
    return figures
