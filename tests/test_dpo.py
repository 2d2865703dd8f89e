"""DPO and WRPO (`fusion.modules.dpo`, `fusion.modules.wrpo`, `fusion.modules.logps`) against TRL itself and dense
references: the losses and metrics of TRL 1.16's DPOTrainer on the same batch, the chunked log-probs and their
gradients against ``log_softmax`` + gather, and WRPO's identities (``shared/reference/wrpo_fusechat3.md`` §3.4)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fusion.config import OptimConfig
from fusion.modules.dpo import DPOModule, log_ratios, preference_loss
from fusion.modules.logps import sequence_logps
from fusion.modules.losses import IGNORE_INDEX, labelled_rows, vocab_loss
from fusion.modules.wrpo import WRPOModule, alpha_at

trl = pytest.importorskip("trl")  # a test-only requirement (requirements.txt)

# Two pairs of token ids; responses end with EOS (1), as TRL appends it.
EXAMPLES = [{"prompt_ids": [3, 4, 5], "chosen_ids": [10, 11, 1], "rejected_ids": [20, 1]},
            {"prompt_ids": [6, 7], "chosen_ids": [12, 1], "rejected_ids": [21, 22, 23, 1]}]
REF_CHOSEN, REF_REJECTED = torch.tensor([-12.8, -8.0]), torch.tensor([-8.6, -16.2])


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).float()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def trl_trainer(model, loss_type, beta, label_smoothing, tmp_path, examples=EXAMPLES):
    from datasets import Dataset

    words = [{k: " ".join(f"w{i}" for i in e[f"{k}_ids"] if i != 1) for k in ("prompt", "chosen", "rejected")}
             for e in examples]
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                         gradient_checkpointing=False, precompute_ref_log_probs=True, loss_type=loss_type, beta=beta,
                         label_smoothing=label_smoothing, per_device_train_batch_size=len(examples))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(words),
                              processing_class=tokenizer())


def trl_batch(examples=EXAMPLES, ref_chosen=REF_CHOSEN, ref_rejected=REF_REJECTED):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)([dict(e) for e in examples])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen.clone(), ref_rejected.clone()
    return batch


def ours(batch):
    """TRL's batch in our layout: rows [chosen; rejected], labels on the completion, reference log-probs."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
            "ref_logps": torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])}


def module(cls, model, **kwargs):
    m = cls(model_path="unused", optim=OptimConfig(), loss_chunk_size=3, **kwargs)
    m.model = model  # configure_model keeps a model it already has
    return m


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_loss_and_metrics_equal_trls_dpo_trainer(loss_type, tmp_path):
    model = tiny_llama()
    trainer = trl_trainer(copy.deepcopy(model), loss_type, 0.1, 0.0, tmp_path)
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, trl_batch())
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics = module(DPOModule, model, loss_type=loss_type, beta=0.1).preference_step(ours(trl_batch()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6), name


def test_label_smoothing_is_conservative_dpo_as_trls_aot_computes_it_for_one_pair(tmp_path):
    # TRL 1.x's sigmoid loss ignores label_smoothing; its `aot` loss is cDPO's formula when the batch is one pair
    model = tiny_llama()
    for example, rc, rr in zip(EXAMPLES, REF_CHOSEN, REF_REJECTED):
        batch = trl_batch([example], rc[None], rr[None])
        trainer = trl_trainer(copy.deepcopy(model), "aot", 0.1, 0.2, tmp_path, [example])
        trainer.model.train()
        expected = trainer.compute_loss(trainer.model, batch)
        loss, _ = module(DPOModule, model, beta=0.1, label_smoothing=0.2).preference_step(ours(batch))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_gradient_equals_autograd_through_the_dense_logits():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    batch = ours(trl_batch())
    loss, _ = module(DPOModule, model, beta=0.5).preference_step(batch)
    loss.backward()
    # dense reference: full float32 logits, log_softmax, gather (what TRL's fused head computes)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    token = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logps = (token * (labels != IGNORE_INDEX)).sum(1)
    chosen, rejected = (logps - batch["ref_logps"]).chunk(2)
    (-F.logsigmoid(0.5 * (chosen - rejected))).mean().backward()
    for (name, ours_p), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours_p.grad, theirs.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_sequence_logps_and_gradients_equal_log_softmax(bias):
    torch.manual_seed(0)
    n, hidden_size, vocab, sequences = 23, 8, 50, 4
    hidden = torch.randn(n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,))
    targets[[0, 5, 6, 22]] = IGNORE_INDEX
    segments = torch.sort(torch.randint(0, sequences, (n,))).values
    upstream = torch.randn(sequences, dtype=torch.float64)
    sums, counts = sequence_logps(hidden, weight, targets, segments, sequences, bias=b, chunk_size=5)
    (sums.double() * upstream).sum().backward()
    got = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    token = F.linear(hidden, weight, b).log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    token = torch.where(targets != IGNORE_INDEX, token, 0.0)
    dense = torch.zeros(sequences, dtype=torch.float64).index_add(0, segments, token)
    (dense * upstream).sum().backward()
    want = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
    assert torch.allclose(sums.double(), dense, rtol=1e-5)  # the sums are float32
    assert counts.tolist() == torch.zeros(sequences).index_add(0, segments, (targets != IGNORE_INDEX).float()).tolist()
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_a_padded_batch_gives_each_response_the_log_prob_it_has_alone():
    model = tiny_llama()
    m = module(DPOModule, model)
    batch = ours(trl_batch())
    together = m.sequence_logps(batch)[0]
    for row in range(batch["input_ids"].size(0)):
        length = int(batch["attention_mask"][row].sum())
        alone = {k: batch[k][row:row + 1, :length] for k in ("input_ids", "attention_mask", "labels")}
        assert m.sequence_logps(alone)[0].item() == pytest.approx(together[row].item(), rel=1e-5)


