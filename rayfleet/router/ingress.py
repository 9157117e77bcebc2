"""The ingress deployment: gRPC ``rayfleet.v1.Generation`` + ``grpc.health.v1.Health`` (through
Serve's gRPC proxy) and OpenAI-compatible HTTP (through Serve's HTTP proxy), in one class.

Per request: validate and tokenize here (the tokenizer and the model's limits are loaded at
start, so bad input never reaches a replica), then stream from one LLMReplica through a
DeploymentHandle and forward each chunk as it arrives (no buffering).

Who ends a request, and how the replica learns of it (KV blocks are freed in every case):
  client cancels / disconnects  Serve cancels this call -> ``finally`` cancels the replica call
  Abort(request_id)             ``_inflight[rid].response.cancel()`` -> stream ends ABORTED
  replica queue full            BackPressureError before the first chunk -> RESOURCE_EXHAUSTED
Abort finds requests of this ingress replica only; run one ingress replica (the default) or
route Abort with the same session.

Routing (``routing`` != "default"): before dispatch the ingress hashes the prompt exactly as the
engine will (``hash_blocks`` with the replicas' block size and hash seed from ``describe()`` and
the request's tenant) and attaches a ``RoutingHint`` (hashes, session id, mode) to the job; the
PrefixAwareRequestRouter of ``self._llm`` (in this process) reads it, and the job is pickled to
the replica without it. The final chunk's ``replica_id`` and ``num_cached_tokens`` go back to that
router (predicted vs actual hits). A gRPC client may pick another mode for one request with the
metadata ``rayfleet-routing: MODE`` (benchmarks compare modes on one set of replicas that way).
"""

# No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real
# types (``request: Request``) after Serve rebinds the methods in the replica.
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

import rayfleet
from rayfleet.cluster import openai_api as oa
from rayfleet.cluster.errors import ErrorKind, RequestError
from rayfleet.cluster.metrics import ingress_metrics
from rayfleet.cluster.request_codec import (
    GenerationJob,
    ModelLimits,
    StreamChunk,
    chunk_to_proto,
    job_from_proto,
)
from rayfleet.cluster.serve_config import ServeConfig
from rayfleet.hashing import hash_blocks
from rayfleet.protos_gen.v1 import generation_pb2 as pb
from rayfleet.router.routing_state import RoutingHint, find_router
from rayfleet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTHY_CACHE_S = 2.0
ROUTING_METADATA_KEY = "rayfleet-routing"
SERVICE_NAMES = ("", "rayfleet.v1.Generation")

openai_app = FastAPI(title="rayfleet", version=rayfleet.__version__)


@dataclass
class _Inflight:
    response: DeploymentResponseGenerator
    aborted: bool = False


@dataclass
class ModelView:
    """The model as the ingress sees it: limits, tokenizer, chat template (no weights)."""

    name: str
    vocab_size: int
    max_model_len: int
    tokenizer: Any | None
    has_chat_template: bool
    engine_facts: dict[str, Any] = field(default_factory=dict)  # from a replica's describe()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # template errors are the caller's (bad roles/order)
            raise RequestError.invalid("messages", f"chat template failed: {e}") from None
        # The template writes its own special tokens (BOS...): do not add them twice.
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def load_model_view(cfg: ServeConfig) -> ModelView:
    if cfg.model_shape:
        from rayfleet.replicas.model.shapes import MODEL_SHAPES

        arch = MODEL_SHAPES[cfg.model_shape]
        tokenizer = None
    else:
        from transformers import AutoTokenizer

        from rayfleet.replicas.model import read_arch_config

        arch = read_arch_config(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.engine.get("tokenizer") or cfg.model)
    return ModelView(
        name=cfg.model_name,
        vocab_size=arch.vocab_size,
        max_model_len=cfg.engine.get("max_model_len") or arch.max_position_embeddings,
        tokenizer=tokenizer,
        has_chat_template=bool(tokenizer is not None and getattr(tokenizer, "chat_template", None)),
    )


