"""Sampler: exact effects of each stage on hand-built logits, distribution checks, seeding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from rayfleet.replicas.sampler import Sampler, SamplerRow, argmax_rows, step_seed
from rayfleet.sampling_params import SamplingParams

EOS = frozenset({3})

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(
    params: SamplingParams | None = None,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    eos: frozenset[int] = EOS,
) -> SamplerRow:
    return SamplerRow(
        params=params or SamplingParams(),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=eos,
    )


def logits_of(probs: Sequence[float], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float32, device=device).log()


def draw_counts(
    logits: torch.Tensor, params: SamplingParams, n: int = 20000, seed: int = 0
) -> torch.Tensor:
    """Empirical counts over n independent rows (unseeded rows each draw fresh noise)."""
    batch = logits.expand(n, -1).contiguous()
    out = Sampler(seed=seed)(batch, [row(params) for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[1]).float()


def assert_matches(counts: torch.Tensor, expected: Sequence[float]) -> None:
    """Tokens with zero expected mass never drawn; chi-square on the rest at p ~ 1e-4."""
    exp = torch.tensor(expected, dtype=torch.float64)
    exp = exp / exp.sum()
    n = counts.sum().item()
    zero = exp == 0
    assert counts[zero].sum().item() == 0, f"excluded tokens drawn: {counts.tolist()}"
    obs = counts[~zero].double()
    e = exp[~zero] * n
    chi2 = ((obs - e) ** 2 / e).sum().item()
    df = int((~zero).sum().item()) - 1
    # Wilson-Hilferty approximation of the chi-square 1 - 1e-4 quantile.
    z = 3.719
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3 if df > 0 else 0.0
    assert chi2 <= max(limit, 1e-9), f"chi2={chi2:.2f} > {limit:.2f}; counts={counts.tolist()}"


# --- greedy and penalties -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50, device=device)
    rows = [row(SamplingParams(temperature=0)) for _ in range(8)]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_inputs_are_not_modified() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    before = logits.clone()
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, min_tokens=2, top_k=2)
    Sampler()(logits, [row(p, prompt=[0], output=[1])])
    assert torch.equal(logits, before)


def test_repetition_penalty_exact() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0)
    # prompt and output both count; token 3 (EOS, unseen) and 2 untouched.
    x = Sampler.apply_penalties(logits, [row(p, prompt=[0, 0], output=[1, 4])])
    assert x.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.5]]
    # A penalty below 1 rewards seen tokens the same way.
    x = Sampler.apply_penalties(logits, [row(SamplingParams(repetition_penalty=0.5), prompt=[1])])
    assert x.tolist() == [[2.0, -0.5, 0.5, 3.0, 1.0]]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0, -5.0]])
    greedy = SamplingParams(temperature=0)
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(logits, [row(greedy, prompt=[0])]).token_ids == [0]
    assert Sampler()(logits, [row(penalized, prompt=[0])]).token_ids == [1]


def test_presence_and_frequency_penalties_exact() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # output: token 0 twice, token 1 once; token 2 appears only in the prompt (not penalized).
    x = Sampler.apply_penalties(logits, [row(p, prompt=[2, 2], output=[0, 1, 0])])
    assert x.tolist() == [[1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0, 1.0, 1.0]]
    p = SamplingParams(presence_penalty=-1.0)
    x = Sampler.apply_penalties(logits, [row(p, output=[4, 4])])
    assert x.tolist() == [[1.0, 1.0, 1.0, 1.0, 2.0]]


def test_penalties_only_touch_their_rows() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    rows = [
        row(SamplingParams(), prompt=[0], output=[1]),
        row(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt=[0], output=[1]),
        row(SamplingParams(), output=[2]),
    ]
    x = Sampler.apply_penalties(logits, rows)
    assert x[0].tolist() == [2.0, 1.0, 0.0, -1.0]
    assert x[1].tolist() == [1.0, 0.5 - 1.0, 0.0, -1.0]
    assert x[2].tolist() == [2.0, 1.0, 0.0, -1.0]


def test_min_tokens_masks_eos_and_stop_ids_then_releases() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0, 9.0, 1.0]])  # EOS (3) is the argmax, then 2
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    sampler = Sampler()
    assert sampler(logits, [row(p, output=[])]).token_ids == [4]
    assert sampler(logits, [row(p, output=[0])]).token_ids == [4]
    assert sampler(logits, [row(p, output=[0, 1])]).token_ids == [3]
    x = Sampler.apply_penalties(logits, [row(p, output=[0])])
    assert x[0, 2] == -math.inf and x[0, 3] == -math.inf and x[0, 4] == 1.0
    # ignore_eos: EOS is a normal token, stop ids still wait for min_tokens.
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2], ignore_eos=True)
    assert sampler(logits, [row(p, output=[])]).token_ids == [3]
    # EOS ids past the logits' vocab are ignored rather than crashing.
    p = SamplingParams(temperature=0, min_tokens=1)
    assert sampler(logits, [row(p, eos=frozenset({3, 1000}))]).token_ids == [2]


def test_min_tokens_masks_sampled_rows_too() -> None:
    logits = logits_of([0.1, 0.1, 0.1, 0.7])
    counts = draw_counts(logits, SamplingParams(min_tokens=1), n=4000)
    assert counts[3] == 0
    assert_matches(counts, [1, 1, 1, 0])


# --- truncation and temperature -------------------------------------------------------------

PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_is_greedy(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 100, device=device) * 3
    rows = [row(SamplingParams(top_k=1, temperature=1.5)) for _ in range(64)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_unrestricted_sampling_matches_softmax() -> None:
    assert_matches(draw_counts(logits_of(PROBS), SamplingParams()), PROBS)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(top_k=3), [0.4, 0.3, 0.15, 0, 0]),
        (SamplingParams(top_k=-1), PROBS),
        (SamplingParams(top_k=10), PROBS),  # k >= vocab: disabled
        # mass before each token: 0, .4, .7, .85, .95 -> keep while < top_p
        (SamplingParams(top_p=0.75), [0.4, 0.3, 0.15, 0, 0]),
        (SamplingParams(top_p=0.65), [0.4, 0.3, 0, 0, 0]),
        (SamplingParams(top_p=0.2), [1, 0, 0, 0, 0]),
        (SamplingParams(top_p=0.9), [0.4, 0.3, 0.15, 0.1, 0]),
        # min_p: keep prob >= min_p * 0.4
        (SamplingParams(min_p=0.3), [0.4, 0.3, 0.15, 0, 0]),
        (SamplingParams(min_p=0.5), [0.4, 0.3, 0, 0, 0]),
        # top_p sees the top-k-renormalized mass: .4/.85=.47, .7/.85=.82
        (SamplingParams(top_k=3, top_p=0.5), [0.4, 0.3, 0, 0, 0]),
        # min_p after top_k: floor .4*.5=.2 drops token 2 among the kept three
        (SamplingParams(top_k=3, min_p=0.5), [0.4, 0.3, 0, 0, 0]),
    ],
    ids=lambda v: repr(v) if isinstance(v, list) else None,
)
def test_truncation_draws_only_kept_tokens_in_proportion(
    params: SamplingParams, expected: list[float]
) -> None:
    assert_matches(draw_counts(logits_of(PROBS), params), expected)


def test_temperature_reshapes_distribution() -> None:
    logits = logits_of(PROBS)
    hot = torch.tensor(PROBS) ** 0.5  # temperature 2
    assert_matches(draw_counts(logits, SamplingParams(temperature=2.0)), hot.tolist())
    cold = torch.tensor(PROBS) ** 4  # temperature 0.25
    assert_matches(draw_counts(logits, SamplingParams(temperature=0.25)), cold.tolist())


def test_temperature_to_zero_limit_is_greedy() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.5, -1.0]])
    counts = draw_counts(logits, SamplingParams(temperature=0.01), n=2000)
    assert counts[0] == 2000  # p(token 1) = e^-10 per draw
    # Below MIN_TEMPERATURE the row is taken as greedy (no overflow to NaN).
    counts = draw_counts(logits * 1e6, SamplingParams(temperature=1e-7), n=100)
    assert counts[0] == 100


def test_mixed_batch_applies_each_rows_settings() -> None:
    n = 6000
    logits = logits_of(PROBS).expand(3 * n, -1).contiguous()
    settings = [SamplingParams(top_k=2), SamplingParams(min_p=0.3), SamplingParams(temperature=0)]
    rows = [row(settings[i % 3]) for i in range(3 * n)]
    ids = torch.tensor(Sampler(seed=3)(logits, rows).token_ids).view(n, 3)
    assert_matches(torch.bincount(ids[:, 0], minlength=5).float(), [0.4, 0.3, 0, 0, 0])
    assert_matches(torch.bincount(ids[:, 1], minlength=5).float(), [0.4, 0.3, 0.15, 0, 0])
    assert ids[:, 2].eq(0).all()


# --- randomness -----------------------------------------------------------------------------


class ToyModel:
    """Deterministic next-token logits from the last token: a stand-in for a forward pass."""

    def __init__(self, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g)

    def __call__(self, last: int) -> torch.Tensor:
        return self.table[last]


def generate(
    sampler: Sampler, model: ToyModel, params_list: list[SamplingParams], steps: int
) -> list[list[int]]:
    """Each request in the batch grows one token a step; request i's prompt is [i]."""
    outputs: list[list[int]] = [[] for _ in params_list]
    for _ in range(steps):
        rows = [row(p, prompt=[i], output=outputs[i]) for i, p in enumerate(params_list)]
        logits = torch.stack([model((out or [i])[-1]) for i, out in enumerate(outputs)])
        for out, t in zip(outputs, sampler(logits, rows).token_ids):
            out.append(t)
    return outputs


