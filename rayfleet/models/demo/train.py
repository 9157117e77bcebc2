"""Train the bundled demo pair: a small Llama target and a distilled draft for speculative decoding.

    python -m rayfleet.models.demo.train --out rayfleet/models/demo --device cuda \\
        --log-dir /tmp/demo-logs
    python -m rayfleet.models.demo.train --out /tmp/demo --tiny          # CPU smoke run, ~1 min

Pipeline (everything offline; inputs are the interpreter's stdlib and installed packages):

1. corpus: the stdlib ``.py`` files of the running interpreter, split train / held-out by a stable
   hash of the relative path (``corpus.py`` documents the exact rules);
2. tokenizer: byte-level BPE trained on the train files, saved into both model directories;
3. the train files are encoded once into one flat int32 token tensor on the device; every step
   draws ``batch_size`` random windows of ``context_len + 1`` tokens with a seeded generator;
4. target: ``LlamaForCausalLM`` from scratch, next-token cross-entropy, AdamW, linear warmup then
   cosine decay to ``min_lr_ratio`` of the peak, computed from the planned step count;
5. the target is saved in bfloat16 and reloaded from disk: that exact (bf16) model is the teacher;
6. draft: ``LlamaForCausalLM`` from scratch, loss ``kd_weight * KL(target || draft) +
   (1 - kd_weight) * CE`` at temperature 1, same schedule shape;
7. evaluation of both from disk (float32 compute on the saved bf16 weights): held-out perplexity
   (``evaluate.perplexity``) and greedy acceptance of the draft against the target for k = 1..8;
8. ``card.json`` beside the two directories; the on-disk size budget is asserted before training
   (projected) and after saving (exact).

Step counts: ``--target-steps``/``--draft-steps`` fix the schedule (a run is reproducible given the
seed and the step counts). Defaults 1000 / 2000 at 64 x 1024 tokens a step, target dropout 0.2: on
the H100 host's Python 3.12 stdlib (2.9M train tokens) held-out loss bottoms out there; more steps
overfit (measured: dropout 0.2, 1000 steps: ppl 8.9; no dropout, 1160 steps: ppl 34). 62 s +
86 s on one H100. ``0`` means "auto": the steps that fit the phase's minutes, timed on steps 10..40,
which lie inside the warmup, so an auto run equals a fixed run with the step count the card records.
``--target-minutes``/``--draft-minutes`` cap any run: training stops early (the card then says
``stopped_by_time``) when a phase would overrun.

Reproducibility: same seed, step counts and hardware/software => same data order, init and schedule.
On CPU the weights are bit-identical; on CUDA some kernels (embedding backward, SDPA backward) add
with atomics, so bits may differ unless ``--deterministic`` is given (slower).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rayfleet.models.demo import corpus, evaluate

log = logging.getLogger("rayfleet.demo.train")

MIB = 1024 * 1024
CALIB_START, CALIB_END = 10, 40  # steps timed by --*-steps 0 (auto); must end before warmup does


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    context_len: int


# Full scale. 15.5 MiB budget for both directories, bf16 weights, tied embeddings, vocab 4096:
# target 6.55M params (13.1 MB), draft 1.16M params (2.3 MB), tokenizer files ~0.27 MB.
TARGET = Shape(
    hidden=256, layers=8, heads=4, kv_heads=2, intermediate=640, head_dim=64, context_len=1024
)
DRAFT = Shape(
    hidden=128, layers=3, heads=2, kv_heads=2, intermediate=384, head_dim=64, context_len=1024
)
TINY_TARGET = Shape(
    hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, head_dim=32, context_len=128
)
TINY_DRAFT = Shape(
    hidden=32, layers=1, heads=1, kv_heads=1, intermediate=64, head_dim=32, context_len=128
)


def llama_config(shape: Shape, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.context_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=corpus.BOS_ID,
        eos_token_id=corpus.EOS_ID,
        pad_token_id=corpus.PAD_ID,
        use_cache=True,
    )


def build_model(shape: Shape, vocab_size: int, seed: int) -> torch.nn.Module:
    """A fresh float32 ``LlamaForCausalLM`` on CPU; the init depends only on ``seed``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, vocab_size))
    model.generation_config = GenerationConfig(
        bos_token_id=corpus.BOS_ID, eos_token_id=corpus.EOS_ID, pad_token_id=corpus.PAD_ID
    )
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def count_params_for(shape: Shape, vocab_size: int) -> int:
    """Parameters of a shape without building it (tied embeddings)."""
    h, hd = shape.hidden, shape.head_dim
    attn = h * shape.heads * hd * 2 + h * shape.kv_heads * hd * 2
    mlp = 3 * h * shape.intermediate
    return vocab_size * h + shape.layers * (attn + mlp + 2 * h) + h


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio * peak`` at
    ``total``. The warmup part does not depend on ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: str) -> Any:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **extra)


