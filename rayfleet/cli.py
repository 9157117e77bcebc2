"""`rayfleet` command line: generate | bench offline | eval perplexity."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rayfleet.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS


def _add_engine_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required, help="Hugging Face model directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=list(KV_CACHE_DTYPES),
        help="auto = the model dtype; fp8 = float8 e4m3, half the KV bytes per token",
    )
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=256,
        help="decode batches up to this size replay CUDA graphs; larger run eagerly (0 = none)",
    )
    p.add_argument(
        "--cuda-graph-prefill-tokens",
        type=int,
        default=1024,
        help="short prefills (prompts, the draft's catch-up) of up to this many tokens in a step "
        "replay CUDA graphs, padded to a power of two (0 = none)",
    )
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--engine-seed", type=int, default=0, help="seed of unseeded sampling")
    p.add_argument(
        "--draft-model",
        default=None,
        help="draft model directory for speculative decoding (same tokenizer as --model)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most draft tokens per step (default 4 with --draft-model); adapted per request",
    )
    p.add_argument(
        "--proposal-graph-max-batch-size",
        type=int,
        default=None,
        help="greedy draft proposals up to this batch (at most 64) replay one CUDA graph each; "
        "0 = none: less graph memory, one graph per draft forward (default 64)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATION_METHODS,
        default=None,
        help="quantize the model's linear weights at load (fp8: per-row float8_e4m3fn)",
    )
    p.add_argument(
        "--draft-quantization",
        choices=QUANTIZATION_METHODS,
        default=None,
        help="quantize the draft model's linear weights at load (fp8: halves its decode time)",
    )


def _engine_kwargs(a: argparse.Namespace) -> dict:
    # Options left unset take EngineConfig's defaults.
    optional = {
        name: getattr(a, name)
        for name in ("proposal_graph_max_batch_size",)
        if getattr(a, name) is not None
    }
    return optional | dict(
        device=a.device,
        dtype=a.dtype,
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        kv_cache_memory_bytes=a.kv_cache_memory_bytes,
        gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_dtype=a.kv_cache_dtype,
        enable_prefix_caching=not a.no_prefix_caching,
        cuda_graph_max_batch_size=a.cuda_graph_max_batch_size,
        cuda_graph_prefill_tokens=a.cuda_graph_prefill_tokens,
        attention_backend=a.attention_backend,
        seed=a.engine_seed,
        draft_model=a.draft_model,
        num_speculative_tokens=(
            a.num_speculative_tokens
            if a.num_speculative_tokens is not None
            else (4 if a.draft_model else 0)
        ),
        quantization=a.quantization,
        draft_quantization=a.draft_quantization,
    )


def _parse_ids(raw: str) -> list[int]:
    try:
        return [int(t) for t in raw.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers; got {raw!r}"
        ) from None


def cmd_generate(a: argparse.Namespace) -> int:
    from rayfleet.llm import LLM
    from rayfleet.sampling_params import SamplingParams

    prompts: list = list(a.prompts or [])
    if not prompts:
        print("error: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            min_p=a.min_p,
            max_tokens=a.max_tokens,
            seed=a.seed_sampling,
            stop=a.stop or [],
            ignore_eos=a.ignore_eos,
        )
        llm = LLM(a.model, show_progress=not a.json, **_engine_kwargs(a))
        outs = llm.generate(prompts, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for o in outs:
        if a.json:
            print(
                json.dumps(
                    {
                        "request_id": o.request_id,
                        "text": o.text,
                        "token_ids": o.token_ids,
                        "finish_reason": o.finish_reason,
                        "num_prompt_tokens": o.num_prompt_tokens,
                        "num_cached_tokens": o.num_cached_tokens,
                    }
                )
            )
        else:
            head = o.prompt if o.prompt is not None else str(o.prompt_token_ids)
            print(f"--- {head!r} [{o.finish_reason}]\n{o.text}")
    return 0


class _PromptAction(argparse.Action):
    """Keeps --prompt and --prompt-ids in the order given, in one list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest) or []
        items.append(_parse_ids(values) if option_string == "--prompt-ids" else values)
        setattr(namespace, self.dest, items)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline with one engine in this process")
    _add_engine_args(g)
    g.add_argument("--prompt", dest="prompts", action=_PromptAction, help="a text prompt")
    g.add_argument(
        "--prompt-ids",
        dest="prompts",
        action=_PromptAction,
        help="a prompt as comma-separated token ids",
    )
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument(
        "--seed", dest="seed_sampling", type=int, default=None, help="per-request sampling seed"
    )
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per request per line")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from rayfleet.benchmarks.offline import add_offline_args, cmd_bench_offline

    off = bsub.add_parser("offline", help="engine throughput/latency without serving")
    _add_engine_args(off)
    add_offline_args(off)
    off.set_defaults(func=cmd_bench_offline)

    from rayfleet.models.demo.eval_command import add_eval_commands

    add_eval_commands(sub)

    from rayfleet.cluster.commands import add_cluster_commands

    add_cluster_commands(sub, bsub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "generate" and a.model is None:
        from rayfleet.config import default_demo_model

        a.model = default_demo_model()
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
