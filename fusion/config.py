"""The recipe's schema: one dataclass per section, each field typed and documented.

This module is a leaf: it imports nothing of the package, so every layer (data, modules, stages,
methods) can read its settings from here without an import cycle. Loading a YAML file into these
classes, with its checks, is `fusion.recipe`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def label_of(name: str | None, path: str) -> str:
    """A model's name in tables, logs and folders: its `name`, else the last part of its path or zoo name."""
    return name or path.rstrip("/").split("/")[-1].split(":")[-1]


@dataclass
class ZooConfig:
    """Where the embedded tiny models come from (`zoo:NAME` model paths)."""

    size: Literal["full", "small"] = "full"
    """`full` for the embedded defaults (built in a few minutes), `small` for tests (seconds)."""
    dir: str | None = None
    """Cache folder; default `$FUSION_ZOO_DIR` or `~/.cache/fusion/zoo`."""


@dataclass
class ModelConfig:
    """The model being trained (the target)."""

    path: str = "zoo:target"
    """A Hugging Face hub id, a local HF folder, or `zoo:NAME` for the embedded tiny zoo."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype when loading; `auto` means bfloat16 under `bf16-true` precision, else float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF `gradient_checkpointing_enable`, non-reentrant)."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained`, e.g. `sdpa` or `flash_attention_2`; None lets transformers choose."""
    trust_remote_code: bool = False
    """Needed by models with code on the hub, e.g. MPT-7B."""
    fused_head: bool = True
    """Compute the LM head inside the chunked loss (`fusion.modules.losses.vocab_loss`), so the `[B, T, V]` logits
    never exist whole; heads it cannot compute (logit soft-capping or scaling) fall back to the model's logits."""
    loss_chunk_size: int | None = None
    """Tokens per chunk of the loss, which bounds its transient memory (chunk x vocabulary logits); None: the power of
    two at or above 2^27 / vocabulary (1,024 tokens at 152k, 8,192 at 32k: 0.25-0.5 GB in bf16)."""


@dataclass
class DataConfig:
    """The text the target trains on."""

    source: str = "embedded"
    """`embedded` (the stdlib corpus), a hub dataset id, a `save_to_disk` folder, or .txt/.jsonl/.parquet files."""
    subset: str | None = None
    """Hub dataset configuration name, if it has several."""
    domains: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Embedded corpus only: which domains to use; each gets its own validation perplexity."""
    text_field: str = "text"
    """Column that holds the text."""
    train_split: str = "train"
    validation_split: str | None = "validation"
    """Used if the dataset has it; otherwise `validation_fraction` of the train documents is held out."""
    validation_fraction: float = 0.05
    block_size: int = 256
    """Tokens per training example; documents are packed, each ended by EOS."""
    max_validation_blocks: int | None = None
    """Cap on validation blocks per validation set, to keep evaluation cheap."""
    cache_dir: str | None = None
    """Where tokenized blocks are cached; default `$FUSION_CACHE/data` or `~/.cache/fusion/data`."""
    preprocessing_workers: int = 1
    """Processes for tokenization (`datasets.map(num_proc=...)`)."""
    num_workers: int = 0
    """DataLoader worker processes per device."""


@dataclass
class ChatConfig:
    """Conversations for chat training (`fusion.data.chat`): rows of `data.source` (its splits, caching and workers as
    for text), each rendered with a chat template and trained on the assistant's turns only."""

    column: str | None = None
    """The column holding each conversation: a list of `{role, content}` messages (role: system, user, assistant) or of
    ShareGPT `{from, value}` ones (from: system, human/user, gpt/assistant). None: `messages`, else `conversations`,
    else the preference columns `prompt`, `chosen`, `rejected` (training on the prompt and the chosen answer)."""
    template: str | None = None
    """A Jinja chat template, or a file holding one, that renders every conversation (FuseChat renders every model's
    input with the pivot's); None: the tokenizer's own `chat_template`. BOS is in the text only if the template writes
    it (`{{ bos_token }}`), as in `apply_chat_template(tokenize=True)` at inference."""
    max_length: int = 2048
    """Tokens per conversation at most. A longer one loses whole exchanges from its end while an assistant turn is left;
    one whose first exchange is longer is cut at this many tokens; one left with no assistant token is dropped. The
    data module prints how many of each."""
    skills: list[str] = field(default_factory=lambda: ["arithmetic", "stdlib", "code"])
    """`data.source: embedded` only: the skills of the embedded chat tasks (`fusion.data.skills`) to train on; each gets
    its own held-out perplexity and accuracy."""
    skip_malformed: bool = False
    """Skip rows that are not a conversation to train on (unknown role, empty content, roles not alternating, a system
    message not first, no assistant turn, ...), counted by reason, instead of stopping at the first with an error
    naming its row."""


