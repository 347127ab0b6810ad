"""Where documents come from: the embedded standard-library corpus, text files, directories, JSON Lines, Parquet,
gzip and zstd.

A source argument is resolved up front into a list of input files (a missing path is an error before anything is
read or written); a file's suffix says how it is read. Reading then yields one document per text file, per JSON
Lines record or per Parquet row, except that a corpus of one text file (a book, a dump) is cut into documents
(`cut_text`): the train / validation split is by document, and one document cannot be split. Input that cannot be
used (not UTF-8, binary, a broken gzip or zstd stream, a JSON Lines record without the text field, a Parquet file
without a string column of that name) is skipped and counted in a `SkipReport`, or, in strict mode, stops the run
with an `InputError` that names the file; reading itself never aborts half-way with a traceback.

pyarrow and zstandard are imported inside their readers only: the CLI imports this module on login nodes, and
pyarrow alone takes longer to import than the whole job-preparation command should.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from hvdlm.data.meta import is_dataset_dir
from hvdlm.errors import InputError

STDLIB = "stdlib"  # the source argument that names the embedded corpus
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"  # as Hugging Face datasets name their files (train-00000-of-00004.parquet)
# How documents lie in a file (InputFile.layout), and how it is compressed (InputFile.compression), by suffix.
TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
GZIP, ZSTD = "gzip", "zstd"
_COMPRESSION_SUFFIXES = {".gz": GZIP, ".zst": ZSTD}
_ZSTD_CHUNK = 1 << 20  # compressed bytes read at a time: what a zstd input holds in memory, with its lines
_PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: pyarrow reads one row group's column, then hands out batches
_PREPARE_TEMP = re.compile(r"\..+\.(tmp|old)-.+")  # prepare's temporary directories (see prepare.py)


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # stable document name: relative to its source argument, so the split is the same on every machine
    layout: str  # TEXT (one document), JSONL (one per line, the text in a field), PARQUET (one per row, a column)
    compression: str = ""  # GZIP (.gz), ZSTD (.zst) or "" (none); a Parquet file compresses its own pages

    @property
    def how(self) -> str:
        """How the file is read, e.g. "jsonl+zstd": a file read another way holds other documents."""
        return "+".join(filter(None, (self.layout, self.compression)))


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    cut_at: str = ""  # a part of a text file cut into documents: where this part ends (CUT_PLACES; "" otherwise)


@dataclass
class SkipReport:
    """What was left out, by reason; the first few names of each reason, for the message."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items())


# Why an input was skipped: the wording of the report and of --strict errors.
NOT_UTF8 = "not UTF-8"
BINARY = "binary (NUL bytes)"
BAD_GZIP = "unreadable gzip"
BAD_ZSTD = "unreadable zstd"
BAD_PARQUET = "unreadable Parquet"
NO_COLUMN = "Parquet files without the text column"
NOT_STRINGS = "Parquet files whose text column is not strings"
NULL_TEXT = "Parquet rows without text (null)"
UNREADABLE = "unreadable file"
BAD_JSON = "JSON Lines records that are not JSON objects"
NO_FIELD = "JSON Lines records without the text field"
EMPTY = "empty documents"
LENIENT_REASONS = (EMPTY,)  # skipped even in strict mode: an empty file holds no data to lose


# A corpus of one text file is cut into documents of about PART_CHARS characters, or into at least PARTS of them
# for a smaller file, none shorter than MIN_PART_CHARS (shorter text is one document): enough of them that hashing
# their names puts about val_fraction of the text into validation, few enough that the separators the tokenizer
# puts between documents are a vanishing share of the tokens.
PART_CHARS, PARTS, MIN_PART_CHARS = 64 << 10, 20, 256
# Where a part ends, best first: at a blank line (between paragraphs) within the next part's length, else at a
# line end, else at its length (a text without line ends); the cut blank line or line end itself is dropped (the
# tokenizer's separator stands in its place). "the end": the file's last part.
BLANK_LINE, LINE_END, FIXED, END = "a blank line", "a line end", "a fixed length", "the end"
CUT_PLACES = (BLANK_LINE, LINE_END, FIXED, END)
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")


