"""Kernel registry: every op has a torch reference backend and optional fast backends.

An op is looked up by name and backend (``get("paged_attention", "torch")``). The reference
("torch") backend runs on CPU and CUDA and is the oracle every fast backend is tested against.
Backends register themselves on import of their module; a fast backend whose dependencies do not
import on this machine simply never registers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

REFERENCE = "torch"

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}
_PREFERENCE: dict[str, list[str]] = {}


def register(op: str, backend: str, *, priority: int = 0) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend`` for ``op``; higher priority is preferred."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        prefs = _PREFERENCE.setdefault(op, [])
        prefs.append(backend)
        prefs.sort(key=lambda b: -getattr(_REGISTRY[op][b], "_priority", 0))
        return fn

    def with_priority(fn: Callable) -> Callable:
        fn._priority = priority  # type: ignore[attr-defined]
        return deco(fn)

    return with_priority


def backends(op: str) -> list[str]:
    _load_builtin()
    return list(_PREFERENCE.get(op, []))


def get(op: str, backend: str | None = None) -> Callable[..., Any]:
    """The implementation of ``op``: ``backend`` if given, else the highest-priority one."""
    _load_builtin()
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no kernel registered for op {op!r}; known ops: {sorted(_REGISTRY)}")
    if backend is None:
        backend = _PREFERENCE[op][0]
    if backend not in impls:
        raise ValueError(
            f"attention backend {backend!r} is not available for {op!r}; available: {sorted(impls)}"
        )
    return impls[backend]


def get_or_default(op: str, backend: str | None) -> Callable[..., Any]:
    """``backend``'s implementation of ``op`` if it has one, else the default (e.g. the write_kv
    that goes with the "sdpa" attention backend, which has no write_kv of its own)."""
    return get(op, backend if backend in backends(op) else None)


def get_fused(op: str, backend: str | None) -> Callable[..., Any] | None:
    """``backend``'s own implementation of a fused op, or None where the backend has none or is
    the reference: callers then run the unfused reference ops (e.g. RoPE, then write_kv)."""
    if backend is None or backend == REFERENCE or backend not in backends(op):
        return None
    return get(op, backend)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # torch references of attention / KV write and of the fused ops (norm, SiLU, RoPE)
    from rayfleet.kernels import attention_ref, ops_ref  # noqa: F401

    # Triton backends register as "triton" with the same priority as "torch", which registered
    # first and so stays the default; the runner asks for "triton" explicitly on CUDA.
    with contextlib.suppress(ImportError):  # no triton on this machine: the references serve
        from rayfleet.kernels import (  # noqa: F401
            triton_attention,
            triton_gemv,
            triton_ops,
            triton_step_io,
        )
    from rayfleet.kernels import (
        attention_flash,
        attention_sdpa,  # noqa: F401  (stock-torch fast path)
        fp8_linear,  # noqa: F401  (cuBLAS FP8)
    )

    attention_flash.register_if_installed()  # "flash_attn", where the flash-attn package imports


def choose_attention_backend(requested: str | None, device) -> str:
    """``requested`` if available; else "triton" on CUDA (the fastest measured there, and the
    one CUDA graphs can capture), else the highest-priority backend ("sdpa"). "flash_attn"
    (registered where the flash-attn package imports) is chosen by name: it has not been
    measured against "triton" on a machine that has it, and it needs block_size % 256 == 0."""
    available = backends("paged_attention")
    if requested is not None:
        if requested not in available:
            raise ValueError(
                f"attention_backend must be one of {', '.join(available)}; got {requested!r}"
            )
        return requested
    if getattr(device, "type", device) == "cuda" and "triton" in available:
        return "triton"
    return available[0]
