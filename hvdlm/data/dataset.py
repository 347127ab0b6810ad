"""Reading a prepared dataset: memory-mapped shards per split, its documents, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdlm.data.meta import SPLITS, load_meta
from hvdlm.data.tokenizer import Tokenizer, make_tokenizer


@dataclass(frozen=True)
class TokenSplit:
    """One split (train or val): its shards as read-only memory maps, and where each document lies in them."""

    shards: tuple[np.ndarray, ...]  # (N_i,) token ids per shard
    doc_files: tuple[Path, ...]  # (documents, 2) [start, end) per shard, read on demand
    name: str = "train"  # "train" or "val": for messages about this split

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def documents(self):
        """Each document's token ids (without the separator), in order."""
        for shard, doc_file in zip(self.shards, self.doc_files):
            for start, end in np.load(doc_file):
                yield shard[start:end]


@dataclass(frozen=True)
class Dataset:
    path: Path
    meta: dict
    train: TokenSplit
    val: TokenSplit
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def open_dataset(path: str | Path) -> Dataset:
    """A dataset written by `hvdlm data prepare`; a missing, partial or foreign directory is an InputError."""
    path = Path(path)
    meta = load_meta(path)  # every key used below is checked there, and every shard's size
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in SPLITS:
        entries = meta["splits"][split]["shards"]
        shards = tuple(np.memmap(path / e["file"], dtype=dtype, mode="r") for e in entries)
        splits[split] = TokenSplit(shards, tuple(path / e["docs"] for e in entries), split)
    return Dataset(path, meta, splits["train"], splits["val"], make_tokenizer(meta["tokenizer"], path))
