"""Reading a prepared dataset: memory-mapped shards per split, its documents, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdlm.data.prepare import SPLITS, read_meta
from hvdlm.data.shards import FORMAT_VERSION
from hvdlm.data.tokenizer import Tokenizer, make_tokenizer
from hvdlm.errors import InputError


@dataclass(frozen=True)
class TokenSplit:
    """One split (train or val): its shards as read-only memory maps, and where each document lies in them."""

    shards: tuple[np.ndarray, ...]  # (N_i,) token ids per shard
    doc_files: tuple[Path, ...]  # (documents, 2) [start, end) per shard, read on demand

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
    meta = read_meta(path)
    if meta is None:
        raise InputError(
            f"'{path}' is not a prepared dataset (no readable meta.json). Create it with "
            f"`hvdlm data prepare SOURCES... --out {path}`."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"dataset '{path}' has format version {meta.get('format_version')}, this hvdlm reads version "
            f"{FORMAT_VERSION}. Prepare it again with `hvdlm data prepare`."
        )
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in SPLITS:
        shards, doc_files = [], []
        for entry in meta["splits"][split]["shards"]:
            file = path / entry["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != entry["tokens"] * dtype.itemsize:
                raise InputError(
                    f"dataset '{path}' is damaged: shard {entry['file']} should hold {entry['tokens']} tokens "
                    f"({entry['tokens'] * dtype.itemsize} bytes) but has {max(size, 0)} bytes. Prepare it again."
                )
            shards.append(np.memmap(file, dtype=dtype, mode="r"))
            doc_files.append(path / entry["docs"])
        splits[split] = TokenSplit(tuple(shards), tuple(doc_files))
    return Dataset(path, meta, splits["train"], splits["val"], make_tokenizer(meta["tokenizer"], path))