def _classify(e: BaseException) -> RequestError | None:
    """Map what a handle call can raise to a RequestError (None: not ours to map)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, RequestError):
        return e
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, RequestError):
            return cause
        if isinstance(cause, BaseException):
            mapped = _classify(cause)
            if mapped is not None:
                return mapped
        return RequestError(ErrorKind.INTERNAL, f"replica failed: {cause or e}")
    if isinstance(e, BackPressureError):
        return RequestError(ErrorKind.RESOURCE_EXHAUSTED, f"server overloaded: {e.message}")
    if isinstance(e, DeploymentUnavailableError):
        return RequestError(ErrorKind.UNAVAILABLE, f"no replica available: {e.message}")
    if isinstance(e, RayActorError):
        return RequestError(ErrorKind.UNAVAILABLE, f"replica died: {e}")
    return None


def _routing_override(grpc_context: Any) -> str | None:
    """The ``rayfleet-routing`` metadata value, validated (None when absent)."""
    if grpc_context is None:
        return None
    try:
        metadata = grpc_context.invocation_metadata() or ()
    except Exception:
        return None
    for key, value in metadata:
        if key == ROUTING_METADATA_KEY:
            from rayfleet.router.policy import RoutingMode

            modes = [m.value for m in RoutingMode]
            if value not in modes:
                raise RequestError.invalid(
                    f"metadata {ROUTING_METADATA_KEY}",
                    f"must be one of {', '.join(modes)}; got {value!r}",
                )
            return value
    return None


@serve.ingress(openai_app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, config: dict[str, Any]) -> None:
        self._cfg = ServeConfig.from_dict(config)
        self._llm = llm
        self._view = load_model_view(self._cfg)
        self._inflight: dict[str, _Inflight] = {}
        self._healthy_until = 0.0
        self._metrics = ingress_metrics(self._cfg.model_name)
        self._created = oa.now_s()

    # ---- shared plumbing -----------------------------------------------------------------------
    def _limits(self) -> ModelLimits:
        return ModelLimits(
            vocab_size=self._view.vocab_size,
            max_model_len=self._view.max_model_len,
            kv_capacity_tokens=self._view.engine_facts.get("kv_capacity_tokens"),
        )

    async def _engine_facts(self) -> dict[str, Any]:
        if not self._view.engine_facts:
            self._view.engine_facts = await self._llm.describe.remote()
        return self._view.engine_facts

    def _new_request_id(self, given: str) -> str:
        if not given:
            return uuid.uuid4().hex
        if given in self._inflight:
            raise RequestError.invalid("request_id", f"{given!r} is already in flight")
        return given

    def _router(self) -> Any | None:
        return find_router(self._llm.app_name, self._llm.deployment_name)

    def _routing_hint(self, job: GenerationJob, mode: str | None) -> RoutingHint | None:
        """Block hashes of the prompt as the engine will compute them (None: Serve's routing)."""
        if self._cfg.routing == "default":
            return None
        facts = self._view.engine_facts
        block_size = int(facts["block_size"])
        ids = job.prompt_token_ids
        # The engine always computes the last prompt token, so at most the full blocks of the
        # first n - 1 tokens can be served from its cache: those are the blocks worth matching.
        hashes = hash_blocks(
            ids[: len(ids) - 1],
            block_size,
            seed=int(facts.get("hash_seed", 0)),
            tenant=job.tenant,
        )
        return RoutingHint(
            request_id=job.request_id,
            block_hashes=tuple(hashes),
            block_size=block_size,
            num_prompt_tokens=len(ids),
            session_key=job.session_id,
            mode=mode,
        )

    async def _stream(
        self, job: GenerationJob, protocol: str, routing_mode: str | None = None
    ) -> AsyncIterator[StreamChunk]:
        """Dispatch ``job`` to a replica and yield its chunks as they arrive; every exit path
        records one ``rayfleet_requests`` status and leaves no request running on the replica."""
        tags = {"protocol": protocol}
        if not self._view.engine_facts:
            await self._engine_facts()
        job.routing = self._routing_hint(job, routing_mode)
        t0 = time.monotonic()
        last = t0
        status = ErrorKind.INTERNAL.value
        finished = False
        handle = self._llm.options(stream=True)
        if job.session_id:
            handle = handle.options(session_id=job.session_id)
        response: DeploymentResponseGenerator = handle.generate.remote(job)
        rec = _Inflight(response)
        self._inflight[job.request_id] = rec
        try:
            async for chunk in response:
                now = time.monotonic()
                n = len(chunk.new_token_ids)
                if n:
                    if last == t0:
                        self._metrics.ttft.observe(now - t0, tags=tags)
                        router = self._router() if job.routing is not None else None
                        if router is not None:
                            router.report_prefilled(job.request_id)
                    else:
                        self._metrics.itl.observe((now - last) / n, tags=tags)
                    last = now
                if chunk.finished:
                    finished = True
                    self._metrics.e2e.observe(now - t0, tags=tags)
                    router = self._router() if job.routing is not None else None
                    if router is not None:
                        router.report_finished(
                            job.request_id, chunk.replica_id, chunk.num_cached_tokens
                        )
                yield chunk
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = ErrorKind.CANCELLED.value
            raise
        except Exception as e:
            from ray.serve.exceptions import RequestCancelledError

            if isinstance(e, RequestCancelledError) or rec.aborted:
                err = (
                    RequestError(ErrorKind.ABORTED, f"request {job.request_id} was aborted")
                    if rec.aborted
                    else RequestError(ErrorKind.CANCELLED, f"request {job.request_id} cancelled")
                )
            else:
                err = _classify(e)
                if err is None:
                    logger.exception("request %s failed", job.request_id)
                    err = RequestError(ErrorKind.INTERNAL, f"internal error: {e!r}")
            status = err.kind.value
            raise err from None
        finally:
            self._inflight.pop(job.request_id, None)
            if not finished:
                response.cancel()  # the replica aborts the request and frees its KV blocks
                router = self._router() if job.routing is not None else None
                if router is not None:
                    router.report_aborted(job.request_id)
            self._metrics.requests.inc(tags={**tags, "status": status})

    async def _replicas_ready(self) -> bool:
        if time.monotonic() < self._healthy_until:
            return True
        try:
            ok = await asyncio.wait_for(self._llm.ready.remote(), timeout=5.0)
        except Exception:
            return False
        if ok:
            self._healthy_until = time.monotonic() + HEALTHY_CACHE_S
            await self._engine_facts()
        return bool(ok)

    async def ready(self) -> bool:
        """True once a replica answers; used by ``rayfleet serve`` before printing ready."""
        return await self._replicas_ready()

    # ---- gRPC: rayfleet.v1.Generation ----------------------------------------------------------
    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            if not self._view.engine_facts:
                await self._engine_facts()
            mode = _routing_override(grpc_context)
            job = job_from_proto(
                request,
                request_id=self._new_request_id(request.request_id),
                limits=self._limits(),
                tokenize=self._view.tokenize if self._view.tokenizer is not None else None,
            )
            async for chunk in self._stream(job, "grpc", mode):
                yield chunk_to_proto(chunk, request.output)
        except Exception as e:
            err = _classify(e)
            if err is None:
                raise
            if grpc_context is not None:
                grpc_context.set_code(err.kind.grpc_code())
                grpc_context.set_details(err.details)
            raise err from None

    async def Abort(self, request: pb.AbortRequest, grpc_context: Any = None) -> pb.AbortResponse:  # noqa: N802
        rec = self._inflight.get(request.request_id)
        if rec is None:
            return pb.AbortResponse(found=False)
        rec.aborted = True
        rec.response.cancel()
        return pb.AbortResponse(found=True)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.ModelInfo:  # noqa: N802
        facts = await self._engine_facts()
        v = self._view
        return pb.ModelInfo(
            model_name=v.name,
            max_model_len=v.max_model_len,
            vocab_size=v.vocab_size,
            dtype=facts.get("dtype", ""),
            quantization=facts.get("quantization", ""),
            draft_model=facts.get("draft_model", ""),
            num_speculative_tokens=facts.get("num_speculative_tokens", 0),
            block_size=facts.get("block_size", 0),
            has_tokenizer=v.tokenizer is not None,
            has_chat_template=v.has_chat_template,
        )

    async def GetServerInfo(self, request: pb.GetServerInfoRequest) -> pb.ServerInfo:  # noqa: N802
        from rayfleet.replicas.deployment import read_published_stats

        stats = await asyncio.to_thread(read_published_stats, self._cfg.app_name)
        info = pb.ServerInfo(
            version=rayfleet.__version__, model_name=self._view.name, routing=self._cfg.routing
        )
        for s in stats:
            info.replicas.append(
                pb.ReplicaInfo(
                    replica_id=s["replica_id"],
                    num_running=s["num_running"],
                    num_waiting=s["num_waiting"],
                    queued_prefill_tokens=s["queued_prefill_tokens"],
                    kv_usage=s["kv_usage"],
                    num_kv_blocks=s["num_kv_blocks"],
                    prefix_cache_queries=s["prefix_cache_queries"],
                    prefix_cache_hits=s["prefix_cache_hits"],
                    num_preemptions=s["num_preemptions"],
                    num_aborted=s.get("num_aborted", 0),
                    device=s["device"],
                    stats_age_s=s["stats_age_s"],
                )
            )
        return info

    # ---- routing introspection (through the handle: tests, operators) -------------------------
    async def routing_debug(
        self,
        prompt_token_ids: list[int] | None = None,
        tenant: str | None = None,
        mode: str | None = None,
    ) -> dict[str, Any]:
        """This ingress replica's router state: mode, index size, event batches applied, and
        per mode the predicted vs actual cached tokens. With ``prompt_token_ids``, also how many
        leading blocks of that prompt each replica holds in ``mode``'s index ("match")."""
        router = self._router()
        out: dict[str, Any] = {"routing": self._cfg.routing, "router": None}
        if router is None:
            return out
        out["router"] = router.debug_snapshot()
        if prompt_token_ids is not None:
            if not self._view.engine_facts:
                await self._engine_facts()
            job = GenerationJob("debug", list(prompt_token_ids), SamplingParams(), tenant=tenant)
            hint = self._routing_hint(job, mode)
            out["match"] = router.state.match(hint.block_hashes, mode) if hint else {}
        return out

    # ---- gRPC: grpc.health.v1.Health -----------------------------------------------------------
    async def _health(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in SERVICE_NAMES:
            import grpc

            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            raise RequestError(ErrorKind.INVALID_ARGUMENT, f"unknown service {request.service!r}")
        serving = await self._replicas_ready()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        return await self._health(request, grpc_context)

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            resp = await self._health(request, grpc_context)
            if resp.status != last:
                last = resp.status
                yield resp
            await asyncio.sleep(1.0)

    # ---- OpenAI-compatible HTTP ----------------------------------------------------------------
    def _card(self) -> oa.ModelCard:
        v = self._view
        return oa.ModelCard(
            name=v.name,
            limits=self._limits(),
            tokenize=v.tokenize if v.tokenizer is not None else None,
            apply_chat_template=v.chat_ids if v.has_chat_template else None,
            created=self._created,
        )

    @staticmethod
    def _error(err: RequestError) -> JSONResponse:
        return JSONResponse(oa.error_body(err), status_code=err.kind.http_status)

    @openai_app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        return JSONResponse(oa.models_body(self._card()))

    @openai_app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._openai(request, chat=False)

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, *, chat: bool) -> Any:
        try:
            body = await request.json()
        except Exception:
            return self._error(RequestError.invalid("body", "request body is not valid JSON"))
        try:
            if not self._view.engine_facts:
                await self._engine_facts()
            rid = self._new_request_id("")
            build = oa.chat_request if chat else oa.completion_request
            req = build(body, self._card(), rid)
            chunks = self._stream(req.job, "http")
            # Wait for the first chunk before answering, so that overload and validation errors
            # on the replica become HTTP statuses rather than a broken stream.
            first = await chunks.__anext__()
        except Exception as e:
            err = _classify(e)
            if err is None:
                raise
            return self._error(err)
        created = oa.now_s()
        if not req.stream:
            collected = [first]
            try:
                async for c in chunks:
                    collected.append(c)
            except Exception as e:
                err = _classify(e)
                if err is None:
                    raise
                return self._error(err)
            fmt = oa.chat_body if chat else oa.completion_body
            return JSONResponse(fmt(req, collected, created, self._view.decode_token))
        return StreamingResponse(
            self._sse(req, first, chunks, created, chat), media_type="text/event-stream"
        )

    async def _sse(
        self,
        req: oa.OpenAIRequest,
        first: StreamChunk,
        rest: AsyncIterator[StreamChunk],
        created: int,
        chat: bool,
    ) -> AsyncIterator[str]:
        decode = self._view.decode_token
        chunk: StreamChunk | None = first
        is_first = True
        try:
            while chunk is not None:
                if chat:
                    body = oa.chat_chunk_body(req, chunk, created, decode, is_first)
                else:
                    body = oa.completion_chunk_body(req, chunk, created, decode)
                yield oa.sse(body)
                is_first = False
                if chunk.finished:
                    if req.include_usage:
                        yield oa.sse(oa.usage_chunk_body(req, chunk, created, chat))
                    break
                chunk = await rest.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:
            err = _classify(e)
            if err is None:
                raise
            yield oa.sse(oa.error_body(err))
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        yield oa.sse("[DONE]")
