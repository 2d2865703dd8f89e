"""`TeacherModule.predict_step` (issue 10): top-k on the logits in their dtype and a chunked float32
log-softmax give the numbers of a whole-sequence float32 log-softmax, flag NaN/inf chunks, never make
a float32 [L, V] tensor and copy to the host once per batch."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusion import kernels
from fusion.data.representations import TeacherModule
from fusion.zoo import resolve_model

LENGTHS = [41, 17, 2, 30]  # padded to 41 in one batch; a 2-token sequence has one prediction row


@pytest.fixture(scope="module")
def teacher_path(zoo_dir) -> str:
    return resolve_model("zoo:gpt2-code", "small", zoo_dir)


def teacher(path: str, top_k: int, dtype: str = "float32") -> TeacherModule:
    module = TeacherModule(path, dtype, "none", top_k)
    module.configure_model()
    return module


def make_batch(vocab: int, lengths: list[int] = LENGTHS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "lengths": torch.tensor(lengths),
            "chunk_ids": torch.arange(100, 100 + len(lengths))}


@torch.inference_mode()
def reference(model, batch: dict, top_k: int) -> list[dict]:
    """The implementation before issue 10: a float32 log-softmax of each whole sequence, top-k on it."""
    input_ids = batch["input_ids"].to(model.device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(model.device)).logits.cpu()
    out = []
    for row, length in enumerate(batch["lengths"].tolist()):
        logprobs = torch.log_softmax(logits[row, :length - 1].float(), dim=-1)
        top = logprobs.topk(top_k, dim=-1)
        ce = -logprobs.gather(-1, batch["input_ids"][row, 1:length, None]).squeeze(-1)
        out.append({"logprobs": logprobs.numpy(), "ids": top.indices.numpy(), "values": top.values.numpy(),
                    "ce": ce.numpy(), "tokens": batch["input_ids"][row, :length].numpy()})
    return out


def assert_matches(got, ref: list[dict], top_k: int) -> None:
    assert len(got) == len(ref)
    fp16 = dict(rtol=2.0 ** -11, atol=1e-6)  # well within the float16 the shards store
    for chunk, want, chunk_id in zip(got, ref, range(100, 100 + len(ref))):
        n = len(want["tokens"]) - 1
        assert chunk.chunk_id == chunk_id and not chunk.bad
        np.testing.assert_array_equal(chunk.tokens, want["tokens"])
        assert chunk.topk_ids.shape == chunk.topk_logprobs.shape == (n, top_k) and chunk.token_ce.shape == (n,)
        assert chunk.topk_ids.dtype == np.int64 and chunk.topk_logprobs.dtype == chunk.token_ce.dtype == np.float32
        np.testing.assert_allclose(chunk.topk_logprobs, want["values"], **fp16)
        np.testing.assert_allclose(chunk.token_ce, want["ce"], **fp16)
        # The ids are a top-k of the reference log-probs: the same ids except where values tie exactly.
        rows = np.arange(n)[:, None]
        np.testing.assert_allclose(want["logprobs"][rows, chunk.topk_ids], want["values"], **fp16)
        assert all(len(set(r)) == top_k for r in chunk.topk_ids.tolist())
        differ = chunk.topk_ids != want["ids"]
        assert np.array_equal(want["logprobs"][rows, chunk.topk_ids][differ], want["values"][differ])


@pytest.mark.parametrize("top_k", [1, 10, "vocab-3"])
@pytest.mark.parametrize("chunk", ["default", "7 rows", "1 row"])
def test_predict_step_matches_a_whole_sequence_log_softmax(teacher_path, monkeypatch, top_k, chunk):
    module = teacher(teacher_path, 1)
    model = module.teacher[0]
    vocab = model.config.vocab_size
    module.top_k = top_k = vocab - 3 if top_k == "vocab-3" else top_k
    if chunk != "default":  # several chunks per sequence, a last one shorter
        monkeypatch.setattr(TeacherModule, "_CHUNK_ELEMENTS", vocab * (7 if chunk == "7 rows" else 1))
    batch = make_batch(vocab)
    assert_matches(module.predict_step(batch), reference(model, batch, top_k), top_k)


def test_bfloat16_logits_tie_often_and_still_match(teacher_path, monkeypatch):
    # bf16 logits have 8 significant bits: top-k on them ties where the float32 log-probs tie too.
    module = teacher(teacher_path, 10, "bfloat16")
    model = module.teacher[0]
    monkeypatch.setattr(TeacherModule, "_CHUNK_ELEMENTS", model.config.vocab_size * 5)
    batch = make_batch(model.config.vocab_size, seed=1)
    assert model(input_ids=batch["input_ids"][:1]).logits.dtype == torch.bfloat16
    assert_matches(module.predict_step(batch), reference(model, batch, 10), 10)


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_log_z_path_on_cuda_matches_too(teacher_path, dtype):
    module = teacher(teacher_path, 10, dtype)
    model = module.teacher[0]
    batch = make_batch(model.config.vocab_size, seed=2)
    model.to("cuda")
    assert kernels.available(torch.empty(1, device="cuda"))
    assert_matches(module.predict_step(batch), reference(model, batch, 10), 10)  # the same logits, eager


class _Poisoned(torch.nn.Module):
    """A teacher whose logits get NaN / inf / -inf written at chosen (sequence, position, token)s."""

    def __init__(self, model, poison: list[tuple[int, int, int | slice, float]]) -> None:
        super().__init__()
        self.model, self.poison = model, poison

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, **inputs):
        logits = self.model(**inputs).logits.clone()
        for row, position, token, value in self.poison:
            logits[row, position, token] = value
        return SimpleNamespace(logits=logits)


def test_nan_and_inf_logits_flag_their_chunk_bad(teacher_path, monkeypatch):
    module = teacher(teacher_path, 5)
    model = module.teacher[0]
    batch = make_batch(model.config.vocab_size)
    ids = batch["input_ids"]
    not_next = int(ids[3, 6]) + 1 if int(ids[3, 6]) + 1 < model.config.vocab_size else 0
    poison = [(0, 3, 7, float("nan")),  # one NaN logit: the whole row's log-softmax is NaN
              (1, 15, slice(None), float("nan")),  # the last prediction row, all NaN
              (2, 1, 0, float("nan")),  # the 2-token sequence's last position: it predicts nothing
              (2, 20, slice(None), float("nan")),  # its padding
              (3, 5, not_next, float("-inf"))]  # -inf for a token that is not next: a zero probability
    monkeypatch.setattr(TeacherModule, "_CHUNK_ELEMENTS", model.config.vocab_size * 4)
    module.teacher[0] = _Poisoned(model, poison)
    got = module.predict_step(batch)
    assert [c.bad for c in got] == [True, True, False, False]
    assert np.isnan(got[0].token_ce[3]) and np.isfinite(np.delete(got[0].token_ce, 3)).all()
    assert np.isnan(got[1].topk_logprobs[15]).all()

    inf = [(0, 2, int(ids[0, 3]), float("-inf")),  # the next token's logit is -inf: CE is inf
           (1, 0, 11, float("inf"))]  # +inf: inf - inf in the log-softmax, NaN
    module.teacher[0] = _Poisoned(model, inf)
    got = module.predict_step(batch)
    assert [c.bad for c in got] == [True, True, False, False]
    assert got[0].token_ce[2] == np.inf and np.isnan(got[1].token_ce[0])


class _Shapes(TorchDispatchMode):
    """Records the dtype and shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, tuple(t.shape)))
        return out


