"""Build an Engine from a model directory or from a named shape with random weights.

Shared by the serving replica and benchmarks: ``model_shape`` (a key of ``MODEL_SHAPES``) builds a
model of that real architecture with random weights directly on the device, so a GPU benchmark
needs no download; such an engine has no tokenizer (requests must carry token ids).
"""

from __future__ import annotations

from typing import Any


def build_engine(
    model: str | None,
    engine_kwargs: dict[str, Any],
    *,
    model_shape: str | None = None,
    weights_seed: int = 0,
):
    """An ``Engine`` for ``model`` (HF directory) or ``model_shape`` (random weights).

    ``engine_kwargs`` are ``EngineConfig.from_kwargs`` keywords. With a shape, ``dtype: auto``
    means bfloat16 (the shapes' checkpoint dtype).
    """
    import torch

    from rayfleet.config import EngineConfig
    from rayfleet.replicas.llm_engine import Engine, resolve_dtype

    if model_shape is None:
        if not model:
            raise ValueError("give a model directory or a model_shape")
        return Engine(EngineConfig.from_kwargs(model, **engine_kwargs))

    from rayfleet.replicas.model import MODEL_SHAPES, build_random_model

    if model_shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model_shape {model_shape!r}; known: {sorted(MODEL_SHAPES)}")
    arch = MODEL_SHAPES[model_shape]
    kwargs = dict(engine_kwargs)
    requested = kwargs.get("dtype", "auto")
    dtype = resolve_dtype(requested if requested != "auto" else "bfloat16", None)
    device = torch.device(kwargs.get("device", "cpu"))
    model_obj = build_random_model(
        arch, dtype, device, seed=weights_seed, max_positions=kwargs.get("max_model_len")
    )
    kwargs["dtype"] = str(dtype).replace("torch.", "")
    kwargs.setdefault("show_progress", False)
    config = EngineConfig.from_kwargs(f"<random {model_shape}>", **kwargs)
    return Engine(config, model=model_obj)
