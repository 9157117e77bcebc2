"""Torch model layer: architecture configs, TP-ready layers, model families and the loader."""

from rayfleet.replicas.model.arch import (
    SUPPORTED_ARCHITECTURES,
    ModelArchConfig,
    read_arch_config,
)
from rayfleet.replicas.model.forward import ForwardBatch
from rayfleet.replicas.model.llama import LlamaForCausalLM, MistralForCausalLM
from rayfleet.replicas.model.loader import (
    MODEL_CLASSES,
    build_model,
    build_random_model,
    load_model,
)
from rayfleet.replicas.model.qwen2 import Qwen2ForCausalLM
from rayfleet.replicas.model.qwen3 import Qwen3ForCausalLM
from rayfleet.replicas.model.shapes import MODEL_SHAPES

__all__ = [
    "MODEL_CLASSES",
    "MODEL_SHAPES",
    "SUPPORTED_ARCHITECTURES",
    "ForwardBatch",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "ModelArchConfig",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "build_model",
    "build_random_model",
    "load_model",
    "read_arch_config",
]
