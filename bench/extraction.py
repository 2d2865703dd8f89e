"""Benchmark: teacher extraction (`TeacherModule.predict_step`) next to a bare forward of the teacher.

``extraction_forward_ratio`` = time of a bare forward (``model(input_ids, attention_mask).logits``, the
same batch and mask) / time of ``predict_step`` on that batch, which is that forward plus the top-k
log-probs, the teacher's CE on its own tokens and the copy to the host: 1.0 would be free extraction.
``baseline`` is the same ratio for the implementation before issue 10 (kept below as `_old_predict_step`:
a float32 log-softmax of each sequence's whole [L, V] logits, top-k on it, host copies per sequence),
measured in the same process; ``ratio`` = baseline / value. ``plain_topk_ratio`` is the new code with
`torch.topk` in place of its block top-k (`TeacherModule._topk_ids`).

Models are random-weight configs (nothing is downloaded), full-length sequences, top-k = 10:

- CPU (float32, as `resolve_dtype` picks there): a 4-layer, hidden-512 Qwen2 at V = 152,064 and Llama
  at V = 32,000, 2 x 512 tokens.
- CUDA (bf16): the shapes of TinyLlama-1.1B (22 layers, hidden 2,048, V = 32,000) and Qwen2.5-1.5B
  (28 layers, hidden 1,536, V = 151,936), 8 x 2,048 tokens; also the peak memory growth of each
  variant over the weights, and ``eager_log_z_ratio``: the new code with the eager float32 log-softmax
  (the CPU path) in place of the fused Triton log Z (`fusion.kernels.row_log_z`).

Variants alternate in one process: ``ROUNDS`` rounds in rotating order, each timing every variant
``STEPS`` times after a warm-up; ``value`` / ``baseline`` are the median over the rounds of the ratio of
the round's median times, ``spread`` its min / median / max. ``max_logprob_diff`` / ``topk_id_agreement``
compare the new outputs with the old ones on the same batch (ids differ only at exact ties: bf16 logits
tie often). ``FUSION_BENCH_ROUNDS`` changes ROUNDS.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fusion import kernels
from fusion.data.representations import TeacherModule
from fusion.data.store import ChunkPredictions

ROUNDS = int(os.environ.get("FUSION_BENCH_ROUNDS", 7))
STEPS, TOP_K = 1, 10
CPU_MODELS = {  # V -> (config class name, config); float32, 2 x 512 tokens: ~2 min in all on 2 cores
    152064: ("Qwen2Config", {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                             "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": True}),
    32000: ("LlamaConfig", {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                            "num_attention_heads": 8, "num_key_value_heads": 8}),
}
CPU_BATCH = (2, 512)
GPU_MODELS = {
    32000: ("LlamaConfig", {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                            "rope_theta": 10000.0, "tie_word_embeddings": False}),  # TinyLlama-1.1B
    151936: ("Qwen2Config", {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                             "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                             "rope_theta": 1000000.0, "tie_word_embeddings": True}),  # Qwen2.5-1.5B
}
GPU_BATCH = (8, 2048)


@torch.inference_mode()
def _old_predict_step(module: TeacherModule, batch: dict) -> list[ChunkPredictions]:
    """`TeacherModule.predict_step` before issue 10, verbatim: the baseline."""
    model = module.teacher[0]
    input_ids = batch["input_ids"].to(model.device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(model.device)).logits
    out = []
    for row, (chunk_id, length) in enumerate(zip(batch["chunk_ids"].tolist(), batch["lengths"].tolist())):
        logprobs = torch.log_softmax(logits[row, :length - 1].float(), dim=-1)
        top = logprobs.topk(module.top_k, dim=-1)
        nll = -logprobs.gather(-1, input_ids[row, 1:length, None]).squeeze(-1)
        out.append(ChunkPredictions(chunk_id=chunk_id, tokens=input_ids[row, :length].cpu().numpy(),
                                    topk_ids=top.indices.cpu().numpy(), topk_logprobs=top.values.cpu().numpy(),
                                    token_ce=nll.cpu().numpy()))
    return out


def _model(vocab: int, spec: tuple[str, dict], device: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, spec[0])(vocab_size=vocab, use_cache=False, **spec[1])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _batch(vocab: int, shape: tuple[int, int], device: str) -> dict:
    """What `_Collate` makes, moved to the device as Lightning does: full-length sequences."""
    b, length = shape
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "lengths": torch.full((b,), length),
             "chunk_ids": torch.arange(b)}
    return {key: value.to(device) for key, value in batch.items()}


def _rounds(variants: dict[str, Callable[[], object]], device: str) -> tuple[dict, dict]:
    """Each variant's step times per round (rotating order), and its peak memory growth (CUDA)."""
    times = {name: [[] for _ in range(ROUNDS)] for name in variants}
    growth = dict.fromkeys(variants, 0)
    names = list(variants)
    for step in variants.values():  # warm-up
        step()
    for rnd in range(ROUNDS):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            for _ in range(STEPS):
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                variants[name]()
                if device == "cuda":
                    torch.cuda.synchronize()
                    growth[name] = max(growth[name], torch.cuda.max_memory_allocated() - base)
                times[name][rnd].append(time.perf_counter() - start)
    return times, growth


