"""LLMReplica: the Ray Serve deployment that owns one AsyncEngine.

The ingress calls ``generate(job)`` through a streaming DeploymentHandle and gets ``StreamChunk``
deltas for that request: the first token at once, then the tokens of one or more engine steps
per chunk, paced to this replica's share of ``stream_messages_per_s`` (``AsyncEngine``). Leaving
the stream early (client cancelled or disconnected, Abort, ingress gone) cancels this generator,
which leaves ``AsyncEngine.generate`` and so aborts the request: its KV blocks are back in the
pool before the next engine step.

Every ``STATS_PERIOD_S`` a background task snapshots the engine (running/waiting, queued prefill
tokens, KV usage, prefix-cache counters), sets the Prometheus gauges, and publishes the snapshot
to Ray's internal KV under ``{app}/{replica_id}`` so any ingress replica can answer
GetServerInfo for all LLM replicas. The same snapshot is what ``record_routing_stats`` returns to
Serve for a request router, plus the replica's KV events.

KV events (the router's second source of truth, next to its own predictions). The block pool
records the hashes it caches and evicts; every stats pass drains them under the engine lock into a
``KVEventLog`` (``engine/kv_events.py``), which nets them against the pool's map (a hash stored
then evicted within one period nets to removed, evicted then recomputed to stored).
Each ``record_routing_stats`` call (Serve's controller, every ``request_routing_stats_period_s``)
seals the net changes into one batch with the next sequence number and returns the last
``KV_EVENT_WINDOW`` batches; the controller broadcasts them to every handle's router, which
applies each batch once (``rayfleet.router.routing_state.KVEventCursor``). Latency from the
engine caching a block to the routers' indexes: one stats period plus the controller's loop and
long poll, about 0.6 s at the 0.5 s default.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from rayfleet.cluster.errors import ErrorKind, RequestError
from rayfleet.cluster.request_codec import GenerationJob, StreamChunk
from rayfleet.cluster.serve_config import ServeConfig
from rayfleet.replicas.engine.kv_events import KVEventLog

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5
STATS_NAMESPACE = "rayfleet_stats"
# Sealed KV event batches repeated in every routing-stats snapshot: a router that misses up to
# KV_EVENT_WINDOW - 1 broadcasts still applies every batch.
KV_EVENT_WINDOW = 3


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit use)
        import uuid

        return f"local-{uuid.uuid4().hex[:8]}"


def _value_error_to_request_error(e: ValueError) -> RequestError:
    """Map the engine's admission errors (validate / KV fit / duplicate id) to a field."""
    msg = str(e)
    if "request_id" in msg:
        field = "request_id"
    elif "stop_token_ids" in msg:
        field = "sampling.stop_token_ids"
    elif "max_tokens" in msg or "KV cache" in msg:
        field = "sampling.max_tokens"
    else:
        field = "prompt"
    return RequestError.invalid(field, msg)


