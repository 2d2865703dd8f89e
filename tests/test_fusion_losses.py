"""The losses: the chunked engine against dense references (value and gradient, every path), its memory,
the fusion functions, the extension hooks, and lambda = 1 is CLM."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from fusion.config import FusionConfig, OptimConfig
from fusion.modules.base import CausalLMModule
from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import (
    IGNORE_INDEX,
    NO_PREDICTION,
    cross_entropy_to_teacher,
    fuse_teachers,
    kl_to_teacher,
    next_token_targets,
    span_mean,
    tail_cross_entropy,
    teacher_probs,
    vocab_loss,
)
from fusion.modules.reverse_kl import ReverseKLFuseLLM
from fusion.modules.skew_kl import SkewKLFuseLLM

V, H = 41, 12


def random_case(seed: int = 0, b: int = 2, length: int = 9, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (b, length), generator=g)
    labels[0, :3] = IGNORE_INDEX
    ids = torch.randint(0, V, (b, length, k), generator=g)
    ids[..., 1] = ids[..., 0]  # duplicates must add up
    probs = torch.softmax(torch.randn(b, length, k, generator=g), -1)
    probs[..., -1] = 0  # a dropped candidate
    probs = probs / probs.sum(-1, keepdim=True)
    return hidden, weight, bias, labels, ids, probs


def dense_reference(logits, labels, ids, probs, loss):
    """The straightforward dense computation: scatter the teacher into [B, L, V] and compare in full."""
    target = torch.zeros(*ids.shape[:2], V).scatter_add(-1, ids, probs)[:, :-1]
    logq = logits[:, :-1].float().log_softmax(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    per_position = -(target * logq).sum(-1)
    if loss == "kl":
        per_position = (torch.where(target > 0, target * target.log(), 0) - target * logq).sum(-1)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (per_position * mask).sum(), mask.sum()


def engine(hidden, weight, bias, labels, ids, probs, loss, chunk_size, a=1.0, c=0.7, through_logits=False):
    n = labels.numel()
    targets = next_token_targets(labels).reshape(-1)
    x = (hidden @ weight.T + bias) if through_logits else hidden
    return vocab_loss(x.reshape(n, -1), None if through_logits else weight, targets,
                      bias=None if through_logits else bias, clm_weight=a, distill_weight=c,
                      ids=ids.reshape(n, -1), probs=probs.reshape(n, -1), distillation=loss, chunk_size=chunk_size)


@pytest.mark.parametrize("loss", ["ce", "kl", kl_to_teacher])  # a function: the autograd path
@pytest.mark.parametrize("chunk_size", [1024, 5])
@pytest.mark.parametrize("through_logits", [False, True])
def test_vocab_loss_equals_the_dense_reference_in_value_and_gradient(loss, chunk_size, through_logits):
    hidden, weight, bias, labels, ids, probs = random_case()
    parts = engine(hidden, weight, bias, labels, ids, probs, loss, chunk_size, through_logits=through_logits)
    grads = torch.autograd.grad(parts.loss, (hidden, weight, bias))
    name = loss if isinstance(loss, str) else "kl"
    ref_nll, ref_distill, ref_tokens = dense_reference(hidden @ weight.T + bias, labels, ids, probs, name)
    ref_grads = torch.autograd.grad(ref_nll + 0.7 * ref_distill, (hidden, weight, bias))
    assert parts.tokens == ref_tokens
    torch.testing.assert_close(parts.nll_sum, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.distill_sum, ref_distill, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.loss, ref_nll + 0.7 * ref_distill, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
    if name == "kl":
        assert parts.distill_sum >= 0


def dense_tail_reference(logits, labels, ids, probs, loss):
    """`dense_reference` plus the rest of the vocabulary as one outcome: the teacher's 1 − Σp against the
    student's mass outside the ids that have a probability, both as dense [B, L, V] tensors."""
    nll, distill, tokens = dense_reference(logits, labels, ids, probs, loss)
    target = torch.zeros(*ids.shape[:2], V).scatter_add(-1, ids, probs)[:, :-1]
    q = logits[:, :-1].float().softmax(-1)
    rest = 1 - target.sum(-1)
    rest = torch.where(rest > 1e-6, rest, 0)
    term = -rest * torch.log(1 - (q * (target > 0)).sum(-1))
    if loss == "kl":
        term = term + torch.where(rest > 0, rest * rest.log(), 0)
    return nll, distill + (term * (labels[:, 1:] != IGNORE_INDEX)).sum(), tokens