@dataclass
class EvaluateConfig:
    """How chat runs are evaluated after (and before) training (`fusion.chat_eval`)."""

    questions: int = 200
    """Held-out questions per skill of the embedded chat tasks, answered greedily and checked by its verifier."""
    max_new_tokens: int = 64
    """Tokens an answer may take; one that has not ended by then is judged as it stands."""
    batch_size: int = 64
    """Questions answered together."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (e.g. `[gsm8k, ifeval]`) to run on the exported model after training (the `lm-eval`
    extra); their metrics go to results.json under `lm_eval`."""
    lm_eval_batch_size: int = 8


@dataclass
class SamplerConfig:
    """A chat model to sample responses from, with its own decoding settings (FuseChat-3.0 sets them per source)."""

    path: str
    """A Hugging Face hub id, a local HF folder, or `zoo:NAME`."""
    name: str | None = None
    """Label in tables and folders; default: the last part of `path`."""
    template: str | None = None
    """A Jinja chat template (or a file holding one) to render the prompts with; None: the model's own."""
    temperature: float = 0.8
    """Sampling temperature; 0 means greedy (then every sample of a prompt is the same)."""
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    """A response that has not ended by then is kept, with finish reason `length`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; `auto` = bfloat16 on GPUs, float32 on CPUs."""
    trust_remote_code: bool = False

    @property
    def label(self) -> str:
        return label_of(self.name, self.path)


