"""On the machine that trained the demo pair (same Python, so the same stdlib held-out split):
`rayfleet eval perplexity` reproduces card.json's held-out perplexity within 1%."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayfleet.config import default_demo_model

CARD = json.loads((Path(default_demo_model()).parent / "card.json").read_text())

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        platform.python_version() != CARD["machine"]["python_version"],
        reason="the stdlib held-out split depends on the Python version the card was made with",
    ),
]


@pytest.mark.parametrize("which", ["target", "draft"])
def test_card_perplexity_reproduced(which: str) -> None:
    d = Path(default_demo_model()).parent / which
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayfleet.cli",
            "eval",
            "perplexity",
            "--model",
            str(d),
            "--device",
            "cuda",
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)["perplexity"]
    want = CARD[which]["heldout"]["perplexity"]
    assert abs(got - want) / want < 0.01, (got, want)
