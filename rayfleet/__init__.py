"""rayfleet: a Ray-based LLM serving cluster with its own paged-KV engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from rayfleet.llm import LLM
    from rayfleet.outputs import RequestOutput
    from rayfleet.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy so that `import rayfleet.hashing` (router, unit tests) never pulls in torch.
    if name == "LLM":
        from rayfleet.llm import LLM

        return LLM
    if name == "SamplingParams":
        from rayfleet.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from rayfleet.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
