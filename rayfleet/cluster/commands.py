"""CLI for the cluster: ``rayfleet serve | query | build-config`` and ``rayfleet bench serve``.

``rayfleet.cli.build_parser`` calls ``add_cluster_commands(sub, bench_sub)`` once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from rayfleet.cluster.serve_config import ROUTING_MODES, AutoscalingSpec, ServeConfig

# Flags that map 1:1 onto engine options (merged over the config file's ``engine`` mapping).
_ENGINE_FLAGS = (
    ("--dtype", str, "dtype"),
    ("--block-size", int, "block_size"),
    ("--max-num-seqs", int, "max_num_seqs"),
    ("--max-num-batched-tokens", int, "max_num_batched_tokens"),
    ("--max-model-len", int, "max_model_len"),
    ("--num-blocks", int, "num_blocks"),
    ("--kv-cache-memory-bytes", int, "kv_cache_memory_bytes"),
    ("--gpu-memory-utilization", float, "gpu_memory_utilization"),
    ("--kv-cache-dtype", str, "kv_cache_dtype"),
    ("--cuda-graph-max-batch-size", int, "cuda_graph_max_batch_size"),
    ("--cuda-graph-prefill-tokens", int, "cuda_graph_prefill_tokens"),
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="rayfleet YAML config (flags below override it)")
    p.add_argument("--model", help="HF model directory (default: the bundled demo model)")
    p.add_argument("--model-shape", help="random weights of a named shape (ids-only prompts)")
    rep = p.add_mutually_exclusive_group()
    rep.add_argument("--num-replicas", type=int, help="fixed number of LLM replicas")
    rep.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale LLM replicas")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--num-gpus-per-replica", type=float, help="fractional allowed with TP=1")
    p.add_argument("--num-cpus-per-replica", type=float)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--http-port", type=int)
    p.add_argument("--host", dest="http_host", help="HTTP bind host (default 127.0.0.1)")
    p.add_argument("--max-ongoing-requests", type=int, help="per LLM replica")
    p.add_argument("--max-queued-requests", type=int, help="per caller; -1 = unbounded")
    p.add_argument("--drain-timeout", type=float, dest="drain_timeout_s")
    p.add_argument(
        "--stream-messages-per-s",
        type=float,
        help="stream messages per second one ingress forwards at most (tokens in between are "
        "merged; 0 = one per engine step; default 1000)",
    )
    p.add_argument("--metrics-export-port", type=int, help="Ray metrics port (local head)")
    p.add_argument(
        "--routing",
        choices=list(ROUTING_MODES),
        help="how the ingress picks a replica (default prefix_precise; 'default' = Serve's own)",
    )
    for flag, typ, _key in _ENGINE_FLAGS:
        p.add_argument(flag, type=typ, default=None, help="engine option")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any engine option (YAML value), repeatable",
    )


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    """The config file (if any) with every given flag applied over it."""
    import yaml

    cfg = ServeConfig.load(a.config) if a.config else ServeConfig()
    engine = dict(cfg.engine)
    for _flag, _typ, key in _ENGINE_FLAGS:
        value = getattr(a, key, None)
        if value is not None:
            engine[key] = value
    for item in a.engine:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--engine takes KEY=VALUE; got {item!r}")
        engine[key.strip()] = yaml.safe_load(raw)
    autoscaling = None
    if a.autoscale:
        spec = AutoscalingSpec.parse(a.autoscale)
        base = cfg.autoscaling or AutoscalingSpec()  # keep the file's delays and target
        autoscaling = dataclasses.replace(
            base, min_replicas=spec.min_replicas, max_replicas=spec.max_replicas
        )
    changes: dict[str, Any] = {
        "engine": engine,
        "autoscaling": autoscaling,
        "num_replicas": a.num_replicas,
        "device": a.device,
        "num_gpus_per_replica": a.num_gpus_per_replica,
        "num_cpus_per_replica": a.num_cpus_per_replica,
        "grpc_port": a.grpc_port,
        "http_port": a.http_port,
        "http_host": a.http_host,
        "max_ongoing_requests": a.max_ongoing_requests,
        "max_queued_requests": a.max_queued_requests,
        "drain_timeout_s": a.drain_timeout_s,
        "stream_messages_per_s": a.stream_messages_per_s,
        "metrics_export_port": a.metrics_export_port,
        "routing": a.routing,
    }
    if a.model or a.model_shape:
        changes["model"] = a.model
        changes["model_shape"] = a.model_shape
        cfg = dataclasses.replace(cfg, model=None, model_shape=None)
    cfg = cfg.replace(**changes)
    cfg.validate_engine_options()
    return cfg


def cmd_serve(a: argparse.Namespace) -> int:
    from rayfleet.cluster.app import resolve_model
    from rayfleet.cluster.launch import run_server

    try:
        cfg = resolve_model(config_from_args(a))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init: dict[str, Any] = {}
    if a.num_cpus is not None:
        init["num_cpus"] = a.num_cpus
    if a.num_gpus is not None:
        init["num_gpus"] = a.num_gpus
    return run_server(cfg, address=a.address, **init)


def cmd_build_config(a: argparse.Namespace) -> int:
    import yaml

    from rayfleet.cluster.serve_config import serve_deploy_config

    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(serve_deploy_config(cfg), sort_keys=False)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_query(a: argparse.Namespace) -> int:
    import grpc

    from rayfleet.protos_gen.v1 import generation_pb2 as pb
    from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature)
    if a.top_p is not None:
        sampling.top_p = a.top_p
    if a.top_k is not None:
        sampling.top_k = a.top_k
    if a.seed is not None:
        sampling.seed = a.seed
    sampling.stop.extend(a.stop or [])
    if a.ignore_eos:
        sampling.ignore_eos = True
    req = pb.GenerateRequest(request_id=a.request_id or "", sampling=sampling)
    if a.token_ids:
        req.prompt_token_ids.ids.extend(int(t) for t in a.prompt.split(","))
    else:
        req.prompt_text = a.prompt
    with grpc.insecure_channel(a.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            final = None
            for msg in stub.Generate(req, timeout=a.timeout):
                if a.json:
                    from google.protobuf.json_format import MessageToDict

                    print(json.dumps(MessageToDict(msg)), flush=True)
                else:
                    sys.stdout.write(msg.text if msg.text else "")
                    sys.stdout.flush()
                if msg.finish_reason:
                    final = msg
            if final is not None and not a.json:
                u = final.usage
                print(
                    f"\n[{final.finish_reason}] prompt={u.prompt_tokens} "
                    f"completion={u.completion_tokens} cached={u.cached_tokens} "
                    f"replica={final.replica_id}",
                    file=sys.stderr,
                )
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def add_cluster_commands(
    sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction
) -> None:
    s = sub.add_parser("serve", help="run the gRPC + OpenAI HTTP serving cluster (Ray Serve)")
    _add_config_args(s)
    s.add_argument("--address", help="join this Ray cluster instead of starting a local head")
    s.add_argument("--num-cpus", type=float, help="CPUs of the local Ray head")
    s.add_argument("--num-gpus", type=float, help="GPUs of the local Ray head")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser(
        "build-config", help="write the Serve config (serve deploy / serve run) for a config"
    )
    _add_config_args(b)
    b.add_argument("-o", "--output", help="file to write (default: stdout)")
    b.set_defaults(func=cmd_build_config)

    q = sub.add_parser("query", help="stream one gRPC Generate to the terminal")
    q.add_argument("prompt", help="prompt text (or comma-separated ids with --token-ids)")
    q.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC proxy")
    q.add_argument("--token-ids", action="store_true", help="the prompt is token ids")
    q.add_argument("--max-tokens", type=int, default=64)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--top-p", type=float)
    q.add_argument("--top-k", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--stop", action="append")
    q.add_argument("--ignore-eos", action="store_true")
    q.add_argument("--request-id")
    q.add_argument("--timeout", type=float, default=600.0)
    q.add_argument("--json", action="store_true", help="print each message as JSON")
    q.set_defaults(func=cmd_query)

    from rayfleet.cluster.bench_client import add_bench_serve_args, cmd_bench_serve

    bs = bench_sub.add_parser("serve", help="load a running server: Poisson arrivals over gRPC")
    add_bench_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)

    from rayfleet.benchmarks.routing_live import add_bench_routing_args, cmd_bench_routing

    br = bench_sub.add_parser(
        "routing", help="compare the routing modes on a live cluster (shared-prefix tenants)"
    )
    add_bench_routing_args(br)
    br.set_defaults(func=cmd_bench_routing)
