"""The on-disk format of a dataset: token shards that `numpy.memmap` reads as they are.

    DATASET/
      meta.json                 format version, tokenizer, counts, sources, content hash (written last)
      tokenizer.json            BPE only: the Hugging Face tokenizer
      train-00000.bin ...       raw little-endian token ids, uint16 when the vocabulary fits, else uint32
      train-00000.docs.npy ...  (documents, 2) int64 [start, end) of each document's tokens in that shard
      val-00000.bin ...

Each document's tokens are followed by the tokenizer's separator (the end-of-document token for BPE, a blank line
for bytes). A shard holds whole documents and is closed once it reaches `shard_tokens`; training windows never
cross a shard boundary, so each shard can be memory-mapped on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def docs_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.docs.npy"


class ShardWriter:
    """Appends documents' tokens to one split's shards, starting a new shard when the current one is full."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []  # meta.json entries of the closed shards
        self._file = None
        self._tokens = 0  # in the open shard
        self._docs: list[tuple[int, int]] = []

    def add(self, tokens: np.ndarray, separator: np.ndarray) -> None:
        """One document: its tokens, then the separator."""
        if self._file is None:
            self._file = open(self.directory / shard_name(self.split, len(self.shards)), "wb")
        start = self._tokens
        self._file.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._file.write(separator.astype(self.dtype).tobytes())
        self._tokens += len(tokens) + len(separator)
        self._docs.append((start, start + len(tokens)))
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards) + len(self._docs)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._tokens

    def _close_shard(self) -> None:
        index = len(self.shards)
        self._file.close()
        np.save(self.directory / docs_name(self.split, index), np.asarray(self._docs, dtype=np.int64).reshape(-1, 2))
        self.shards.append(
            {
                "file": shard_name(self.split, index),
                "docs": docs_name(self.split, index),
                "tokens": self._tokens,
                "documents": len(self._docs),
            }
        )
        self._file, self._tokens, self._docs = None, 0, []