def ce_with_tail(z, i, p):  # the building blocks: the autograd path's own version of "ce" with tail=True
    return cross_entropy_to_teacher(z, i, p) + tail_cross_entropy(z, i, p)


@pytest.mark.parametrize("loss", ["ce", "kl", ce_with_tail])
@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_tail_bucket_equals_the_dense_reference_in_value_and_gradient(loss, chunk_size):
    hidden, weight, bias, labels, ids, probs = random_case(seed=3)
    g = torch.Generator().manual_seed(4)
    probs = probs * torch.rand(*probs.shape[:2], 1, generator=g)  # each row keeps part of the teacher's mass
    probs[0, 4] /= probs[0, 4].sum()  # and one row all of it: no tail
    ids[1, 2, 2] = ids[1, 2, -1]  # a dropped candidate (p = 0) shares an id with a kept one: the id is inside
    n = labels.numel()
    parts = vocab_loss(hidden.reshape(n, -1), weight, next_token_targets(labels).reshape(-1), bias=bias,
                       clm_weight=1.0, distill_weight=0.7, ids=ids.reshape(n, -1), probs=probs.reshape(n, -1),
                       distillation=loss, tail=True, chunk_size=chunk_size)
    grads = torch.autograd.grad(parts.loss, (hidden, weight, bias))
    ref_nll, ref_distill, _ = dense_tail_reference(hidden @ weight.T + bias, labels, ids, probs,
                                                   loss if isinstance(loss, str) else "ce")
    ref_grads = torch.autograd.grad(ref_nll + 0.7 * ref_distill, (hidden, weight, bias))
    torch.testing.assert_close(parts.distill_sum, ref_distill, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.loss, ref_nll + 0.7 * ref_distill, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


def test_the_tail_bucket_is_minimised_by_the_teachers_own_probabilities():
    """Renormalising a top-k that holds 40 % of the teacher's mass teaches 2.5x its probabilities; the
    bucket's loss has its minimum at the probabilities themselves, the rest spread outside the k."""
    logprobs = torch.log(torch.tensor([[0.3, 0.1]]))
    bucket, renormalised = teacher_probs(logprobs, tail="bucket"), teacher_probs(logprobs)
    torch.testing.assert_close(bucket, torch.tensor([[0.3, 0.1]]))
    torch.testing.assert_close(renormalised, torch.tensor([[0.75, 0.25]]))
    ids = torch.tensor([[0, 1]])
    for probs, want in ((bucket, [0.3, 0.1]), (renormalised, [0.75, 0.25])):
        z = torch.zeros(1, 8, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(1000):
            opt.zero_grad()
            parts = vocab_loss(z, None, torch.tensor([7]), clm_weight=0.0, ids=ids, probs=probs,
                               distill_weight=1.0, tail=True)
            parts.loss.backward()
            opt.step()
        torch.testing.assert_close(z.softmax(-1)[0, :2], torch.tensor(want), atol=1e-3, rtol=0)
    hot = teacher_probs(logprobs, temperature=2.0, tail="bucket")  # the tail is one outcome of the softmax
    flat = torch.tensor([0.3, 0.1, 0.6]).sqrt()
    torch.testing.assert_close(hot, (flat / flat.sum())[None, :2])


def test_vocab_loss_under_bf16_autocast_matches_the_reference_to_bf16_precision():
    hidden, weight, bias, labels, ids, probs = random_case(seed=1, length=33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = engine(hidden, weight, bias, labels, ids, probs, "ce", 16)
        logits = F.linear(hidden, weight, bias)  # bf16 under autocast, as an HF head computes it
    grads = torch.autograd.grad(parts.loss, (hidden, weight))
    ref_nll, ref_distill, _ = dense_reference(logits, labels, ids, probs, "ce")
    ref_grads = torch.autograd.grad(ref_nll + 0.7 * ref_distill, (hidden, weight))
    torch.testing.assert_close(parts.loss, ref_nll + 0.7 * ref_distill, rtol=1e-4, atol=1e-4)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        assert ((grad - ref).norm() / ref.norm()) < 1e-2  # bf16 matmuls


def test_backward_runs_once_and_no_grad_computes_no_gradient():
    hidden, weight, bias, labels, ids, probs = random_case()
    parts = engine(hidden, weight, bias, labels, ids, probs, "ce", 4)
    parts.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        parts.loss.backward()
    with torch.no_grad():
        again = engine(hidden, weight, bias, labels, ids, probs, "ce", 4)
    assert not again.loss.requires_grad
    torch.testing.assert_close(again.loss, parts.loss.detach())


def saved_bytes(fn, *args, **kwargs) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn(*args, **kwargs)`` runs (distinct storages)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())


@pytest.mark.parametrize("teacher", [False, True])
def test_saved_for_backward_memory_scales_with_the_chunk_not_with_the_sequence(teacher):
    """The fusion and the CLM loss keep nothing vocabulary-sized per token: the head's gradient (V x H) and
    the hidden states' (N x H) are all; the logits, 4 x N x V bytes in float32, exist one chunk at a time."""
    vocab, width = 4096, 16
    torch.manual_seed(0)
    weight = torch.randn(vocab, width, requires_grad=True)
    measured = {}
    for length in (2048, 4096):
        hidden = torch.randn(length, width, requires_grad=True)
        targets = torch.randint(0, vocab, (length,))
        extra = {"ids": torch.randint(0, vocab, (length, 10)), "probs": torch.full((length, 10), 0.1),
                 "distill_weight": 0.1} if teacher else {}
        for chunk in (1024, 128):
            measured[length, chunk] = saved_bytes(vocab_loss, hidden, weight, targets, chunk_size=chunk, **extra)
        logits_bytes = 4 * length * vocab
        bound = 4 * (vocab * width + length * width) + 4 * 1024 * vocab  # the two gradients + one chunk
        assert measured[length, 1024] <= bound < logits_bytes
        assert measured[length, 128] <= measured[length, 1024]
        # what the chunk size bounds: a dense loss over the same logits saves them (and more) whole
        dense = saved_bytes(lambda h, t: F.cross_entropy(h @ weight.T, t), hidden, targets)
        assert dense >= logits_bytes
    # doubling the sequence adds only the hidden-state gradient, N x H, not N x V
    assert measured[4096, 1024] - measured[2048, 1024] <= 4 * 2048 * width * 1.01


def tiny_model(arch: str, vocab: int = 97):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=64))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            max_position_embeddings=64))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_the_module_loss_is_the_hf_loss_for_every_zoo_architecture(arch, fused_head):
    m = CausalLMModule(model_path="unused", optim=OptimConfig(), fused_head=fused_head, loss_chunk_size=7)
    m.model = tiny_model(arch).eval()  # no dropout: two forward passes must agree
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # e.g. a prompt that is not trained on
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    loss = m.training_loss(batch)
    grads = torch.autograd.grad(loss, list(m.model.parameters()))
    reference = m.model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, list(m.model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_temperature_renormalises_over_the_stored_candidates():
    logprobs = torch.tensor([[-0.5, -1.5, float("-inf")]])
    torch.testing.assert_close(teacher_probs(logprobs), torch.tensor([[0.7311, 0.2689, 0.0]]), atol=1e-4, rtol=0)
    hot = teacher_probs(logprobs, temperature=0.5)
    assert hot[0, 0] > 0.73 and hot[0, 2] == 0


def test_mince_picks_the_lowest_ce_teacher_per_sequence_and_per_token():
    b, t, length, k = 2, 3, 4, 2
    ids = torch.arange(t).view(1, t, 1, 1).expand(b, t, length, k).clone()  # teacher j proposes id j
    probs = torch.full((b, t, length, k), 0.5)
    ce = torch.tensor([[2.0, 0.5, 1.0], [0.1, 0.3, 0.1]])  # row 1: a tie goes to the first listed teacher
    fused_ids, fused_probs, weights = fuse_teachers(ids, probs, ce, "mince")
    assert fused_ids.shape == (b, length, k)
    assert (fused_ids[0] == 1).all() and (fused_ids[1] == 0).all()
    assert weights.tolist() == [[0, 1, 0], [1, 0, 0]]
    token_ce = torch.tensor([[[3.0, 0.0, 3.0, 3.0], [1.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 0.0]]] * b)
    fused_ids, _, _ = fuse_teachers(ids, probs, token_ce, "mince")
    assert fused_ids[0, :, 0].tolist() == [1, 0, 1, 2]


def test_avgce_weights_teachers_by_softmax_of_minus_ce():
    b, t, length, k = 1, 2, 3, 2
    ids = torch.arange(t * k).view(1, t, 1, k).expand(b, t, length, k)
    probs = torch.tensor([0.75, 0.25]).expand(b, t, length, k)
    ce = torch.tensor([[1.0, 2.0]])
    fused_ids, fused_probs, weights = fuse_teachers(ids, probs, ce, "avgce")
    w = torch.softmax(-ce, -1)[0]
    assert fused_ids.shape == (b, length, t * k) and fused_ids[0, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(fused_probs[0, 0], torch.stack([0.75 * w[0], 0.25 * w[0], 0.75 * w[1], 0.25 * w[1]]))
    torch.testing.assert_close(fused_probs.sum(-1), torch.ones(b, length))
    torch.testing.assert_close(weights, w.view(1, t))


def fused_batch(b=2, length=12, t=2, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (b, length), generator=g)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids),
            "teacher_ids": torch.randint(0, 97, (b, t, length, k), generator=g),
            "teacher_logprobs": torch.randn(b, t, length, k, generator=g).log_softmax(-1),
            "teacher_ce": torch.rand(b, t, generator=g) * 3, "teacher_token_ce": torch.rand(b, t, length, generator=g),
            "teacher_fallback": torch.zeros(b, t, length, dtype=torch.bool)}


