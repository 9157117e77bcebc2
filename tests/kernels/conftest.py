"""Kernel-test fixtures. Triton kernels run through Triton's CPU interpreter when no GPU is
present (``TRITON_INTERPRET`` is set by the root tests/conftest.py, before any collection)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils import _device
from torch.utils._device import DeviceContext

# ``with torch.device(...)`` places the factories of a set torch builds once and caches. Built
# while ``poison_empty`` has torch.empty patched, it would hold the patch, and every later
# ``torch.empty`` (the model loader's weights, in the tiers run after this one in the same
# process) would ignore the device context: build it now, from the real functions.
if hasattr(_device, "_device_constructors"):  # private to torch: present in 2.0 through 2.13
    _device._device_constructors()


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _context_device() -> torch.device:
    """The device of the innermost ``with torch.device(...)``, else the default device, read
    from the mode stack: on the GPU host (torch 2.11) ``torch.get_default_device()`` gave the
    CPU inside the loader's ``with torch.device("cuda")``, and the engine test's weights were
    made there."""
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return torch.device(mode.device)
    return torch.get_default_device()


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every floating ``torch.empty`` / ``empty_like`` made during a test is filled with NaN, so
    an output element (or workspace entry) a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(real: Callable[..., torch.Tensor], factory: bool) -> Callable[..., torch.Tensor]:
        def make(*args: Any, **kwargs: Any) -> torch.Tensor:
            if factory:  # a wrapped factory escapes ``with torch.device(...)``: pass it on
                kwargs.setdefault("device", _context_device())
            t = real(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return make

    monkeypatch.setattr(torch, "empty", poisoned(real_empty, factory=True))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like, factory=False))
    yield


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances per dtype (fp32 math inside every kernel)."""
    return {
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
    }[dtype]


@pytest.fixture
def tol() -> Callable[[torch.dtype], dict[str, float]]:
    return tolerances
