"""`rayfleet eval perplexity --model DIR --data PATH|stdlib-heldout`: held-out perplexity computed
with rayfleet's own loader and forward (paged KV cache, registry attention), by the same procedure
as the training script's number (``evaluate.perplexity``), so card.json can be reproduced."""

from __future__ import annotations

import argparse
import json
import math

import torch

from rayfleet import kernels
from rayfleet.models.demo import corpus, evaluate
from rayfleet.replicas.model import load_model, read_arch_config
from rayfleet.replicas.model.forward import ForwardBatch
from rayfleet.replicas.runner import allocate_kv_tensors, build_attention_metadata, slot_mapping

BLOCK_SIZE = 16


def rayfleet_logits_fn(model: torch.nn.Module, device: torch.device, backend: str | None):
    """A ``logits_fn`` ([B, T] ids -> [B, T, V] logits) over rayfleet's model: each row is one
    request prefilled from scratch into its own blocks of a scratch paged cache."""
    dtype = next(model.parameters()).dtype
    attention = kernels.get("paged_attention", backend)
    write_kv = kernels.get_or_default("write_kv", backend)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        per_seq = -(-t // BLOCK_SIZE)
        caches = allocate_kv_tensors(model.arch, 1 + b * per_seq, BLOCK_SIZE, dtype, device)
        # Request r owns blocks 1 + r*per_seq ... (block 0 stays the null block).
        tables = [list(range(1 + r * per_seq, 1 + (r + 1) * per_seq)) for r in range(b)]
        slots = [s for row in tables for s in slot_mapping(row, 0, t, BLOCK_SIZE)]
        meta, _ = build_attention_metadata(
            slots, [i * t for i in range(b + 1)], [t] * b, tables, device
        )
        batch = ForwardBatch(meta=meta, kv_caches=caches, attention=attention, write_kv=write_kv)
        positions = torch.arange(t, device=device).repeat(b)
        hidden = model(ids.reshape(-1).to(device), positions, batch)
        return model.compute_logits(hidden).float().view(b, t, -1)

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
