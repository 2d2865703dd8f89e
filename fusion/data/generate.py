"""Batched greedy generation from token-id prompts: what chat evaluation and answer sampling read models with.

Prompts are sorted by length and cut into batches, so that little of a batch is padding; each batch is padded on
the left (the new tokens of every row then start at the same position), and a row ends at its first stop id (an
end-of-turn marker) or after ``max_new_tokens``. `transformers`' ``generate`` does the decoding, with its KV cache
and the position ids it derives from the attention mask, so left padding changes no row's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                    max_new_tokens: int = 64, batch_size: int = 64) -> list[list[int]]:
    """The greedy continuation of each prompt, in the prompts' order.

    ``prompts``: token ids, each already holding what the model should continue (a chat template's generation
    prompt, BOS if the template writes one); ``stop_ids``: the ids that end a turn. A continuation ends with its
    first stop id (kept, so a caller can tell a finished answer from one cut at ``max_new_tokens``) and holds at
    most ``max_new_tokens`` ids. Model and prompts stay on the model's device; the model is left in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    stops = torch.tensor(list(stop_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: an early OOM, if any
    out: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        length = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for r, i in enumerate(rows):
            input_ids[r, length - len(prompts[i]):] = torch.as_tensor(prompts[i], device=device)
            attention_mask[r, length - len(prompts[i]):] = 1
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=stops.tolist(), pad_token_id=pad_id)
        for r, i in enumerate(rows):
            new = generated[r, length:]
            ends = torch.isin(new, stops).nonzero()
            out[i] = new[: int(ends[0]) + 1 if len(ends) else len(new)].tolist()
    return out
