"""LLM engine over one model replica (apart from the pure-Python ``engine/`` package):
add_request / step / abort, and AsyncEngine for streaming.

step():  schedule() -> runner.execute() -> scheduler.update() -> detokenize, stop strings
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rayfleet.config import EngineConfig
from rayfleet.outputs import RequestOutput
from rayfleet.replicas.detokenizer import IncrementalDetokenizer
from rayfleet.replicas.engine.request import Request, RequestStatus
from rayfleet.replicas.engine.scheduler import Scheduler, SchedulerOutput
from rayfleet.replicas.model import load_model, read_arch_config
from rayfleet.replicas.runner import ModelRunner
from rayfleet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, checkpoint_dtype: str | None) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    return _DTYPES.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)


def load_eos_token_ids(model_dir: str, tokenizer, arch) -> frozenset[int]:
    """EOS ids: generation_config.json's eos_token_id (int or list), else config's, else the
    tokenizer's."""
    import json

    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if not ids:
        ids.update(arch.eos_token_ids)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


@dataclass
class _Tracked:
    request: Request
    prompt: str | None
    detok: IncrementalDetokenizer | None
    params: SamplingParams
    arrival_time: float
    num_sent_tokens: int = 0
    first_token_time: float | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None


class Engine:
    """One replica's engine. ``model`` (with its ``arch``) may be passed prebuilt, e.g. random
    weights of a real shape for benchmarks; then there is no tokenizer and outputs carry ids
    only."""

    def __init__(self, config: EngineConfig, *, model: torch.nn.Module | None = None) -> None:
        self.config = config
        mc = config.model
        self.device = torch.device(config.device)
        torch.manual_seed(mc.seed)
        if model is None:
            from transformers import AutoTokenizer

            self.arch = read_arch_config(mc.model)
            self.dtype = resolve_dtype(mc.dtype, self.arch.torch_dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer_path)
            self.eos_token_ids = load_eos_token_ids(mc.model, self.tokenizer, self.arch)
            self.model = load_model(
                mc.model,
                dtype=self.dtype,
                device=self.device,
                show_progress=config.show_progress,
                max_positions=mc.max_model_len,
            )
        else:
            self.arch = model.arch
            self.dtype = next(model.parameters()).dtype
            self.tokenizer = None
            self.eos_token_ids = frozenset()
            self.model = model
        self.max_model_len = mc.max_model_len or self.arch.max_position_embeddings
        self.runner = ModelRunner(
            self.model,
            device=self.device,
            dtype=self.dtype,
            block_size=config.cache.block_size,
            attention_backend=config.attention_backend,
            eos_token_ids=self.eos_token_ids,
            seed=mc.seed,
        )
        self.num_blocks, self.memory_report = self._size_kv_cache()
        self.runner.allocate_kv_cache(self.num_blocks)
        sc = config.scheduler
        self.scheduler = Scheduler(
            num_blocks=self.num_blocks,
            block_size=config.cache.block_size,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            max_num_seqs=sc.max_num_seqs,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            hash_seed=config.cache.hash_seed,
            long_prefill_token_threshold=sc.long_prefill_token_threshold,
        )
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
            self.num_blocks - 1,
            config.cache.block_size,
            (self.num_blocks - 1) * config.cache.block_size,
            self.num_blocks * self.runner.bytes_per_block / 2**20,
        )

    # ---- sizing --------------------------------------------------------------------------------
    def _size_kv_cache(self) -> tuple[int, dict[str, int]]:
        cc, sc = self.config.cache, self.config.scheduler
        per_block = self.runner.bytes_per_block
        if cc.num_blocks is not None:
            return cc.num_blocks, {"source": 0}
        if cc.kv_cache_memory_bytes is not None:
            return max(cc.kv_cache_memory_bytes // per_block, 2), {}
        if self.device.type == "cuda":
            n, report = self.runner.profile_num_blocks(
                sc.max_num_batched_tokens, sc.max_num_seqs, cc.gpu_memory_utilization
            )
            if n < 2:
                raise RuntimeError(
                    f"no memory left for the KV cache: {report}; lower max_num_batched_tokens or "
                    "raise gpu_memory_utilization"
                )
            return n, report
        # CPU: enough for every sequence slot at full context, capped by a default budget.
        want = sc.max_num_seqs * -(-self.max_model_len // cc.block_size) + 1
        cap = cc.cpu_kv_cache_bytes_default // per_block
        return max(min(want, cap), 2), {}

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompt_token_ids")
        return list(self.tokenizer.encode(prompt))

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Reject what can never be served, naming the field and the limit."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}); got {bad}")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}); got {bad}")
        n = len(prompt_token_ids)
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens and max_tokens is {params.max_tokens}: together "
                f"{n + params.max_tokens}, more than the model's context of {self.max_model_len}"
            )

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams; got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._tracked:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(
            request_id=rid,
            prompt_token_ids=ids,
            max_tokens=params.max_tokens,
            sampling_params=params,
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            stop_token_ids=frozenset(params.stop_token_ids),
            min_tokens=params.min_tokens,
            tenant=tenant,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
        )
        self.scheduler.add_request(req)
        self._tracked[rid] = _Tracked(
            request=req,
            prompt=text,
            detok=IncrementalDetokenizer(self.tokenizer, ids, params) if self.tokenizer else None,
            params=params,
            arrival_time=req.arrival_time,
        )
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request; its KV blocks are back in the pool when this returns."""
        tr = self._tracked.get(request_id)
        if tr is None:
            return None
        self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        return self._output(tr, finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._tracked)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched: SchedulerOutput = self.scheduler.schedule()
        result = self.runner.execute(sched)
        touched = self.scheduler.update(sched, result)
        now = time.monotonic()
        outputs = []
        for req in touched:
            tr = self._tracked[req.request_id]
            if tr.first_token_time is None:
                tr.first_token_time = now
            new = req.output_token_ids[tr.num_sent_tokens :]
            stop = tr.detok.add_tokens(new) if tr.detok is not None else None
            if req.request_id in result.logprobs:
                if tr.logprobs is None:
                    tr.logprobs = []
                tr.logprobs.extend(result.logprobs[req.request_id])
            if stop is not None and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
                tr.stop_reason = stop
            elif req.is_finished and req.status == RequestStatus.FINISHED_STOPPED:
                tr.stop_reason = req.output_token_ids[-1]
            outputs.append(self._output(tr, finished=req.is_finished))
        return outputs

    def _output(self, tr: _Tracked, finished: bool) -> RequestOutput:
        req = tr.request
        new_ids = req.output_token_ids[tr.num_sent_tokens :]
        tr.num_sent_tokens = req.num_output_tokens
        now = time.monotonic()
        metrics = {"arrival_time": tr.arrival_time}
        if tr.first_token_time is not None:
            metrics["first_token_time"] = tr.first_token_time
        if finished:
            metrics["finished_time"] = now
            self._tracked.pop(req.request_id, None)
        # take_delta(finished=True) flushes a held-back tail into output_text: call it first.
        new_text = tr.detok.take_delta(finished=finished) if tr.detok is not None else ""
        return RequestOutput(
            request_id=req.request_id,
            prompt=tr.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=tr.detok.output_text if tr.detok is not None else "",
            finished=finished,
            finish_reason=req.status.finish_reason if finished else None,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            new_token_ids=new_ids,
            new_text=new_text,
            logprobs=list(tr.logprobs) if tr.logprobs is not None else None,
            stop_reason=tr.stop_reason,
            metrics=metrics,
        )

    # ---- offline convenience -------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final


class EngineDeadError(RuntimeError):
    """The engine's step failed; every request in flight was failed with this error."""


