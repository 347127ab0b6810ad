"""Where documents come from: the embedded standard-library corpus, text files, directories, JSON Lines, gzip.

A source argument is resolved up front into a list of input files (a missing path is an error before anything is
read or written). Reading then yields one document per text file or per JSON Lines record, except that a corpus of
one text file (a book, a dump) is cut into documents (`cut_text`): the train / validation split is by document,
and one document cannot be split. Input that cannot be
used (not UTF-8, binary, a broken gzip stream, a JSON Lines record without the text field) is skipped and counted
in a `SkipReport`, or, in strict mode, stops the run with an `InputError` that names the file; reading itself
never aborts half-way with a traceback.
"""

from __future__ import annotations

import gzip
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
_PREPARE_TEMP = re.compile(r"\..+\.(tmp|old)-.+")  # prepare's temporary directories (see prepare.py)


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # stable document name: relative to its source argument, so the split is the same on every machine
    jsonl: bool  # one document per line, the text in a JSON field
    gzip: bool  # gzip-compressed (by the .gz suffix)


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
                f"Pass text files, directories (with --glob patterns), JSON Lines files, or '{STDLIB}'."
            )
        else:
            raise InputError(
                f"source '{spec}' does not exist. Pass text files, directories (with --glob patterns), JSON Lines "
                f"files, or '{STDLIB}' for the standard-library corpus."
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
    compressed = path.name.endswith(".gz")
    bare = path.name[:-3] if compressed else path.name
    return InputFile(path=path, name=name, jsonl=bare.endswith(JSONL_SUFFIXES), gzip=compressed)


def fingerprint_inputs(files: list[InputFile]) -> list[str]:
    """One line per input (absolute path, size, modification time): changes when an input changes."""
    lines = []
    for f in files:
        try:
            st = f.path.stat()
            lines.append(f"{f.path.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:  # gone since it was listed: reading will count it as unreadable
            lines.append(f"{f.path}|missing")
    if any(f.name.startswith(STDLIB + "/") for f in files):
        lines.append(f"python {sys.version}")
    return lines


def read_documents(
    files: list[InputFile], text_field: str, strict: bool, skipped: SkipReport
) -> Iterator[tuple[InputFile, Document]]:
    """Every usable document of the inputs, in order; the unusable ones are counted in `skipped`. A single text
    file (the whole corpus) is cut into documents named FILE#N (`cut_text`)."""

    def skip(reason: str, name: str) -> None:
        if strict and reason not in LENIENT_REASONS:
            raise InputError(
                f"input '{name}' was rejected: {reason} (--strict). Fix it or remove it from the sources, or leave "
                "out --strict to skip and count such inputs instead."
            )
        skipped.add(reason, name)

    for f in files:
        if f.jsonl:
            yield from ((f, doc) for doc in _jsonl_documents(f, text_field, skip))
            continue
        text = _read_text(f, skip)
        if text is None:
            continue
        if not text.strip():
            skip(EMPTY, f.name)
        elif len(files) == 1:  # the whole corpus: documents are what the train / validation split divides
            yield from ((f, Document(f"{f.name}#{i}", part, where)) for i, (part, where) in enumerate(cut_text(text)))
        else:
            yield f, Document(f.name, text)


def _jsonl_documents(f: InputFile, text_field: str, skip) -> Iterator[Document]:
    """One document per record, streamed line by line: JSON Lines files can be far larger than memory."""
    lineno = 0
    try:
        with (gzip.open if f.gzip else open)(f.path, "rb") as stream:
            for lineno, raw in enumerate(stream, start=1):  # split on b"\n" only: JSON strings may hold U+2028
                if not raw.strip():
                    continue
                name = f"{f.name}:{lineno}"
                try:
                    # utf-8-sig on the first line: editors on Windows start a file with a byte order mark.
                    record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError:
                    skip(NOT_UTF8, name)
                    continue
                except json.JSONDecodeError:
                    skip(BAD_JSON, name)
                    continue
                if not isinstance(record, dict):
                    skip(BAD_JSON, name)
                elif not isinstance(record.get(text_field), str):
                    skip(NO_FIELD, name)
                elif not record[text_field].strip():
                    skip(EMPTY, name)
                else:
                    yield Document(name, record[text_field])
    except (EOFError, zlib.error, gzip.BadGzipFile):  # cut short or not gzip: the records before it are kept
        skip(BAD_GZIP, f"{f.name} (after line {lineno})")
    except OSError:
        skip(UNREADABLE, f.name)


def _read_text(f: InputFile, skip) -> str | None:
    try:
        raw = f.path.read_bytes()
    except OSError:
        skip(UNREADABLE, f.name)
        return None
    if f.gzip:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):  # not gzip, or cut short: BadGzipFile is an OSError
            skip(BAD_GZIP, f.name)
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
    """Bytes on disk of all inputs (compressed size for gzip): the progress bar's total."""
    return sum(os.path.getsize(f.path) for f in files if f.path.exists())