def test_seeded_rows_independent_of_batch_order_and_composition() -> None:
    model = ToyModel()
    p = SamplingParams(seed=1234, top_k=20, temperature=1.3)
    alone = generate(Sampler(seed=0), model, [p], 30)[0]

    # Same request as row 0 of a batch with unseeded and other seeded neighbours.
    def others(n: int) -> list[SamplingParams]:
        return [SamplingParams(seed=None if k % 2 else k, top_p=0.9) for k in range(n)]

    batch = [p, *others(7)]
    assert generate(Sampler(seed=99), model, batch, 30)[0] == alone

    # Reversed order: prompt [i] decides the request, so rebuild rows by hand.
    outputs: list[list[int]] = [[], [], []]
    params = [SamplingParams(seed=5), p, SamplingParams()]
    for _ in range(30):
        order = [2, 1, 0] if len(outputs[0]) % 2 else [0, 1, 2]
        rows = [row(params[i], prompt=[0], output=outputs[i]) for i in order]
        logits = torch.stack([model((outputs[i] or [0])[-1]) for i in order])
        for i, t in zip(order, Sampler(seed=len(outputs[0]))(logits, rows).token_ids):
            outputs[i].append(t)
    assert outputs[1] == alone

    # Different seeds give different streams.
    other = generate(Sampler(), model, [SamplingParams(seed=1235, top_k=20, temperature=1.3)], 30)
    assert other[0] != alone


