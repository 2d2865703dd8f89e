"""The Triton kernel of the chunked loss against the eager code it replaces on GPUs.

Runs on CUDA, or anywhere with Triton installed under its CPU interpreter (``TRITON_INTERPRET=1``,
slow but exact); skipped where neither is there (CI's CPU machines have no Triton).
"""

import os

import pytest
import torch

from fusion import kernels
from fusion.modules.losses import IGNORE_INDEX, vocab_loss

pytestmark = pytest.mark.skipif(
    kernels.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA, or Triton with TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [kernels._BLOCK, 5003])  # a whole block, and a ragged last one
def test_scaled_softmax_is_softmax_times_scale_and_log_z(dtype, vocab):
    g = torch.Generator(DEVICE).manual_seed(0)
    logits = (torch.randn(9, vocab, device=DEVICE, generator=g) * 4).to(dtype)
    scale = torch.rand(9, device=DEVICE, generator=g)
    scale[3] = 0  # a masked row: all zeros
    ref_lse = logits.double().logsumexp(-1)
    ref = (logits.double() - ref_lse[:, None]).exp() * scale[:, None].double()
    out, lse = kernels.scaled_softmax(logits, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert ((out.double() - ref).norm() / ref.norm()) < tolerance
    assert (out[3] == 0).all()
    in_place = logits.clone()
    again, _ = kernels.scaled_softmax(in_place, scale, out=in_place)
    assert again.data_ptr() == in_place.data_ptr() and torch.equal(again, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("through_logits", [False, True])
@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("tail", [False, True])
def test_vocab_loss_with_the_kernel_equals_the_eager_path(monkeypatch, dtype, through_logits, loss, tail):
    g = torch.Generator(DEVICE).manual_seed(1)
    n, width, vocab, k = 37, 16, 5003, 6
    hidden = torch.randn(n, width, device=DEVICE, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, device=DEVICE, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=DEVICE, generator=g)
    targets[:5] = IGNORE_INDEX
    ids = torch.randint(0, vocab, (n, k), device=DEVICE, generator=g)
    ids[:, 1] = ids[:, 0]  # duplicates add up
    probs = torch.softmax(torch.randn(n, k, device=DEVICE, generator=g), -1)
    if tail:  # the candidates hold part of the teacher's mass; the rest is one more outcome
        probs = probs * torch.rand(n, 1, device=DEVICE, generator=g)

    def run():
        x = hidden @ weight.T if through_logits else hidden
        parts = vocab_loss(x, None if through_logits else weight, targets, clm_weight=0.9 / n, ids=ids, probs=probs,
                           distill_weight=0.1 / n, distillation=loss, tail=tail, chunk_size=16)
        grads = torch.autograd.grad(parts.loss, (hidden, weight))
        return parts, grads

    fused, fused_grads = run()
    monkeypatch.setattr(kernels, "available", lambda tensor: False)
    eager, eager_grads = run()
    for a, b in zip(fused[:3], eager[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, eager_grads):
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradient rounded once, or twice
        assert ((a.float() - b.float()).norm() / b.float().norm()) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_log_z_is_logsumexp_with_nan_and_inf_as_log_softmax_has_them(dtype):
    g = torch.Generator(DEVICE).manual_seed(1)
    logits = (torch.randn(6, 5003, device=DEVICE, generator=g) * 4).to(dtype)
    logits[1, 17] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :100] = float("-inf")  # some zero probabilities: log Z is still finite
    logits[4] = float("-inf")
    lse = kernels.row_log_z(logits[:, :5000])  # a view whose rows are contiguous but strided
    want = torch.log_softmax(logits[:, :5000].float(), -1)[:, 0]  # log Z = logit - log-prob
    want = logits[:, 0].float() - want
    finite = [0, 3, 5]
    ref = logits[finite, :5000].double().logsumexp(-1)
    torch.testing.assert_close(lse[finite].double(), ref, rtol=0, atol=1e-5)
    assert torch.isnan(lse[[1, 2]]).all() and torch.isnan(want[[1, 2]]).all()  # NaN, and inf - inf
    assert not torch.isfinite(lse[4])  # every logit -inf: no distribution
