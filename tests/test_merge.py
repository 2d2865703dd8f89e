"""Parameter-space merges: each method against mergekit on the same checkpoints, VaRM against its formula, both SCE
semantics, the streamed writer, the command line."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fusion.errors import FusionError
from fusion.merge import methods
from fusion.merge.config import load_merge_config
from fusion.merge.stream import run_merge

# Odd shapes: nothing is a power of two, the vocabulary differs from every other size.
CONFIG = dict(vocab_size=37, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
              num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bf16 base and three fine-tunes of it (random deltas of different sizes and sparsity)."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    paths = []
    for j, (scale, keep) in enumerate(((0.02, 1.0), (0.05, 0.5), (0.01, 0.9))):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                noise = torch.randn(p.shape) * scale * (torch.rand(p.shape) < keep)
                p.copy_((q.float() + noise).to(torch.bfloat16))
        model.save_pretrained(root / f"m{j}")
        paths.append(str(root / f"m{j}"))
    return str(root / "base"), paths


def mergekit_merge(config: dict, out):
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    mk_run_merge(mk_config.MergeConfiguration.model_validate(config), str(out),
                 MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_file(out / "model.safetensors")


def fusion_merge(config: dict, out):
    run_merge(load_merge_config(config), out, progress=False)
    return load_file(out / "model.safetensors")


def close_in_bf16(ours: dict, theirs: dict, name: str) -> None:
    """Equal up to bf16 rounding: mergekit computes in the checkpoints' dtype (each delta, product and sum rounded
    to 8 bits), we in float32, rounded once. So an entry may differ by a few roundings of the tensor's typical
    magnitude, not of its own (an entry near 0 is a difference of larger numbers)."""
    assert ours.keys() == theirs.keys(), name
    for key in ours:
        a, b = ours[key].float(), theirs[key].float()
        assert a.shape == b.shape and ours[key].dtype == theirs[key].dtype == torch.bfloat16, (name, key)
        tolerance = 4 * 2 ** -8 * (b.abs() + b.abs().mean())
        worst = ((a - b).abs() / tolerance).max().item()
        assert worst <= 1, f"{name} {key}: off by {worst:.1f} x the tolerance"


def method_configs(base, models):
    weights = [0.5, 0.3, 0.2]
    weighted = [{"model": m, "parameters": {"weight": w, "density": 0.6}} for m, w in zip(models, weights)]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                                         for m, w in zip(models, weights)], "dtype": "bfloat16"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": weighted,
                            "parameters": {"lambda": 0.8}, "dtype": "bfloat16"},
        # Selections (TIES's top-k, SCE's top variance, the sign election) made on bf16 deltas differ with their
        # rounding, so these compare mergekit computing in float32 (`dtype`) and writing bf16 (`out_dtype`).
        "ties": {"merge_method": "ties", "base_model": base, "models": weighted, "dtype": "float32",
                 "out_dtype": "bfloat16"},
        "ties-unnormalised": {"merge_method": "ties", "base_model": base, "models": weighted,
                              "parameters": {"normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in models],
                "parameters": {"select_topk": 0.1}, "dtype": "float32", "out_dtype": "bfloat16"},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": models[1]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                  "dtype": "bfloat16"},
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "ties-unnormalised", "sce", "slerp"])
def test_every_method_mergekit_has_gives_mergekit_s_tensors(checkpoints, tmp_path, method):
    base, models = checkpoints
    config = method_configs(base, models)[method]
    ours, theirs = fusion_merge(config, tmp_path / "ours"), mergekit_merge(config, tmp_path / "theirs")
    close_in_bf16(ours, theirs, method)
    if config["dtype"] == "float32":  # both compute in float32: the same selections, nearly every entry equal
        equal = sum(int((ours[k] == theirs[k]).sum()) for k in ours) / sum(v.numel() for v in ours.values())
        assert equal > 0.99, f"{method}: {equal:.2%} of the entries equal"


def test_the_slerp_slices_form_reads_as_its_models(checkpoints, tmp_path):
    base, models = checkpoints
    config = {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16", "parameters": {"t": 0.3},
              "slices": [{"sources": [{"model": base, "layer_range": [0, 3]},
                                      {"model": models[0], "layer_range": [0, 3]}]}]}
    close_in_bf16(fusion_merge(config, tmp_path / "ours"), mergekit_merge(config, tmp_path / "theirs"), "slices")
    config["slices"][0]["sources"][1]["layer_range"] = [0, 2]
    with pytest.raises(FusionError, match="layer ranges"):
        load_merge_config(config)


def test_varm_is_the_paper_s_formula_per_matrix(checkpoints, tmp_path):
    base, models = checkpoints
    config = {"merge_method": "varm", "base_model": base, "models": [{"model": m} for m in models]}
    run_merge(load_merge_config(config), tmp_path / "varm", progress=False, block_elements=64)  # several blocks
    merged = load_file(tmp_path / "varm" / "model.safetensors")
    pivot, targets = load_file(f"{base}/model.safetensors"), [load_file(f"{m}/model.safetensors") for m in models]
    record = json.loads((tmp_path / "varm" / "merge.json").read_text())
    for name, p in pivot.items():
        updates = [t[name].double() - p.double() for t in targets]
        variation = torch.tensor([u.pow(2).mean() for u in updates])
        w = variation / variation.sum()  # W_j,m = E[Δθ²_j,m] / Σ_i E[Δθ²_i,m]
        expected = p.double() + sum(wj * u for wj, u in zip(w, updates))
        assert torch.allclose(merged[name].double(), expected.to(torch.bfloat16).double(), atol=0, rtol=2 ** -7)
        assert record["weights"][name] == pytest.approx(w.tolist(), rel=1e-5)
    # the weights differ per matrix (the released script gave 1/K everywhere)
    assert len({tuple(round(x, 3) for x in w) for w in record["weights"].values()}) > 5


def sce(base, tensors, select_topk, masked):
    merge = methods.TensorMerge("sce", select_topk=select_topk, masked_merge=masked)
    merged = methods.merge_whole(merge, base, tensors)
    return merged, merge.chosen


def test_both_sce_semantics():
    torch.manual_seed(1)
    base = torch.randn(50, 7)
    tensors = [base + torch.randn(50, 7) * s for s in (0.1, 0.3, 0.2)]
    deltas = torch.stack([t - base for t in tensors])
    variance = deltas.var(0, unbiased=False)
    mask = variance >= variance.flatten().sort(descending=True).values[int(0.1 * 350) - 1]
    assert mask.sum() == int(0.1 * 350)
    (masked, masked_w), (release, release_w) = sce(base, tensors, 0.1, True), sce(base, tensors, 0.1, False)
    # mergekit: only the selected entries move; the release: every entry does
    assert torch.equal(masked[~mask], base[~mask]) and (release[~mask] != base[~mask]).float().mean() > 0.9
    # both take their weights from the selected entries only
    energy = (deltas * mask).pow(2).flatten(1).mean(1)
    assert masked_w == pytest.approx((energy / energy.sum()).tolist()) == release_w
    # where they agree on the elected sign, the release's entry is the weighted mean of the agreeing deltas
    w = (energy / energy.sum()).view(-1, 1, 1)
    agree = (deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)).float()
    assert torch.allclose(release, base + (w * agree * deltas).sum(0) / (w * agree).sum(0), atol=1e-6)
    # tiny updates: mergekit's SCE falls back to uniform weights below a sum of 1e-6, the release does not
    small = [base + (t - base) * 1e-3 for t in tensors]
    assert sce(base, small, 0.1, True)[1] == pytest.approx([1 / 3] * 3)
    assert sce(base, small, 0.1, False)[1] == pytest.approx((energy / energy.sum()).tolist(), rel=1e-3)


def test_blocks_give_what_whole_tensors_give(checkpoints, tmp_path):
    """Merging a few rows at a time (two passes for the methods that rank or weigh a whole tensor) writes the same
    tensors as merging each tensor at once."""
    base, models = checkpoints
    for method, config in method_configs(base, models).items():
        if method == "linear":
            continue
        whole = run_merge(load_merge_config(config), tmp_path / "whole", progress=False, block_elements=10**9)
        blocks = run_merge(load_merge_config(config), tmp_path / "blocks", progress=False, block_elements=50)
        a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "blocks" / "model.safetensors")
        assert all(torch.allclose(a[k].float(), b[k].float(), rtol=2 ** -7, atol=1e-6) for k in a), method
        assert whole["weights"].keys() == blocks["weights"].keys()


def test_dare_keeps_a_density_share_rescaled_and_is_seeded(checkpoints, tmp_path):
    base, models = checkpoints
    config = {"merge_method": "dare_linear", "base_model": base, "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.3}} for m in models[:1]]}
    a = fusion_merge(config, tmp_path / "a")
    b = fusion_merge(config, tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded per tensor
    pivot, target = load_file(f"{base}/model.safetensors"), load_file(f"{models[0]}/model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    delta, merged = target[name].float() - pivot[name].float(), a[name] - pivot[name].float()
    kept = merged != 0
    assert 0.25 < kept.float().mean() < 0.35
    assert merged.abs().sum() == pytest.approx(delta.abs().sum().item(), rel=1e-4)  # L1 rescale, as mergekit
    dense = fusion_merge({**config, "models": [{"model": models[0], "parameters": {"weight": 1.0, "density": 1.0}}]},
                         tmp_path / "dense")
    assert torch.allclose(dense[name], target[name].float(), atol=1e-6)  # density 1: the target itself


def test_the_merge_streams_and_the_output_loads_as_a_model(checkpoints, tmp_path):
    base, models = checkpoints
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                                      "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}}
                                                 for m in models]}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fusion.merge", str(config), str(out), "--shard-size", "4KB",
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # several streamed files
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    reference = fusion_merge(yaml.safe_load(config.read_text()), tmp_path / "one-file")
    assert all(torch.equal(p.detach(), reference[n]) for n, p in model.named_parameters())


def test_bad_configs_name_the_key(checkpoints, tmp_path):
    base, models = checkpoints
    for config, words in (({"merge_method": "ties", "models": [{"model": models[0]}]}, "needs base_model"),
                          ({"merge_method": "nope", "models": [{"model": models[0]}]}, "merge_method 'nope'"),
                          ({"merge_method": "ties", "base_model": base, "models": [{"model": models[0]}]},
                           "parameters.weight"),
                          ({"merge_method": "sce", "base_model": base, "models": [{"model": models[0]}],
                            "dtype": "int4"}, "dtype 'int4'")):
        with pytest.raises(FusionError, match=words):
            load_merge_config(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "varm", "base_model": base,
                                    "models": [{"model": str(tmp_path / "missing")}]}))
    result = subprocess.run([sys.executable, "-m", "fusion.merge", str(path), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no .safetensors" in result.stderr and "Traceback" not in result.stderr


def test_large_tensors_rank_by_threshold_and_keep_exactly_k(monkeypatch, checkpoints, tmp_path):
    """Above `EXACT_TOP_K` entries TIES and SCE select by threshold: without ties that is the same selection as
    mergekit's argsort; with ties (bf16 deltas have many) still exactly k entries, whatever the block size."""
    torch.manual_seed(2)
    base = torch.randn(40, 9)
    tensors = [base + torch.randn(40, 9) * s for s in (0.1, 0.3, 0.2)]
    exact = {m: methods.merge_whole(methods.TensorMerge(m, weights=[1, 1, 1], densities=[0.3] * 3, select_topk=0.2),
                                    base, tensors) for m in ("ties", "sce")}
    monkeypatch.setattr(methods, "EXACT_TOP_K", 0)
    for m, expected in exact.items():
        merge = methods.TensorMerge(m, weights=[1, 1, 1], densities=[0.3] * 3, select_topk=0.2)
        assert torch.equal(methods.merge_whole(merge, base, tensors), expected), m
    # ties: a delta of three values; a third of its entries kept, the tied ones first in order, in any blocks
    delta = torch.tensor([0.5, 0.25, 0.25, 0.25, 0.0, 0.25] * 10).view(12, 5)
    kept = []
    for block_rows in (12, 5, 1):
        merge = methods.TensorMerge("ties", weights=[1.0], densities=[1 / 3], normalize=False, numel=60)
        blocks = [(torch.zeros(b.shape), [b]) for b in delta.split(block_rows)]
        out = {}
        methods.run_passes(merge, lambda i, blocks=blocks: blocks[i], len(blocks),
                           lambda i, merged, out=out: out.setdefault(i, merged))
        kept.append(torch.cat([out[i] for i in range(len(blocks))]))
    assert all(torch.equal(k, kept[0]) for k in kept)
    assert int((kept[0] != 0).sum()) == 20 and (kept[0] == 0.5).sum() == 10  # k = 20: every 0.5, then ten 0.25s
    quarters = (delta.flatten() == 0.25).nonzero().flatten()
    assert torch.equal(kept[0].flatten()[quarters] != 0, torch.arange(len(quarters)) < 10)  # the first ten
    # and through the files: the threshold path in blocks writes what it writes whole
    config = method_configs(*checkpoints)["ties"]
    whole = run_merge(load_merge_config(config), tmp_path / "w", progress=False, block_elements=10**9)
    blocked = run_merge(load_merge_config(config), tmp_path / "b", progress=False, block_elements=37)
    a, b = load_file(tmp_path / "w" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert whole["tensors"] == blocked["tensors"] and all(torch.equal(a[k], b[k]) for k in a)
