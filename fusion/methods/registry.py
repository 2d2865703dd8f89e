"""The method registry: what `method: NAME` in a recipe means.

A method is a list of stages (`fusion.stages`), the data module its training reads, and the
LightningModule that implements its objective; a recipe may name a subclass of that module
(``module_class``) with constructor arguments (``module_args``). Adding a method is one file here
with a `Method` subclass, registered with `register` (or listed in `METHODS` for shipped ones):

    clm       baseline -> train -> export -> evaluate
    fusellm   representations -> alignment -> baseline -> train -> export -> evaluate
    sft       baseline -> accuracy -> train -> export -> evaluate
    sample    sample -> score
    chat-fusion   representations -> alignment -> baseline -> accuracy -> train -> export -> evaluate
    fusechat  baseline -> accuracy -> pairs (a chat-fusion run per source) -> merge -> evaluate
    dpo       reference -> baseline -> accuracy -> train -> export -> evaluate
    fusechat3 sample -> score -> pairs -> sft (a sub-run) -> reference -> baseline -> accuracy -> train -> export
              -> evaluate
    wrpo      as fusechat3, with on-policy (the SFT model's own samples) before reference
"""

from __future__ import annotations

from fusion.errors import FusionError
from fusion.methods.base import Method
from fusion.methods.chat_fusion import ChatFusion
from fusion.methods.clm import CLM
from fusion.methods.dpo import DPO
from fusion.methods.fusechat import FuseChat
from fusion.methods.fusechat3 import WRPO, FuseChat3
from fusion.methods.fusellm import FuseLLM
from fusion.methods.sample import SampleMethod
from fusion.methods.sft import SFT

METHODS: dict[str, Method] = {m.name: m for m in (CLM(), FuseLLM(), SFT(), SampleMethod(), ChatFusion(), FuseChat(),
                                                  DPO(), FuseChat3(), WRPO())}


def register(method: Method) -> Method:
    """Make ``method`` available to recipes as ``method: NAME`` (a method of the same name is replaced)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FusionError(f"recipe key 'method': unknown method {name!r}; use one of: {', '.join(METHODS)}") from None

