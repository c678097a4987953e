"""Character-level language modelling on the Python standard library's own source code, a
corpus every Python installation carries (nothing is downloaded).

Corpus: the ``*.py`` files directly in ``sysconfig.get_paths()["stdlib"]`` (no subpackages), in
sorted order, split by file: the file at sorted index i is val if i % 10 == 8, test if
i % 10 == 9, else train. Each split is its files' text joined by newlines. The corpus is
whatever the running Python ships, so its size and checksum depend on the Python version.

Characters: printable ASCII (32..126), newline and tab get ids 1..97; anything else is id 0.
Sequences: consecutive chunks of ``seq_len + 1`` characters that overlap by one (input the
first ``seq_len``, target the last ``seq_len``); each chunk starts from a zero state. The
metric is bits per character (``bpc``), plus next-character accuracy; the trivial baseline is the
training split's unigram distribution.

Dimension legend: N sequences, T = seq_len, V = 98 characters.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import register
from lstmlab.runner.tasks.dataset import DatasetTask

ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n\t"
VOCAB_SIZE = len(ALPHABET) + 1  # 0: any other character
_CODES = np.zeros(0x110000, dtype=np.uint8)
_CODES[[ord(c) for c in ALPHABET]] = np.arange(1, VOCAB_SIZE, dtype=np.uint8)


def corpus_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def split_of(index: int) -> str:
    return {8: "val", 9: "test"}.get(index % 10, "train")


def corpus_text(split: str) -> str:
    files = [f for i, f in enumerate(corpus_files()) if split_of(i) == split]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def encode(text: str) -> np.ndarray:
    """Character ids ``(len(text),)`` as uint8."""
    return _CODES[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]


def decode(ids: list[int] | np.ndarray | Tensor) -> str:
    return "".join(ALPHABET[i - 1] if i > 0 else "\ufffd" for i in np.asarray(ids).tolist())


def chunks(ids: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping inputs ``(N, T)`` and their next-character targets ``(N, T)``."""
    n = (len(ids) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)  # (N, T + 1)
    c = torch.from_numpy(ids[idx].astype(np.int64))
    return c[:, :-1], c[:, 1:]


@register
class CharLMTask(DatasetTask):
    name = "charlm"
    metric = "bpc"
    higher_is_better = False
    vocab_size = VOCAB_SIZE
    output_size = VOCAB_SIZE
    per_step = True
    acc_means = "share of next characters predicted exactly"

    def __init__(
        self, seq_len: int = 128, max_train_chars: int | None = None, eval_chars: int = 65536
    ) -> None:
        super().__init__(seq_len)
        self.max_train_chars = max_train_chars
        self.eval_chars = eval_chars

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        limits = {"train": self.max_train_chars, "val": self.eval_chars, "test": self.eval_chars}
        out = {}
        for split, limit in limits.items():
            ids = encode(corpus_text(split))
            out[split] = chunks(ids[: limit + 1] if limit else ids, self.seq_len)
        return out

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        return {
            "bpc": self.loss(out, y).item() / math.log(2),
            "acc": (out.argmax(-1) == y).float().mean().item(),
        }

    def baseline(self) -> dict[str, float]:
        """The training split's character frequencies (add-one smoothed), scored on test."""
        counts = torch.bincount(self.split("train")[1].flatten(), minlength=VOCAB_SIZE).double() + 1
        logp = (counts / counts.sum()).log()  # (V,)
        y = self.split("test")[1].flatten()
        bpc = -logp[y].mean().item() / math.log(2)
        return {"bpc": bpc, "acc": (y == counts.argmax()).double().mean().item()}
