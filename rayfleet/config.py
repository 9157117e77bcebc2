"""Frozen configuration, built once from CLI flags, ``LLM(...)`` keywords or YAML.

This is the only module that reads ``os.environ``. Small parts of the system take plain values
(``num_blocks``, ``block_size``) rather than these objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, in which dtype. ``model`` is a Hugging Face model directory."""

    model: str
    dtype: str = "auto"  # "auto" = the checkpoint's torch_dtype (float32 on CPU when it is half)
    tokenizer: str | None = None  # defaults to ``model``
    max_model_len: int | None = None  # defaults to the checkpoint's max_position_embeddings
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. The pool size comes from ``num_blocks``, else ``kv_cache_memory_bytes``,
    else (CUDA) ``gpu_memory_utilization`` of free memory after weights and a profiled forward."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    hash_seed: int = 0
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    num_blocks: int | None = None
    cpu_kv_cache_bytes_default: int = 1 << 30
    # "auto": the model dtype; "fp8" (= "fp8_e4m3"): float8 e4m3 with unit scale, half the bytes
    # of bf16 per token (K/V saturate at +-448; attention computes in the model dtype)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1; got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}"
            )
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2; got {self.num_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0; got {self.kv_cache_memory_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    # A prefill chunk of one request is capped at this many tokens per step (0 = no cap beyond the
    # step budget), so a long prompt cannot starve running decodes.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0; "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class SpecConfig:
    draft_model: str | None = None
    num_speculative_tokens: int = 0
    # CUDA: greedy proposals of up to this many requests replay one graph each, all their draft
    # forwards in one launch (spec/proposal_graphs.py; at the decode graphs' capture sizes, 1, 2,
    # 4, 8, 16, 32, 48, 64 at most: capped at its MAX_BATCH, 64); 0 = none, the
    # draft then replays one graph per forward. Each captured batch size holds a graph per first
    # query length and k: in the H100 benchmark (llama-3.2-1b-shaped draft, k up to 8) 128
    # graphs, 346 MiB and about 17 s of start-up.
    proposal_graph_max_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(
                f"num_speculative_tokens must be >= 0; got {self.num_speculative_tokens}"
            )
        if self.proposal_graph_max_batch_size < 0:
            raise ValueError(
                "proposal_graph_max_batch_size must be >= 0; "
                f"got {self.proposal_graph_max_batch_size}"
            )


QUANTIZATION_METHODS = ("fp8",)  # replicas/quant/fp8.py


@dataclass(frozen=True)
class QuantConfig:
    # Weights quantized at load from the checkpoint's dtype: "fp8" (per-row float8_e4m3fn).
    quantization: str | None = None  # the target model's
    draft_quantization: str | None = None  # the draft model's (speculative decoding)

    def __post_init__(self) -> None:
        for name in ("quantization", "draft_quantization"):
            value = getattr(self, name)
            if value is not None and value not in QUANTIZATION_METHODS:
                raise ValueError(
                    f"{name} must be one of {', '.join(QUANTIZATION_METHODS)} or unset; "
                    f"got {value!r}"
                )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    device: str = "cpu"
    attention_backend: str | None = None  # None = the fastest available for the device
    # CUDA graphs for decode steps up to this batch size (0 = eager only).
    cuda_graph_max_batch_size: int = 256
    # CUDA graphs also for short prefills: steps of up to this many tokens in all whose queries
    # round up to a power of two >= 16 (a short prompt, the draft's catch-up over one); 0 = none.
    cuda_graph_prefill_tokens: int = 1024
    # Overlapped scheduling: schedule and prepare step N+1 (and detokenize step N) while the GPU
    # runs step N (with a draft model: the steps where speculation is paused). None = on for
    # CUDA; True forces it (also on CPU, where it only reorders work: tests use that), False
    # turns it off.
    overlap_scheduling: bool | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from flat keywords (``LLM(model, dtype=..., block_size=...)``).

        Each keyword names a field of exactly one sub-config or of EngineConfig itself; an unknown
        keyword is an error that lists the accepted ones.
        """
        parts: dict[str, type] = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "parallel": ParallelConfig,
            "spec": SpecConfig,
            "quant": QuantConfig,
        }
        buckets: dict[str, dict[str, Any]] = {name: {} for name in parts}
        buckets["model"]["model"] = str(Path(model))
        top: dict[str, Any] = {}
        top_names = {f.name for f in fields(cls)} - set(parts)
        owner = {f.name: name for name, c in parts.items() for f in fields(c)}
        for key, value in kwargs.items():
            if key in top_names:
                top[key] = value
            elif key in owner and key != "model":
                buckets[owner[key]][key] = value
            else:
                accepted = sorted((set(owner) - {"model"}) | top_names)
                raise TypeError(f"unknown engine option {key!r}; accepted: {', '.join(accepted)}")
        if "num_blocks" not in buckets["cache"]:
            env_blocks = _env_int("RAYFLEET_NUM_BLOCKS", None)
            if env_blocks is not None:
                buckets["cache"]["num_blocks"] = env_blocks
        return cls(**{name: parts[name](**buckets[name]) for name in parts}, **top)


def default_demo_model() -> str:
    """Directory of the bundled demo target model (``RAYFLEET_DEMO_MODEL`` overrides)."""
    override = os.environ.get("RAYFLEET_DEMO_MODEL")
    if override:
        return override
    return str(Path(__file__).parent / "models" / "demo" / "target")


def __getattr__(name: str):
    # ServeConfig lives with the cluster code (rayfleet/cluster/serve_config.py) and imports this
    # module, so it is re-exported lazily: ``from rayfleet.config import ServeConfig`` works.
    if name in ("ServeConfig", "AutoscalingSpec"):
        from rayfleet.cluster import serve_config

        return getattr(serve_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