@dataclass
class SamplingConfig:
    """Responses sampled from chat models (`fusion.data.responses`): `n` per prompt per model, stored in shards."""

    models: list[SamplerConfig] = field(default_factory=list)
    """The models to sample, each with its decoding settings."""
    n: int = 4
    """Responses per prompt per model (FuseChat-3.0: 5 for instructions, 8 for code)."""
    prompts: int | None = None
    """Prompts to sample: per skill for the embedded chat tasks (default 100), the first N rows otherwise (default
    all)."""
    split: str = "train"
    """The split the prompts come from: the embedded tasks' `train` or `test`, or a split of `data.source`."""
    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: `generate` with a KV cache through `Trainer.predict` (any device, sharded over ranks); `vllm`: a vLLM
    engine (GPUs; the `vllm` extra)."""
    batch_size: int = 16
    """Prompts per `generate` call (`hf`); each gives `n` sequences."""
    prompts_per_shard: int = 64
    """Prompts per shard file: the unit of resumption."""


@dataclass
class ScoringConfig:
    """How sampled responses are scored (`fusion.data.rewards`): rule verifiers and, optionally, a reward model, which
    chat runs also use for the mean reward of their held-out answers before and after training."""

    verify: bool = True
    """Check each response of the embedded chat tasks (or of rows with `skill` and `reference` columns) with its
    skill's verifier: numbers for arithmetic, the reference for stdlib, running the tests for code."""
    reward_model: str | None = None
    """An `AutoModelForSequenceClassification` reward model (hub id, folder or `zoo:NAME`) that scores each prompt and
    response rendered with its own chat template; None: no reward."""
    trust_remote_code: bool = False
    """Opt-in for reward models with code on the hub (e.g. `RLHFlow/ArmoRM-Llama3-8B-v0.1`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = 8
    """Conversations per reward-model forward."""
    max_length: int = 4096
    """Tokens per scored conversation; longer ones are cut from the left (the response's end is kept)."""
    workers: int = 2
    """Code answers checked at once (each in its own sandboxed process)."""


@dataclass
class TeacherConfig:
    """A model whose next-token distributions the target learns from (a FuseLLM "source")."""

    path: str
    """A Hugging Face hub id, a local HF folder, or `zoo:NAME`. The target itself may be one (FuseLLM includes it)."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    name: str | None = None
    """Label in tables and logs; default: the last part of `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for extraction; `auto` = bfloat16 on GPUs, float32 on CPUs."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes loading: `8bit` (LLM.int8) or `4bit` (NF4, bf16 compute) to fit big teachers on small GPUs."""
    trust_remote_code: bool = False
    """Needed by models with code on the hub, e.g. MPT-7B."""
    attn_implementation: str | None = None

    @property
    def label(self) -> str:
        return label_of(self.name, self.path)


@dataclass
class RepresentationsConfig:
    """How the teachers' top-k distributions are computed and stored (`fusion.data.store`)."""

    top_k: int = 10
    """Candidates kept per position (the paper: 10)."""
    batch_size: int = 8
    """Chunks per forward pass per device."""
    chunks_per_shard: int = 256
    """Chunks per shard file: the unit of resumption (a killed extraction loses at most one shard per device)."""
    dir: str | None = None
    """Where shards are kept, shared by all runs; default `$FUSION_CACHE/representations` or `~/.cache/fusion/...`."""
    max_chunks: int | None = None
    """Use only the first N training chunks (a slice of a big corpus; the rows wholly within them); None = all."""


@dataclass
class FusionConfig:
    """FuseLLM's objective: loss = clm_weight * CLM + (1 - clm_weight) * distillation on the fused teachers."""

    alignment: Literal["mined", "exact", "offsets", "prefix"] = "mined"
    """Token alignment (`fusion.data.alignment`): the paper's MinED DTW, exact-match DTW (the paper's EM
    ablation), byte offsets, or `prefix`: every position where both tokenizations have a boundary, the
    teacher's candidates projected onto the target token its tokenizer would emit first for them."""
    function: Literal["mince", "avgce"] = "mince"
    """MinCE: the distribution of the teacher with the lowest cross-entropy; AvgCE: teachers weighted by
    softmax(-CE)."""
    level: Literal["sequence", "span", "token"] = "sequence"
    """Where the CE that picks or weighs teachers is measured: per training row (the paper's per sequence),
    per span of ``span`` target tokens centred on each position, or per token. Span and token levels use
    each teacher's CE on the target's next token under its aligned distribution (comparable across
    tokenizers), averaged over the positions of the span where it has a prediction; a teacher with none
    there is not chosen (AvgCE: weight 0)."""
    span: int = 32
    """Span level: the window, in target tokens: wide enough that one lucky token does not pick a teacher,
    narrow enough to follow a switch between code and prose within a document (8 and 128 measured level
    with 32 on the zoo: the README's table)."""
    ce_unit: Literal["own_token", "target_token"] = "own_token"
    """Sequence level: a teacher's chunk CE per token of its own tokenizer (the paper), or its summed CE per
    target token, which compares teachers with finer and coarser tokenizers fairly."""
    clm_weight: float = 0.9
    """The paper's lambda."""
    clm_weight_schedule: Literal["constant", "linear"] = "constant"
    """`linear`: lambda grows from `clm_weight` to 1 over training (the distillation weight decays to 0)."""
    loss: Literal["ce", "kl"] = "ce"
    """Distillation loss against the fused distribution: cross-entropy (the paper) or KL divergence."""
    tail: Literal["renormalise", "bucket"] = "renormalise"
    """What becomes of the teacher's probability outside its stored top-k: `renormalise` (the paper) spreads
    it over the k, so they sum to one; `bucket` keeps the k at their own probabilities and trains the
    student's mass outside them towards the remainder, one more outcome of the distillation loss."""
    temperature: float = 1.0
    """Teacher temperature: the stored top-k log-probs (and, with `tail: bucket`, the remainder as one more
    outcome) are divided by it and renormalised."""

    @property
    def level_label(self) -> str:
        """``span level (32 tokens)``, ``token level``, ``sequence level``: for plans and objective lines."""
        return f"span level ({self.span} tokens)" if self.level == "span" else f"{self.level} level"


@dataclass
class MergeSettings:
    """How FuseChat merges its pairwise targets in parameter space (`fusion.merge`), the pivot as the base model."""

    method: Literal["varm", "sce", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "linear"] = "varm"
    """FuseChat's VaRM (v1: per-matrix weights from each target's mean squared update), SCE (v2), or one of mergekit's
    methods over the same targets."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Method-wide parameters as mergekit's config writes them: `select_topk` and `sce_semantics` (sce), `density`,
    `normalize`, `lambda`, `t` (slerp: a number, a list over the layers, or `{filter, value}` items), `seed` (dare)."""
    model_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source (its teacher label): its pairwise target's own parameters, e.g. `{weight: 0.5, density: 0.6}`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The merged weights' dtype; `auto`: the pivot's."""


@dataclass
class PairsConfig:
    """FuseChat-3.0's rules for turning scored samples into SFT examples and preference pairs (`fusion.data.pairs`)."""

    sft_share: float = 0.4
    """The share of prompts for SFT, the rest for preference training: 4:6 in FuseChat-3.0, 1:2 in WRPO."""
    same_source: bool = True
    """A pair's chosen and rejected responses come from one source model (FuseChat-3.0); false: the best and the
    worst across all sources."""
    min_margin: float | None = 0.01
    """Pairs whose reward gap, reward(chosen) − reward(rejected), is below this are dropped; null: no lower bound."""
    max_margin: float | None = 0.1
    """Pairs whose reward gap is above this are dropped (too easy); null: no upper bound."""
    margin_on_verified: bool = True
    """The window applies to verified pairs (correct vs incorrect) too, as FuseChat-3.0 does for math."""


@dataclass
class PreferenceConfig:
    """Preference optimisation after SFT: DPO and its variants, WRPO (`fusion.modules.dpo`, `fusion.modules.wrpo`)."""

    loss_type: Literal["sigmoid", "sigmoid_norm", "ipo"] = "sigmoid"
    """`sigmoid`: DPO; `sigmoid_norm`: length-normalised DPO (each log-ratio divided by its response's tokens,
    FuseChat-3.0's LN-DPO); `ipo`: IPO, on per-token averaged log-probs as TRL computes it."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    """cDPO's ε: the preference label is wrong with this probability (`sigmoid` and `sigmoid_norm` only)."""
    reference: Literal["precomputed", "online"] = "precomputed"
    """`precomputed`: the frozen reference (the model training starts from) scores every pair once, in a stage, and
    no second model is in memory while training; `online`: a frozen copy runs beside the policy every step."""
    max_prompt_length: int = 1800
    """When a prompt and its longest response exceed `chat.max_length`, the prompt keeps its last this many tokens,
    then the responses are cut (TRL's and WRPO's rule)."""
    alpha: float = 0.1
    """WRPO: the weight of the source's response in the chosen reward, reached at the end of training."""
    dynamic_alpha: bool = True
    """WRPO: α grows linearly from 0 to `alpha` over the optimizer steps; false: `alpha` throughout."""
    samples: int = 5
    """WRPO: responses the SFT model samples per preference prompt, whose best and worst become chosen and
    rejected."""
    temperature: float = 0.8
    """WRPO: the SFT model's sampling temperature (top-p 0.95)."""
    max_new_tokens: int = 512
    """WRPO: the SFT model's longest response."""


@dataclass
class SFTPhaseConfig:
    """The SFT that comes before preference training (FuseChat-3.0, WRPO): its own optimizer and length; the rest
    (precision, strategy, devices) is the recipe's `trainer`."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig())
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    max_epochs: int = 1
    max_steps: int = -1


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit` is bitsandbytes' 8-bit AdamW: optimizer state in 2 bytes/param instead of 8."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    """Not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    """Fraction of all optimizer steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    """The schedule ends at `lr * min_lr_ratio`."""


@dataclass
class FSDPConfig:
    """Settings of `trainer.strategy: fsdp`."""

    wrap: list[str] = field(default_factory=list)
    """Module class names that become FSDP units, e.g. `LlamaDecoderLayer`; empty = the model's `_no_split_modules`."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    activation_checkpointing: bool = False
    """Checkpoint the wrapped layers (use this, not `model.gradient_checkpointing`, under FSDP)."""
    cpu_offload: bool = False
    state_dict_type: Literal["full", "sharded"] = "full"
    """`full` gathers checkpoints on rank 0 (needed for HF export); `sharded` saves faster for huge models."""


@dataclass
class DeepSpeedConfig:
    """Settings of `trainer.strategy: deepspeed` (needs `pip install deepspeed`)."""

    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    batch_size: int = 8
    """Sequences per device per micro-batch.

    Global batch = batch_size * devices * num_nodes * accumulate_grad_batches."""
    accumulate_grad_batches: int = 1
    max_epochs: int = 1
    max_steps: int = -1
    """Optimizer steps; -1 means `max_epochs` decides."""
    gradient_clip_val: float | None = 1.0
    val_every_n_steps: int | None = None
    """Validate every N optimizer steps; None = at the end of each epoch only."""
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    """Resumable checkpoints (`checkpoints/last.ckpt`) are written this often."""
    process_group_backend: str | None = None
    """`gloo` to run DDP on CPUs; None lets Lightning choose (nccl on GPUs)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when W&B credentials exist (WANDB_API_KEY or `wandb login`), else offline."""
    project: str = "fusion"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A whole run: what to train, on what, how, and where the results go."""

    name: str
    method: str = "clm"
    """A method of the registry (`fusion.methods`): `clm`, continual causal-LM training of the target (the
    baseline every fusion run is compared with); `fusellm`, FuseLLM, training on the fused distributions of
    `teachers` (chunks -> representations -> alignment); `sft`, supervised fine-tuning of a chat model on the
    assistant's turns of `chat` conversations; `sample`, responses of `sampling.models` to prompts, scored by
    verifiers and a reward model (`scoring`); `chat-fusion`, a chat model trained on conversations and the fused
    distributions of `teachers` (FuseChat's pairwise step with one source and the pivot, its Multi baseline with
    all); `fusechat`, FuseChat: one `chat-fusion` pair per source of `teachers`, merged (`merge`); `dpo`, preference
    optimisation on a dataset of prompt/chosen/rejected rows (`preference`); `fusechat3`, FuseChat-3.0: the sources
    sampled and scored, SFT on the best responses, DPO on same-source pairs (`pairs`, `sft`, `preference`); `wrpo`,
    WRPO: as fusechat3, then the SFT model's own samples, and the source's best response weighted into the chosen
    side."""
    output_dir: str | None = None
    """Run folder; default `runs/NAME`. A re-run with the same folder resumes."""
    seed: int = 42
    module_class: str | None = None
    """Dotted path of a subclass of the method's module to train with, e.g. `fusion.modules.skew_kl.SkewKLFuseLLM`;
    default: the method's own module."""
    module_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the module class's constructor (e.g. `{alpha: 0.1}`), checked against its signature."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    """Chat data, for methods that train on conversations."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Chat evaluation: per-skill accuracy on held-out questions."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Responses sampled from chat models, for methods that sample."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """How sampled responses are scored."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Source models for fusion methods, any number, any tokenizers."""
    representations: RepresentationsConfig = field(default_factory=RepresentationsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    merge: MergeSettings = field(default_factory=MergeSettings)
    """FuseChat: how the pairwise targets are merged."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """FuseChat-3.0 and WRPO: how scored samples become SFT examples and preference pairs."""
    sft: SFTPhaseConfig = field(default_factory=SFTPhaseConfig)
    """FuseChat-3.0 and WRPO: the SFT before preference training."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """DPO, FuseChat-3.0 and WRPO: the preference loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    source_file: str | None = None
    """Set by the loader: the YAML file this recipe came from."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(recipe))
