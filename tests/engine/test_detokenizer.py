"""IncrementalDetokenizer on real byte-level and Metaspace tokenizers trained in a tmp dir."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rayfleet.replicas.detokenizer import IncrementalDetokenizer, special_token_ids
from rayfleet.sampling_params import SamplingParams
from tests.tokenizer_factory import make_bytelevel_tokenizer, make_metaspace_tokenizer

TEXTS = [
    "Hello world! Привет мир. こんにちは世界 🙂",
    "def fibonacci(n):\n    return n\n",
    "Ünïcödé façade naïve café — “quotes” … 北京 東京 서울",
    "print('hello, world') 🙂🙂 ok",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_bytelevel_tokenizer(Path(tmp_path_factory.mktemp("bytelevel")))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_metaspace_tokenizer(Path(tmp_path_factory.mktemp("metaspace")))


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def stream(
    tokenizer: Any,
    prompt: Sequence[int],
    output: Sequence[int],
    params: SamplingParams | None = None,
    chunk: int = 1,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``output`` ``chunk`` ids at a time as an engine would; stop at a matched stop string."""
    det = IncrementalDetokenizer(tokenizer, prompt, params or SamplingParams())
    deltas: list[str] = []
    stop = None
    for i in range(0, len(output), chunk):
        stop = det.add_tokens(output[i : i + chunk])
        deltas.append(det.take_delta(finished=stop is not None))
        if stop is not None:
            return det, deltas, stop
    deltas.append(det.take_delta(finished=True))
    return det, deltas, stop


def expected_text(tokenizer: Any, prompt: list[int], output: list[int], skip: bool) -> str:
    """What the output adds to the prompt's text (differs from decode(output) only in a
    Metaspace leading space, which decode strips at the start of a sequence)."""
    if not prompt:
        return tokenizer.decode(output, skip_special_tokens=skip)
    before = tokenizer.decode(prompt, skip_special_tokens=skip)
    after = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    assert after.startswith(before)
    return after[len(before) :]


# --- text correctness -----------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_encoded_text_matches_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    det, deltas, _ = stream(tokenizer, [], ids)
    assert "".join(deltas) == det.output_text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_split_multibyte_character_is_held_back(bytelevel: Any) -> None:
    ids = bytelevel.encode("a🙂", add_special_tokens=False)
    pieces = bytelevel.convert_ids_to_tokens(ids)
    assert len(ids) >= 3, pieces  # the emoji spans several byte-level tokens
    det = IncrementalDetokenizer(bytelevel, [], SamplingParams())
    seen = []
    for t in ids:
        det.add_tokens([t])
        seen.append(det.take_delta(finished=False))
    assert seen[0] == "a"
    assert all(d == "" for d in seen[1:-1])
    assert seen[-1] == "🙂"


def test_byte_fallback_character_is_held_back(metaspace: Any) -> None:
    # The metaspace tokenizer has no piece for this emoji: it encodes as <0xF0><0x9F>... bytes.
    ids = metaspace.encode("x 🚀", add_special_tokens=False)
    pieces = metaspace.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) == 4, pieces
    det = IncrementalDetokenizer(metaspace, [], SamplingParams(skip_special_tokens=False))
    seen = []
    for t in ids:
        det.add_tokens([t])
        seen.append(det.take_delta(finished=False))
    assert "".join(seen) == "x 🚀"
    assert all("\ufffd" not in d for d in seen)
    assert seen[-1].endswith("🚀") and "🚀" not in "".join(seen[:-1])