def batches(
    data: torch.Tensor, batch_size: int, context_len: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) pairs of random windows; the starts come from a CPU generator so
    the sequence is the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    n_starts = data.numel() - context_len
    if n_starts < 1:
        raise ValueError(f"{data.numel()} training tokens is too few for context {context_len}")
    offsets = torch.arange(context_len + 1, device=data.device)
    while True:
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
        win = data[starts.to(data.device)[:, None] + offsets].long()
        yield win[:, :-1], win[:, 1:]


def autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class PhaseConfig:
    name: str
    steps: int  # 0 = auto (fit the minutes)
    minutes: float
    batch_size: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int
    kd_weight: float = 0.0  # draft only
    dropout: float = 0.0  # residual-branch dropout while training (see add_dropout)
    log_every: int = 50
    eval_every: int = 500
    eval_windows: int = 0  # 0 = the whole held-out stream


def add_dropout(model: torch.nn.Module, p: float) -> list[Any]:
    """Training-time dropout on the embedding output and on every attention and MLP output
    (the residual branches), via forward hooks: transformers' Llama has no such dropout, and the
    saved checkpoint stays a plain Llama. Returns the hook handles (remove them after training)."""
    if p <= 0.0:
        return []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    inner = model.model  # type: ignore[attr-defined]
    handles = [inner.embed_tokens.register_forward_hook(hook)]
    for layer in inner.layers:
        handles.append(layer.self_attn.register_forward_hook(hook))
        handles.append(layer.mlp.register_forward_hook(hook))
    return handles


