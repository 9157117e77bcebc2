"""Corpus, held-out split and tokenizer of the bundled demo models.

The corpus is the ``.py`` sources of the running interpreter's standard library, which every
Python installation carries, so it can be rebuilt offline on any host. The definition:

* root: ``sysconfig.get_paths()["stdlib"]``; every file whose name ends in ``.py``, found by a
  recursive walk that does not follow directory symlinks;
* skipped directories (at any depth): ``site-packages``, ``dist-packages``, ``__pycache__`` and
  the build directory ``config-*`` (build-specific); skipped files: ``_sysconfigdata*.py``
  (build-specific paths and flags);
* the ``test``/``tests`` packages and ``idle_test`` are INCLUDED by default (they roughly double the
  data; ``include_tests=False`` drops every directory named ``test``, ``tests`` or ``idle_test``);
* a file is read as bytes and decoded as strict UTF-8; files that do not decode (a handful of
  deliberately mis-encoded test files) or are larger than ``MAX_FILE_BYTES`` are skipped and
  listed, so the selection is a pure function of the directory's contents;
* files are ordered by their relative POSIX path (``a/b.py``), never by walk order.

Split: a file is held out iff ``split_bucket(relpath) < heldout_fraction`` (default 0.05), where
the bucket is the first 8 bytes of ``sha256(SPLIT_SALT + ":" + relpath)`` read as a big-endian
integer over 2**64. It depends on nothing but the relative path, so the same stdlib gives the same
split on every machine. A different Python version has a different stdlib, hence a different
corpus: the model card records the interpreter version and a digest of the held-out list.

Token stream: every document is encoded without special tokens and framed as
``<s> ids... </s>``; documents are concatenated in relative-path order (``encode_documents``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLIT_SALT = "rayfleet-demo-v1"
HELDOUT_FRACTION = 0.05
MAX_FILE_BYTES = 2 * 1024 * 1024
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3 (the Llama convention for unk/bos/eos)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# A plain chat template: role-tagged blocks that read like Python comments, so that the code model
# sees something close to its training distribution. ``bos_token`` comes from the template, so the
# rendered prompt is encoded with add_special_tokens=False (as transformers' apply_chat_template
# does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "# {{ message['role'] }}:\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}# assistant:\n{% endif %}"
)


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def split_bucket(relpath: str, salt: str = SPLIT_SALT) -> float:
    """A stable number in [0, 1) from a relative POSIX path (sha256; not Python's ``hash``)."""
    digest = hashlib.sha256(f"{salt}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(relpath: str, fraction: float = HELDOUT_FRACTION) -> bool:
    return split_bucket(relpath) < fraction


def list_py_files(root: Path, *, include_tests: bool = True) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root``, sorted (see module docstring)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        dirnames[:] = [
            d
            for d in dirnames
            if d not in SKIP_DIRS
            and not d.startswith("config-")
            and (include_tests or d not in TEST_DIRS)
        ]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                out.append((rel_dir / name).as_posix())
    return sorted(out)


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str
    nbytes: int


@dataclass
class Corpus:
    """The files of one corpus, split into train and held-out, each in relative-path order."""

    root: str
    python_version: str
    include_tests: bool
    heldout_fraction: float
    subset_fraction: float
    train: list[SourceFile]
    heldout: list[SourceFile]
    skipped: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, object]:
        names = "\n".join(f.relpath for f in self.heldout).encode()
        return {
            "source": "python-stdlib",
            "python_version": self.python_version,
            "root": self.root,
            "include_tests": self.include_tests,
            "subset_fraction": self.subset_fraction,
            "heldout_fraction": self.heldout_fraction,
            "split_rule": (
                f"heldout iff int(sha256('{SPLIT_SALT}:' + relpath)[:8], big-endian) / 2**64 "
                f"< {self.heldout_fraction}"
            ),
            "files_train": len(self.train),
            "files_heldout": len(self.heldout),
            "files_skipped": len(self.skipped),
            "skipped": list(self.skipped),
            "bytes_train": sum(f.nbytes for f in self.train),
            "bytes_heldout": sum(f.nbytes for f in self.heldout),
            "heldout_list_sha256": hashlib.sha256(names).hexdigest(),
            "heldout_files": [f.relpath for f in self.heldout],
        }


def read_source(path: Path) -> str | None:
    """The file as strict UTF-8 text, or None when it is too large or does not decode."""
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(
    root: Path | None = None,
    *,
    include_tests: bool = True,
    heldout_fraction: float = HELDOUT_FRACTION,
    subset_fraction: float = 1.0,
) -> Corpus:
    """Read and split the corpus. ``subset_fraction`` < 1 keeps only files whose bucket under a
    second salt is below it (a deterministic sample, used by ``--tiny`` runs and tests)."""
    root = Path(root) if root is not None else stdlib_root()
    train: list[SourceFile] = []
    heldout: list[SourceFile] = []
    skipped: list[str] = []
    for rel in list_py_files(root, include_tests=include_tests):
        if (
            subset_fraction < 1.0
            and split_bucket(rel, salt=SPLIT_SALT + ":subset") >= subset_fraction
        ):
            continue
        path = root / rel
        text = read_source(path)
        if text is None:
            skipped.append(rel)
            continue
        sf = SourceFile(rel, text, len(text.encode("utf-8")))
        (heldout if split_bucket(rel) < heldout_fraction else train).append(sf)
    return Corpus(
        root=str(root),
        python_version=python_version(),
        include_tests=include_tests,
        heldout_fraction=heldout_fraction,
        subset_fraction=subset_fraction,
        train=train,
        heldout=heldout,
        skipped=skipped,
    )


def heldout_texts(
    root: Path | None = None,
    *,
    include_tests: bool = True,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> list[str]:
    """The held-out documents of the stdlib corpus, in order (``--data stdlib-heldout``)."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for rel in list_py_files(root, include_tests=include_tests):
        if split_bucket(rel) < heldout_fraction:
            text = read_source(root / rel)
            if text is not None:
                out.append(text)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) with the four special tokens at
    ids 0..3. Encoding a single text adds ``<s>`` in front (a TemplateProcessing post-processor),
    like Llama tokenizers; documents in the training stream are framed by ``encode_documents``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    for name, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID, PAD_ID), strict=True):
        got = tok.token_to_id(name)
        if got != want:
            raise RuntimeError(f"special token {name} got id {got}, expected {want}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def save_hf_tokenizer(tok, out_dir: Path, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ chat template) via transformers."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: str | os.PathLike[str]):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    return Tokenizer.from_file(str(p))


def encode_documents(tok, texts: Iterable[str], batch: int = 256) -> np.ndarray:
    """The flat token stream ``<s> doc0 </s> <s> doc1 </s> ...`` as int32 (special tokens added
    here, not by the tokenizer's post-processor)."""
    texts = list(texts)
    parts: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i : i + batch], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 2, dtype=np.int32)
            ids[0] = BOS_ID
            ids[1:-1] = enc.ids
            ids[-1] = EOS_ID
            parts.append(ids)
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(parts)
