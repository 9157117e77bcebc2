"""Build a model and stream a safetensors checkpoint into it, tensor by tensor.

The model is constructed directly on the target device with uninitialized parameters; each
checkpoint tensor is read (on the CPU) with ``safetensors.safe_open`` and handed to its parameter's
``weight_loader``, which copies this TP rank's slice. No transformers model is ever built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rayfleet.replicas.model.arch import ModelArchConfig, read_arch_config
from rayfleet.replicas.model.llama import LlamaForCausalLM, MistralForCausalLM
from rayfleet.replicas.model.qwen2 import Qwen2ForCausalLM
from rayfleet.replicas.model.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

# checkpoint name fragment -> (our fused module fragment, shard id)
_FUSED: dict[str, tuple[str, str | int]] = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
_SHARDS_OF: dict[str, tuple[str | int, ...]] = {
    ".qkv_proj.": ("q", "k", "v"),
    ".gate_up_proj.": (0, 1),
}
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def build_model(
    arch: ModelArchConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """The model with uninitialized weights, allocated once, directly on ``device``."""
    cls = MODEL_CLASSES[arch.architecture]
    with torch.device(device):
        model = cls(arch, dtype=dtype, max_positions=max_positions)
    return model.eval()


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"model directory {model_dir} lacks shards {missing} named in {index.name}"
            )
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weights")
    return files


def _target(name: str) -> tuple[str, str | int | None]:
    for frag, (fused, shard) in _FUSED.items():
        if frag in name:
            return name.replace(frag, fused), shard
    return name, None


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """Load a Llama/Mistral/Qwen2/Qwen3 safetensors checkpoint for this TP rank.

    ``dtype=None`` keeps the checkpoint's dtype. Raises if the checkpoint lacks a parameter, holds
    a tensor the model has no place for, or holds one twice.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    arch = read_arch_config(model_dir)
    model = build_model(
        arch, dtype=dtype or arch.torch_dtype, device=device, max_positions=max_positions
    )
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding
    expected: set[tuple[str, str | int | None]] = set()
    for name in params:
        fused = next((f for f in _SHARDS_OF if f in name), None)
        if fused is None:
            expected.add((name, None))
        else:
            expected.update((name, s) for s in _SHARDS_OF[fused])

    files = checkpoint_files(model_dir)
    loaded: set[tuple[str, str | int | None]] = set()
    with tqdm(desc=f"loading {model_dir.name}", unit="tensor", disable=not show_progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                bar.total = (bar.total or 0) + len(keys)
                bar.refresh()
                for key in keys:
                    bar.update()
                    if _IGNORED.search(key):
                        continue
                    if key == "lm_head.weight" and arch.tie_word_embeddings:
                        continue  # some tied checkpoints store the shared matrix twice
                    name, shard = _target(key)
                    param = params.get(name)
                    if param is None:
                        raise ValueError(
                            f"checkpoint tensor {key!r} in {path.name} matches no parameter "
                            f"of {arch.architecture}"
                        )
                    if (name, shard) in loaded:
                        raise ValueError(f"checkpoint tensor {key!r} appears more than once")
                    param.weight_loader(param, f.get_tensor(key), shard)  # type: ignore[attr-defined]
                    loaded.add((name, shard))
    missing = expected - loaded
    if missing:
        names = sorted(_checkpoint_name(n, s) for n, s in missing)
        raise ValueError(f"checkpoint {model_dir} is missing {len(names)} tensors: {names}")
    return model


def _checkpoint_name(name: str, shard: str | int | None) -> str:
    """The checkpoint tensor name that feeds ``(name, shard)``, for error messages."""
    for frag, (fused, s) in _FUSED.items():
        if fused in name and s == shard:
            return name.replace(fused, frag)
    return name


@torch.no_grad()
def build_random_model(
    arch: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    *,
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """A model of ``arch``'s real shapes with random weights, for benchmarks: normal(0, 0.02)
    matrices and biases, norm weights 1. Weights are drawn directly on ``device``."""
    model = build_model(arch, dtype=dtype, device=device, max_positions=max_positions)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if _is_norm(name, model):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model


def _is_norm(name: str, model: nn.Module) -> bool:
    module_name = name.rsplit(".", 1)[0]
    from rayfleet.replicas.model.layers import RMSNorm

    return isinstance(model.get_submodule(module_name), RMSNorm)
