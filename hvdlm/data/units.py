"""Work units of a preparation: the inputs cut into pieces that are encoded on their own, by any process or rank,
into files of a work directory that the assembler (assemble.py) concatenates in unit order.

The cut depends on the inputs only, never on how many workers or ranks there are, and a unit's output depends on
its piece and the tokenizer only: so the dataset is the same bytes whichever process encoded which unit. A plain
JSON Lines file is cut at line starts about every `unit_bytes` bytes (its lines are counted once, so a piece
knows the number of its first line, which names its documents), a Parquet file into runs of row groups of about
that size; text files and compressed streams (gzip, zstd: no seeking into them) are read whole, and consecutive
whole files share a unit up to that size.

A unit writes, per split, its tokens with their separators (`uNNNNNN.SPLIT.bin`) and each document's token count
(`uNNNNNN.SPLIT.len.npy`), a digest per document for the content hash (`uNNNNNN.digests`), and last its record
(`uNNNNNN.json`): a unit is finished when its record is there, names the same piece, tokenizer and forced moves,
and its files have the sizes the record says. Each file is written under a temporary name and renamed, so a
killed preparation leaves only finished units and stray temporaries, and a rerun encodes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdlm.data.meta import SPLITS
from hvdlm.data.sources import PARQUET, InputFile, Piece, SkipReport, read_piece

DIGEST_BYTES = 32  # sha256 of each document, in order: the content hash is the hash of these
_COUNT_CHUNK = 16 << 20  # bytes read at a time when counting a file's lines
_ENCODE_BATCH_CHARS = 4 << 20  # documents are encoded in batches of about this much text (one call per batch)


@dataclass(frozen=True)
class Unit:
    index: int
    pieces: tuple[Piece, ...]  # read in this order: a piece of a large file, or several small files whole
    size: int  # input bytes it covers (on disk): for progress, and to share units out evenly

    def describe(self) -> list[dict]:
        """What the record names: a rerun reuses the unit only when the plan has the same pieces here."""
        return [
            {"file": str(p.file.path), "name": p.file.name, "start": p.start, "stop": p.stop, "first": p.first}
            for p in self.pieces
        ]


def plan_units(files: list[InputFile], unit_bytes: int) -> list[Unit]:
    """The inputs cut into units, in document order (see the module docstring); consecutive small files share a
    unit of up to unit_bytes (a directory of many small text files is not thousands of units)."""
    pieces: list[tuple[Piece, int]] = []
    for f in files:
        if f.layout == PARQUET:
            pieces += _parquet_pieces(f, unit_bytes)
        elif f.layout == "jsonl" and not f.compression:
            pieces += _jsonl_pieces(f, unit_bytes)
        else:
            pieces.append((Piece(f), _size(f.path)))
    groups: list[tuple[list[Piece], int]] = []
    for piece, size in pieces:
        if groups and groups[-1][1] + size <= unit_bytes and piece.whole and groups[-1][0][-1].whole:
            groups[-1][0].append(piece)
            groups[-1] = (groups[-1][0], groups[-1][1] + size)
        else:
            groups.append(([piece], size))
    return [Unit(i, tuple(group), size) for i, (group, size) in enumerate(groups)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reading it will count it as unreadable


def _jsonl_pieces(f: InputFile, unit_bytes: int) -> list[tuple[Piece, int]]:
    """Cut at the first line start after each multiple of unit_bytes, counting lines on the way."""
    size = _size(f.path)
    if size <= unit_bytes:
        return [(Piece(f), size)]
    cuts = [(0, 1)]  # (byte, number of the line that starts there)
    try:
        with open(f.path, "rb") as stream:
            lines, at, target = 0, 0, unit_bytes
            while chunk := stream.read(_COUNT_CHUNK):
                start = 0
                while at + len(chunk) > target:  # a cut falls in this chunk: the line start after `target`
                    nl = chunk.find(b"\n", max(start, target - at))
                    if nl < 0:
                        break
                    lines += chunk.count(b"\n", start, nl + 1)
                    start = nl + 1
                    if at + start < size:
                        cuts.append((at + start, lines + 1))
                    target = at + start + unit_bytes
                lines += chunk.count(b"\n", start)
                at += len(chunk)
    except OSError:
        return [(Piece(f), size)]  # reading it reports the problem
    bounds = [c[0] for c in cuts] + [size]
    return [
        (Piece(f, start, -1 if i == len(cuts) - 1 else bounds[i + 1], first), bounds[i + 1] - start)
        for i, (start, first) in enumerate(cuts)
    ]


def _parquet_pieces(f: InputFile, unit_bytes: int) -> list[tuple[Piece, int]]:
    """Runs of whole row groups of about unit_bytes (compressed), numbered by the rows before them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(f.path) as parquet:
            meta = parquet.metadata
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
            groups = [(g.num_rows, g.total_byte_size) for g in groups]
    except (pa.ArrowException, OSError):
        return [(Piece(f), _size(f.path))]  # reading it reports the problem
    pieces, start, rows, run_bytes, first = [], 0, 0, 0, 1
    for g, (n_rows, n_bytes) in enumerate(groups):
        rows, run_bytes = rows + n_rows, run_bytes + n_bytes
        if run_bytes >= unit_bytes or g == len(groups) - 1:
            stop = -1 if g == len(groups) - 1 else g + 1
            pieces.append((Piece(f, start, stop, first), run_bytes))
            start, first, run_bytes = g + 1, rows + 1, 0
    return pieces or [(Piece(f), _size(f.path))]


