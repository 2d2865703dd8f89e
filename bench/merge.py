"""Benchmark: merge throughput and peak memory, against mergekit on the same checkpoints in the same run.

Checkpoints of a Llama-shaped model with random bf16 weights (vocabulary 32,000, width 2,048, MLP 5,504; 2 and 8
layers: about 0.37 and 1.07 GB each) are written to a temporary folder: a base and three fine-tunes. Each merge runs
in its own process (`python -m fusion.merge`, and mergekit's `mergekit-yaml` when mergekit is installed), and its
peak resident memory is read from the kernel (``ru_maxrss`` of the finished child). Throughput is the bytes of the
four input checkpoints over the wall time of the process (start-up included).

Figures per size: ``peak_memory_<method>`` (GB; baseline: mergekit's), ``throughput_<method>`` (GB/s; baseline:
mergekit's; ratio = baseline / value, so below 1 is faster than mergekit). TIES is compared (mergekit has it); VaRM
is ours alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

SIZES = {"0.4GB": 2, "1GB": 8}  # name -> layers
ROOT = Path(__file__).resolve().parent.parent
WIDTH, MLP, VOCAB = 2048, 5504, 32000


def _tensors(layers: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": randn(VOCAB, WIDTH), "lm_head.weight": randn(VOCAB, WIDTH),
               "model.norm.weight": torch.ones(WIDTH, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = randn(WIDTH, WIDTH)
        tensors[p + "mlp.gate_proj.weight"] = randn(MLP, WIDTH)
        tensors[p + "mlp.up_proj.weight"] = randn(MLP, WIDTH)
        tensors[p + "mlp.down_proj.weight"] = randn(WIDTH, MLP)
        tensors[p + "input_layernorm.weight"] = torch.ones(WIDTH, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(WIDTH, dtype=torch.bfloat16)
    return tensors


def _write(folder: Path, layers: int, seed: int) -> int:
    folder.mkdir(parents=True)
    tensors = _tensors(layers, torch.Generator().manual_seed(seed))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": WIDTH,
              "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return (folder / "model.safetensors").stat().st_size


def _measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident GB of ``command`` run alone in a child process (its own rusage, from wait4)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{command[:3]} failed: {errors.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def run() -> list[dict]:
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size, layers in SIZES.items():
            folders = [root / size / name for name in ("base", "a", "b", "c")]
            # Written by a child: a merge process forked from a parent that held the tensors would report the
            # parent's resident pages as its own peak.
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            "from bench.merge import _write; "
                            f"[_write(__import__('pathlib').Path(f), {layers}, s) for s, f in "
                            f"enumerate({[str(f) for f in folders]!r})]"], check=True)
            total = sum((f / "model.safetensors").stat().st_size for f in folders)
            for method in ("ties", "varm"):
                params = {"weight": 1 / 3, "density": 0.5} if method == "ties" else {}
                config = {"merge_method": method, "base_model": str(folders[0]), "dtype": "bfloat16",
                          "models": [{"model": str(f), "parameters": params} for f in folders[1:]]}
                path = root / f"{size}-{method}.yaml"
                path.write_text(yaml.safe_dump(config))
                ours = _measure([sys.executable, "-m", "fusion.merge", str(path), str(root / "out"), "--quiet"])
                shutil.rmtree(root / "out")
                theirs = None
                if mergekit and method == "ties":
                    theirs = _measure([mergekit, str(path), str(root / "out"), "--no-copy-tokenizer"])
                    shutil.rmtree(root / "out")
                for metric, index, unit in (("peak_memory", 1, "GB"), ("throughput", 0, "GB/s")):
                    value = ours[index] if metric == "peak_memory" else total / 1e9 / ours[0]
                    figure = {"bench": "merge", "metric": f"{metric}_{method}_{size}", "value": round(value, 3),
                              "unit": unit, "input_gb": round(total / 1e9, 2)}
                    if theirs is not None:
                        baseline = theirs[1] if metric == "peak_memory" else total / 1e9 / theirs[0]
                        figure.update(baseline=round(baseline, 3), ratio=round(baseline / value, 3))
                    figures.append(figure)
            shutil.rmtree(root / size)
    return figures
