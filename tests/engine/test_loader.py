"""The safetensors loader: sharded checkpoints, dtypes, tied weights, TP slices, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayfleet.replicas import parallel
from rayfleet.replicas.model import (
    MODEL_SHAPES,
    ModelArchConfig,
    build_model,
    build_random_model,
    load_model,
    read_arch_config,
)
from tests.model_factory import make_tiny_model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_loads_identically(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", "qwen2", seed=5)
    sharded = make_tiny_model(tmp_path / "sharded", "qwen2", seed=5, sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = _state(load_model(single, dtype=torch.float32, device="cpu", show_progress=False))
    b = _state(load_model(sharded, dtype=torch.float32, device="cpu", show_progress=False))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fused_shards_hold_checkpoint_tensors(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "qwen2", num_kv_heads=1)
    ckpt = load_file(str(path / "model.safetensors"))
    model = load_model(path, dtype=torch.float32, device="cpu", show_progress=False)
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.split(attn.qkv_proj.weight.T)
    assert torch.equal(q.T, ckpt["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k.T, ckpt["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v.T, ckpt["model.layers.1.self_attn.v_proj.weight"])
    bq, bk, bv = attn.qkv_proj.split(attn.qkv_proj.bias)
    assert torch.equal(bv, ckpt["model.layers.1.self_attn.v_proj.bias"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, ckpt["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, ckpt["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_share_one_parameter(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model = load_model(path, dtype=torch.float32, device="cpu", show_progress=False)
    assert model.arch.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_keep_their_dtype(tmp_path: Path, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "m", "llama", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert read_arch_config(path).torch_dtype == torch_dtype
    model = load_model(path, device="cpu", show_progress=False)  # dtype=None: the checkpoint's
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    ckpt = load_file(str(path / "model.safetensors"))
    assert torch.equal(model.model.embed_tokens.weight, ckpt["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])

    # Same numerics recipe as transformers in half precision too (loose: different GEMM orders).
    from tests.engine.test_model_forward import PagedState

    ids = torch.arange(3, 15)
    state = PagedState(model, 1)
    state.kv_caches = [(k.to(torch_dtype), v.to(torch_dtype)) for k, v in state.kv_caches]
    batch, positions = state.batch([len(ids)], [len(ids)])
    with torch.no_grad():
        ours = model.compute_logits(model(ids, positions, batch)).float()
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        ref = hf(ids[None]).logits[0].float()
    # The reference attention keeps softmax @ V in float32 where transformers rounds to half
    # precision, so positions > 0 differ by a few ULPs; position 0 (attends to itself) is exact.
    torch.testing.assert_close(ours[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(ours, ref, atol=0.25, rtol=0.05)
    assert (ours - ref).abs().mean() < 0.03


def test_unknown_architecture_is_one_clear_error(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_model(path, dtype=torch.float32, device="cpu", show_progress=False)
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    for supported in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ):
        assert supported in msg


def test_missing_files_name_the_directory(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"safetensors") as err:
        read_arch_config(path)
    assert str(path) in str(err.value)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as err:
        load_model(path, dtype=torch.float32, device="cpu")
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_arch_config(tmp_path / "nowhere")


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "llama")
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    without = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    save_file(without, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, dtype=torch.float32, device="cpu", show_progress=False)

    extra = {**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}
    save_file(extra, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        load_model(path, dtype=torch.float32, device="cpu", show_progress=False)


def test_progress_bar_can_be_disabled(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = make_tiny_model(tmp_path / "m", "llama")
    capfd.readouterr()
    load_model(path, dtype=torch.float32, device="cpu", show_progress=False)
    assert "loading" not in capfd.readouterr().err
    load_model(path, dtype=torch.float32, device="cpu", show_progress=True)
    assert "loading m" in capfd.readouterr().err


def test_old_rope_scaling_spelling_is_read(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    arch = read_arch_config(path)
    assert arch.rope_theta == 500000.0
    assert arch.rope_type == "linear" and arch.rope_scaling is not None
    assert arch.rope_scaling["factor"] == 4.0


def test_arch_fields(tmp_path: Path) -> None:
    qwen3 = read_arch_config(make_tiny_model(tmp_path / "q3", "qwen3", head_dim=24))
    assert qwen3.head_dim == 24 and qwen3.qk_norm and not qwen3.qkv_bias
    qwen2 = read_arch_config(make_tiny_model(tmp_path / "q2", "qwen2", sliding_window=8))
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert [qwen2.layer_sliding_window(i) for i in range(2)] == [None, 8]
    plain_qwen2 = read_arch_config(make_tiny_model(tmp_path / "q2b", "qwen2"))
    assert plain_qwen2.sliding_window is None
    mistral = read_arch_config(make_tiny_model(tmp_path / "mi", "mistral", sliding_window=6))
    assert [mistral.layer_sliding_window(i) for i in range(2)] == [6, 6]
    assert mistral.eos_token_ids == (2,) and mistral.bos_token_id == 1


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_shards_reassemble(tmp_path: Path, tp_size: int) -> None:
    """Each rank's slices, concatenated in rank order, give back the full checkpoint tensors
    (kv heads replicated when there are fewer of them than ranks)."""
    path = make_tiny_model(tmp_path / "m", "llama", num_heads=4, num_kv_heads=2)
    ckpt = load_file(str(path / "model.safetensors"))
    ranks = []
    try:
        for rank in range(tp_size):
            parallel.set_tensor_parallel(rank, tp_size)
            ranks.append(load_model(path, dtype=torch.float32, device="cpu", show_progress=False))
    finally:
        parallel.set_tensor_parallel(0, 1)
    layer = "model.layers.0"
    attn = [m.model.layers[0].self_attn.qkv_proj for m in ranks]
    q = torch.cat([a.split(a.weight.T)[0].T for a in attn])
    assert torch.equal(q, ckpt[f"{layer}.self_attn.q_proj.weight"])
    k_parts = [a.split(a.weight.T)[1].T for a in attn]
    replicas = max(1, tp_size // 2)
    k = torch.cat(k_parts[::replicas])
    assert torch.equal(k, ckpt[f"{layer}.self_attn.k_proj.weight"])
    o = torch.cat([m.model.layers[0].self_attn.o_proj.weight for m in ranks], dim=1)
    assert torch.equal(o, ckpt[f"{layer}.self_attn.o_proj.weight"])
    down = torch.cat([m.model.layers[0].mlp.down_proj.weight for m in ranks], dim=1)
    assert torch.equal(down, ckpt[f"{layer}.mlp.down_proj.weight"])
    vocab = ranks[0].arch.vocab_size
    emb = torch.cat([m.model.embed_tokens.weight for m in ranks])
    assert torch.equal(emb[:vocab], ckpt["model.embed_tokens.weight"])
    assert not emb[vocab:].any()


def test_build_random_model(tmp_path: Path) -> None:
    arch = read_arch_config(make_tiny_model(tmp_path / "m", "qwen3"))
    model = build_random_model(arch, torch.float32, "cpu", seed=1)
    again = build_random_model(arch, torch.float32, "cpu", seed=1)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    assert torch.all(model.model.norm.weight == 1)
    assert torch.all(model.model.layers[0].self_attn.q_norm.weight == 1)
    std = model.model.layers[0].mlp.down_proj.weight.std().item()
    assert 0.015 < std < 0.025


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-3-8b", 8.03),
        ("llama-3.2-1b", 1.24),
        ("llama-3.2-3b", 3.21),
        ("llama-3.1-70b", 70.55),
        ("qwen2.5-7b", 7.62),
        ("qwen3-8b", 8.19),
        ("mistral-7b", 7.25),
    ],
)
def test_model_shapes_have_real_sizes(name: str, billions: float) -> None:
    arch: ModelArchConfig = MODEL_SHAPES[name]
    model = build_model(arch, dtype=torch.bfloat16, device="meta", max_positions=16)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e9 - billions) < 0.01 * billions, params