def test_metaspace_spaces_mid_stream_and_after_prompt(metaspace: Any) -> None:
    prompt = metaspace.encode("Hello", add_special_tokens=False)
    output = metaspace.encode(" world fox", add_special_tokens=False)
    assert metaspace.convert_ids_to_tokens(output)[0].startswith("▁")
    _, deltas, _ = stream(metaspace, prompt, output)
    assert deltas[0] == " world"  # leading space relative to the prompt
    assert "".join(deltas) == " world fox"
    # With no prompt context the stream starts the text, as decode() would.
    _, deltas, _ = stream(metaspace, [], output)
    assert "".join(deltas) == metaspace.decode(output) == "world fox"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer: Any, skip: bool) -> None:
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    output = [bos, *tokenizer.encode("Hi there", add_special_tokens=False), eos]
    params = SamplingParams(skip_special_tokens=skip)
    det, deltas, _ = stream(tokenizer, [bos], output, params)
    assert "".join(deltas) == det.output_text
    if skip:
        assert det.output_text.strip() == "Hi there"
    else:
        assert det.output_text.startswith("<s>") and det.output_text.endswith("</s>")
    assert det.output_text == expected_text(tokenizer, [bos], output, skip)


def test_special_token_ids_cover_added_special_tokens(metaspace: Any) -> None:
    ids = special_token_ids(metaspace)
    assert set(metaspace.all_special_ids) <= ids
    # The factory registers the byte-fallback pieces as special added tokens; decode skips them.
    byte_id = metaspace.convert_tokens_to_ids("<0xF0>")
    assert byte_id in ids and metaspace.decode([byte_id], skip_special_tokens=True) == ""


def _prompts(tokenizer: Any) -> list[list[int]]:
    return [[]] + [tokenizer.encode(t, add_special_tokens=False)[:7] for t in TEXTS[:3]]


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_bytelevel_match_decode(bytelevel: Any, skip: bool) -> None:
    # Fully random ids: broken UTF-8, specials, all of it. Byte-level decode is lossy UTF-8 over
    # the concatenated bytes, which the held-back window reproduces exactly.
    rng = random.Random(0)
    vocab = len(bytelevel)
    params = SamplingParams(skip_special_tokens=skip)
    for trial in range(150):
        prompt = _prompts(bytelevel)[trial % 4]
        output = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        det, deltas, _ = stream(bytelevel, prompt, output, params, chunk=1 + trial % 3)
        want = bytelevel.decode(output, skip_special_tokens=skip)
        assert "".join(deltas) == det.output_text == want, (prompt, output)


def _metaspace_random_output(metaspace: Any, rng: random.Random) -> list[int]:
    """Random pieces, specials, and byte-fallback runs that spell whole characters (emoji etc.)."""
    byte_ids = set(metaspace.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)]))
    normal = [i for i in range(len(metaspace)) if i not in byte_ids]
    out: list[int] = []
    for _ in range(rng.randint(1, 30)):
        roll = rng.random()
        if roll < 0.15:
            char = rng.choice("🚀🧪😀€ü\u2028北")
            out += metaspace.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()])
        else:
            out.append(rng.choice(normal))
    return out


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_metaspace_match_decode(metaspace: Any, skip: bool) -> None:
    rng = random.Random(1)
    params = SamplingParams(skip_special_tokens=skip)
    for trial in range(150):
        prompt = _prompts(metaspace)[trial % 4]
        output = _metaspace_random_output(metaspace, rng)
        det, deltas, _ = stream(metaspace, prompt, output, params, chunk=1 + trial % 3)
        want = expected_text(metaspace, prompt, output, skip)
        assert "".join(deltas) == det.output_text == want, (prompt, output)
        if not prompt:
            assert det.output_text == metaspace.decode(output, skip_special_tokens=skip)


def test_random_ids_metaspace_skip_special_any_ids(metaspace: Any) -> None:
    # With skip_special_tokens the (special) byte pieces vanish, so any id sequence must match.
    rng = random.Random(2)
    for _ in range(100):
        output = [rng.randrange(len(metaspace)) for _ in range(rng.randint(1, 40))]
        det, deltas, _ = stream(metaspace, [], output)
        assert "".join(deltas) == metaspace.decode(output, skip_special_tokens=True)


