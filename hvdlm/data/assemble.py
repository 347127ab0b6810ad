"""The finished units (units.py) put together in unit order: their records merged into the dataset's counts, their
tokens concatenated into the shards of each split.

A shard is closed after the document that brings it to `shard_tokens` or more, as ShardWriter closes it when the
documents are written one by one: the shards are the same files whichever way the units were cut. The tokens are
copied a run of whole documents at a time (the documents' boundaries found with numpy), not one at a time.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvdlm.data.meta import SPLITS
from hvdlm.data.shards import docs_name, shard_name
from hvdlm.data.sources import SkipReport
from hvdlm.data.units import unit_file

_COPY_CHUNK = 1 << 24  # tokens copied at a time from a unit's file into a shard


@dataclass
class Merged:
    """The dataset's counts: the units' records added up in unit order."""

    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)
    lowest: tuple[int, str] = (1 << 64, "")  # the document nearest to moving into validation, and its unit
    highest: tuple[int, str] = (-1, "")
    lowest_unit: int = -1
    highest_unit: int = -1
    cuts: Counter = field(default_factory=Counter)


def merge_records(records: list[dict]) -> Merged:
    merged = Merged()
    for index, record in enumerate(records):
        for split in SPLITS:
            merged.documents[split] += record["documents"][split]
            merged.tokens[split] += record["tokens"][split]
        merged.bytes += record["bytes"]
        for reason, n in record["skipped"].items():
            merged.skipped.counts[reason] += n
            examples = merged.skipped.examples.setdefault(reason, [])
            examples += record["examples"].get(reason, [])[: 3 - len(examples)]
        merged.cuts.update(record["cuts"])
        if record["documents"]["train"] + record["documents"]["val"]:
            if tuple(record["lowest"]) < merged.lowest:
                merged.lowest, merged.lowest_unit = tuple(record["lowest"]), index
            if tuple(record["highest"]) > merged.highest:
                merged.highest, merged.highest_unit = tuple(record["highest"]), index
    return merged


def content_hash(work: Path, units: int) -> str:
    """sha256 of every document's digest, in order: the same text under the same names gives the same hash."""
    h = hashlib.sha256()
    for index in range(units):
        h.update(unit_file(work, index, "digests").read_bytes())
    return h.hexdigest()


class ShardSink:
    """One split's shards, filled with whole runs of documents from the units' token files."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, separator: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.separator = shard_tokens, separator
        self.shards: list[dict] = []
        self._file = None
        self._tokens = 0
        self._docs: list[np.ndarray] = []

    def add_unit(self, work: Path, index: int) -> None:
        lengths = np.load(unit_file(work, index, f"{self.split}.len.npy"))
        if not len(lengths):
            return
        tokens = np.memmap(unit_file(work, index, f"{self.split}.bin"), dtype=self.dtype, mode="r")
        ends = np.cumsum(lengths + self.separator)  # where each document (with its separator) ends in the unit
        starts = ends - lengths - self.separator
        i = 0
        while i < len(lengths):
            # The document that fills the shard: the first whose end brings it to shard_tokens.
            j = int(np.searchsorted(ends, starts[i] + self.shard_tokens - self._tokens, side="left"))
            last = min(j, len(lengths) - 1)
            self._write(tokens, int(starts[i]), int(ends[last]))
            begin = starts[i : last + 1] + (self._tokens - starts[i])  # where the documents start in the shard
            self._docs.append(np.stack([begin, begin + lengths[i : last + 1]], 1))
            self._tokens += int(ends[last] - starts[i])
            if j < len(lengths):
                self._close_shard()
            i = last + 1
        del tokens

    def _write(self, tokens: np.ndarray, start: int, end: int) -> None:
        if self._file is None:
            self._file = open(self.directory / shard_name(self.split, len(self.shards)), "wb")
        for at in range(start, end, _COPY_CHUNK):
            self._file.write(tokens[at : min(end, at + _COPY_CHUNK)].tobytes())

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        index = len(self.shards)
        self._file.close()
        docs = np.concatenate(self._docs).astype(np.int64).reshape(-1, 2)
        np.save(self.directory / docs_name(self.split, index), np.ascontiguousarray(docs))
        entry = {"file": shard_name(self.split, index), "docs": docs_name(self.split, index)}
        self.shards.append({**entry, "tokens": self._tokens, "documents": len(docs)})
        self._file, self._tokens, self._docs = None, 0, []


def assemble_shards(work: Path, units: int, staging: Path, dtype: np.dtype, shard_tokens: int, separator: int) -> dict:
    """Every split's shards in `staging`, from the units in order; returns meta.json's shard lists by split."""
    shards = {}
    for split in SPLITS:
        sink = ShardSink(staging, split, dtype, shard_tokens, separator)
        for index in range(units):
            sink.add_unit(work, index)
        shards[split] = sink.close()
    return shards
