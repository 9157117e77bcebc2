"""Incremental detokenization with stop strings, one instance per request.

Text is decoded over a small sliding window of token strings rather than the whole output:

    tokens:  [ ... already handed out ... | prefix ........ | read ....... ]
                                          ^prefix_offset    ^read_offset  ^len(tokens)

``decode(tokens[prefix:])`` minus ``decode(tokens[prefix:read])`` is the new text. Decoding both
from the same ``prefix`` start keeps context-dependent pieces right: a Metaspace "▁" at the start
of a decode is stripped, so the window always starts one emitted chunk back. New text that ends in
U+FFFD is held (offsets do not move) until the pending bytes complete a character, so a multi-byte
character split over byte-level or byte-fallback tokens never streams as '\\ufffd'. At the start the
window holds the last few prompt tokens, so the first generated token's leading space is relative to
the prompt: the output text is what the output adds to the prompt's text.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

from rayfleet.sampling_params import SamplingParams

# Prompt tokens kept as left context for the first decode; enough to cover a pending multi-byte
# character and a leading-space marker.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"

_special_ids_cache: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops: the named special tokens and every
    added token flagged special (fast tokenizers skip those too, e.g. reserved chat markers)."""
    try:
        return _special_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    result = frozenset(ids)
    with contextlib.suppress(TypeError):  # tokenizers that cannot be weakly referenced
        _special_ids_cache[tokenizer] = result
    return result


class IncrementalDetokenizer:
    """Feed generated ids with ``add_tokens``; read text with ``take_delta`` / ``output_text``.

    ``output_text`` holds only settled text: bytes of an incomplete character stay pending until
    they complete or until ``take_delta(finished=True)`` flushes them. Once a stop string matches,
    the text is cut there (or just after it with ``include_stop_str_in_output``) and later tokens
    are ignored.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_ids = special_token_ids(tokenizer) if params.skip_special_tokens else frozenset()
        self._stops = list(params.stop)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._include_stop = params.include_stop_str_in_output

        context_ids: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context_ids) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skip_ids:
                context_ids.append(token_id)
        context_ids.reverse()
        self._tokens: list[str] = self._to_tokens(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(0, self._read_offset)

        self._text = ""  # settled output text, cut at the stop string if one matched
        self._sent = 0  # chars of _text handed out by take_delta
        self._stop: str | None = None

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def matched_stop(self) -> str | None:
        return self._stop

    def add_tokens(self, new_token_ids: Sequence[int]) -> str | None:
        """Append generated ids; returns the stop string that matched in the new text, if any."""
        if self._stop is not None:
            return None
        tokens = self._to_tokens([t for t in new_token_ids if t not in self._skip_ids])
        if not tokens:
            return None
        self._tokens.extend(tokens)
        return self._settle(final=False)

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. Unless finished (or stopped), a tail that could still grow into
        a stop string is held back, so nothing handed out is ever cut later."""
        if finished and self._stop is None:
            self._settle(final=True)
        end = len(self._text)
        if not finished and self._stop is None:
            end -= self._stop_prefix_len()
        end = max(end, self._sent)
        delta = self._text[self._sent : end]
        self._sent = end
        return delta

    def _to_tokens(self, ids: list[int]) -> list[str]:
        if not ids:
            return []
        # Ids past the tokenizer's vocab (padded model vocab) map to None; decode drops them too.
        return [t for t in self._tokenizer.convert_ids_to_tokens(ids) if t is not None]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.convert_tokens_to_string(self._tokens[start:end])

    def _settle(self, final: bool) -> str | None:
        """Move newly complete text from the pending window into _text; check stop strings."""
        if self._read_offset == len(self._tokens):
            return None
        full = self._decode(self._prefix_offset, len(self._tokens))
        if len(full) <= len(self._prefix_text):
            if final:
                self._advance()
            return None
        if full.endswith(REPLACEMENT_CHAR) and not final:
            return None
        new_text = full[len(self._prefix_text) :]
        self._advance()
        start = len(self._text)
        self._text += new_text
        return self._check_stop(start)

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _check_stop(self, new_start: int) -> str | None:
        if not self._stops:
            return None
        # Earlier text held no stop string, so a match must end inside the new text.
        search_from = max(0, new_start - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self._text.find(stop, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return None
        pos, stop = best
        self._text = self._text[: pos + len(stop) if self._include_stop else pos]
        self._stop = stop
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of _text that is a proper prefix of some stop string."""
        text = self._text
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
