"""An upper bound on choosing teachers: each position taught by the source of its document's domain.

MinCE chooses a teacher per span from the teachers' own cross-entropies on the gold text. On the embedded corpus
the right choice is known: a code document should learn from ``gpt2-code``, a prose document from ``neox-prose``.
`DomainRoutedFuseLLM` makes exactly that choice at every position (the chunk's document is found in the corpus),
so the table's ``fusellm-route-domain`` row measures what a perfect domain-level selection would give:

    python -m fusion.experiments.fusellm_table --only clm fusellm fusellm-route-domain

Only for the embedded corpus (`data.source: embedded`), with both sources among the teachers.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion.data.chunks import load_chunk_set
from fusion.data.corpus import embedded_corpus
from fusion.errors import FusionError
from fusion.modules.fusellm import FuseLLMModule
from fusion.modules.losses import fuse_teachers, teacher_probs

_CODE, _PROSE = 0, 1


class DomainRoutedFuseLLM(FuseLLMModule):
    """`FuseLLMModule` whose fused distribution is, at each position, the ``code`` teacher's in code documents and
    the ``prose`` teacher's in prose documents (their labels in the recipe's ``teachers``)."""

    def __init__(self, *args, code: str = "gpt2-code", prose: str = "neox-prose", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        missing = [label for label in (code, prose) if label not in self.teacher_labels]
        if self.teacher_labels and missing:
            raise FusionError(f"module_args: teacher(s) {missing} are not among the recipe's teachers "
                              f"{list(self.teacher_labels)}")
        self.routes = (code, prose)
        self._domains: dict[int, np.ndarray] | None = None

    def row_domains(self) -> dict[int, np.ndarray]:
        """Per training row (by its first chunk id), the domain of each of its positions: 0 code, 1 prose."""
        if self._domains is None:
            datamodule = self.trainer.datamodule
            chunks, _ = load_chunk_set(datamodule.chunk_folder)
            code = "\n".join(d["text"] for d in embedded_corpus("train", ("code",)))
            self._domains = {}
            for first, size in datamodule.rows.tolist():
                domains = []
                for chunk_id in range(first, first + size):
                    chunk = chunks[chunk_id]
                    # a piece of a document is a substring of it; docstrings (prose) are not in the code documents
                    domain = _CODE if chunk["text"][:300] in code else _PROSE
                    domains += [domain] * (len(chunk["input_ids"]) - (0 if chunk["starts_document"] else 1))
                self._domains[first] = np.asarray(domains)
        return self._domains

    def fuse(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fusion_config
        probs = teacher_probs(batch["teacher_logprobs"], f.temperature, f.tail)
        b, t, length, _ = probs.shape
        teacher = [self.teacher_labels.index(label) for label in self.routes]
        cost = torch.ones(b, t, length, device=probs.device)  # MinCE over costs 0 (the routed teacher) and 1
        for n, first in enumerate(batch["chunk_ids"].tolist()):
            domains = torch.as_tensor(self.row_domains()[first][:length], device=probs.device)
            domains = torch.cat([domains, domains[-1:].expand(length - len(domains))])  # padding: any teacher
            routed = torch.where(domains == _CODE, teacher[0], teacher[1])
            cost[n].scatter_(0, routed[None], 0.0)
        ids, fused, _ = fuse_teachers(batch["teacher_ids"], probs, cost, "mince")
        return ids, fused