def wrpo_batch():
    """Three responses per prompt: [source_chosen; chosen; rejected], right-padded, with reference log-probs."""
    rows = [[3, 4, 30, 31, 1], [6, 7, 32, 1], [3, 4, 10, 11, 1], [6, 7, 12, 1], [3, 4, 20, 1], [6, 7, 21, 22, 23, 1]]
    prompt = [2, 2, 2, 2, 2, 2]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.clone()
    for i, p in enumerate(prompt):
        labels[i, :p] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "ref_logps": torch.tensor([-9.0, -7.5, -8.0, -6.0, -7.0, -12.0])}


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "ipo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wrpo_is_dpo_on_the_alpha_mixed_chosen_log_ratios(alpha, loss_type):
    model = tiny_llama()
    batch = wrpo_batch()
    wrpo = module(WRPOModule, model, loss_type=loss_type, beta=0.2, alpha=alpha)
    loss, metrics = wrpo.wrpo_step(batch, alpha)
    dpo = module(DPOModule, model, loss_type=loss_type, beta=0.2)
    policy, tokens = dpo.sequence_logps(batch)
    source, target, rejected = log_ratios(policy, batch["ref_logps"], tokens, loss_type).view(3, -1)
    # (a): the loss is linear in the log-ratios, so WRPO(α) is DPO fed the α-mixed chosen side
    mixed = preference_loss(alpha * source + (1 - alpha) * target, rejected, loss_type, 0.2).mean()
    assert loss.item() == pytest.approx(mixed.item(), rel=1e-6)
    # (b): α = 0 is DPO on (target chosen, rejected), α = 1 DPO on (source chosen, rejected), as DPOModule runs them
    if alpha in (0.0, 1.0):
        keep = [1, 2] if alpha == 0.0 else [0, 2]
        rows = torch.cat([torch.arange(2) + 2 * k for k in keep])
        pair = {k: v[rows] for k, v in batch.items()}
        assert loss.item() == pytest.approx(dpo.preference_step(pair)[0].item(), rel=1e-6)
    assert metrics["alpha"].item() == pytest.approx(alpha)


def test_wrpo_target_accuracy_is_per_example():
    model = tiny_llama()
    batch = wrpo_batch()
    wrpo = module(WRPOModule, model)
    _, metrics = wrpo.wrpo_step(batch, 0.1)
    policy, _ = wrpo.sequence_logps(batch)
    source, target, rejected = (policy - batch["ref_logps"]).view(3, -1)
    assert metrics["rewards/target_accuracies"].item() == (target > rejected).float().mean().item()
    assert metrics["rewards/source_accuracies"].item() == (source > rejected).float().mean().item()


def test_alpha_grows_linearly_over_optimizer_steps_and_stays_at_its_end():
    assert [alpha_at(s, 10, 0.1) for s in (0, 5, 10, 12)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    assert alpha_at(3, 10, 0.1, dynamic=False) == 0.1


def test_online_and_precomputed_references_give_the_same_loss(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    batch = ours(trl_batch())
    online = DPOModule(model_path=str(tmp_path / "m"), optim=OptimConfig(), reference="online")
    online.configure_model()
    batch["ref_logps"] = online.sequence_logps(batch)[0].detach()  # the starting model is the reference
    with torch.no_grad():
        for p in online.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the policy moves away from it
    loss_online, _ = online.preference_step({k: v for k, v in batch.items() if k != "ref_logps"})
    online.reference = "precomputed"
    loss_precomputed, _ = online.preference_step(batch)
    assert loss_online.item() == pytest.approx(loss_precomputed.item(), rel=1e-6)
    assert loss_online.item() != pytest.approx(0.6931, abs=1e-4)  # the policy did move: the test can fail


def test_only_the_labelled_rows_go_through_the_head_and_prompt_rows_get_no_gradient():
    targets = torch.tensor([IGNORE_INDEX] * 4 + [3, 1, 4, 1])
    assert labelled_rows(targets).tolist() == [4, 5, 6, 7]
    assert labelled_rows(torch.tensor([3] * 15 + [IGNORE_INDEX])) is None  # text: nearly every row counts
    torch.manual_seed(0)
    hidden = torch.randn(8, 6, requires_grad=True)
    weight = torch.randn(10, 6, requires_grad=True)
    segments = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    sums, _ = sequence_logps(hidden, weight, targets, segments, 2)
    parts = vocab_loss(hidden, weight, targets)
    ((sums * torch.tensor([1.0, 2.0])).sum() + 3 * parts.loss).backward()  # weights that do not cancel
    assert hidden.grad[:4].eq(0).all() and hidden.grad[4:].ne(0).all()
    gold = F.log_softmax(hidden[4:] @ weight.T, -1).gather(-1, targets[4:, None]).squeeze(-1).detach()
    assert torch.allclose(sums, torch.stack([gold[:2].sum(), gold[2:].sum()]), atol=1e-5)
    assert torch.allclose(parts.loss, -gold.sum(), atol=1e-5) and parts.tokens == 4