def test_seeded_rows_survive_preemption_and_step_boundaries() -> None:
    model = ToyModel()
    p = SamplingParams(seed=42)
    full = generate(Sampler(), model, [p], 24)[0]
    # Preempted after 10 tokens and recomputed: a fresh sampler continues from the output so far.
    resumed = list(full[:10])
    sampler = Sampler(seed=7)
    for _ in range(14):
        logits = model(resumed[-1]).unsqueeze(0)
        resumed.append(sampler(logits, [row(p, prompt=[0], output=resumed)]).token_ids[0])
    assert resumed == full
    # Speculative-style: the same step sampled twice gives the same token.
    logits = model(full[4]).unsqueeze(0)
    first = Sampler()(logits, [row(p, output=full[:5])]).token_ids
    again = Sampler(seed=3)(logits, [row(p, output=full[:5])]).token_ids
    assert first == again == [full[5]]


def test_seeded_stream_has_the_right_distribution() -> None:
    # One seed, many positions: the per-position generators must behave like fresh randomness.
    logits = logits_of(PROBS)
    sampler = Sampler()
    counts = torch.zeros(5)
    for pos in range(3000):
        params = SamplingParams(seed=pos % 7)
        t = sampler(logits, [row(params, output=[0] * (pos // 7))]).token_ids[0]
        counts[t] += 1
    assert_matches(counts, PROBS)


def test_step_seed_is_stable() -> None:
    # Pinned: changing the mix silently changes every seeded stream users depend on.
    assert step_seed(0, 0) == step_seed(0, 0)
    assert len({step_seed(s, p) for s in range(20) for p in range(20)}) == 400
    assert all(0 <= step_seed(s, p) < 2**63 for s in (0, 2**63 - 1) for p in (0, 10**6))
    assert step_seed(1234, 5) == 3961839609573649378


def test_unseeded_rows_reproducible_per_sampler_seed() -> None:
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    rows = [row() for _ in range(16)]
    a = Sampler(seed=11)(logits, rows).token_ids
    assert Sampler(seed=11)(logits, rows).token_ids == a
    assert Sampler(seed=12)(logits, rows).token_ids != a


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_raw_with_exact_rank_and_top() -> None:
    raw = torch.tensor([[2.0, 1.9, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    expected = raw.log_softmax(dim=-1)
    rows = [
        # The repetition penalty makes token 1 the greedy pick; logprobs stay those of raw logits.
        row(SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=2), prompt=[0]),
        row(SamplingParams(temperature=0.5, top_k=1, logprobs=0)),
    ]
    out = Sampler()(raw, rows)
    assert out.token_ids == [1, 1]
    first, second = out.logprobs
    assert first is not None and second is not None
    assert first.token_id == 1 and first.rank == 2
    assert first.logprob == pytest.approx(expected[0, 1].item(), abs=1e-6)
    assert [t for t, _ in first.top] == [0, 1]
    assert [lp for _, lp in first.top] == pytest.approx(expected[0, :2].tolist(), abs=1e-6)
    assert second.rank == 1 and second.top == []
    assert second.logprob == pytest.approx(expected[1, 1].item(), abs=1e-6)


def test_logprobs_rank_of_sampled_tail_token_and_mixed_requests() -> None:
    raw = logits_of([0.5, 0.2, 0.2, 0.1]).expand(3, -1).contiguous()
    rows = [
        row(SamplingParams(min_tokens=1, logprobs=4), eos=frozenset({0, 1, 2})),  # forces token 3
        row(SamplingParams()),
        row(SamplingParams(temperature=0, logprobs=20)),  # n > vocab: all tokens
    ]
    out = Sampler()(raw, rows)
    assert out.token_ids[0] == 3 and out.token_ids[2] == 0
    lp = out.logprobs[0]
    assert lp is not None
    assert lp.rank == 4 and lp.logprob == pytest.approx(math.log(0.1), abs=1e-6)
    assert [t for t, _ in lp.top][0] == 0 and {t for t, _ in lp.top[1:3]} == {1, 2}
    assert out.logprobs[1] is None
    top_all = out.logprobs[2]
    assert top_all is not None and len(top_all.top) == 4


def test_tied_tokens_share_best_rank() -> None:
    raw = torch.tensor([[1.0, 1.0, 0.0]])
    out = Sampler()(raw, [row(SamplingParams(temperature=0, logprobs=1))])
    assert out.logprobs[0] is not None and out.logprobs[0].rank == 1


def test_shape_mismatch_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="num_rows=2"):
        Sampler()(torch.zeros(3, 5), [row(), row()])
    assert Sampler()(torch.zeros(0, 5), []).token_ids == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_where_deterministic() -> None:
    torch.manual_seed(0)
    logits = torch.randn(32, 1000) * 4
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.4, logprobs=3),
        SamplingParams(top_k=1, frequency_penalty=0.7, min_tokens=3, logprobs=0),
    ]
    rows = [row(params[i % 2], prompt=[i, i + 1], output=[2 * i, 5, 5]) for i in range(32)]
    cpu = Sampler()(logits, rows)
    gpu = Sampler()(logits.cuda(), rows)
    assert gpu.token_ids == cpu.token_ids
    for a, b in zip(cpu.logprobs, gpu.logprobs):
        assert a is not None and b is not None
        assert a.rank == b.rank and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # Seeded rows on CUDA: reproducible across batch composition on that device.
    p = SamplingParams(seed=9, top_p=0.95)
    alone = Sampler()(logits[:1].cuda(), [row(p, output=[1, 2])]).token_ids[0]
    batched = Sampler(seed=5)(
        logits[[5, 0, 9]].cuda(), [row(), row(p, output=[1, 2]), row(p, output=[7])]
    ).token_ids[1]
    assert alone == batched


@pytest.mark.parametrize("vocab", [128256, 151936, 32000, 50257, 1000])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_argmax_rows_is_argmax(vocab: int, rows: int) -> None:
    """Greedy's argmax (on CUDA a Triton kernel reducing each row in blocks) picks the index
    torch.argmax picks, ties (the first) and NaN (ranked highest) included, on CPU and, where
    present, CUDA."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(vocab + rows)
    x = torch.randn(rows, vocab, generator=g)
    tied = torch.zeros(rows, vocab)
    tied[:, [7, vocab // 2, vocab - 5]] = 1.0  # the same max in three blocks
    nan = x.clone()
    nan[:, [vocab // 3, vocab // 2]] = float("nan")
    for dev in devices:
        for t in (x, tied, torch.zeros(rows, vocab), nan, x.bfloat16()):
            t = t.to(dev)
            assert torch.equal(argmax_rows(t), t.argmax(dim=-1))
    assert argmax_rows(tied).tolist() == [7] * rows
