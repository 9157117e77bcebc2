"""Held-out perplexity and greedy draft-acceptance of the demo models, engine-agnostic.

Every helper takes a ``logits_fn``: a callable mapping int64 token ids ``[B, T]`` to logits
``[B, T, V]`` (any float dtype), computed causally from scratch (no cache). The training script
passes a transformers forward (``hf_logits_fn``); ``rayfleet eval perplexity`` passes rayfleet's own
engine forward. Both then get the same number for the same weights, up to kernel numerics.

Perplexity procedure (``perplexity``): the evaluation text is one token stream (documents framed
``<s> doc </s>`` and concatenated, see ``corpus.encode_documents``). The stream is cut into
NON-overlapping windows of ``context_len`` tokens, starting at token 0; the last window may be
shorter and is kept when it has at least 2 tokens. In each window, every token but the first is
predicted from the tokens before it in the same window (so a window of n tokens gives n - 1
predictions; the first token of each window is never predicted). The result is
``exp(sum of NLL over all predictions / number of predictions)``, NLL from a float32 log-softmax,
summed in float64.

Data (``load_eval_stream``): ``stdlib-heldout`` = the held-out files of the running interpreter's
stdlib corpus under the default corpus settings (``corpus.heldout_texts``); a directory = every
``*.py`` file under it (recursive, sorted by relative POSIX path, strict UTF-8, undecodable files
skipped); a file = its whole text as one document.

Acceptance (``acceptance_stats``): for each prompt, the target's greedy continuation of ``max_k``
tokens and the draft's greedy continuation of ``max_k`` tokens (each model conditioned only on the
prompt and its own previous tokens). With k speculative tokens, the accepted length is the number
of leading positions, at most k, where the draft's token equals the target's: exactly what greedy
speculative decoding accepts in one verification step.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rayfleet.models.demo import corpus

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
STDLIB_HELDOUT = "stdlib-heldout"


def _as_long_tensor(token_stream: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    if isinstance(token_stream, torch.Tensor):
        return token_stream.detach().to("cpu", torch.long).reshape(-1)
    return torch.as_tensor(np.asarray(token_stream, dtype=np.int64)).reshape(-1)


def window_spans(n_tokens: int, context_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the non-overlapping windows; a trailing window shorter than 2 is
    dropped (it predicts nothing)."""
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2; got {context_len}")
    spans = []
    for start in range(0, n_tokens, context_len):
        end = min(start + context_len, n_tokens)
        if end - start >= 2:
            spans.append((start, end))
    return spans


@torch.no_grad()
def nll_sum(
    logits_fn: LogitsFn,
    token_stream: torch.Tensor | np.ndarray | Sequence[int],
    context_len: int,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
) -> tuple[float, int]:
    """(sum of NLL in nats, number of predicted tokens) under the procedure of ``perplexity``.
    ``max_windows`` keeps only the first windows (a quick estimate during training)."""
    stream = _as_long_tensor(token_stream)
    spans = window_spans(stream.numel(), context_len)
    if max_windows is not None:
        spans = spans[:max_windows]
    total = 0.0
    count = 0
    i = 0
    while i < len(spans):
        # Batch consecutive windows of equal length (all but possibly the last one).
        length = spans[i][1] - spans[i][0]
        j = i
        while j < len(spans) and j - i < batch_size and spans[j][1] - spans[j][0] == length:
            j += 1
        ids = torch.stack([stream[s:e] for s, e in spans[i:j]]).to(device)
        logits = logits_fn(ids)
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits_fn returned {tuple(logits.shape)} for ids {tuple(ids.shape)}")
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += float(nll.double().sum())
        count += nll.numel()
        i = j
    return total, count


def mean_nll(logits_fn: LogitsFn, token_stream: Any, context_len: int, **kw: Any) -> float:
    total, count = nll_sum(logits_fn, token_stream, context_len, **kw)
    if count == 0:
        raise ValueError("the token stream is too short to predict any token")
    return total / count


def perplexity(logits_fn: LogitsFn, token_stream: Any, context_len: int, **kw: Any) -> float:
    """Token-level perplexity over non-overlapping windows (see the module docstring)."""
    return math.exp(mean_nll(logits_fn, token_stream, context_len, **kw))


# --------------------------------------------------------------------------------------------
# Greedy acceptance of a draft against a target


