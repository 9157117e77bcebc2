"""FP8 layers under tensor parallelism, two CPU processes over gloo: each rank quantizes its own
shard (row scales), and the column -> row pair of an MLP gives, after the all-reduce, the sum of
the shards' quantized products, computed here without TP."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rayfleet.kernels import ops_ref
from rayfleet.replicas import parallel
from rayfleet.replicas.model.layers import ColumnParallelLinear, RowParallelLinear
from rayfleet.replicas.quant.fp8 import Fp8ColumnParallelLinear, quantize_model, quantize_weight

HIDDEN, INTER, TP = 32, 48, 2


def _weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    up = torch.randn(INTER, HIDDEN, generator=g)
    down = torch.randn(HIDDEN, INTER, generator=g) * torch.logspace(-2, 1, HIDDEN)[:, None]
    x = torch.randn(3, HIDDEN, generator=g)
    return up, down, x


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(HIDDEN, INTER, dtype=torch.float32)
        self.down = RowParallelLinear(INTER, HIDDEN, dtype=torch.float32)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        parallel.set_tensor_parallel(rank, TP)
        up, down, x = _weights()
        mlp = _Mlp()
        mlp.up.weight_loader(mlp.up.weight, up)
        mlp.down.weight_loader(mlp.down.weight, down)
        report = quantize_model(mlp, "fp8")
        assert report.layers == 2 and type(mlp.up) is Fp8ColumnParallelLinear
        y = mlp.down(mlp.up(x))  # all-reduced over the ranks
        if rank == 0:
            torch.save(y, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fp8_mlp_over_two_ranks_sums_the_shards_quantized_products(tmp_path: Path) -> None:
    out = str(tmp_path / "y.pt")
    mp.spawn(_rank, args=(_free_port(), out), nprocs=TP, join=True)
    y = torch.load(out)
    up, down, x = _weights()
    n, k = INTER // TP, INTER // TP
    expected = torch.zeros(3, HIDDEN)
    for r in range(TP):
        q, s = quantize_weight(up[r * n : (r + 1) * n])  # whole rows: the full matrix's scales
        h = ops_ref.fp8_linear(x, q, s)
        q, s = quantize_weight(down[:, r * k : (r + 1) * k])  # this shard's own row scales
        expected += ops_ref.fp8_linear(h, q, s)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # the shard scales matter: quantizing the down projection whole gives another result
    q, s = quantize_weight(down)
    whole = ops_ref.fp8_linear(ops_ref.fp8_linear(x, *quantize_weight(up)), q, s)
    assert not torch.allclose(y, whole, rtol=1e-5, atol=1e-5)
