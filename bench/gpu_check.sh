#!/usr/bin/env bash
# What only a GPU can check, in one call: the Triton kernel against the eager loss, the fusion_step
# benchmark at realistic shapes (the loss alone at 32k and 152k in bf16; the whole bf16-mixed step of a
# Qwen2.5-1.5B-shape model against HF's and liger-kernel's, memory and gradients included), then the
# teacher-extraction benchmark (predict_step against a bare bf16 forward at 32k and 152k), then the embedded
# FuseLLM default end to end under FSDP with activation checkpointing (FULL=1: also the whole default in
# bf16-mixed), then FuseChat's embedded default in bf16-mixed, the DPO / WRPO step against a CLM step at a
# Llama-3.2-1B shape, and FuseChat-3.0's embedded default in bf16-mixed. ONLY="kernel_tests extraction" runs just
# those steps; FUSELLM_EXTRA adds recipe overrides.
#   bash bench/gpu_check.sh [OUT_DIR]
# Missing packages can come as wheels in .whl/ (liger-kernel, datasets, rapidfuzz, ...), and a built zoo
# in .gpu/zoo (FUSION_ZOO_DIR), so the machine needs no network.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
py=${PYTHON:-python3}
if ls .whl/*.whl > /dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false FUSION_CACHE=${FUSION_CACHE:-/tmp/fusion-cache}
[ -d .gpu/zoo ] && export FUSION_ZOO_DIR=$PWD/.gpu/zoo
common="wandb.mode=disabled trainer.accelerator=gpu"
only=${ONLY:-kernel_tests fusion_step extraction dpo_step fusellm_fsdp fusechat_bf16_mixed fusechat3_bf16_mixed}
step() {  # name, seconds, command...: run it with a time limit, keep its log, print its tail and exit code
  local name=$1 limit=$2; shift 2
  [[ " $only " == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  grep -v -E "it/s|s/it|Loading weights|warnings.warn|FutureWarning" "$out/$name.log" | tail -n 12 | cut -c1-400
}
nvidia-smi -L
$py -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
step kernel_tests 150 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_extraction_speedpath.py
step fusion_step 250 $py bench/run.py fusion_step
step extraction 200 $py bench/run.py extraction
step dpo_step 200 $py bench/run.py dpo_step
cat "$out"/fusion_step.log "$out"/extraction.log "$out"/dpo_step.log 2>/dev/null | grep '^{' > "$out/figures.jsonl"
step fusellm_fsdp 110 $py -m fusion.fit --recipe fusellm.yaml output_dir=/tmp/gpu/fsdp trainer.strategy=fsdp \
  "fsdp.wrap=[LlamaDecoderLayer]" fsdp.activation_checkpointing=true trainer.precision=bf16-mixed \
  trainer.max_steps=60 trainer.val_every_n_steps=60 $common ${FUSELLM_EXTRA:-}
# FuseChat's embedded default end to end on the GPU in bf16-mixed: extraction, two pairs, the merge, the evaluation
# (needs the chat zoo in .gpu/zoo too).
step fusechat_bf16_mixed 420 $py -m fusion.fit --recipe fusechat.yaml output_dir=/tmp/gpu/fusechat \
  trainer.precision=bf16-mixed $common
step fusechat_fsdp 240 $py -m fusion.fit --recipe fusechat.yaml output_dir=/tmp/gpu/fusechat-fsdp trainer.strategy=fsdp \
  "fsdp.wrap=[LlamaDecoderLayer]" fsdp.activation_checkpointing=true trainer.precision=bf16-mixed \
  trainer.max_steps=200 trainer.val_every_n_steps=200 evaluate.questions=50 $common
# FuseChat-3.0's embedded default in bf16-mixed: sampling, scoring, pairs, SFT, reference, DPO, evaluation.
step fusechat3_bf16_mixed 300 $py -m fusion.fit --recipe fusechat3.yaml output_dir=/tmp/gpu/fusechat3 \
  trainer.precision=bf16-mixed $common
[ "${FULL:-0}" = 1 ] && only="$only fusellm_bf16_mixed" && step fusellm_bf16_mixed 130 $py -m fusion.fit --recipe fusellm.yaml output_dir=/tmp/gpu/bf16 \
  trainer.precision=bf16-mixed $common
echo "== summary"
$py - "$out/figures.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    f = json.loads(line)
    keys = ("metric", "variant", "vocab", "value", "spread", "ms", "hf_clm_ms", "step_ms", "hf_step_ms", "mb",
            "hf_clm_mb", "hf_gb", "vs_our_clm", "errors", "baseline", "chunk_elements", "predict_ms", "forward_ms",
            "mem_growth_gb", "forward_gb", "max_logprob_diff", "topk_id_agreement", "baseline_ms")
    print({k: f[k] for k in keys if k in f})
EOF