class LLMReplica:
    """One engine per replica. Methods called through the handle: ``generate`` (streaming),
    ``describe``, ``stats``, ``ready``; Serve calls ``record_routing_stats`` and
    ``check_health``."""

    def __init__(self, config: dict[str, Any]) -> None:
        from rayfleet.cluster.engine_factory import build_engine
        from rayfleet.cluster.metrics import ReplicaMetrics
        from rayfleet.replicas.llm_engine import AsyncEngine

        self._cfg = ServeConfig.from_dict(config)
        self.replica_id = _replica_id()
        try:
            from ray import serve

            self._app_name = serve.get_replica_context().app_name
        except Exception:
            self._app_name = self._cfg.app_name
        engine = build_engine(
            self._cfg.model, self._cfg.engine_kwargs(), model_shape=self._cfg.model_shape
        )
        self._engine = AsyncEngine(
            engine, max_stream_messages_per_s=self._cfg.replica_stream_messages_per_s
        )
        self._metrics = ReplicaMetrics(self._cfg.model_name, self.replica_id)
        # Totals since start; the stats task turns them into Prometheus counter increments.
        self._totals = {"prompt": 0, "generated": 0, "cached": 0, "aborts": 0}
        self._flushed = dict(self._totals)
        self._flushed_preemptions = 0
        # Net KV changes since the last sealed batch, and the window of sealed batches.
        self._kv_events = KVEventLog(KV_EVENT_WINDOW)
        self._snapshot: dict[str, Any] = self._collect()
        self._stats_task: asyncio.Task | None = None
        self._closed = False
        self._start_stats_task()
        logger.info("LLMReplica %s ready (%s)", self.replica_id, self._cfg.model_name)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, job: GenerationJob) -> AsyncIterator[StreamChunk]:
        """Stream ``job``'s deltas; the last chunk carries finish_reason, usage and replica_id."""
        from rayfleet.replicas.llm_engine import EngineDeadError

        self._start_stats_task()
        num_sent_logprobs = 0
        finished = False
        try:
            async for out in self._engine.generate(
                job.prompt_token_ids,
                job.params,
                request_id=job.request_id,
                tenant=job.tenant,
            ):
                logprobs = None
                if out.logprobs is not None:
                    new = out.logprobs[num_sent_logprobs:]
                    num_sent_logprobs = len(out.logprobs)
                    logprobs = [(x.token_id, x.logprob, x.rank, list(x.top)) for x in new]
                chunk = StreamChunk(
                    request_id=out.request_id,
                    new_text=out.new_text,
                    new_token_ids=list(out.new_token_ids),
                    logprobs=logprobs,
                )
                self._totals["generated"] += len(out.new_token_ids)
                if out.finished:
                    finished = True
                    chunk.finish_reason = out.finish_reason or "stop"
                    chunk.stop_reason = out.stop_reason
                    chunk.num_prompt_tokens = len(out.prompt_token_ids)
                    chunk.num_output_tokens = len(out.token_ids)
                    chunk.num_cached_tokens = out.num_cached_tokens
                    chunk.replica_id = self.replica_id
                    self._totals["prompt"] += chunk.num_prompt_tokens
                    self._totals["cached"] += chunk.num_cached_tokens
                    if out.finish_reason == "abort":
                        self._totals["aborts"] += 1
                yield chunk
        except ValueError as e:  # admission: raised before the first output
            finished = True  # rejected, not aborted
            raise _value_error_to_request_error(e) from None
        except EngineDeadError as e:
            finished = True  # failed, not aborted
            raise RequestError(ErrorKind.UNAVAILABLE, f"replica {self.replica_id}: {e}") from None
        finally:
            if not finished:  # cancelled: AsyncEngine.generate's exit aborted it
                self._totals["aborts"] += 1

    async def ready(self) -> bool:
        return not self._closed and self._engine.failure is None

    async def describe(self) -> dict[str, Any]:
        """Static facts of this replica's engine (dtype, KV pool, limits)."""
        eng = self._engine.engine
        cfg = eng.config
        return {
            "replica_id": self.replica_id,
            "dtype": str(eng.dtype).replace("torch.", ""),
            "device": cfg.device,
            "block_size": cfg.cache.block_size,
            "hash_seed": cfg.cache.hash_seed,
            "prefix_caching": cfg.cache.enable_prefix_caching,
            "num_kv_blocks": eng.num_blocks - 1,
            "kv_capacity_tokens": (eng.num_blocks - 1) * cfg.cache.block_size,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.arch.vocab_size,
            "draft_model": cfg.spec.draft_model or "",
            "num_speculative_tokens": cfg.spec.num_speculative_tokens,
            "quantization": cfg.quant.quantization or "",
        }

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._collect)

    # ---- Serve hooks ---------------------------------------------------------------------------
    async def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every ``request_routing_stats_period_s``: a fresh snapshot (load) and
        the last KV event batches, for the RequestRouter (``RunningReplica.routing_stats``)."""
        s = await asyncio.to_thread(self._collect)
        self._snapshot = s
        return {
            "time": s["time"],
            "kv_usage": s["kv_usage"],
            "num_running": s["num_running"],
            "num_waiting": s["num_waiting"],
            "queued_prefill_tokens": s["queued_prefill_tokens"],
            "decode_tokens": s["decode_tokens"],
            "num_kv_blocks": s["num_kv_blocks"],
            "kv_events": self._kv_events.seal(),
        }

    def check_health(self) -> None:
        dead = self._engine.failure
        if dead is not None:
            raise RuntimeError(f"engine of replica {self.replica_id} failed: {dead!r}")

    def __del__(self) -> None:
        # Serve calls this after draining (graceful_shutdown_timeout_s); also on GC.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._stats_task is not None:
            self._stats_task.cancel()
        try:
            self._engine.shutdown()
        finally:
            self._unpublish()

    # ---- stats ---------------------------------------------------------------------------------
    def _collect(self) -> dict[str, Any]:
        """Snapshot the scheduler. Runs off the event loop: it waits for the engine's lock, which
        the engine thread holds for the duration of a step."""

        def snapshot(engine):
            # Between steps, so the scheduler and its requests are consistent; the KV events are
            # netted against the pool's map while the engine cannot change it (module docstring).
            sched = engine.scheduler
            self._kv_events.drain(sched.pool)
            queued, decode = sched.routing_load()
            return sched.stats(), sched.pool.num_usable_blocks, queued, decode

        st, num_kv_blocks, queued, decode = self._engine.run_locked(snapshot)
        return {
            "replica_id": self.replica_id,
            "time": time.time(),
            "num_running": st.num_running,
            "num_waiting": st.num_waiting,
            "queued_prefill_tokens": queued,
            "decode_tokens": decode,
            "kv_usage": float(st.kv_usage),
            "num_kv_blocks": num_kv_blocks,
            "prefix_cache_queries": st.prefix_cache_queries,
            "prefix_cache_hits": st.prefix_cache_hits,
            "num_preemptions": st.num_preemptions_total,
            "num_aborted": self._totals["aborts"],
            "device": self._cfg.device,
        }

    def _start_stats_task(self) -> None:
        if self._stats_task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # constructed outside the loop: start on the first call instead
            return
        self._stats_task = loop.create_task(self._stats_loop())

    async def _stats_loop(self) -> None:
        while not self._closed:
            try:
                self._snapshot = await asyncio.to_thread(self._collect)
                self._export_metrics(self._snapshot)
                await asyncio.to_thread(self._publish, self._snapshot)
            except Exception:  # stats must never take the replica down
                logger.exception("replica stats update failed")
            await asyncio.sleep(STATS_PERIOD_S)

    def _export_metrics(self, s: dict[str, Any]) -> None:
        m = self._metrics
        m.running.set(s["num_running"])
        m.waiting.set(s["num_waiting"])
        m.kv_usage.set(s["kv_usage"])
        for key, counter in (
            ("prompt", m.prompt_tokens),
            ("generated", m.generation_tokens),
            ("cached", m.cached_tokens),
            ("aborts", m.aborts),
        ):
            delta = self._totals[key] - self._flushed[key]
            if delta > 0:
                counter.inc(delta)
                self._flushed[key] += delta
        delta = s["num_preemptions"] - self._flushed_preemptions
        if delta > 0:
            m.preemptions.inc(delta)
            self._flushed_preemptions += delta

    def _stats_key(self) -> str:
        return f"{self._app_name}/{self.replica_id}"

    def _publish(self, s: dict[str, Any]) -> None:
        from ray.experimental.internal_kv import _internal_kv_initialized, _internal_kv_put

        if _internal_kv_initialized():
            _internal_kv_put(self._stats_key(), json.dumps(s), namespace=STATS_NAMESPACE)

    def _unpublish(self) -> None:
        try:
            from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

            if _internal_kv_initialized():
                _internal_kv_del(self._stats_key(), namespace=STATS_NAMESPACE)
        except Exception:  # the cluster may be going away
            pass


def read_published_stats(app_name: str, max_age_s: float = 10.0) -> list[dict[str, Any]]:
    """Every live replica's latest snapshot of ``app_name`` (stale ones = dead replicas are
    skipped). Blocking GCS calls: run off the event loop."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    now = time.time()
    out = []
    for key in _internal_kv_list(f"{app_name}/", namespace=STATS_NAMESPACE):
        raw = _internal_kv_get(key, namespace=STATS_NAMESPACE)
        if raw is None:
            continue
        s = json.loads(raw)
        s["stats_age_s"] = max(now - s["time"], 0.0)
        if s["stats_age_s"] <= max_age_s:
            out.append(s)
    return sorted(out, key=lambda s: s["replica_id"])