class AsyncEngine:
    """Streams RequestOutputs from an Engine stepped on a background thread.

    ``generate()`` is an async iterator of incremental outputs. Leaving it early (client gone,
    task cancelled) aborts the request, which frees its KV blocks before the next step. If a step
    raises, every request in flight gets the error and the engine refuses new work.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_aborts: list[str] = []
        self._dead: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="rayfleet-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(Engine(config))

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"engine failed earlier: {self._dead!r}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt, params, request_id=request_id, tenant=tenant)
            self._queues[rid] = (loop, queue)
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.append(request_id)
        self._wakeup.set()

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, queue = target
        if isinstance(item, BaseException) or item.finished:
            self._queues.pop(rid, None)
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                aborts, self._pending_aborts = self._pending_aborts, []
                for rid in aborts:
                    out = self.engine.abort(rid)
                    if out is not None:
                        self._deliver(rid, out)
                busy = self.engine.has_unfinished()
            if not busy:
                self._wakeup.wait(0.1)
                self._wakeup.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except Exception as e:  # an engine fault fails the affected requests, never hangs them
                logger.exception("engine step failed")
                self._dead = e
                err = EngineDeadError(f"engine step failed: {e!r}")
                with self._lock:
                    for rid in list(self._queues):
                        self.engine.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
                        self._deliver(rid, err)
                return
            for out in outputs:
                self._deliver(out.request_id, out)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=5)
