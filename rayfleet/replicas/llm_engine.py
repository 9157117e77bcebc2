"""LLM engine over one model replica (apart from the pure-Python ``engine/`` package):
add_request / step / abort, and AsyncEngine for streaming.

step():  schedule() -> runner.execute() -> scheduler.update() -> detokenize, stop strings

Overlapped (``overlap_scheduling``, default on CUDA), one step in flight:

    schedule(N+1) -> runner.launch(N+1) -> runner.resolve(N) -> update(N) -> detokenize(N)

so the host schedules, prepares and detokenizes while the device computes. Step N+1 is scheduled
before step N's tokens are known: a request sampling in N holds one pending token
(Request.num_pending_tokens) that N+1 computes from the device-side copy. A request that N
finishes (EOS, stop string, abort) has computed one token too many in N+1; that token is dropped.
Requests whose sampling reads their generated ids (penalties, logprobs) switch the engine to
synchronous steps while they run. With a draft model, steps overlap only while the speculation
policy has speculation paused (SpecPolicy.speculation_paused: its last plan drafted nothing and it
would not probe next); otherwise the step in flight is drained and steps are synchronous, planning
and drafting after each. Such a step returns with its drafts still on the device: the next one is
scheduled and launched while the draft runs, and reads them from there (spec/proposer.py).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from rayfleet import kernels
from rayfleet.config import EngineConfig
from rayfleet.kernels import attention_flash, choose_attention_backend
from rayfleet.outputs import RequestOutput, SpecStats
from rayfleet.replicas.cuda_graphs import default_capture_sizes, prefill_query_lens
from rayfleet.replicas.detokenizer import IncrementalDetokenizer
from rayfleet.replicas.engine.request import Request, RequestStatus
from rayfleet.replicas.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from rayfleet.replicas.model import load_model, read_arch_config
from rayfleet.replicas.model.forward import AttentionKernels
from rayfleet.replicas.model.layers import use_kernel_backend
from rayfleet.replicas.quant.fp8 import quantize_model
from rayfleet.replicas.runner import ModelRunner, PendingStep
from rayfleet.replicas.sampler import needs_host_history
from rayfleet.replicas.spec.adaptive import SpecPolicy
from rayfleet.replicas.spec.proposer import DraftProposer
from rayfleet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, checkpoint_dtype: str | None) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    return _DTYPES.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)


def resolve_kv_cache_dtype(requested: str, model_dtype: torch.dtype) -> torch.dtype:
    """CacheConfig.kv_cache_dtype -> the dtype of the paged K/V tensors."""
    return model_dtype if requested == "auto" else torch.float8_e4m3fn


# Files whose content defines a tokenizer's id <-> text mapping.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def check_same_tokenizer(target_dir: str, draft_dir: str) -> None:
    """A draft must tokenize exactly like its target: its proposals are target token ids.

    Same content of every tokenizer-defining file present in either directory; where neither has
    one, the loaded vocabularies must match. Raises ValueError naming both directories."""
    t, d = Path(target_dir), Path(draft_dir)
    differing = []
    present = False
    for name in _TOKENIZER_FILES:
        tf, df = t / name, d / name
        if not tf.exists() and not df.exists():
            continue
        present = True
        if not (tf.exists() and df.exists()) or tf.read_bytes() != df.read_bytes():
            differing.append(name)
    if not present:
        from transformers import AutoTokenizer

        t_vocab = AutoTokenizer.from_pretrained(t).get_vocab()
        if t_vocab != AutoTokenizer.from_pretrained(d).get_vocab():
            differing.append("vocabulary")
    if differing:
        raise ValueError(
            f"draft model {draft_dir} does not share the tokenizer of target model {target_dir} "
            f"(differs: {', '.join(differing)}); speculative decoding needs the same tokenizer"
        )


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
    spec: SpecStats | None = None


class Engine:
    """One replica's engine. ``model`` (with its ``arch``) may be passed prebuilt, e.g. random
    weights of a real shape for benchmarks; then there is no tokenizer and outputs carry ids
    only. ``draft_model`` likewise (a prebuilt draft of the same vocabulary); ``spec_policy``
    replaces the adaptive speculation policy (e.g. ``FixedSpecPolicy(k)``)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model: torch.nn.Module | None = None,
        draft_model: torch.nn.Module | None = None,
        spec_policy: SpecPolicy | None = None,
    ) -> None:
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
        self.draft_model = self._load_draft(draft_model)
        num_spec = config.spec.num_speculative_tokens if self.draft_model is not None else 0
        backend = self.attention_backend = choose_attention_backend(
            config.attention_backend, self.device
        )
        qc = config.quant
        if qc.draft_quantization is not None and self.draft_model is None:
            raise ValueError("draft_quantization needs a draft model (draft_model=DIR)")
        for m, method, role in (
            (self.model, qc.quantization, "model"),
            (self.draft_model, qc.draft_quantization, "draft model"),
        ):
            if m is not None and method is not None:
                rep = quantize_model(m, method)  # before the kernel swap, which reads the dtype
                logger.info(
                    "%s: %s weights in %d linears, %.1f -> %.1f MiB (%s for rows the GEMV skips)",
                    role,
                    rep.method,
                    rep.layers,
                    rep.bytes_before / 2**20,
                    rep.bytes_after / 2**20,
                    rep.backend,
                )
        for m in (self.model, self.draft_model):
            if m is not None and backend != kernels.REFERENCE:
                use_kernel_backend(m, backend)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype)
        if backend == attention_flash.BACKEND:  # at start-up, not in the first step
            for arch in (self.arch, self.draft_model and self.draft_model.arch):
                if arch:
                    attention_flash.check_supported(
                        block_size=config.cache.block_size,
                        dtype=self.dtype,
                        kv_cache_dtype=self.kv_cache_dtype,
                        head_dim=arch.head_dim,
                    )
        if (
            self.kv_cache_dtype == torch.float8_e4m3fn
            and self.device.type == "cuda"
            and backend == "triton"
            and torch.cuda.get_device_capability(self.device) < (8, 9)
        ):
            raise ValueError(
                "kv_cache_dtype='fp8' with the triton attention backend needs an sm89+ GPU "
                "(Ada, Hopper or newer); use attention_backend='sdpa' or kv_cache_dtype='auto'"
            )
        proposer = None
        if self.draft_model is not None:
            proposer = DraftProposer(
                self.draft_model,
                device=self.device,
                dtype=self.dtype,
                kv_cache_dtype=self.kv_cache_dtype,
                block_size=config.cache.block_size,
                attn_kernels=AttentionKernels.for_backend(backend),
                eos_token_ids=self.eos_token_ids,
                seed=mc.seed,
            )
        self.runner = ModelRunner(
            self.model,
            device=self.device,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            block_size=config.cache.block_size,
            attention_backend=backend,
            eos_token_ids=self.eos_token_ids,
            seed=mc.seed,
            proposer=proposer,
            num_speculative_tokens=num_spec,
            max_model_len=self.max_model_len,
            spec_policy=spec_policy,
        )
        self.num_blocks, self.memory_report = self._size_kv_cache()
        self.runner.allocate_kv_cache(self.num_blocks)
        # A backend that compiles kernels per batch shape registers a warm-up (Triton does).
        warm_up = kernels.get_fused("attention_warm_up", backend)
        if warm_up is not None and self.device.type == "cuda":
            archs = [self.model.arch] + ([proposer.arch] if proposer else [])
            self._warm_up_attention(warm_up, archs)
        # the greedy argmax and the graphs' input staging (CUDA takes Triton's whatever the
        # attention backend)
        step_io_warm_up = kernels.get_fused("step_io_warm_up", "triton")
        if step_io_warm_up is not None and self.device.type == "cuda":
            # (with graphs, query lengths up to the largest short-prefill bucket: a prompt or a
            # catch-up that fills its bucket exactly is staged like a decode step)
            buckets = (
                prefill_query_lens(config.cuda_graph_prefill_tokens)
                if self._cuda_graphs_usable()
                else []
            )
            max_q = max([num_spec + 1, *buckets])
            step_io_warm_up(self.dtype, self.device, self.model.arch.vocab_size, max_q)
        if self._cuda_graphs_usable():
            self._capture_target_graphs(num_spec)
            if proposer is not None:
                self._capture_draft_graphs(proposer, num_spec)
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
            num_lookahead_tokens=num_spec,
        )
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        overlap = config.overlap_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        self.overlap = overlap
        # The step in flight (overlap): its scheduler output and launched runner step.
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None
        # The step the latest step() call processed, for _report_step.
        self._processed: tuple[SchedulerOutput, RunnerOutput] | None = None
        # Live requests whose sampling reads their own generated ids: steps are synchronous
        # while any runs.
        self._history_readers: set[str] = set()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s)",
            self.num_blocks - 1,
            config.cache.block_size,
            (self.num_blocks - 1) * config.cache.block_size,
            self.num_blocks * self.runner.bytes_per_block / 2**20,
            str(self.kv_cache_dtype).replace("torch.", ""),
        )
        # Start-up leaves a large heap of long-lived objects (imported libraries, modules,
        # kernels, graphs). Move them to the permanent generation: otherwise every full
        # collection walks them, a 100-300 ms pause in the middle of a step (measured on the
        # GPU host with an 8B target and a 1B draft).
        gc.collect()
        gc.freeze()
        # Interpreter shutdown collects them as usual (registered once per process).
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)

    def _warm_up_attention(self, warm_up: Callable[..., int], archs: list) -> None:
        """Compile the attention variants every model's head layout can select now, not in the
        middle of a step (eager steps of new shapes would each pay a compile)."""
        t0 = time.perf_counter()
        launches = 0
        for arch in archs:
            windows = {arch.layer_sliding_window(i) for i in range(arch.num_layers)}
            for window in windows:
                launches += warm_up(
                    arch.num_heads,
                    arch.num_kv_heads,
                    arch.head_dim,
                    self.runner.block_size,
                    self.dtype,
                    self.device,
                    window,
                    kv_dtype=self.kv_cache_dtype,
                )
        logger.info(
            "attention kernels: %d variants warmed up in %.1f s", launches, time.perf_counter() - t0
        )

    def _load_draft(self, prebuilt: torch.nn.Module | None) -> torch.nn.Module | None:
        """The draft model of ``config.spec`` (or ``prebuilt``), checked against the target."""
        spec = self.config.spec
        if prebuilt is None and spec.draft_model is None:
            if spec.num_speculative_tokens:
                raise ValueError("num_speculative_tokens needs a draft model (draft_model=DIR)")
            return None
        if spec.num_speculative_tokens < 1:
            raise ValueError("a draft model needs num_speculative_tokens >= 1")
        target = self.config.model.model
        if prebuilt is not None:
            draft = prebuilt
            name = "<prebuilt draft>"
        else:
            assert spec.draft_model is not None
            name = spec.draft_model
            check_same_tokenizer(self.config.model.tokenizer_path, name)
            draft_arch = read_arch_config(name)
            draft = load_model(
                name,
                dtype=self.dtype,
                device=self.device,
                show_progress=self.config.show_progress,
                # The draft sees every position the target does (and its lookahead).
                max_positions=max(
                    draft_arch.max_position_embeddings,
                    self.max_model_len + spec.num_speculative_tokens,
                ),
            )
        if draft.arch.vocab_size != self.arch.vocab_size:
            raise ValueError(
                f"draft model {name} has a vocabulary of {draft.arch.vocab_size} but target model "
                f"{target} has {self.arch.vocab_size}; speculative decoding needs the same one"
            )
        return draft

    def _cuda_graphs_usable(self) -> bool:
        """Graphs need a device-side attention backend (the torch/sdpa ones size their work from
        host lists) and static rope tables (dynamic NTK recomputes them per request)."""
        return (
            self.device.type == "cuda"
            and self.attention_backend == "triton"
            and self.config.cuda_graph_max_batch_size > 0
            and self.arch.rope_type != "dynamic"
        )

    def _capture_target_graphs(self, num_spec: int) -> None:
        limit = min(self.config.cuda_graph_max_batch_size, self.config.scheduler.max_num_seqs)
        max_len = self.max_model_len + num_spec
        try:
            self.runner.enable_cuda_graphs(
                default_capture_sizes(limit),
                max_blocks_per_seq=-(-max_len // self.config.cache.block_size) + 1,
                max_seq_len=max_len,
                prefill_tokens=self.config.cuda_graph_prefill_tokens,
            )
        except Exception:  # a capture problem costs speed, never the engine
            logger.exception("target CUDA graph capture failed; decode runs eagerly")
            self.runner.graphs = None
            return
        self.memory_report["cuda_graph_bytes"] = self.runner.graphs.memory_bytes
        logger.info(
            "decode CUDA graphs: %d sizes up to batch %d, %.1f MiB",
            len(self.runner.graphs.sizes),
            limit,
            self.runner.graphs.memory_bytes / 2**20,
        )

    def _capture_draft_graphs(self, proposer: DraftProposer, num_spec: int) -> None:
        """CUDA: the draft's forwards replay decode graphs up to ``cuda_graph_max_batch_size``,
        and whole greedy proposals up to ``proposal_graph_max_batch_size`` one graph each
        (spec/proposal_graphs.py); on failure the draft runs eagerly."""
        limit = min(self.config.cuda_graph_max_batch_size, self.config.scheduler.max_num_seqs)
        max_len = self.max_model_len + num_spec
        try:
            proposer.enable_cuda_graphs(
                default_capture_sizes(limit),
                max_blocks_per_seq=-(-max_len // self.config.cache.block_size) + 1,
                max_seq_len=max_len,
                proposal_k=num_spec,
                proposal_max_batch=self.config.spec.proposal_graph_max_batch_size,
                prefill_tokens=self.config.cuda_graph_prefill_tokens,
            )
        except Exception:  # a capture problem costs speed, never the engine
            logger.exception("draft CUDA graph capture failed; the draft runs eagerly")
            proposer.graphs = proposer.proposal_graphs = None
            return
        self.memory_report["draft_cuda_graph_bytes"] = proposer.graph_memory_bytes
        logger.info("draft CUDA graphs: %.1f MiB", proposer.graph_memory_bytes / 2**20)

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
        if needs_host_history(params):
            self._history_readers.add(rid)
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
        # A step still in flight matters only for requests the scheduler still runs.
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._tracked)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.overlap and not self._history_readers and self._speculation_paused():
            outputs = self._step_overlapped()
        elif self._inflight is not None:  # leaving overlap: deliver the step in flight first
            outputs = self._finish_inflight()
        else:
            sched: SchedulerOutput = self.scheduler.schedule()
            outputs = self._process(sched, self.runner.execute(sched))
        if self._processed is not None:
            self._report_step(*self._processed, time.perf_counter() - t0)
            self._processed = None
        return outputs

    def _report_step(self, sched: SchedulerOutput, result: RunnerOutput, seconds: float) -> None:
        """A steady-state step's wall time, for the speculation policy's sync overhead
        (spec/adaptive.py): every scheduled request decoded or verified (no prefill chunk, no
        new request)."""
        policy = self.runner.spec_policy
        if self.runner.proposer is None or policy is None or sched.new_requests:
            return
        sampled = result.sampled_token_ids
        for rid, n in sched.num_scheduled_tokens.items():
            if rid not in sampled or n > 1 + len(sched.spec_token_ids.get(rid, ())):
                return
        num_tokens = sum(len(ids) for ids in sampled.values())
        policy.observe_step(len(sched.num_scheduled_tokens), seconds, num_tokens)

    def _speculation_paused(self) -> bool:
        """Without a draft model, always. With one, while the policy plans no drafts and no
        request still holds drafts: a step that plans or verifies drafts runs synchronously
        (planning needs the previous step's tokens on the host)."""
        policy = self.runner.spec_policy
        if self.runner.proposer is None or policy is None:
            return True
        sched = self.scheduler
        if any(req.spec_token_ids for req in sched.running):
            return False
        num_requests = min(len(sched.running) + len(sched.waiting), sched.max_num_seqs)
        prefill = bool(sched.waiting) or any(
            req.num_computed_tokens < req.num_prompt_tokens for req in sched.running
        )
        return self.runner.speculation_paused(sched.running, num_requests, prefill)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Launch the next step, then finish the one in flight (see the module docstring)."""
        sched = self.scheduler.schedule(lookahead=False)  # an overlapped step never drafts
        launched = self.runner.launch(sched)
        outputs = self._finish_inflight() if self._inflight is not None else []
        if launched is not None:
            self._inflight = (sched, launched)
        return outputs

    def _finish_inflight(self) -> list[RequestOutput]:
        """Wait for the step in flight and process its tokens."""
        assert self._inflight is not None
        sched, pending = self._inflight
        self._inflight = None
        return self._process(sched, self.runner.resolve(pending))

    def _process(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """The host side of a finished step: tokens into the scheduler, detokenization, stop
        strings, outputs."""
        touched = self.scheduler.update(sched, result)
        self._processed = (sched, result)
        now = time.monotonic()
        outputs = []
        for req in touched:
            tr = self._tracked[req.request_id]
            if tr.first_token_time is None:
                tr.first_token_time = now
            stop, cut = self._detokenize(tr, req)
            new = req.output_token_ids[tr.num_sent_tokens :]
            if req.request_id in result.logprobs:
                if tr.logprobs is None:
                    tr.logprobs = []
                tr.logprobs.extend(result.logprobs[req.request_id][: len(new)])
            verified = result.spec_verified.get(req.request_id)
            if verified is not None:
                if tr.spec is None:
                    tr.spec = SpecStats()
                tr.spec.add(*verified)
            if stop is not None and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
                tr.stop_reason = stop
            elif stop is not None and req.is_finished:
                # The stop string ended the output at (or, with speculation, before) the token
                # that also finished the request by length / stop id: the stop string wins.
                req.status = RequestStatus.FINISHED_STOPPED
                tr.stop_reason = stop
            elif req.is_finished and req.status == RequestStatus.FINISHED_STOPPED:
                tr.stop_reason = req.output_token_ids[-1]
            outputs.append(self._output(tr, finished=req.is_finished))
        return outputs

    @staticmethod
    def _detokenize(tr: _Tracked, req: Request) -> tuple[str | None, bool]:
        """Feed this step's tokens one by one; a stop string ends the output at the token that
        completed it (a speculative step can bring several tokens; later ones are dropped, as
        if they had never been generated). Returns (matched stop string, whether tokens were
        dropped)."""
        if tr.detok is None:
            return None, False
        new = req.output_token_ids[tr.num_sent_tokens :]
        for i, tok in enumerate(new):
            stop = tr.detok.add_tokens([tok])
            if stop is not None:
                del req.output_token_ids[tr.num_sent_tokens + i + 1 :]
                return stop, i + 1 < len(new)
        return None, False

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
            self._history_readers.discard(req.request_id)
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
            spec=self._spec_stats(tr),
        )

    def _spec_stats(self, tr: _Tracked) -> SpecStats | None:
        if self.draft_model is None:
            return None
        return tr.spec.copy() if tr.spec is not None else SpecStats()

    # ---- offline convenience -------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` carrying the deltas of both (cumulative fields are already ``later``'s).

    Extends ``earlier``'s delta list in place (each output owns its ``new_token_ids``), so
    merging k queued outputs costs O(their new tokens), not O(k^2)."""
    earlier.new_token_ids.extend(later.new_token_ids)
    later.new_token_ids = earlier.new_token_ids
    later.new_text = earlier.new_text + later.new_text
    return later


class EngineDeadError(RuntimeError):
    """The engine's step failed; every request in flight was failed with this error."""


_Item = RequestOutput | BaseException  # what a stream receives: an output, or the error ending it

# A stream paced by ``max_stream_messages_per_s`` still hears from the engine at least this often.
MAX_STREAM_INTERVAL_S = 0.5


class _Stream:
    """One request's mailbox on its consumer's event loop: at most one pending output (later
    steps are merged into it) and the error that ends the stream, if any.

    Written only on the consumer's loop (the engine thread hands batches over with one
    ``call_soon_threadsafe`` per loop and step). ``not_before`` is when the consumer wants the
    next non-final output at the earliest; a final output or an error wakes it at once.
    """

    __slots__ = ("request_id", "loop", "pending", "error", "waiter", "not_before")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.not_before = 0.0

    def put(self, item: _Item) -> None:
        if isinstance(item, BaseException):
            self.error = item
        elif self.pending is None:
            self.pending = item
        else:
            self.pending = merge_outputs(self.pending, item)
        w = self.waiter
        if w is None or w.done():
            return
        if self.error is not None or self.pending.finished or time.monotonic() >= self.not_before:
            w.set_result(None)

    async def next(self) -> _Item:
        """The merged output once it is due (or final), else the error that ended the stream."""
        while True:
            out = self.pending
            if out is not None and (
                self.error is not None or out.finished or time.monotonic() >= self.not_before
            ):
                self.pending = None
                return out
            if out is None and self.error is not None:
                return self.error
            self.waiter = fut = self.loop.create_future()
            timer = None
            if out is not None:  # due later: wake at not_before unless something final comes
                timer = self.loop.call_later(self.not_before - time.monotonic(), _resolve, fut)
            try:
                await fut
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _put_all(batch: list[tuple[_Stream, _Item]]) -> None:
    for stream, item in batch:
        stream.put(item)


@dataclass
class _Admission:
    """A generate() call waiting for the engine thread to add its request between two steps."""

    stream: _Stream
    prompt: str | Sequence[int]
    params: SamplingParams | None
    tenant: str | None


class AsyncEngine:
    """Streams RequestOutputs from an Engine stepped on a background thread.

    ``generate()`` is an async iterator of incremental outputs. Leaving it early (client gone,
    task cancelled) aborts the request, which frees its KV blocks before the next step. If a step
    raises, every request in flight gets the error and the engine refuses new work.

    The caller's event loop never waits for a step: new requests and aborts go into an inbox
    (its own small lock) that the engine thread empties between steps; a request the engine
    rejects (ValueError: bad prompt, duplicate id) raises from ``generate()`` before any output.

    Per step the engine thread wakes each consumer event loop once, whatever the number of
    streams on it. A consumer that fell behind gets one merged output, not one per step. With
    ``max_stream_messages_per_s`` > 0 every stream is also paced: after its first output (never
    delayed) it yields at most once per ``num_streams / max_stream_messages_per_s`` seconds
    (capped at ``MAX_STREAM_INTERVAL_S``; a final output is never held back), so the messages all
    streams send downstream stay near that rate however fast the engine steps.
    """

    def __init__(self, engine: Engine, *, max_stream_messages_per_s: float = 0.0) -> None:
        if max_stream_messages_per_s < 0:
            raise ValueError(
                f"max_stream_messages_per_s must be >= 0; got {max_stream_messages_per_s}"
            )
        self.engine = engine
        self.max_stream_messages_per_s = max_stream_messages_per_s
        self._lock = threading.Lock()  # held by the engine thread for a whole step
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # admitted requests; engine thread, under _lock
        # The inbox: consumers append, the engine thread takes both lists between steps.
        self._inbox_lock = threading.Lock()
        self._pending_adds: list[_Admission] = []
        self._pending_aborts: list[str] = []
        self._dead: BaseException | None = None  # set under _inbox_lock
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="rayfleet-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(Engine(config))

    def stream_interval_s(self) -> float:
        """The pacing interval now (0: a message per step)."""
        if self.max_stream_messages_per_s <= 0:
            return 0.0
        return min(len(self._streams) / self.max_stream_messages_per_s, MAX_STREAM_INTERVAL_S)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        rid = request_id if request_id is not None else uuid.uuid4().hex
        stream = _Stream(rid, asyncio.get_running_loop())
        with self._inbox_lock:  # the engine sets _dead under this lock: nothing slips in after
            if self._dead is not None:
                raise EngineDeadError(f"engine is not running: {self._dead!r}")
            self._pending_adds.append(_Admission(stream, prompt, params, tenant))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.next()
                if isinstance(item, BaseException):
                    finished = True  # failed or rejected: nothing of it left in the engine
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
                interval = self.stream_interval_s()
                if interval > 0:
                    stream.not_before = time.monotonic() + interval
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._pending_aborts.append(request_id)
        self._wakeup.set()

    @property
    def failure(self) -> BaseException | None:
        """The exception that killed the engine loop, or None while it is healthy."""
        return self._dead

    def run_locked(self, fn: Callable[[Engine], T]) -> T:
        """``fn(engine)`` between steps: the engine thread steps under the same lock, so ``fn``
        sees a consistent scheduler (e.g. a stats snapshot plus the pool's KV events)."""
        with self._lock:
            return fn(self.engine)

    def _deliver(self, items: list[tuple[_Stream, _Item]]) -> None:
        """Hand each item to its stream, one wake-up per consumer event loop. Called with
        ``_lock`` held, in the same locked section as the step that produced the items, so a
        finished id's stream is gone before anyone can reuse the id."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = {}
        for stream, item in items:
            ends = isinstance(item, BaseException) or item.finished
            if ends and self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
            batches.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read these
                for stream, _ in batch:
                    if self._streams.pop(stream.request_id, None) is not None:
                        with self._inbox_lock:
                            self._pending_aborts.append(stream.request_id)

    def _deliver_outputs(self, outputs: list[RequestOutput]) -> None:
        self._deliver(
            [(self._streams[o.request_id], o) for o in outputs if o.request_id in self._streams]
        )

    def _admit(self, adds: list[_Admission]) -> None:
        """Add the inbox's requests to the engine (under ``_lock``); rejections go to their
        streams."""
        rejected: list[tuple[_Stream, _Item]] = []
        for a in adds:
            rid = a.stream.request_id
            try:
                self.engine.add_request(a.prompt, a.params, request_id=rid, tenant=a.tenant)
            except (ValueError, TypeError) as e:
                rejected.append((a.stream, e))
            else:
                self._streams[rid] = a.stream
        if rejected:
            self._deliver(rejected)

    def _loop(self) -> None:
        """Run the engine; whatever ends it (a fault, shutdown) fails every waiting consumer with
        EngineDeadError and makes later generate() calls raise, so no stream is left hanging."""
        try:
            self._run()
            reason: BaseException = EngineDeadError("engine was shut down")
        except BaseException as e:  # an engine fault fails the affected requests
            logger.exception("engine loop failed")
            reason = e
        with self._inbox_lock:
            self._dead = reason
            adds, self._pending_adds = self._pending_adds, []
        err = EngineDeadError(f"engine step failed: {reason!r}")
        with self._lock:
            for rid in list(self._streams):
                try:
                    self.engine.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
                except Exception:  # the scheduler itself may be what failed
                    logger.exception("could not free request %s", rid)
            self._deliver([(s, err) for s in list(self._streams.values())])
            self._deliver([(a.stream, err) for a in adds])

    def _run(self) -> None:
        while not self._stopped:
            with self._inbox_lock:
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, []
            with self._lock:
                # Adds first: an abort always follows its own request's admission.
                self._admit(adds)
                outs = [self.engine.abort(rid) for rid in aborts]
                self._deliver_outputs([o for o in outs if o is not None])
                busy = self.engine.has_unfinished()
            if not busy:
                self._wakeup.wait(0.1)
                self._wakeup.clear()
                continue
            with self._lock:
                self._deliver_outputs(self.engine.step())

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=5)
