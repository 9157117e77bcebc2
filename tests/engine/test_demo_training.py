"""CPU tests of the demo-model training pipeline (rayfleet/models/demo) at --tiny scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rayfleet.models.demo import corpus, evaluate, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    logs = tmp_path_factory.mktemp("logs")
    card = train.main(
        [
            "--out",
            str(out),
            "--tiny",
            "--device",
            "cpu",
            "--log-dir",
            str(logs),
            "--target-steps",
            "12",
            "--draft-steps",
            "8",
            "--n-prompts",
            "8",
        ]
    )
    return out, logs, card


def test_tiny_run_writes_loadable_hf_dirs(tiny_run: tuple[Path, Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = tiny_run
    for name in ("target", "draft"):
        d = out / name
        for f in (
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ):
            assert (d / f).is_file(), f"{name}/{f} missing"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == corpus.EOS_ID and gen["bos_token_id"] == corpus.BOS_ID
        model = AutoModelForCausalLM.from_pretrained(str(d))
        assert model.dtype == torch.bfloat16
        tok = AutoTokenizer.from_pretrained(str(d))
        ids = tok("def f(x):\n    return x").input_ids
        assert ids[0] == corpus.BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == "<s># user:\nhi\n# assistant:\n"
        out_ids = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        assert out_ids.shape[1] == len(ids) + 3


def test_tiny_run_card(tiny_run: tuple[Path, Path, dict]) -> None:
    out, logs, card = tiny_run
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk == json.loads(json.dumps(card))
    assert (logs / "train.log").is_file() and (logs / "metrics.jsonl").is_file()
    assert on_disk["machine"]["python_version"] == corpus.python_version()
    for key in ("torch_version", "gpu_name", "transformers_version"):
        assert key in on_disk["machine"]
    c = on_disk["corpus"]
    for key in (
        "files_train",
        "files_heldout",
        "bytes_train",
        "bytes_heldout",
        "tokens_train",
        "tokens_heldout",
        "heldout_list_sha256",
        "python_version",
    ):
        assert c[key], key
    total = 0
    for name in ("target", "draft"):
        m = on_disk[name]
        assert m["params"] > 0 and m["bytes"] == sum(
            (out / name / f).stat().st_size for f in m["files"]
        )
        total += m["bytes"]
        assert m["training"]["steps_run"] == m["training"]["steps_planned"]
        assert m["training"]["tokens_seen"] > 0
        assert math.isfinite(m["heldout"]["perplexity"]) and m["heldout"]["perplexity"] > 1
    assert on_disk["size"]["total_bytes"] == total <= on_disk["size"]["budget_bytes"]
    acc = on_disk["evaluation"]["acceptance"]
    assert len(acc["position_acceptance"]) == 8 and set(acc["per_k"]) == {
        str(k) for k in range(1, 9)
    }


def test_card_perplexity_reproduces_with_evaluate(tiny_run: tuple[Path, Path, dict]) -> None:
    """The card's number is evaluate.perplexity over the held-out split, from the saved files."""
    out, _, card = tiny_run
    model = train.load_model(out / "target", "cpu")
    cor = corpus.load_corpus(subset_fraction=0.04, heldout_fraction=0.25)
    stream = corpus.encode_documents(
        corpus.load_tokenizer(out / "target"), [f.text for f in cor.heldout]
    )
    ppl = evaluate.perplexity(
        evaluate.hf_logits_fn(model), stream, model.config.max_position_embeddings
    )
    assert ppl == pytest.approx(card["target"]["heldout"]["perplexity"], rel=1e-4)


