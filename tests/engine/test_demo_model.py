"""The bundled demo pair: loads in transformers and rayfleet with identical greedy output, ships
in the wheel, is the default model, and its perplexity is reproducible by `rayfleet eval`."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rayfleet import LLM, SamplingParams
from rayfleet.config import default_demo_model
from tests.engine.test_engine_vs_transformers import hf_greedy

DEMO = Path(default_demo_model()).parent
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("which", ["target", "draft"])
def test_demo_greedy_equals_transformers(which: str) -> None:
    d = DEMO / which
    tok = AutoTokenizer.from_pretrained(d)
    prompts = ["def fibonacci(n):", "import os\nclass Config:", "for i in range("]
    llm = LLM(str(d), dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(d, [tok.encode(p) for p in prompts], 24)


def test_demo_is_the_default_and_fits_the_size_budget() -> None:
    assert Path(default_demo_model()) == DEMO / "target"
    llm = LLM()  # no model given
    out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.text.strip()
    total = sum(f.stat().st_size for f in (DEMO / "target").iterdir()) + sum(
        f.stat().st_size for f in (DEMO / "draft").iterdir()
    )
    assert total <= 16 * 2**20
    card = json.loads((DEMO / "card.json").read_text())
    assert card["size"]["total_bytes"] <= 16 * 2**20


def test_chat_template_present() -> None:
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in text


def test_wheel_contains_demo_weights(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("rayfleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for which in ("target", "draft"):
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ):
            assert f"rayfleet/models/demo/{which}/{f}" in names
    assert "rayfleet/models/demo/card.json" in names


def test_eval_perplexity_command_matches_transformers_procedure(tmp_path: Path) -> None:
    """`rayfleet eval perplexity` (rayfleet's forward) and the training script's evaluation
    (transformers' forward, same procedure) agree within 1% on the same data."""
    data = tmp_path / "sample.py"
    data.write_text((Path(json.__file__).parent / "decoder.py").read_text())
    model = str(DEMO / "target")
    args = ["--model", model, "--data", str(data), "--context-len", "256"]
    ours = subprocess.run(
        [sys.executable, "-m", "rayfleet.cli", "eval", "perplexity", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert ours.returncode == 0, ours.stderr[-2000:]
    ref = subprocess.run(
        [sys.executable, "-m", "rayfleet.models.demo.evaluate", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    p_ours = json.loads(ours.stdout)["perplexity"]
    p_ref = json.loads(ref.stdout[ref.stdout.index("{") :])["perplexity"]
    assert abs(p_ours - p_ref) / p_ref < 0.01
    assert 1.0 < p_ours < 100.0