def test_no_float32_copy_of_the_logits_and_one_host_copy(teacher_path, monkeypatch):
    module = teacher(teacher_path, 10, "bfloat16")
    vocab = module.teacher[0].config.vocab_size
    monkeypatch.setattr(TeacherModule, "_CHUNK_ELEMENTS", vocab * 8)
    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or cpu(self, *a, **k))
    with _Shapes() as shapes:
        module.predict_step(make_batch(vocab))
    wide = [shape for dtype, shape in shapes.seen if dtype == torch.float32 and shape and shape[-1] == vocab]
    assert wide and max(int(np.prod(s)) for s in wide) <= 8 * vocab, wide  # only the chunk buffer
    assert len(copies) == 1


@pytest.mark.parametrize("vocab", [50, 1280, 1290, 5003])
def test_block_top_k_picks_the_largest_values(vocab):
    """`_topk_ids` (block maxima, then the top k among the best blocks' and the tail's columns) returns the
    values `torch.topk` returns, in descending order, distinct ids, with ties, -inf, vocabularies that
    fill no whole block and ones with fewer blocks than k."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=g).to(torch.bfloat16)  # bf16: many exact ties
    logits[3] = 0.0  # all tied
    logits[4, : vocab // 2] = float("-inf")
    logits[5, -3:] = 50.0  # the largest values sit in the tail columns
    for k in (1, 10, 12):
        ids = TeacherModule._topk_ids(logits, k)
        want = logits.topk(k, dim=-1).values
        assert ids.shape == (64, k)
        assert torch.equal(logits.gather(1, ids), want)
        assert all(len(set(row)) == k for row in ids.tolist())