def part_length(chars: int) -> int:
    """The length a text of `chars` characters is cut into parts of."""
    return max(MIN_PART_CHARS, min(PART_CHARS, chars // PARTS))


def cut_text(text: str) -> Iterator[tuple[str, str]]:
    """A text cut into parts of about part_length characters (at most twice that), each with where it ends (a
    CUT_PLACES word); a text under twice the length is one part. Parts of nothing but white space are left out."""
    size, start = part_length(len(text)), 0
    while start < len(text):
        if len(text) - start < 2 * size:
            end, resume, where = len(text), len(text), END
        elif blank := _BLANK_LINES.search(text, start + size, start + 2 * size):
            end, resume, where = blank.start(), blank.end(), BLANK_LINE
        elif (line_end := text.find("\n", start + size, start + 2 * size)) >= 0:
            end, resume, where = line_end, line_end + 1, LINE_END
        else:
            end = resume = start + size
            where = FIXED
        if text[start:end].strip():
            yield text[start:end], where
        start = resume


def stdlib_root() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def stdlib_files() -> list[Path]:
    """The standard library's .py files, in a fixed order (installed packages are not part of it)."""
    root = stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        # Prune while walking: site-packages can hold far more files than the standard library itself.
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
        found += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return sorted((Path(p) for p in found), key=lambda p: p.relative_to(root).as_posix())


def resolve_sources(specs: list[str], globs: list[str] | None = None) -> list[InputFile]:
    """Input files of the source arguments, in a fixed order: `stdlib`, files, or directories searched by globs.

    Without globs a directory gives all its files except hidden ones (.git/ and the like are not text to learn).
    Datasets inside a directory (and prepare's temporary directories) are never read as text.
    """
    hidden_too = bool(globs)
    globs = list(globs or ["**/*"])
    for pattern in globs:
        _check_glob(pattern)
    files: list[InputFile] = []
    for spec in specs or [STDLIB]:
        if spec == STDLIB and not Path(spec).exists():
            root = stdlib_root()
            found = stdlib_files()
            if not found:
                raise InputError(
                    f"found no .py files under {root}: this Python ships without its standard-library sources. "
                    "Use a Python installation that includes them, or pass your own text files."
                )
            files += [_input_file(p, f"{STDLIB}/{p.relative_to(root).as_posix()}") for p in found]
            continue
        path = Path(spec)
        if path.is_file():
            files.append(_input_file(path, path.name))
        elif path.is_dir():
            matched = _glob(path, globs)
            if not hidden_too:
                matched = [p for p in matched if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            files += [_input_file(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in matched]
        elif os.path.lexists(path):
            raise InputError(
                f"source '{spec}' is not a regular file or a directory (a FIFO, device or socket, or a broken link). "
                f"Pass text files, directories (with --glob patterns), JSON Lines or Parquet files, or '{STDLIB}'."
            )
        else:
            raise InputError(
                f"source '{spec}' does not exist. Pass text files, directories (with --glob patterns), JSON Lines "
                f"or Parquet files, or '{STDLIB}' for the standard-library corpus."
            )
    return files


def _check_glob(pattern: str) -> None:
    """Patterns are relative to each directory source, and stay inside it."""
    what = None
    if not pattern.strip():
        what = "is empty"
    elif PurePath(pattern).is_absolute():
        what = "is an absolute path"
    elif ".." in pattern.split("/"):
        what = "climbs out of the source directory with '..'"
    if what:
        raise InputError(
            f"--glob '{pattern}' {what}: patterns match files inside each directory source. Pass a relative pattern "
            "such as '*.txt' or '**/*.md', and the directory itself as a source."
        )


def _glob(root: Path, patterns: list[str]) -> list[Path]:
    """The regular files under root that the patterns match, leaving out datasets and prepare's temporaries."""
    matched = set()
    for pattern in patterns:
        try:
            matched.update(p for p in root.glob(pattern) if p.is_file())
        except (ValueError, NotImplementedError) as e:  # pathlib's word for a malformed pattern
            raise InputError(f"--glob '{pattern}' is not a valid pattern ({e}). Pass one such as '**/*.md'.") from None
    skip: dict[Path, bool] = {}  # directory -> whether it is a dataset or a temporary (so never text)

    def in_dataset(p: Path) -> bool:
        for parent in p.relative_to(root).parents:
            d = root / parent
            if parent != PurePath(".") and d not in skip:
                skip[d] = bool(_PREPARE_TEMP.fullmatch(d.name)) or is_dataset_dir(d)
            if skip.get(d):
                return True
        return False

    return sorted(p for p in matched if not in_dataset(p))


def _input_file(path: Path, name: str) -> InputFile:
    compression = _COMPRESSION_SUFFIXES.get(path.suffix, "")
    bare = path.stem if compression else path.name
    if not compression and bare.endswith(PARQUET_SUFFIX):
        layout = PARQUET
    else:
        layout = JSONL if bare.endswith(JSONL_SUFFIXES) else TEXT
    return InputFile(path=path, name=name, layout=layout, compression=compression)


# Read as they were before Parquet and zstd were (text or JSON Lines, plain or gzip): their fingerprint lines stay
# as they were, so datasets prepared from them stay up to date.
_FIRST_WAYS = ("text", "jsonl", "text+gzip", "jsonl+gzip")


def fingerprint_inputs(files: list[InputFile]) -> list[str]:
    """One line per input (absolute path, size, modification time, and how it is read where that is a newer way):
    changes when an input changes. A .parquet or .zst file was binary text to earlier versions (skipped): naming
    how it is read now prepares such a dataset again instead of calling it up to date."""
    lines = []
    for f in files:
        way = "" if f.how in _FIRST_WAYS else f"|{f.how}"
        try:
            st = f.path.stat()
            lines.append(f"{f.path.resolve()}|{st.st_size}|{st.st_mtime_ns}{way}")
        except OSError:  # gone since it was listed: reading will count it as unreadable
            lines.append(f"{f.path}|missing")
    if any(f.name.startswith(STDLIB + "/") for f in files):
        lines.append(f"python {sys.version}")
    return lines


@dataclass(frozen=True)
class Piece:
    """A part of one input file that is read on its own (a unit of parallel preparation): lines of a plain JSON
    Lines file from byte `start` to `stop`, or row groups `start` to `stop` of a Parquet file; other files are
    read whole (stop -1). `first` is the number of its first line or row, so that its documents are named as a
    reading of the whole file names them; only the first piece of a file reports what is wrong with the whole
    file (a missing column), so a file is counted once."""

    file: InputFile
    start: int = 0
    stop: int = -1  # -1: to the end of the file
    first: int = 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == -1


def read_documents(
    files: list[InputFile], text_field: str, strict: bool, skipped: SkipReport
) -> Iterator[tuple[InputFile, Document]]:
    """Every usable document of the inputs, in order; the unusable ones are counted in `skipped`. A single text
    file (the whole corpus) is cut into documents named FILE#N (`cut_text`)."""
    for f in files:
        yield from ((f, doc) for doc in read_piece(Piece(f), text_field, strict, skipped, whole_corpus=len(files) == 1))


def read_piece(
    piece: Piece, text_field: str, strict: bool, skipped: SkipReport, whole_corpus: bool
) -> Iterator[Document]:
    """The usable documents of one piece of an input file, in order (see read_documents). `whole_corpus`: the
    file is the only input, so a text file is cut into documents."""

    def skip(reason: str, name: str) -> None:
        if strict and reason not in LENIENT_REASONS:
            raise InputError(
                f"input '{name}' was rejected: {reason} (--strict). Fix it or remove it from the sources, or leave "
                "out --strict to skip and count such inputs instead."
            )
        skipped.add(reason, name)

    f = piece.file
    if f.layout == PARQUET:
        yield from _parquet_documents(piece, text_field, skip)
        return
    if f.layout == JSONL:
        yield from _jsonl_documents(piece, text_field, skip)
        return
    text = _read_text(f, skip)
    if text is None:
        return
    if not text.strip():
        skip(EMPTY, f.name)
    elif whole_corpus:  # the whole corpus: documents are what the train / validation split divides
        yield from (Document(f"{f.name}#{i}", part, where) for i, (part, where) in enumerate(cut_text(text)))
    else:
        yield Document(f.name, text)


def _jsonl_documents(piece: Piece, text_field: str, skip) -> Iterator[Document]:
    """One document per record, streamed line by line: JSON Lines files can be far larger than memory. A piece of
    a plain file holds the lines that start at byte `start` up to (not including) byte `stop`."""
    f, lineno, at = piece.file, piece.first - 1, piece.start
    try:
        with open(f.path, "rb") as raw_stream:
            # Lines split on b"\n" only (a binary stream): JSON strings may hold U+2028.
            stream = raw_stream
            if f.compression == GZIP:
                stream = gzip.open(raw_stream, "rb")
            elif f.compression == ZSTD:
                stream = _zstd_lines(raw_stream)
            else:
                raw_stream.seek(piece.start)
            for raw in stream:
                if piece.stop >= 0 and at >= piece.stop:
                    break
                lineno, at = lineno + 1, at + len(raw)
                if raw.strip():
                    yield from _record_document(raw, lineno, f"{f.name}:{lineno}", text_field, skip)
    except (EOFError, zlib.error, gzip.BadGzipFile):  # cut short or not gzip: the records before it are kept
        skip(BAD_GZIP, f"{f.name} (after line {lineno})" if lineno else f.name)
    except _ZstdError:  # likewise for zstd
        skip(BAD_ZSTD, f"{f.name} (after line {lineno})" if lineno else f.name)
    except OSError:
        skip(UNREADABLE, f.name)


def _record_document(raw: bytes, lineno: int, name: str, text_field: str, skip) -> Iterator[Document]:
    """The document of one JSON Lines record (none if it is unusable, which is skipped)."""
    try:
        # utf-8-sig on the first line: editors on Windows start a file with a byte order mark.
        record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
    except UnicodeDecodeError:
        skip(NOT_UTF8, name)
        return
    except json.JSONDecodeError:
        skip(BAD_JSON, name)
        return
    if not isinstance(record, dict):
        skip(BAD_JSON, name)
    elif not isinstance(record.get(text_field), str):
        skip(NO_FIELD, name)
    elif not record[text_field].strip():
        skip(EMPTY, name)
    else:
        yield Document(name, record[text_field])


class _ZstdError(Exception):
    """A zstd stream that is not zstd, or is cut short (zstandard's own error is raised as this one, so that
    catching it needs no import of zstandard)."""


def _zstd_lines(stream) -> Iterator[bytes]:
    """The decompressed lines of a zstd stream (each with its b"\n"), frame after frame, a chunk at a time.

    zstandard's stream_reader would be shorter, but it ends a frame that is cut short without a word (the lines
    before the cut come out and the rest is silently lost); a decompressobj says whether its frame ended (`eof`).
    """
    import zstandard  # here: a heavy import the CLI must not pay for text inputs

    decoder, mid_frame, pending = zstandard.ZstdDecompressor().decompressobj(), False, b""
    try:
        while chunk := stream.read(_ZSTD_CHUNK):
            while chunk:  # a file may hold several frames (pzstd, concatenated dumps): each needs a new decoder
                pending += decoder.decompress(chunk)
                mid_frame, chunk = not decoder.eof, decoder.unused_data if decoder.eof else b""
                if decoder.eof:
                    decoder = zstandard.ZstdDecompressor().decompressobj()
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
    except zstandard.ZstdError as e:
        raise _ZstdError(str(e)) from None
    if mid_frame:
        raise _ZstdError("the last frame is cut short")
    if pending:
        yield pending


def _parquet_documents(piece: Piece, text_field: str, skip) -> Iterator[Document]:
    """One document per row of the text column, read a row group at a time and handed out in batches, so memory
    holds one row group's column, not the file's; the rows before a damaged row group are kept."""
    import pyarrow as pa  # here: a heavy import the CLI must not pay for other inputs
    import pyarrow.parquet as pq

    f, row = piece.file, piece.first - 1
    try:
        with pq.ParquetFile(f.path) as parquet:
            column = parquet.schema_arrow.field(text_field) if text_field in parquet.schema_arrow.names else None
            if column is None or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                if piece.start == 0:  # the file's first piece speaks for the file
                    why = f"no column '{text_field}'" if column is None else f"'{text_field}' is {column.type}"
                    skip(NO_COLUMN if column is None else NOT_STRINGS, f"{f.name} ({why})")
                return
            stop = parquet.num_row_groups if piece.stop < 0 else piece.stop
            for group in range(piece.start, stop):  # one at a time: a batch may otherwise span row groups
                for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field]):
                    for text in batch.column(0).to_pylist():
                        row += 1
                        yield from _row_document(text, f"{f.name}:{row}", skip)
    except (pa.ArrowException, OSError):  # not Parquet, or damaged: the rows before the damage are kept
        skip(BAD_PARQUET, f"{f.name} (after row {row})" if row else f.name)


def _row_document(text: str | None, name: str, skip) -> Iterator[Document]:
    if text is None:
        skip(NULL_TEXT, name)
    elif not text.strip():
        skip(EMPTY, name)
    else:
        yield Document(name, text)


def _read_text(f: InputFile, skip) -> str | None:
    try:
        raw = f.path.read_bytes()
    except OSError:
        skip(UNREADABLE, f.name)
        return None
    if f.compression == GZIP:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):  # not gzip, or cut short: BadGzipFile is an OSError
            skip(BAD_GZIP, f.name)
            return None
    elif f.compression == ZSTD:
        try:
            raw = b"".join(_zstd_lines(io.BytesIO(raw)))
        except _ZstdError:
            skip(BAD_ZSTD, f.name)
            return None
    if b"\x00" in raw:  # valid UTF-8 can hold NUL, but text never does: this is a binary file
        skip(BINARY, f.name)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skip(NOT_UTF8, f.name)
        return None


def total_size(files: list[InputFile]) -> int:
    """Bytes on disk of all inputs (compressed size for gzip, zstd and Parquet): the progress bar's total."""
    return sum(os.path.getsize(f.path) for f in files if f.path.exists())
