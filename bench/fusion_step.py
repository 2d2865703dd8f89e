"""Benchmark: one FuseLLM training step against one CLM-only step, same model, same batch, same run.

Model: the full zoo target (a Llama); batch: 8 sequences x 256 tokens, 3 teachers x top-10 (the
embedded default, ``recipes/fusellm.yaml``). A step is forward + loss + backward. Each variant
runs in its own subprocess so that its peak memory is its own:

- ``fusion_step_time_ratio``: median FuseLLM step time / median CLM step time (1.0 = free);
- ``fusion_step_peak_mem_ratio``: peak memory growth during the steps (CUDA: max allocated; CPU:
  the process's resident memory, sampled every millisecond during the steps, above its level before
  the first step), FuseLLM / CLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

STEPS, WARMUP = 12, 3
B, L, T, K = 8, 256, 3, 10


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _measure(variant: str) -> dict:
    import torch

    from fusion.config import FusionConfig, OptimConfig
    from fusion.modules.base import CausalLMModule
    from fusion.modules.fusellm import FuseLLMModule
    from fusion.zoo import resolve_model

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model("zoo:target", "full")
    cls = FuseLLMModule if variant == "fusellm" else CausalLMModule
    extra = {"fusion": FusionConfig()} if variant == "fusellm" else {}
    module = cls(model_path=path, optim=OptimConfig(), **extra)
    module.configure_model()
    module.to(device)
    vocab = module.model.config.vocab_size
    ids = torch.randint(0, vocab, (B, L), device=device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "teacher_ids": torch.randint(0, vocab, (B, T, L, K), device=device),
             "teacher_logprobs": torch.randn(B, T, L, K, device=device).log_softmax(-1),
             "teacher_ce": torch.rand(B, T, device=device), "teacher_token_ce": torch.rand(B, T, L, device=device)}
    times = []
    base_rss, peak_rss, done = _rss_kb(), [0], threading.Event()

    def sample() -> None:  # CPU tensors are malloc'd: the resident set is what they cost
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], _rss_kb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for step in range(WARMUP + STEPS):
        if step == WARMUP and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = module.training_loss(batch)
        loss.backward()
        module.model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else (peak_rss[0] - base_rss) / 1024
    times.sort()
    return {"median_s": times[len(times) // 2], "peak_mb": peak, "device": device}


def run() -> list[dict]:
    results = {}
    for variant in ("clm", "fusellm"):
        out = subprocess.run([sys.executable, "-m", "bench.fusion_step", variant], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    clm, fuse = results["clm"], results["fusellm"]
    shape = {"batch": B, "tokens": L, "teachers": T, "top_k": K, "device": fuse["device"], "steps": STEPS}
    time_ratio = {"bench": "fusion_step", "metric": "fusion_step_time_ratio",
                  "value": round(fuse["median_s"] / clm["median_s"], 3), "unit": "x CLM step",
                  "fusion_step_s": round(fuse["median_s"], 4), "clm_step_s": round(clm["median_s"], 4), **shape}
    mem_ratio = {"bench": "fusion_step", "metric": "fusion_step_peak_mem_ratio",
                 "value": round(fuse["peak_mb"] / max(clm["peak_mb"], 1e-9), 3), "unit": "x CLM step",
                 "fusion_peak_mb": round(fuse["peak_mb"], 1), "clm_peak_mb": round(clm["peak_mb"], 1), **shape}
    return [time_ratio, mem_ratio]


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1])))