def test_same_seed_same_weights() -> None:
    data = torch.randint(
        0, 64, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int32
    )
    shape = train.Shape(
        hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, head_dim=16, context_len=32
    )
    cfg = train.PhaseConfig(
        name="t",
        steps=3,
        minutes=5,
        batch_size=4,
        lr=1e-2,
        warmup=1,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        seed=7,
        dropout=0.1,
    )

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = train.build_model(shape, 64, seed=seed)
        train.train_phase(model, data, cfg, "cpu")
        assert not model.model.layers[0].mlp._forward_hooks  # dropout hooks removed
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = trained(1), trained(1), trained(2)  # dropout masks are seeded too
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    init = train.build_model(shape, 64, seed=1).state_dict()
    assert not torch.equal(init["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_perplexity_hand_computed() -> None:
    """Vocab 3, a 'model' whose logits depend only on the previous token, stream of 5 tokens,
    context 3: windows [0,1,2] and [3,4]; predictions 1<-0, 2<-1, 4<-3 (token 3 is a window start
    and is not predicted)."""
    table = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]  # [B, T, 3]: the row of the current token predicts the next

    stream = [0, 1, 1, 2, 2]
    # preds: p(1|0)=0.25, p(1|1)=0.8, p(2|2)=0.6
    want = math.exp(-(math.log(0.25) + math.log(0.8) + math.log(0.6)) / 3)
    assert evaluate.perplexity(logits_fn, stream, 3) == pytest.approx(want, rel=1e-6)
    assert evaluate.nll_sum(logits_fn, stream, 3)[1] == 3
    assert evaluate.window_spans(5, 3) == [(0, 3), (3, 5)]
    assert evaluate.window_spans(7, 3) == [(0, 3), (3, 6)]  # a 1-token tail predicts nothing
    # batching must not change the number
    assert evaluate.perplexity(logits_fn, list(range(3)) * 5, 4, batch_size=1) == pytest.approx(
        evaluate.perplexity(logits_fn, list(range(3)) * 5, 4, batch_size=16), rel=1e-12
    )


def test_acceptance_from_tokens() -> None:
    t = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    d = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    s = evaluate.acceptance_from_tokens(t, d)
    assert s["position_acceptance"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert s["position_conditional_acceptance"] == pytest.approx([2 / 3, 0.5, 1.0, 1.0])
    assert s["per_k"]["1"]["mean_accepted_len"] == pytest.approx(2 / 3)
    assert s["per_k"]["4"]["mean_accepted_len"] == pytest.approx((4 + 1 + 0) / 3)
    assert s["per_k"]["4"]["tokens_per_target_step"] == pytest.approx(1 + 5 / 3)


def test_split_is_stable_and_path_based(tmp_path: Path) -> None:
    # Pinned values: the split must not change between Python versions or machines.
    assert corpus.split_bucket("json/decoder.py") == pytest.approx(
        int.from_bytes(
            __import__("hashlib").sha256(b"rayfleet-demo-v1:json/decoder.py").digest()[:8], "big"
        )
        / 2**64
    )
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "tests" / "t.py").write_text("z = 3\n")
    (tmp_path / "site-packages" / "s.py").write_text("w = 4\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\x00")
    assert corpus.list_py_files(tmp_path) == ["a.py", "bad.py", "pkg/b.py", "pkg/tests/t.py"]
    assert corpus.list_py_files(tmp_path, include_tests=False) == ["a.py", "bad.py", "pkg/b.py"]
    cor = corpus.load_corpus(tmp_path, heldout_fraction=0.5)
    assert cor.skipped == ["bad.py"]
    assert sorted(f.relpath for f in cor.train + cor.heldout) == [
        "a.py",
        "pkg/b.py",
        "pkg/tests/t.py",
    ]
    assert [f.relpath for f in cor.heldout] == [
        r for r in ("a.py", "pkg/b.py", "pkg/tests/t.py") if corpus.split_bucket(r) < 0.5
    ]
    texts = evaluate.load_eval_texts(str(tmp_path))
    # A --data directory takes every readable .py file (bad.py skipped; no stdlib exclusions).
    assert texts == ["x = 1\n", "y = 2\n", "z = 3\n", "w = 4\n"]


def test_encode_documents_frames_docs() -> None:
    tok = corpus.train_tokenizer(["def f():\n    pass\n"] * 50, vocab_size=300)
    ids = corpus.encode_documents(tok, ["pass", "def"])
    assert ids[0] == corpus.BOS_ID and ids[-1] == corpus.EOS_ID
    assert list(ids).count(corpus.BOS_ID) == 2 and list(ids).count(corpus.EOS_ID) == 2
    assert tok.decode([int(i) for i in ids], skip_special_tokens=True) == "passdef"
