"""Offline API: ``LLM(model=DIR).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rayfleet.config import EngineConfig, default_demo_model
from rayfleet.outputs import RequestOutput
from rayfleet.sampling_params import SamplingParams


class LLM:
    """One engine in this process.

    ``LLM(model=DIR, dtype="float32", device="cpu", block_size=16, max_num_seqs=..., ...)``: any
    keyword of the engine's config sections (see rayfleet.config) is accepted; ``model`` defaults
    to the bundled demo model.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from rayfleet.replicas.llm_engine import Engine

        kwargs.setdefault("show_progress", False)
        self.config = EngineConfig.from_kwargs(model or default_demo_model(), **kwargs)
        self.engine = Engine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tenant: str | None = None,
    ) -> list[RequestOutput]:
        """Submit every prompt together and run until all finish; outputs in prompt order.

        ``prompts`` is a string, a list of strings, or a list of token-id lists.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        # Validate everything before submitting anything, so a bad prompt leaves no work behind.
        ids = [
            self.engine.tokenize(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]
        for i, p in zip(ids, params_list):
            self.engine.validate(i, p)
        rids = [self.engine.add_request(i, p, tenant=tenant) for i, p in zip(ids, params_list)]
        final = self.engine.run_to_completion()
        outs = [final[r] for r in rids]
        for out, p in zip(outs, prompts):
            out.prompt = p if isinstance(p, str) else None
        return outs
