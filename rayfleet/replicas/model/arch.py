"""A checkpoint's architecture: everything needed to build the torch model, from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class ModelArchConfig:
    """Shapes and flags of one decoder-only checkpoint (global sizes, before any TP sharding).

    ``rope_scaling`` is the rope dict without ``rope_theta`` (keys as in transformers:
    ``rope_type``, ``factor``, ...) or None for plain RoPE. ``sliding_window_layers[i]`` says
    whether layer i uses ``sliding_window``; it is all False when there is no window.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[bool, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    torch_dtype: torch.dtype = torch.bfloat16
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not self.sliding_window_layers:
            windowed = self.sliding_window is not None
            object.__setattr__(self, "sliding_window_layers", (windowed,) * self.num_layers)
        if len(self.sliding_window_layers) != self.num_layers:
            raise ValueError("sliding_window_layers must have one entry per layer")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.sliding_window_layers[layer_idx] else None

    def num_kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads one TP rank holds: its shard, or one replicated head when fewer than ranks."""
        return max(1, self.num_kv_heads // tp_size)

    @classmethod
    def from_hf_config(cls, hf: Any) -> ModelArchConfig:
        """Build from a ``transformers`` config object (transformers 4.x or 5.x spelling)."""
        archs = list(getattr(hf, "architectures", None) or [])
        supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ValueError(
                f"unsupported model architecture {archs or '(none listed)'}; "
                f"supported: {list(SUPPORTED_ARCHITECTURES)}"
            )
        arch = supported[0]
        num_heads = hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_params(hf)

        is_qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
        window = getattr(hf, "sliding_window", None)
        if is_qwen and not getattr(hf, "use_sliding_window", False):
            window = None
        layers = hf.num_hidden_layers
        if window is None:
            window_layers: tuple[bool, ...] = (False,) * layers
        elif getattr(hf, "layer_types", None):
            window_layers = tuple(t == "sliding_attention" for t in hf.layer_types)
        elif is_qwen:
            first = getattr(hf, "max_window_layers", 0)
            window_layers = tuple(i >= first for i in range(layers))
        else:
            window_layers = (True,) * layers
        if not any(window_layers):
            window = None

        attention_bias = bool(getattr(hf, "attention_bias", False))
        # Qwen2 always has q/k/v biases and none on o_proj; others put attention_bias on all four.
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias

        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            hidden_size=hf.hidden_size,
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_window=window,
            sliding_window_layers=window_layers,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=_parse_dtype(
                getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
            ),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


def read_arch_config(model_dir: str | Path) -> ModelArchConfig:
    """Validate a checkpoint directory and parse its config.json.

    Raises FileNotFoundError when config.json or every ``*.safetensors`` file is missing, and
    ValueError for an architecture this engine does not implement.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model directory {model_dir} has no *.safetensors weights "
            "(only safetensors checkpoints are supported)"
        )
    # Check the architecture before AutoConfig, which fails obscurely on unknown model types.
    raw = json.loads(config_path.read_text())
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(
            f"unsupported model architecture {archs or '(none listed)'} in {config_path}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(model_dir))
    arch = ModelArchConfig.from_hf_config(hf)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if gen_eos is not None:
            extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
            merged = arch.eos_token_ids + tuple(e for e in extra if e not in arch.eos_token_ids)
            object.__setattr__(arch, "eos_token_ids", merged)
    return arch


def _rope_params(hf: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4 and older config.json files)."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and params:
        params = dict(params)
    else:
        params = dict(getattr(hf, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf, "rope_theta", None) or 10000.0
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if params.get("rope_type", "default") == "default":
        return float(theta), None
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
    return float(theta), params


def _parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.bfloat16