def sample_prompts(
    token_stream: torch.Tensor | np.ndarray | Sequence[int],
    n_prompts: int = 200,
    prompt_len: int = 64,
    reserve: int = 8,
) -> torch.Tensor:
    """``[n, prompt_len]`` prompts from evenly spaced starts over the stream (deterministic; no
    RNG): start_i = floor(i * (N - prompt_len - reserve) / n) for i in 0..n-1."""
    stream = _as_long_tensor(token_stream)
    room = stream.numel() - prompt_len - reserve
    if room <= 0:
        raise ValueError(
            f"stream of {stream.numel()} tokens is too short for {prompt_len}-token prompts"
        )
    n = min(n_prompts, room)
    starts = [i * room // n for i in range(n)]
    return torch.stack([stream[s : s + prompt_len] for s in starts])


@torch.no_grad()
def greedy_continuation(
    logits_fn: LogitsFn, prompts: torch.Tensor, n_tokens: int, *, batch_size: int = 64
) -> torch.Tensor:
    """``[B, n_tokens]`` greedy tokens after each prompt, recomputing the whole sequence each step
    (no KV cache: the reference for any cached implementation)."""
    outs = []
    for i in range(0, prompts.shape[0], batch_size):
        seq = prompts[i : i + batch_size]
        for _ in range(n_tokens):
            nxt = logits_fn(seq)[:, -1].float().argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
        outs.append(seq[:, prompts.shape[1] :])
    return torch.cat(outs)


def acceptance_from_tokens(target_tokens: torch.Tensor, draft_tokens: torch.Tensor) -> dict:
    """Acceptance statistics from the two ``[B, K]`` greedy continuations."""
    if target_tokens.shape != draft_tokens.shape:
        raise ValueError("target and draft continuations differ in shape")
    n, max_k = target_tokens.shape
    match = (target_tokens.cpu() == draft_tokens.cpu()).to(torch.int64)
    prefix_ok = match.cumprod(dim=1)  # [B, K]: the first i+1 draft tokens all accepted
    leading = prefix_ok.sum(dim=1)  # number of leading matches, 0..K
    per_pos = prefix_ok.double().mean(dim=0).tolist()  # P(token i accepted), i = 1..K
    conditional = []
    for i in range(max_k):
        reached = prefix_ok[:, i - 1] if i else torch.ones(n, dtype=torch.int64)
        denom = int(reached.sum())
        conditional.append(float(prefix_ok[:, i].sum()) / denom if denom else None)
    per_k = {}
    for k in range(1, max_k + 1):
        acc = leading.clamp(max=k).double().mean().item()
        per_k[str(k)] = {
            "mean_accepted_len": acc,
            "acceptance_rate": acc / k,  # accepted / proposed
            "tokens_per_target_step": acc + 1.0,  # accepted + the target's own next token
        }
    return {
        "n_prompts": n,
        "max_k": max_k,
        "position_acceptance": per_pos,  # P(the i-th proposed token is accepted), i = 1..K
        "position_conditional_acceptance": conditional,  # P(i-th accepted | first i-1 accepted)
        "per_k": per_k,
    }


def acceptance_stats(
    target_fn: LogitsFn, draft_fn: LogitsFn, prompts: torch.Tensor, max_k: int = 8, **kw: Any
) -> dict:
    t = greedy_continuation(target_fn, prompts, max_k, **kw)
    d = greedy_continuation(draft_fn, prompts, max_k, **kw)
    return acceptance_from_tokens(t, d)


# --------------------------------------------------------------------------------------------
# Data and a transformers forward


def load_eval_texts(data: str) -> list[str]:
    """Documents for ``--data``: ``stdlib-heldout``, a directory of ``.py`` files, or a file."""
    if data == STDLIB_HELDOUT:
        return corpus.heldout_texts()
    path = Path(data)
    if path.is_dir():
        texts = []
        for rel in sorted(
            p.relative_to(path).as_posix() for p in path.rglob("*.py") if p.is_file()
        ):
            text = corpus.read_source(path / rel)
            if text is not None:
                texts.append(text)
        if not texts:
            raise ValueError(f"no readable .py files under {path}")
        return texts
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    raise FileNotFoundError(f"--data {data!r}: not {STDLIB_HELDOUT!r}, a directory or a file")


def load_eval_stream(data: str, tokenizer: Any) -> np.ndarray:
    """The int32 evaluation stream. ``tokenizer``: a ``tokenizers.Tokenizer`` or a path to a model
    directory / ``tokenizer.json``."""
    tok = corpus.load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    return corpus.encode_documents(tok, load_eval_texts(data))


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """A ``logits_fn`` over a transformers causal LM (full recompute, no cache)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return fn


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rayfleet.models.demo.evaluate --model DIR [--data stdlib-heldout]``: the held-out
    perplexity with a transformers forward, for cross-checking an engine's number."""
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=STDLIB_HELDOUT)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--context-len", type=int, default=None, help="default: max_position_embeddings"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    ctx = args.context_len or model.config.max_position_embeddings
    stream = load_eval_stream(args.data, args.model)
    total, count = nll_sum(
        hf_logits_fn(model), stream, ctx, batch_size=args.batch_size, device=args.device
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "data": args.data,
                "python_version": corpus.python_version(),
                "context_len": ctx,
                "tokens": int(len(stream)),
                "predicted_tokens": count,
                "mean_nll": total / count,
                "perplexity": math.exp(total / count),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