def module(cls, clm_weight: float, extra: dict | None = None, **fusion):
    m = cls(model_path="unused", optim=OptimConfig(), fusion=FusionConfig(clm_weight=clm_weight, **fusion),
            **(extra or {}))
    m.model = tiny_model("llama")
    return m


def test_lambda_one_is_the_clm_loss_in_value_and_gradient():
    batch = fused_batch()
    fuse = module(FuseLLMModule, clm_weight=1.0)
    loss = fuse.training_loss(batch)
    grads = torch.autograd.grad(loss, list(fuse.model.parameters()))
    reference = CausalLMModule.training_loss(fuse, batch)  # the plain CLM module's loss
    ref_grads = torch.autograd.grad(reference, list(fuse.model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    # and lambda < 1 really adds the distillation term
    with torch.no_grad():
        assert module(FuseLLMModule, clm_weight=0.5).training_loss(batch) != pytest.approx(float(loss))


def distillation(m, batch) -> torch.Tensor:
    """The module's mean distillation loss on ``batch`` through the engine (its own hook, autograd path)."""
    ids, probs = m.fuse(batch)
    parts = m.vocab_loss(batch, clm_weight=0.0, distill_weight=1.0, ids=ids, probs=probs,
                         distillation=m.distillation_loss)
    return parts.distill_sum / parts.tokens


def test_reverse_kl_example_subclass_is_nonnegative_and_zero_on_agreement():
    batch = fused_batch(t=1)
    m = module(ReverseKLFuseLLM, clm_weight=0.0)
    assert distillation(m, batch) > 0
    # the student's own distribution, renormalised on (distinct) candidates, as the teacher: KL = 0
    batch["teacher_ids"] = (batch["teacher_ids"][..., :1] + torch.arange(4) * 7) % 97
    with torch.no_grad():
        logits = m(batch)
    batch["teacher_logprobs"] = logits.log_softmax(-1).gather(-1, batch["teacher_ids"][:, 0]).unsqueeze(1)
    assert abs(distillation(m, batch).item()) < 1e-5


@pytest.mark.parametrize("tail", ["renormalise", "bucket"])
def test_skew_kl_with_alpha_zero_is_the_forward_kl_and_alpha_bounds_it(tail):
    batch = fused_batch(t=2)
    batch["teacher_logprobs"] = batch["teacher_logprobs"] - 0.5  # the top-k holds 61 % of the mass
    kl = module(FuseLLMModule, clm_weight=0.5, loss="kl", tail=tail)
    skew0 = module(SkewKLFuseLLM, clm_weight=0.5, extra={"alpha": 0.0}, loss="kl", tail=tail)
    loss, ref = skew0.training_loss(batch), kl.training_loss(batch)  # the autograd path vs the hand-written one
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, list(skew0.model.parameters())),
                    torch.autograd.grad(ref, list(kl.model.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    values = [distillation(module(SkewKLFuseLLM, clm_weight=0.0, extra={"alpha": a}, tail=tail), batch).item()
              for a in (0.0, 0.1, 0.5, 0.9)]
    assert all(x > y > 0 for x, y in zip(values, values[1:]))  # more teacher in the mixture: closer to it
    assert values[-1] < -torch.log(torch.tensor(0.9)).item()  # KL(p ‖ 0.9 p + 0.1 q) <= -log 0.9


def test_mince_can_compare_teachers_per_target_token():
    batch = fused_batch(t=2)
    batch["teacher_ids"][:, 0], batch["teacher_ids"][:, 1] = 5, 7  # teacher 0 proposes id 5, teacher 1 id 7
    batch["teacher_ce"] = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # per own token: teacher 0 looks better
    batch["teacher_ce_per_target_token"] = torch.tensor([[3.0, 2.5], [3.0, 2.5]])  # per target token: teacher 1
    own = module(FuseLLMModule, clm_weight=0.9)
    fair = module(FuseLLMModule, clm_weight=0.9, ce_unit="target_token")
    assert (own.fuse(batch)[0] == 5).all() and (fair.fuse(batch)[0] == 7).all()


@pytest.mark.parametrize("width", [1, 2, 4, 5, 32])
def test_span_mean_averages_each_window_over_the_positions_with_a_prediction(width):
    g = torch.Generator().manual_seed(width)
    values = torch.rand(2, 3, 11, generator=g) * 5
    missing = torch.rand(2, 3, 11, generator=g) < 0.3
    missing[0, 1] = True  # a teacher with no prediction anywhere in its row
    got = span_mean(values, missing, width)
    for b in range(2):
        for t in range(3):
            for pos in range(11):
                lo, hi = max(pos - width // 2, 0), min(pos - width // 2 + width, 11)
                keep = ~missing[b, t, lo:hi]
                want = values[b, t, lo:hi][keep].mean() if keep.any() else NO_PREDICTION
                assert float(got[b, t, pos]) == pytest.approx(float(want), rel=1e-5), (b, t, pos)
    if width == 1:  # the token level: each position's own CE
        assert torch.equal(got[~missing], values[~missing])


def test_span_level_follows_the_better_teacher_over_a_span_and_skips_a_teacher_without_predictions():
    batch = fused_batch(b=1, length=12, t=2)
    batch["teacher_ids"][:, 0], batch["teacher_ids"][:, 1] = 5, 7  # teacher 0 proposes id 5, teacher 1 id 7
    ce = torch.tensor([[[2.0] * 12, [1.0] * 12]])
    ce[0, 0, 3] = 0.5  # one lucky token of teacher 0
    fallback = torch.zeros(1, 2, 12, dtype=torch.bool)
    fallback[0, 1, 7:] = True  # teacher 1 has no prediction from position 7 on
    batch["teacher_token_ce"], batch["teacher_fallback"] = ce, fallback
    token = module(FuseLLMModule, clm_weight=0.9, level="token").fuse(batch)[0][0, :, 0]
    span = module(FuseLLMModule, clm_weight=0.9, level="span", span=4).fuse(batch)[0][0, :, 0]
    assert token.tolist() == [7, 7, 7, 5, 7, 7, 7] + [5] * 5  # the lucky token; then the only one predicting
    assert span.tolist() == [7] * 9 + [5] * 3  # over 4 tokens teacher 1 is better until its window is empty
