"""Hugging Face export: a Lightning checkpoint of a `CausalLMModule` → a `from_pretrained` folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fusion.data.cache import remove_dead_staging, staging_prefix
from fusion.data.text import load_tokenizer

_PREFIX = "model."  # CausalLMModule keeps the HF model in `self.model`


def export_checkpoint(checkpoint: Path, base_model: str, tokenizer_path: str, out_dir: Path,
                      trust_remote_code: bool = False) -> Path:
    """Write `out_dir` with config, safetensors weights and tokenizer; atomic (staged, then renamed).

    The model skeleton is built on the meta device (no memory, no random init: seconds even for
    7B), then takes the checkpoint's tensors as they are, in the dtype they were trained in.
    """
    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
    weights = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not fit {base_model}: "
                           f"missing {still_meta[:3]}, unexpected {unexpected[:3]}")
    model.config.dtype = next(model.parameters()).dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out_dir.parent)  # an export killed midway
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir.name), dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        load_tokenizer(tokenizer_path, trust_remote_code).save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp made it private
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
