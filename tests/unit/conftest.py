"""Unit-test fixtures: unit tests are pure Python and must never start Ray."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(autouse=True)
def _forbid_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``ray.init`` raise (only if ray is importable; otherwise nothing can start it)."""
    if importlib.util.find_spec("ray") is None:
        return
    import ray

    def _refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray (use tests/serving for that)")

    monkeypatch.setattr(ray, "init", _refuse)
