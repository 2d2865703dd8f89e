"""FuseLLM's math: the sparse losses against dense references, the fusion functions, lambda = 1 is CLM."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fusion.config import FusionConfig, OptimConfig
from fusion.modules.base import CausalLMModule
from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import IGNORE_INDEX, fuse_teachers, sparse_distillation, teacher_probs
from fusion.modules.reverse_kl import ReverseKLFuseLLM

V = 41


def random_case(seed: int = 0, b: int = 2, length: int = 9, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (b, length), generator=g)
    labels[0, :3] = IGNORE_INDEX
    ids = torch.randint(0, V, (b, length, k), generator=g)
    ids[..., 1] = ids[..., 0]  # duplicates must add up
    probs = torch.softmax(torch.randn(b, length, k, generator=g), -1)
    probs[..., -1] = 0  # a dropped candidate
    probs = probs / probs.sum(-1, keepdim=True)
    return logits, labels, ids, probs


def dense_reference(logits, labels, ids, probs, loss):
    """The straightforward dense computation: scatter the teacher into [B, L, V] and compare in full."""
    target = torch.zeros(*ids.shape[:2], V).scatter_add(-1, ids, probs)[:, :-1]
    logq = logits[:, :-1].log_softmax(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    per_position = -(target * logq).sum(-1)
    if loss == "kl":
        per_position = (torch.where(target > 0, target * target.log(), 0) - target * logq).sum(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll, (per_position * mask).sum(), mask.sum()


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_sparse_loss_equals_the_dense_reference_in_value_and_gradient(loss, chunk_size):
    logits, labels, ids, probs = random_case()
    nll, distill, tokens = sparse_distillation(logits, labels, ids, probs, loss, chunk_size)
    (grad,) = torch.autograd.grad(nll + 0.7 * distill, logits)
    ref_nll, ref_distill, ref_tokens = dense_reference(logits, labels, ids, probs, loss)
    (ref_grad,) = torch.autograd.grad(ref_nll + 0.7 * ref_distill, logits)
    assert tokens == ref_tokens
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distill, ref_distill, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    if loss == "kl":
        assert distill >= 0


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


def module(cls, clm_weight: float, **fusion):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    m = cls(model_path="unused", optim=OptimConfig(), fusion=FusionConfig(clm_weight=clm_weight, **fusion))
    m.model = LlamaForCausalLM(config)
    return m


def test_lambda_one_is_the_clm_loss_in_value_and_gradient():
    batch = fused_batch()
    fuse = module(FuseLLMModule, clm_weight=1.0)
    loss = fuse.training_loss(batch)
    grads = torch.autograd.grad(loss, list(fuse.model.parameters()))
    reference, _ = CausalLMModule.clm_loss(fuse, fuse(batch), batch)  # the plain CLM module's loss
    ref_grads = torch.autograd.grad(reference, list(fuse.model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    # and lambda < 1 really adds the distillation term
    with torch.no_grad():
        assert module(FuseLLMModule, clm_weight=0.5).training_loss(batch) != pytest.approx(float(loss))


def test_reverse_kl_example_subclass_is_nonnegative_and_zero_on_agreement():
    batch = fused_batch(t=1)
    m = module(ReverseKLFuseLLM, clm_weight=0.0)
    logits = m(batch)
    ids, probs = m.fuse(batch)
    _, kl = m.distillation(logits, batch, ids, probs)
    assert kl > 0
    # the student's own distribution, renormalised on (distinct) candidates, as the teacher: KL = 0
    batch["teacher_ids"] = (batch["teacher_ids"][..., :1] + torch.arange(4) * 7) % 97
    own = logits.detach().log_softmax(-1).gather(-1, batch["teacher_ids"][:, 0])
    batch["teacher_logprobs"] = own.unsqueeze(1)
    ids, probs = m.fuse(batch)
    _, kl = m.distillation(logits, batch, ids, probs)
    assert abs(kl.item()) < 1e-5


def test_mince_can_compare_teachers_per_target_token():
    batch = fused_batch(t=2)
    batch["teacher_ids"][:, 0], batch["teacher_ids"][:, 1] = 5, 7  # teacher 0 proposes id 5, teacher 1 id 7
    batch["teacher_ce"] = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # per own token: teacher 0 looks better
    batch["teacher_ce_per_target_token"] = torch.tensor([[3.0, 2.5], [3.0, 2.5]])  # per target token: teacher 1
    own = module(FuseLLMModule, clm_weight=0.9)
    fair = module(FuseLLMModule, clm_weight=0.9, ce_unit="target_token")
    assert (own.fuse(batch)[0] == 5).all() and (fair.fuse(batch)[0] == 7).all()
