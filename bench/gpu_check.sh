#!/usr/bin/env bash
# What only a GPU can check: the embedded FuseLLM default in bf16 on CUDA (teachers extracted in
# bf16), FSDP and bf16-true on one GPU, and the fusion step's time and peak-memory ratio on CUDA.
#   bash bench/gpu_check.sh [OUT_DIR]          (FUSION_ZOO_DIR may point at a prebuilt zoo)
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false FUSION_CACHE=${FUSION_CACHE:-/tmp/fusion-cache}
py=${PYTHON:-python3}
common="wandb.mode=disabled trainer.accelerator=gpu"
step() {  # name, command...: run it, keep its log, print its tail and exit code
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  grep -v -E "it/s|s/it|Loading weights" "$out/$name.log" | tail -n 14
}
nvidia-smi -L
$py -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
step fusellm_bf16_mixed $py -m fusion.fit --recipe fusellm.yaml output_dir=/tmp/gpu/bf16 trainer.precision=bf16-mixed $common
step fusellm_fsdp $py -m fusion.fit --recipe fusellm.yaml output_dir=/tmp/gpu/fsdp trainer.strategy=fsdp \
  "fsdp.wrap=[LlamaDecoderLayer]" fsdp.activation_checkpointing=true trainer.precision=bf16-mixed \
  trainer.max_steps=60 trainer.val_every_n_steps=60 $common
step fusellm_bf16_true $py -m fusion.fit --recipe fusellm.yaml output_dir=/tmp/gpu/bf16true trainer.precision=bf16-true \
  trainer.max_steps=60 trainer.val_every_n_steps=60 $common
grep -h "bf16\|dtype" /tmp/gpu/*/model/config.json 2>/dev/null | sort | uniq -c
step bench_fusion_step $py bench/run.py fusion_step
cat "$out/bench_fusion_step.log" | grep '^{' > "$out/fusion_step.jsonl"
