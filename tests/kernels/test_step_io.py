"""The step-edge kernels (triton_step_io) against their torch references: greedy argmax, the
staging of a step's inputs into a CUDA graph's static buffers, and a chained proposal's inputs
found on the device from its verification."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import ops_ref, triton_step_io  # noqa: E402
from rayfleet.kernels.triton_step_io import ARGMAX_BLOCK  # noqa: E402


@pytest.mark.parametrize("op", ["argmax", "stage_step_inputs", "chain_proposal_inputs"])
def test_registered_beside_reference(op: str) -> None:
    assert kernels.backends(op)[0] == "torch"
    assert kernels.get(op, "triton") is getattr(triton_step_io, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, ARGMAX_BLOCK, ARGMAX_BLOCK + 1, 3 * ARGMAX_BLOCK - 5])
def test_argmax_matches_torch(
    vocab: int, dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    rows = 6
    x = torch.randn(rows, vocab, generator=gen).to(dtype)
    # ties across blocks (the first wins), a NaN behind a larger value, two NaNs, all -inf
    hi = x.max().item() + 1
    x[1, vocab - 1] = hi
    x[1, vocab // 2] = hi
    x[2, vocab - 1] = float("nan")
    x[2, 0] = hi + 1
    x[3, vocab // 3] = float("nan")
    x[3, vocab - 1] = float("nan")
    x[4] = float("-inf")
    x[5, vocab - 1] = float("inf")
    x = x.to(device)
    want = x.argmax(dim=-1)
    host = torch.full((rows,), -1, dtype=torch.int64)
    if device == "cuda":
        host = host.pin_memory()
    got = triton_step_io.argmax(x, out_host=host)
    if device == "cuda":
        torch.cuda.synchronize()
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
    assert host.tolist() == want.tolist()
    assert triton_step_io.argmax(x).tolist() == want.tolist()
    assert ops_ref.argmax(x).tolist() == want.tolist()


def _stage_case(
    gen: torch.Generator, device: str, b: int, q: int, size: int, w: int, fill: bool
) -> tuple[tuple, tuple | None, torch.Tensor | None, torch.Tensor | None]:
    n = b * q

    def ints(hi: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(1, hi, shape, generator=gen, dtype=dtype)

    src = (
        ints(1000, n),
        ints(5000, n),
        ints(9000, n),
        ints(5000, b, dtype=torch.int32),
        ints(300, b, w, dtype=torch.int32),
    )
    fill_t = prev = None
    if fill:  # every other row takes a previous step's token
        fill_t = torch.where(torch.arange(n) % 2 == 0, torch.randint(0, 4, (n,), generator=gen), -1)
        prev = ints(1000, 4).to(device)
    return src, None, fill_t, prev


def _dst(device: str, size: int, q: int, width: int) -> tuple[torch.Tensor, ...]:
    """Static buffers poisoned with -7, bigger than the step needs."""
    toks = size * q + 3
    return (
        torch.full((toks,), -7, dtype=torch.int64, device=device),
        torch.full((toks,), -7, dtype=torch.int64, device=device),
        torch.full((toks,), -7, dtype=torch.int64, device=device),
        torch.full((size + 2,), -7, dtype=torch.int32, device=device),
        torch.full((size + 2, width), -7, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize(
    ("b", "q", "size", "w", "fill"),
    [
        (1, 1, 1, 1, True),
        (3, 1, 4, 5, True),
        (2, 3, 4, 17, False),
        (5, 4, 8, 1100, True),
        # short-prefill buckets (cuda_graphs.py): a prompt filling its bucket is staged too
        (1, 128, 1, 9, True),
        (2, 32, 4, 3, False),
    ],
)
@pytest.mark.parametrize("where", ["host", "device"])
def test_stage_step_inputs_matches_reference(
    b: int, q: int, size: int, w: int, fill: bool, where: str, gen: torch.Generator, device: str
) -> None:
    src, _, fill_t, prev = _stage_case(gen, device, b, q, size, w, fill)
    if where == "device":  # (the draft's own steps: ids a column of its [rows, k] drafts)
        src = (torch.stack([src[0] + 1, src[0], src[0] - 1], 1)[:, 1], *src[1:])
        src = tuple(t.to(device) for t in src)
        fill_t = fill_t.to(device) if fill_t is not None else None
    elif device == "cuda":  # the runner stages from pinned host memory, which the kernel reads
        src = tuple(t.pin_memory() for t in src)
        fill_t = fill_t.pin_memory() if fill_t is not None else None
    want, got = _dst(device, size, q, w + 9), _dst(device, size, q, w + 9)
    ops_ref.stage_step_inputs(src, want, q, size, fill_t, prev)
    triton_step_io.stage_step_inputs(src, got, q, size, fill_t, prev)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    n = b * q
    ids = want[0][:n].cpu()
    if fill_t is not None and prev is not None:
        taken = fill_t >= 0
        assert torch.equal(ids[taken.cpu()], prev.cpu()[fill_t.cpu()[taken.cpu()]])
        assert torch.equal(ids[~taken.cpu()], src[0].cpu()[~taken.cpu()])
    else:
        assert torch.equal(ids, src[0].cpu())
    # padding requests: null-block slots, position 0, context q; the rest untouched
    assert want[2][n : size * q].eq(0).all() and want[1][n : size * q].eq(0).all()
    assert want[3][b:size].eq(q).all() and want[3][size:].eq(-7).all()
    assert want[4][:b, w:].eq(-7).all() and want[4][b:].eq(-7).all()
    assert want[0][size * q :].eq(-7).all()


def test_stage_step_inputs_rejects_a_step_that_does_not_fit(gen: torch.Generator) -> None:
    src, _, _, _ = _stage_case(gen, "cpu", 3, 2, 4, 5, False)
    with pytest.raises(ValueError, match="do not fit buffers of batch 2"):
        triton_step_io.stage_step_inputs(src, _dst("cpu", 2, 2, 8), 2, 2)
    with pytest.raises(ValueError, match="block tables of width 5"):
        triton_step_io.stage_step_inputs(src, _dst("cpu", 4, 2, 4), 2, 4)


def _compiled_variants() -> int:
    """Kernels compiled so far for the step-edge kernels (all devices)."""
    return sum(
        len(caches[0])
        for kernel in (
            triton_step_io._stage_kernel,
            triton_step_io._argmax_blocks_kernel,
            triton_step_io._argmax_pick_kernel,
        )
        for caches in kernel.device_caches.values()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_up_leaves_nothing_to_compile_while_serving(gen: torch.Generator) -> None:
    """After warm_up, steps of any batch, query length, table width and source (pinned host
    memory, or the draft's ids: a column of its [rows, k] drafts, at any alignment) reuse the
    compiled kernels: no compile stalls a step mid-serving."""
    triton_step_io.warm_up(torch.bfloat16, torch.device("cuda"))
    before = _compiled_variants()
    for b, q, w, col in [
        (1, 1, 1, 0),
        (3, 5, 17, 1),
        (8, 9, 300, 2),
        (64, 1, 16, 3),
        (2, 2, 32, 1),
    ]:
        src, _, fill_t, prev = _stage_case(gen, "cuda", b, q, 2 * b, w, fill=True)
        host = tuple(t.pin_memory() for t in src)
        ids_col = torch.stack([src[0]] * 4, 1)[:, col].cuda()
        dev = (ids_col, *(t.cuda() for t in src[1:]))
        for s, f in ((host, fill_t.pin_memory()), (dev, None)):
            dst = _dst("cuda", 2 * b, q, w + 3)
            triton_step_io.stage_step_inputs(s, dst, q, 2 * b, f, prev if f is not None else None)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(b, 128256, generator=gen).to("cuda", dtype)
            triton_step_io.argmax(x, torch.empty(b, dtype=torch.int64).pin_memory())
            triton_step_io.argmax(x[:, : 128256 - col])
    torch.cuda.synchronize()
    assert _compiled_variants() == before


def test_warm_up_runs_every_variant(device: str) -> None:
    # 2 logit dtypes (bf16 and float32) x with/without the host copy; host/device sources x fill
    assert triton_step_io.warm_up(torch.bfloat16, torch.device(device)) == 8
    # q = 17..20 (16+ drafts per step) take the next token tile: four more stage variants
    assert triton_step_io.warm_up(torch.float32, torch.device(device), 300_000, 20) == 2 + 8


def _chain_case(gen: torch.Generator, size: int, real: int, k: int, max_kv: int, a_want: list[int]):
    """A chained proposal's staged inputs (the a = 0 layout, random), verification results
    giving row i exactly ``a_want[i]`` accepted drafts, and the field offsets."""
    bs, width = 4, 9
    kvs = [
        max(a, 1) + int(torch.randint(0, max_kv - max(a, 1) + 1, (), generator=gen)) for a in a_want
    ]
    kvs = [min(kv, max_kv) for kv in kvs]
    best, drafts, params = [], [], [[], [], [], []]
    for i in range(size):
        if i >= real:  # a padding row
            for p, v in zip(params, (0, 0, 0, 0)):
                p.append(v)
            continue
        kv, a = kvs[i], a_want[i]
        row = torch.randint(3, 1000, (kv + 1,), generator=gen).tolist()
        d = row[:kv]
        if a < kv:
            d[a] = row[a] + 1  # the first rejection
        for j in range(a + 1, kv):  # after it, anything (some equal)
            d[j] = row[j] if j % 2 else row[j] + 2
        for p, v in zip(
            params, (int(torch.randint(3, 1000, (), generator=gen)), len(best), len(drafts) + 5, kv)
        ):
            p.append(v)
        best += row
        drafts += [0] * 5 + d  # (at an offset: dbase)
    n = {"ids": 2 * size, "pos": 2 * size, "slots": 2 * size, "seq_lens": size}
    n |= {"step_pos": (k - 1) * size, "step_slots": (k - 1) * size, "step_seq_lens": (k - 1) * size}
    offsets, total = [], 0
    for name in ops_ref.CHAIN_FIELDS[:-1]:
        offsets.append(total)
        total += n[name]
    offsets.append(total)
    inputs = torch.randint(0, 8 * bs, (total + 4 * size,), generator=gen)
    inputs[: 2 * size] = -7  # ids: all rewritten
    for name in ("slots", "step_slots"):  # zeros (the null slot) stay zeros
        o = offsets[ops_ref.CHAIN_FIELDS.index(name)]
        block = inputs[o : o + n[name]]
        block[torch.rand(block.shape, generator=gen) < 0.3] = 0
    inputs[total:] = torch.tensor([v for p in params for v in p])
    tables = torch.randint(1, 60, (size + 2, width), generator=gen, dtype=torch.int32)
    return (
        inputs,
        tables,
        torch.tensor(best or [0]),
        torch.tensor(drafts or [0]),
        tuple(offsets),
        bs,
    )


@pytest.mark.parametrize("k", [1, 2, 5])
def test_chain_proposal_inputs_matches_reference(k: int, gen: torch.Generator, device: str) -> None:
    """Rows accepting none, some and all of their drafts, a padding row, slots at the null
    slot: the kernel writes what the reference does, and a row's ids are the target's tokens
    after its accepted run (x_last when none was accepted)."""
    size, real, max_kv = 6, 5, 5
    a_want = [0, 2, 5, 1, 3]
    inputs, tables, best, drafts, offsets, bs = _chain_case(gen, size, real, k, max_kv, a_want)
    args = (tables.to(device), best.to(device), drafts.to(device), offsets, size, k, bs)
    want = inputs.clone().to(device)
    ops_ref.chain_proposal_inputs(want, *args, max_kv=max_kv)
    got = inputs.clone().to(device)
    triton_step_io.chain_proposal_inputs(got, *args, max_kv=max_kv)
    assert torch.equal(got.cpu(), want.cpu())
    want = want.cpu()
    params = inputs[offsets[-1] :].view(4, size)
    for i, a in enumerate(a_want):
        x_last, off, _, kv = params[:, i].tolist()
        a = min(a, kv)
        assert want[2 * i + 1] == best[off + a]
        assert want[2 * i] == (best[off + a - 1] if a else x_last)
        assert want[offsets[1] + 2 * i] == inputs[offsets[1] + 2 * i] + a  # positions move up
        if a < kv:  # forward 1's first row writes the null slot
            assert want[offsets[2] + 2 * i] == 0
    pad = size - 1
    assert want[offsets[1] + 2 * pad] == inputs[offsets[1] + 2 * pad]  # padding: a = 0