def train_phase(
    model: torch.nn.Module,
    data: torch.Tensor,
    cfg: PhaseConfig,
    device: str,
    *,
    teacher: torch.nn.Module | None = None,
    heldout: torch.Tensor | None = None,
    compile_model: bool = False,
    metrics: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place (on ``device``); returns the phase's record for the card."""
    if cfg.steps == 0 and cfg.warmup <= CALIB_END:
        raise ValueError(f"auto steps need warmup > {CALIB_END}; got {cfg.warmup}")
    context_len = model.config.max_position_embeddings
    model.to(device).train()
    torch.manual_seed(cfg.seed)  # dropout masks
    hooks = add_dropout(model, cfg.dropout)
    fwd = torch.compile(model) if compile_model else model
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    stream = batches(data, cfg.batch_size, context_len, cfg.seed)
    budget_s = cfg.minutes * 60.0
    planned: int | None = cfg.steps or None
    tokens_per_step = cfg.batch_size * context_len
    step = 0
    stopped_by_time = False
    last_loss = float("nan")
    t_calib = 0.0
    t0 = time.monotonic()
    t_log = t0
    last_log_step = 0
    curve: list[tuple[int, float]] = []
    while planned is None or step < planned:
        if time.monotonic() - t0 > budget_s:
            stopped_by_time = True
            break
        lr = lr_at(step, planned or 10**9, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(stream)
        with autocast(device):
            logits = fwd(input_ids=x, use_cache=False).logits
            if teacher is None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                parts = {}
            else:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x, use_cache=False).logits
                d_logp = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
                t_logp = F.log_softmax(t_logits.float(), dim=-1).flatten(0, 1)
                kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
                ce = F.nll_loss(d_logp, y.flatten())
                loss = cfg.kd_weight * kl + (1.0 - cfg.kd_weight) * ce
                parts = {"kl": kl, "ce": ce}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if planned is None and step in (CALIB_START, CALIB_END):
            _sync(device)
            if step == CALIB_START:
                t_calib = time.monotonic()
            else:
                per_step = (time.monotonic() - t_calib) / (CALIB_END - CALIB_START)
                left = budget_s - (time.monotonic() - t0)
                planned = max(cfg.warmup + 1, step + int(0.95 * left / per_step))
                log.info(
                    "%s: auto steps: %.1f ms/step -> %d steps", cfg.name, per_step * 1e3, planned
                )
        if step % cfg.log_every == 0 or step == planned or step == 1:
            last_loss = loss.detach().item()
            now = time.monotonic()
            rec = {
                "phase": cfg.name,
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "grad_norm": gnorm.item(),
                "elapsed_s": round(now - t0, 2),
                "tokens_per_s": round(
                    tokens_per_step * (step - last_log_step) / max(now - t_log, 1e-9)
                ),
                **{k: v.detach().item() for k, v in parts.items()},
            }
            t_log, last_log_step = now, step
            log.info(
                "%s step %d/%s loss %.4f lr %.2e gnorm %.2f %s tok/s",
                cfg.name,
                step,
                planned or "?",
                last_loss,
                lr,
                rec["grad_norm"],
                rec["tokens_per_s"],
            )
            if metrics:
                metrics(rec)
        if heldout is not None and cfg.eval_every and step % cfg.eval_every == 0:
            model.eval()
            with autocast(device):
                val = evaluate.mean_nll(
                    evaluate.hf_logits_fn(model),
                    heldout,
                    context_len,
                    device=device,
                    batch_size=16,
                    max_windows=cfg.eval_windows or None,
                )
            model.train()
            curve.append((step, round(val, 4)))
            log.info("%s step %d held-out nll %.4f (ppl %.2f)", cfg.name, step, val, math.exp(val))
            if metrics:
                metrics({"phase": cfg.name, "step": step, "heldout_nll": val})
    _sync(device)
    elapsed = time.monotonic() - t0
    last_loss = loss.detach().item() if step else last_loss
    for handle in hooks:
        handle.remove()
    model.eval()
    return {
        "steps_planned": planned if planned is not None else step,
        "steps_run": step,
        "steps_mode": "fixed" if cfg.steps else "auto",
        "stopped_by_time": stopped_by_time,
        "tokens_seen": step * tokens_per_step,
        "epochs": step * tokens_per_step / data.numel(),
        "train_seconds": round(elapsed, 2),
        "tokens_per_s": round(step * tokens_per_step / max(elapsed, 1e-9)),
        "final_train_loss": last_loss,
        "heldout_nll_curve": curve,  # (step, mean NLL), bf16 autocast on CUDA
        "hyperparameters": asdict(cfg),
        "context_len": context_len,
        "compiled": compile_model,
    }


# --------------------------------------------------------------------------------------------
# Saving


def save_tokenizer(tok: Any, out_dir: Path, model_max_length: int) -> None:
    """Standard files, made portable: ``tokenizer_class`` PreTrainedTokenizerFast (read by
    transformers 4 and 5), the chat template also inside ``tokenizer_config.json``, and a compact
    ``tokenizer.json`` (same content, no pretty-printing: half the bytes)."""
    from tokenizers import Tokenizer

    corpus.save_hf_tokenizer(tok, out_dir, model_max_length)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = corpus.CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = out_dir / "tokenizer.json"
    Tokenizer.from_file(str(tok_path)).save(str(tok_path), pretty=False)


def save_model(model: torch.nn.Module, out_dir: Path) -> None:
    """bfloat16 safetensors + config (``dtype`` and the legacy ``torch_dtype``/``rope_theta``
    keys, for readers of either transformers generation) + generation_config."""
    import copy

    bf16 = copy.deepcopy(model).to("cpu", torch.bfloat16)
    bf16.config.dtype = torch.bfloat16
    out_dir.mkdir(parents=True, exist_ok=True)
    bf16.save_pretrained(str(out_dir))
    for p in out_dir.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; these files ship in the package
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg.setdefault("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_model(path: Path, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m rayfleet.models.demo.train",
        description="Train the demo target + distilled draft on the stdlib; write card.json.",
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="writes OUT/target, OUT/draft, OUT/card.json"
    )
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and corpus (CPU smoke test)")
    ap.add_argument(
        "--log-dir", type=Path, default=None, help="train.log + metrics.jsonl + card copy"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="default 4096 (tiny: 512)")
    ap.add_argument(
        "--target-steps", type=int, default=None, help="default 1000; 0 = fit --target-minutes"
    )
    ap.add_argument(
        "--draft-steps", type=int, default=None, help="default 2000; 0 = fit --draft-minutes"
    )
    ap.add_argument("--target-minutes", type=float, default=8.0)
    ap.add_argument("--draft-minutes", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 64)")
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--draft-lr", type=float, default=4e-3)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 200 (tiny: 2)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--target-dropout", type=float, default=None, help="default 0.2 (tiny: 0)")
    ap.add_argument("--draft-dropout", type=float, default=0.0)
    ap.add_argument("--kd-weight", type=float, default=0.9, help="draft loss: w*KL + (1-w)*CE")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    ap.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels")
    ap.add_argument("--exclude-tests", action="store_true", help="drop stdlib test packages")
    ap.add_argument("--subset-fraction", type=float, default=None, help="default 1 (tiny: 0.04)")
    ap.add_argument(
        "--heldout-fraction", type=float, default=None, help="default 0.05 (tiny: 0.25)"
    )
    ap.add_argument("--size-budget-mib", type=float, default=15.5)
    ap.add_argument("--n-prompts", type=int, default=None, help="acceptance prompts (default 200)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "vocab_size": 512 if tiny else 4096,
        "target_steps": 30 if tiny else 1000,
        "draft_steps": 20 if tiny else 2000,
        "batch_size": 8 if tiny else 64,
        "warmup_steps": 2 if tiny else 200,
        "subset_fraction": 0.04 if tiny else 1.0,
        "heldout_fraction": 0.25 if tiny else corpus.HELDOUT_FRACTION,
        "n_prompts": 16 if tiny else 200,
        "log_every": 10 if tiny else 100,
        "eval_every": 0 if tiny else 100,
        "target_dropout": 0.0 if tiny else 0.2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _setup_logging(log_dir: Path | None) -> Callable[[dict[str, Any]], None]:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handler: logging.Handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    log.addHandler(handler)
    if log_dir is None:
        return lambda rec: None
    log_dir.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(log_dir / "train.log", mode="w")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    metrics_path = log_dir / "metrics.jsonl"
    metrics_path.write_text("")

    def write(rec: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    return write


def machine_info(device: str) -> dict[str, Any]:
    import tokenizers
    import transformers

    info: dict[str, Any] = {
        "device": device,
        "python_version": corpus.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "numpy_version": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu_name"] = None
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the card (also written to OUT/card.json)."""
    t_start = time.monotonic()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    metrics = _setup_logging(args.log_dir)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = args.device
    out: Path = args.out
    target_shape, draft_shape = (TINY_TARGET, TINY_DRAFT) if args.tiny else (TARGET, DRAFT)
    argv = list(args.argv) if args.argv is not None else sys.argv[1:]
    log.info("argv: %s", " ".join(argv))

    # 1. corpus
    t = time.monotonic()
    cor = corpus.load_corpus(
        include_tests=not args.exclude_tests,
        heldout_fraction=args.heldout_fraction,
        subset_fraction=args.subset_fraction,
    )
    if not cor.train or not cor.heldout:
        raise RuntimeError(
            f"empty split: {len(cor.train)} train / {len(cor.heldout)} held-out files"
        )
    stats = cor.stats()
    log.info(
        "corpus: python %s, %d train files (%d bytes), %d held-out (%d bytes), %d skipped",
        cor.python_version,
        stats["files_train"],
        stats["bytes_train"],
        stats["files_heldout"],
        stats["bytes_heldout"],
        stats["files_skipped"],
    )

    # 2. tokenizer, 3. token streams
    tok = corpus.train_tokenizer([f.text for f in cor.train], vocab_size=args.vocab_size)
    vocab = tok.get_vocab_size()
    train_ids = corpus.encode_documents(tok, [f.text for f in cor.train])
    heldout_ids = corpus.encode_documents(tok, [f.text for f in cor.heldout])
    stats["tokens_train"] = int(train_ids.size)
    stats["tokens_heldout"] = int(heldout_ids.size)
    stats["bytes_per_token_train"] = stats["bytes_train"] / max(1, train_ids.size)
    stats["eval_data_spec"] = (
        evaluate.STDLIB_HELDOUT
        if (
            not args.exclude_tests
            and args.subset_fraction >= 1.0
            and args.heldout_fraction == corpus.HELDOUT_FRACTION
        )
        else "custom (see include_tests/subset_fraction/heldout_fraction)"
    )
    stats["prep_seconds"] = round(time.monotonic() - t, 2)
    log.info(
        "tokenizer: vocab %d; %d train tokens (%.2f bytes/token), %d held-out tokens",
        vocab,
        train_ids.size,
        stats["bytes_per_token_train"],
        heldout_ids.size,
    )

    # Size budget, projected before any training.
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_tokenizer(tok, staging / "tok", target_shape.context_len)
    tok_bytes = sum(dir_bytes(staging / "tok").values())
    n_target = count_params_for(target_shape, vocab)
    n_draft = count_params_for(draft_shape, vocab)
    overhead = 2 * (tok_bytes + 8192)  # configs + safetensors headers, generously
    projected = 2 * (n_target + n_draft) + overhead
    budget = int(args.size_budget_mib * MIB)
    log.info(
        "params: target %d, draft %d; projected size %d bytes (%.2f MiB) of %d budget",
        n_target,
        n_draft,
        projected,
        projected / MIB,
        budget,
    )
    if projected > budget:
        raise SystemExit(f"projected size {projected} bytes exceeds the budget {budget} bytes")

    data = torch.from_numpy(train_ids).to(device)  # int32, the whole training stream
    heldout_t = torch.from_numpy(heldout_ids)
    common = dict(
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        batch_size=args.batch_size,
        warmup=args.warmup_steps,
        log_every=args.log_every,
        eval_every=args.eval_every,
    )

    # 4. target
    target = build_model(target_shape, vocab, seed=args.seed)
    assert count_params(target) == n_target, (count_params(target), n_target)
    tcfg = PhaseConfig(
        name="target",
        steps=args.target_steps,
        minutes=args.target_minutes,
        lr=args.target_lr,
        dropout=args.target_dropout,
        seed=args.seed + 1,
        **common,
    )
    target_rec = train_phase(
        target, data, tcfg, device, heldout=heldout_t, compile_model=args.compile, metrics=metrics
    )
    final_dirs = {"target": out / "target", "draft": out / "draft"}
    stage_dirs = {k: staging / k for k in final_dirs}
    save_model(target, stage_dirs["target"])
    save_tokenizer(tok, stage_dirs["target"], target_shape.context_len)
    del target

    # 5./6. draft distilled from the saved (bf16) target
    teacher = load_model(
        stage_dirs["target"], device, torch.bfloat16 if device != "cpu" else torch.float32
    )
    teacher.requires_grad_(False)
    draft = build_model(draft_shape, vocab, seed=args.seed + 100)
    assert count_params(draft) == n_draft, (count_params(draft), n_draft)
    dcfg = PhaseConfig(
        name="draft",
        steps=args.draft_steps,
        minutes=args.draft_minutes,
        lr=args.draft_lr,
        seed=args.seed + 2,
        kd_weight=args.kd_weight,
        dropout=args.draft_dropout,
        **common,
    )
    draft_rec = train_phase(
        draft,
        data,
        dcfg,
        device,
        teacher=teacher,
        heldout=heldout_t,
        compile_model=args.compile,
        metrics=metrics,
    )
    del teacher
    save_model(draft, stage_dirs["draft"])
    save_tokenizer(tok, stage_dirs["draft"], draft_shape.context_len)
    del draft, data

    # Move into place (only the two model directories are replaced).
    out.mkdir(parents=True, exist_ok=True)
    for key, final in final_dirs.items():
        shutil.rmtree(final, ignore_errors=True)
        stage_dirs[key].rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    sizes = {k: dir_bytes(d) for k, d in final_dirs.items()}
    total_bytes = sum(sum(s.values()) for s in sizes.values())
    log.info(
        "on disk: target %d + draft %d = %d bytes (%.3f MiB)",
        sum(sizes["target"].values()),
        sum(sizes["draft"].values()),
        total_bytes,
        total_bytes / MIB,
    )
    if total_bytes > budget:
        raise SystemExit(f"model directories take {total_bytes} bytes > budget {budget}")

    # 7. evaluation from disk: float32 compute on the saved bf16 weights
    t = time.monotonic()
    models = {k: load_model(d, device, torch.float32) for k, d in final_dirs.items()}
    ppl = {}
    for key, model in models.items():
        ctx = model.config.max_position_embeddings
        total, count = evaluate.nll_sum(
            evaluate.hf_logits_fn(model), heldout_ids, ctx, device=device
        )
        ppl[key] = {
            "perplexity": math.exp(total / count),
            "mean_nll": total / count,
            "predicted_tokens": count,
            "context_len": ctx,
        }
        log.info(
            "%s held-out perplexity %.4f (%d predicted tokens)", key, ppl[key]["perplexity"], count
        )
    prompts = evaluate.sample_prompts(heldout_ids, args.n_prompts, args.prompt_len, args.max_k)
    accept = evaluate.acceptance_stats(
        evaluate.hf_logits_fn(models["target"]),
        evaluate.hf_logits_fn(models["draft"]),
        prompts.to(device),
        max_k=args.max_k,
    )
    accept["prompt_len"] = args.prompt_len
    accept["prompt_selection"] = (
        "evenly spaced starts over the held-out stream: start_i = floor(i * (N - prompt_len - "
        "max_k) / n), i = 0..n-1"
    )
    log.info("acceptance per position: %s", [round(a, 3) for a in accept["position_acceptance"]])
    log.info(
        "mean accepted length per k: %s",
        {k: round(v["mean_accepted_len"], 3) for k, v in accept["per_k"].items()},
    )
    eval_seconds = round(time.monotonic() - t, 2)

    def model_card(key: str, shape: Shape, n_params: int, rec: dict[str, Any]) -> dict[str, Any]:
        return {
            "path": key,
            "architecture": "LlamaForCausalLM",
            "shape": asdict(shape) | {"vocab_size": vocab, "tie_word_embeddings": True},
            "params": n_params,
            "storage_dtype": "bfloat16",
            "bytes": sum(sizes[key].values()),
            "files": sizes[key],
            "training": rec,
            "heldout": ppl[key],
        }

    card: dict[str, Any] = {
        "format": "rayfleet-demo-card/1",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": args.seed,
        "tiny": args.tiny,
        "command": ["python", "-m", "rayfleet.models.demo.train", *argv],
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"
        },
        "machine": machine_info(device),
        "corpus": stats,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), GPT-2 pre-tokenizer regex, no prefix space",
            "vocab_size": vocab,
            "special_tokens": dict(zip(corpus.SPECIAL_TOKENS, range(4), strict=True)),
            "adds_bos": True,
            "chat_template": corpus.CHAT_TEMPLATE,
        },
        "target": model_card("target", target_shape, n_target, target_rec),
        "draft": model_card("draft", draft_shape, n_draft, draft_rec)
        | {
            "distillation": {
                "teacher": "target (saved bf16 weights)",
                "temperature": 1.0,
                "loss": f"{args.kd_weight}*KL(target||draft) + {1 - args.kd_weight:g}*CE",
            }
        },
        "size": {
            "total_bytes": total_bytes,
            "total_mib": total_bytes / MIB,
            "budget_bytes": budget,
        },
        "evaluation": {
            "compute": "float32 on the saved bfloat16 weights, transformers forward",
            "perplexity_procedure": (
                "held-out files framed '<s> doc </s>' and concatenated in relative-path order; "
                "non-overlapping windows of the model's context length from token 0 (a last "
                "shorter window kept if >= 2 tokens); every token but a window's first is "
                "predicted; perplexity = exp(mean NLL over all predicted tokens); "
                "rayfleet.models.demo.evaluate.perplexity"
            ),
            "acceptance": accept,
            "seconds": eval_seconds,
        },
        "total_seconds": round(time.monotonic() - t_start, 2),
    }
    text = json.dumps(card, indent=2) + "\n"
    (out / "card.json").write_text(text)
    if args.log_dir is not None:
        (args.log_dir / "card.json").write_text(text)
    log.info("wrote %s (total %.1f s)", out / "card.json", card["total_seconds"])
    return card


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return run(args)


if __name__ == "__main__":
    main()