def split_of(name: str, val_fraction: float, force: dict[str, str]) -> tuple[int, str]:
    """A document's split hash and split: by a hash of its name, so the same on every machine."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 1_000_000
    return h, force.get(name) or ("val" if h < val_fraction * 1_000_000 else "train")


def record_path(work: Path, index: int) -> Path:
    return work / f"u{index:06d}.json"


def unit_file(work: Path, index: int, what: str) -> Path:
    return work / f"u{index:06d}.{what}"


@dataclass
class UnitJob:
    """What a worker needs to encode a unit (picklable: it crosses to worker processes)."""

    unit: Unit
    work: str
    text_field: str
    strict: bool
    val_fraction: float
    whole_corpus: bool  # the only input is one text file, cut into documents
    tokenizer_id: str
    dtype: str  # of the tokens written (the shards'): uint16 or uint32
    force: dict


def encode_unit(job: UnitJob, tokenizer) -> dict:
    """Read, split and encode one unit into its files; returns its record (written last)."""
    work, index = Path(job.work), job.unit.index
    dtype = np.dtype(job.dtype)
    streams = {s: open(_temp(unit_file(work, index, f"{s}.bin")), "wb") for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    digests, skipped, cuts = bytearray(), SkipReport(), Counter()
    n_bytes, lowest, highest = 0, [1 << 64, ""], [-1, ""]
    batch: list[tuple[str, str]] = []
    batch_chars = 0

    def flush() -> None:
        for (split, _), ids in zip(batch, tokenizer.encode_many([text for _, text in batch])):
            streams[split].write(np.asarray(ids, dtype=dtype).tobytes())
            streams[split].write(tokenizer.separator.astype(dtype).tobytes())
            lengths[split].append(len(ids))
        batch.clear()

    try:
        for doc in _documents(job, skipped):
            cuts.update([doc.cut_at] if doc.cut_at else [])
            h, split = split_of(doc.name, job.val_fraction, job.force)
            lowest, highest = min(lowest, [h, doc.name]), max(highest, [h, doc.name])
            data = doc.text.encode("utf-8")
            digests += hashlib.sha256(doc.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data).digest()
            n_bytes += len(data)
            batch.append((split, doc.text))
            batch_chars += len(doc.text)
            if batch_chars >= _ENCODE_BATCH_CHARS:
                flush()
                batch_chars = 0
        flush()
    finally:
        for stream in streams.values():
            stream.close()
    record = {
        "unit": job.unit.describe(),
        "tokenizer": job.tokenizer_id,
        "force": job.force,
        "documents": {s: len(lengths[s]) for s in SPLITS},
        "tokens": {s: int(sum(lengths[s])) + len(lengths[s]) * len(tokenizer.separator) for s in SPLITS},
        "bytes": n_bytes,
        "skipped": dict(skipped.counts),
        "examples": skipped.examples,
        "lowest": lowest,
        "highest": highest,
        "cuts": dict(cuts),
    }
    _finish_files(work, index, lengths, bytes(digests))
    _write_atomically(record_path(work, index), json.dumps(record).encode())
    return record


def _documents(job: UnitJob, skipped: SkipReport):
    for piece in job.unit.pieces:
        yield from read_piece(piece, job.text_field, job.strict, skipped, job.whole_corpus)


def _finish_files(work: Path, index: int, lengths: dict[str, list[int]], digests: bytes) -> None:
    for split in SPLITS:
        os.replace(_temp(unit_file(work, index, f"{split}.bin")), unit_file(work, index, f"{split}.bin"))
        with open(_temp(unit_file(work, index, f"{split}.len.npy")), "wb") as out:
            np.save(out, np.asarray(lengths[split], dtype=np.int64))
        os.replace(_temp(unit_file(work, index, f"{split}.len.npy")), unit_file(work, index, f"{split}.len.npy"))
    _write_atomically(unit_file(work, index, "digests"), digests)


def _temp(path: Path) -> Path:
    """This process's temporary name for `path` (two preparers of the same inputs may encode the same unit)."""
    return path.with_name(f"{path.name}.part-{os.getpid()}")


def _write_atomically(path: Path, data: bytes) -> None:
    temp = _temp(path)
    temp.write_bytes(data)
    os.replace(temp, path)


def finished_record(job: UnitJob) -> dict | None:
    """The record of a unit a run before this one finished, when it is this unit's and its files are whole."""
    work, index, itemsize = Path(job.work), job.unit.index, np.dtype(job.dtype).itemsize
    try:
        record = json.loads(record_path(work, index).read_text())
        if (record["unit"], record["tokenizer"], record["force"]) != (job.unit.describe(), job.tokenizer_id, job.force):
            return None
        for split in SPLITS:
            if unit_file(work, index, f"{split}.bin").stat().st_size != record["tokens"][split] * itemsize:
                return None
            if len(np.load(unit_file(work, index, f"{split}.len.npy"))) != record["documents"][split]:
                return None
        docs = sum(record["documents"].values())
        if unit_file(work, index, "digests").stat().st_size != docs * DIGEST_BYTES:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record
