"""`rayfleet eval perplexity --model DIR --data PATH|stdlib-heldout`: held-out perplexity computed
with rayfleet's own loader and forward (paged KV cache, registry attention), by the same procedure
as the training script's number (``evaluate.perplexity``), so card.json can be reproduced."""

from __future__ import annotations

import argparse
import json
import math

import torch

from rayfleet.kernels import get as get_kernel
from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.models.demo import corpus, evaluate
from rayfleet.replicas.model import load_model, read_arch_config
from rayfleet.replicas.model.forward import ForwardBatch

BLOCK_SIZE = 16


def rayfleet_logits_fn(model: torch.nn.Module, device: torch.device, backend: str | None):
    """A ``logits_fn`` ([B, T] ids -> [B, T, V] logits) over rayfleet's model: each row is one
    request prefilled from scratch into its own blocks of a scratch paged cache."""
    arch = model.arch
    dtype = next(model.parameters()).dtype
    attention = get_kernel("paged_attention", backend)
    write_kv = get_kernel("write_kv", backend if backend == "triton" else None)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        per_seq = -(-t // BLOCK_SIZE)
        shape = (1 + b * per_seq, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
        caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(arch.num_layers)
        ]
        # Request r owns blocks 1 + r*per_seq ... (block 0 stays the null block).
        tables = torch.arange(b * per_seq, device=device, dtype=torch.int32).view(b, per_seq) + 1
        pos = torch.arange(t, device=device)
        slots = (tables.long()[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).reshape(-1)
        qsl = [i * t for i in range(b + 1)]
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.full((b,), t, dtype=torch.int32, device=device),
            block_tables=tables,
            max_query_len=t,
            max_seq_len=t,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=[t] * b,
        )
        batch = ForwardBatch(meta=meta, kv_caches=caches, attention=attention, write_kv=write_kv)
        hidden = model(ids.reshape(-1).to(device), pos.repeat(b), batch)
        return model.compute_logits(hidden).view(b, t, -1)

    return fn


def add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluations")
    esub = ev.add_subparsers(dest="eval", required=True)
    p = esub.add_parser("perplexity", help="held-out perplexity with rayfleet's forward")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--data",
        default=evaluate.STDLIB_HELDOUT,
        help="stdlib-heldout, a directory of .py files, or a text file",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="window length (default: the model's max_position_embeddings)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--attention-backend", default=None)
    p.set_defaults(func=cmd_eval_perplexity)


@torch.inference_mode()
def cmd_eval_perplexity(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    arch = read_arch_config(a.model)
    model = load_model(a.model, dtype=getattr(torch, a.dtype), device=device, show_progress=False)
    ctx = a.context_len or arch.max_position_embeddings
    stream = evaluate.load_eval_stream(a.data, a.model)
    total, count = evaluate.nll_sum(
        rayfleet_logits_fn(model, device, a.attention_backend),
        stream,
        ctx,
        batch_size=a.batch_size,
        device=a.device,
    )
    print(
        json.dumps(
            {
                "model": a.model,
                "data": a.data,
                "python_version": corpus.python_version(),
                "context_len": ctx,
                "predicted_tokens": count,
                "mean_nll": total / count,
                "perplexity": math.exp(total / count),
            },
            indent=2,
        )
    )
    return 0