def _agreement(new: list[ChunkPredictions], old: list[ChunkPredictions]) -> dict:
    diff = max(float(np.abs(n.topk_logprobs - o.topk_logprobs).max()) for n, o in zip(new, old))
    ce_diff = max(float(np.abs(n.token_ce - o.token_ce).max()) for n, o in zip(new, old))
    agree = float(np.mean(np.concatenate([(n.topk_ids == o.topk_ids).ravel() for n, o in zip(new, old)])))
    same_tokens = all(np.array_equal(n.tokens, o.tokens) for n, o in zip(new, old))
    return {"max_logprob_diff": diff, "max_ce_diff": ce_diff, "topk_id_agreement": round(agree, 6),
            "tokens_equal": same_tokens}


def measure(vocab: int, spec: tuple[str, dict], shape: tuple[int, int], device: str, dtype: torch.dtype) -> list[dict]:
    model = _model(vocab, spec, device, dtype)
    module = TeacherModule("unused", str(dtype).split(".")[-1], "none", TOP_K)
    module.teacher.append(model)
    batch = _batch(vocab, shape, device)

    @torch.inference_mode()
    def forward():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    logits_dtype = str(forward().dtype).split(".")[-1]

    def new(plain_topk: bool = False, eager_log_z: bool = False) -> Callable[[], object]:
        def step():
            if plain_topk:  # an instance attribute shadows the class's method for this call only
                module._topk_ids = lambda logits, k: logits.topk(k, dim=-1).indices
            available = kernels.available
            if eager_log_z:
                kernels.available = lambda tensor: False
            try:
                return module.predict_step(batch)
            finally:
                module.__dict__.pop("_topk_ids", None)
                kernels.available = available
        return step

    variants = {"forward": forward, "new": new(), "old": lambda: _old_predict_step(module, batch),
                "new_plain_topk": new(plain_topk=True)}
    if kernels.available(batch["input_ids"]):
        variants["new_eager_log_z"] = new(eager_log_z=True)
    check = _agreement(new()(), _old_predict_step(module, batch))
    times, growth = _rounds(variants, device)

    def ratio(name: str) -> tuple[float, dict]:
        """The median over the rounds of forward / ``name`` (each round's pair of times taken close
        together, which a drifting machine load disturbs less than pooling all times), and its spread."""
        rounds = [statistics.median(f) / statistics.median(t) for f, t in zip(times["forward"], times[name])]
        middle = statistics.median(rounds)
        return middle, {"min": round(min(rounds), 3), "median": round(middle, 3), "max": round(max(rounds), 3)}

    ms = {name: round(statistics.median(sum(t, [])) * 1e3, 1) for name, t in times.items()}
    shape_info = {"vocab": vocab, "batch": shape[0], "tokens": shape[1], "top_k": TOP_K, "model": spec[0],
                  "hidden": spec[1]["hidden_size"], "layers": spec[1]["num_hidden_layers"],
                  "dtype": str(dtype).split(".")[-1], "logits_dtype": logits_dtype, "rounds": ROUNDS,
                  "steps": STEPS, "device": torch.cuda.get_device_name() if device == "cuda" else device}
    value, spread = ratio("new")
    baseline, old_spread = ratio("old")
    plain, plain_spread = ratio("new_plain_topk")
    extra = {}
    if "new_eager_log_z" in variants:
        eager, eager_spread = ratio("new_eager_log_z")
        extra = {"eager_log_z_ratio": round(eager, 3), "eager_log_z_spread": eager_spread,
                 "eager_log_z_ms": ms["new_eager_log_z"]}
    figures = [{"bench": "extraction", "metric": "extraction_forward_ratio", "value": round(value, 3),
                "unit": "x predict_step time (bare forward / predict_step)", "spread": spread,
                "baseline": round(baseline, 3), "baseline_spread": old_spread, "ratio": round(baseline / value, 3),
                "forward_ms": ms["forward"], "predict_ms": ms["new"], "old_predict_ms": ms["old"],
                "plain_topk_ratio": round(plain, 3), "plain_topk_spread": plain_spread,
                "plain_topk_ms": ms["new_plain_topk"], **extra, **check, **shape_info}]
    gb = {name: round(g / 2**30, 2) for name, g in growth.items()}
    if device == "cuda":
        figures.append({"bench": "extraction", "metric": "extraction_mem_growth_gb", "value": gb["new"],
                        "unit": "GB peak over the weights", "baseline": gb["old"], "forward_gb": gb["forward"],
                        "ratio": round(gb["old"] / max(gb["new"], 1e-9), 3), **shape_info})
    return figures  # the model, its batch and outputs go with this frame


def run() -> list[dict]:
    if torch.cuda.is_available():
        models, shape, device, dtype = GPU_MODELS, GPU_BATCH, "cuda", torch.bfloat16
    else:
        models, shape, device, dtype = CPU_MODELS, CPU_BATCH, "cpu", torch.float32
    figures = []
    for vocab, spec in models.items():
        figures += measure(vocab, spec, shape, device, dtype)
        if device == "cuda":
            torch.cuda.empty_cache()
    return figures