def test_out_of_vocab_ids_are_dropped(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    det, deltas, _ = stream(tokenizer, [], [ids[0], len(tokenizer) + 50, *ids[1:]])
    assert "".join(deltas) == "Hello world"


def test_decode_window_stays_small(tokenizer: Any) -> None:
    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.longest = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            self.longest = max(self.longest, len(tokens))
            return self.inner.convert_tokens_to_string(tokens)

    counting = Counting(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 800
    det, deltas, _ = stream(counting, [], ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert counting.longest <= 12


# --- stop strings ---------------------------------------------------------------------------


def test_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog. Hello world!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=["lazy dog"])
    det = IncrementalDetokenizer(tokenizer, [], params)
    hits = []
    for i, t in enumerate(ids):
        if det.add_tokens([t]) is not None:
            hits.append(i)
            break
    assert hits, "stop not found"
    # The stop only completes at the token that supplies its last character: it spans tokens.
    assert "lazy dog" not in tokenizer.decode(ids[: hits[0]])
    assert "lazy" in tokenizer.decode(ids[: hits[0]])
    assert det.output_text == "The quick brown fox jumps over the "
    assert det.matched_stop == "lazy dog"
    assert det.add_tokens(ids[hits[0] + 1 :]) is None  # later tokens are ignored
    assert det.output_text == "The quick brown fox jumps over the "


def test_stop_string_at_first_token(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    first = tokenizer.decode(ids[:1])
    det, deltas, stop = stream(tokenizer, [], ids, SamplingParams(stop=[first]))
    assert stop == first and det.output_text == "" and "".join(deltas) == ""
    det, deltas, stop = stream(
        tokenizer, [], ids, SamplingParams(stop=[first], include_stop_str_in_output=True)
    )
    assert stop == first and det.output_text == first == "".join(deltas)


def test_include_stop_str_in_output(tokenizer: Any) -> None:
    ids = tokenizer.encode("def fibonacci(n):\n    return n\n", add_special_tokens=False)
    params = SamplingParams(stop=["):", "never"], include_stop_str_in_output=True)
    det, deltas, stop = stream(tokenizer, [], ids, params)
    assert stop == "):"
    assert det.output_text == "def fibonacci(n):" == "".join(deltas)


def test_earliest_stop_wins_within_one_step(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world! Hello", add_special_tokens=False)
    params = SamplingParams(stop=["world", "llo"])
    det, deltas, stop = stream(tokenizer, [], ids, params, chunk=len(ids))
    assert stop == "llo" and det.output_text == "He" == "".join(deltas)


def test_held_back_stop_prefix_is_released_when_it_does_not_match(bytelevel: Any) -> None:
    det = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["fox!"]))
    ids = bytelevel.encode("the fox jumps", add_special_tokens=False)
    streamed = ""
    most_held = 0
    for t in ids:
        assert det.add_tokens([t]) is None
        streamed += det.take_delta(finished=False)
        text = det.output_text
        # Never hand out a tail that could still become "fox!".
        could_stop = max((k for k in range(1, 4) if text.endswith("fox!"[:k])), default=0)
        assert text.startswith(streamed) and len(text) - len(streamed) >= could_stop
        most_held = max(most_held, len(text) - len(streamed))
    assert most_held >= 3  # "fox" was held until " jumps" ruled the stop out
    streamed += det.take_delta(finished=True)
    assert streamed == "the fox jumps"


def test_streamed_deltas_never_contain_cut_text_random(tokenizer: Any) -> None:
    rng = random.Random(3)
    corpus = " ".join(TEXTS)
    for trial in range(200):
        start = rng.randrange(len(corpus) - 20)
        text = corpus[start : start + rng.randint(10, 60)]
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        a = rng.randrange(len(full))
        stop = full[a : a + rng.randint(1, 5)] if trial % 4 else "never-there"
        include = trial % 2 == 0
        params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
        det, deltas, matched = stream(tokenizer, [], ids, params, chunk=1 + trial % 2)
        pos = full.find(stop)
        if pos == -1:
            want = full
            assert matched is None
        else:
            want = full[: pos + len(stop)] if include else full[:pos]
            assert matched == stop
        assert det.output_text == want == "".join(deltas), (text, stop)
