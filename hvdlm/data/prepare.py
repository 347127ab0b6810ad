"""`hvdlm data prepare`: sources -> documents -> tokenizer -> token shards + meta.json, published atomically.

Everything is written into a temporary directory beside the output and renamed into place at the end, so an
interrupted or failed prepare leaves no half dataset, and concurrent preparers of the same inputs (one rank per
node on a shared file system) each publish a complete copy or find one already there. A dataset remembers a
fingerprint of its inputs (paths, sizes, modification times) and options: preparing again with nothing changed
does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hvdlm import __version__
from hvdlm.config import DataConfig, choices
from hvdlm.data.meta import (
    FORMAT_VERSION,
    SPLITS,
    damaged_shard,
    foreign_files,
    is_dataset_meta,
    meta_problem,
    read_meta,
)
from hvdlm.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, token_dtype
from hvdlm.data.sources import (
    END,
    LENIENT_REASONS,
    MIN_PART_CHARS,
    InputFile,
    SkipReport,
    fingerprint_inputs,
    read_documents,
    resolve_sources,
    total_size,
)
from hvdlm.data.tokenizer import (
    BPE_FILE,
    HF_TOKENIZER_CONFIG,
    ByteTokenizer,
    check_bpe_vocab,
    load_pretrained_tokenizer,
    train_bpe,
)
from hvdlm.errors import InputError
from hvdlm.fsutil import fsync_directory
from hvdlm.units import format_count

PROGRESS_EVERY_S = 5.0  # a phase that runs longer says how far it is this often
_ENCODE_BATCH_CHARS = 4 << 20  # documents are encoded in batches of about this much text (one call per batch)


@dataclass(frozen=True)
class PrepareOptions:
    # byte, bpe (trained here), or a directory holding a tokenizer.json (a transformers model's, used as it is)
    tokenizer: str = "byte"
    vocab_size: int = 4096  # BPE only: bytes + end-of-document + merges
    val_fraction: float = 0.05  # share of documents held out for validation (chosen by a hash of their names)
    text_field: str = "text"  # the field of a JSON Lines record (the column of a Parquet file) that holds the document
    strict: bool = False  # reject unusable inputs instead of skipping and counting them
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # a shard is closed once it holds this many tokens

    def check(self) -> None:
        words = choices(DataConfig, "tokenizer")
        if self.tokenizer not in words and not (Path(self.tokenizer) / BPE_FILE).is_file():
            raise InputError(
                f"--tokenizer '{self.tokenizer}' is neither {' nor '.join(words)} nor a directory holding a "
                f"{BPE_FILE} (as transformers' save_pretrained writes it). Name one of those."
            )
        if self.tokenizer == "bpe":
            check_bpe_vocab(self.vocab_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"the validation fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.shard_tokens <= 0:
            raise InputError(f"the shard size must be positive, got {self.shard_tokens} tokens.")

    def shaping(self) -> dict:
        """The options that change the output (strict does not: it only decides whether to stop)."""
        shape = {k: v for k, v in asdict(self).items() if k != "strict"}
        if self.tokenizer != "bpe":
            shape.pop("vocab_size")
        if self.tokenizer not in choices(DataConfig, "tokenizer"):
            # A pretrained tokenizer is its files: a changed one prepares the data again, a moved one does not.
            shape["tokenizer"] = _pretrained_files_hash(Path(self.tokenizer))
        return shape


def _pretrained_files_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for name in (BPE_FILE, HF_TOKENIZER_CONFIG):
        if (directory / name).is_file():
            h.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return "pretrained:sha256:" + h.hexdigest()


@dataclass
class PrepareReport:
    path: Path
    up_to_date: bool  # nothing was done: the dataset was already prepared from these inputs
    documents: dict[str, int]
    tokens: dict[str, int]
    bytes: int  # UTF-8 bytes of the documents
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    tokenizer: str = ""
    dtype: str = ""
    bpe_seconds: float = 0.0
    vocab_size: int = 0  # the tokenizer's
    requested_vocab: int = 0  # --vocab-size (BPE): a small corpus runs out of merges before it
    cut: str | None = None  # how a corpus of one text file was cut into documents

    def warnings(self) -> list[str]:
        if self.vocab_size < self.requested_vocab:
            return [
                f"the BPE vocabulary has {self.vocab_size:,} tokens, fewer than the {self.requested_vocab:,} asked "
                "for: the corpus has no more pairs to merge. Models trained on it use the smaller vocabulary "
                "(or model.vocab_size where that is larger)."
            ]
        return []

    def summary(self) -> str:
        if self.up_to_date:
            return (
                f"{self.path} is up to date (its inputs and options are unchanged): nothing to do. "
                f"{sum(self.documents.values()):,} documents, {sum(self.tokens.values()):,} tokens."
            ) + "".join(f"\n  warning    {w}" for w in self.warnings())
        docs, tokens, secs = sum(self.documents.values()), sum(self.tokens.values()), max(self.seconds, 1e-9)
        skipped = ", ".join(f"{n:,} {reason}" for reason, n in self.skipped.items()) or "none"
        lines = [
            f"prepared {self.path} in {self.seconds:.1f} s",
            f"  documents  {docs:,} (train {self.documents['train']:,}, val {self.documents['val']:,})",
            *([f"  cut        {self.cut}"] if self.cut else []),
            f"  skipped    {skipped}",
            f"  bytes      {self.bytes:,} ({format_count(self.bytes)}B, {format_count(self.bytes / secs)}B/s)",
            f"  tokens     {tokens:,} (train {self.tokens['train']:,}, val {self.tokens['val']:,}), "
            f"{self.dtype} shards",
            f"  speed      {tokens / secs:,.0f} tokens/s, {self.bytes / max(tokens, 1):.2f} bytes per token",
            f"  tokenizer  {self.tokenizer}" + (f" (trained in {self.bpe_seconds:.1f} s)" if self.bpe_seconds else ""),
            *(f"  warning    {w}" for w in self.warnings()),
        ]
        return "\n".join(lines)


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable document-level split: the same document lands in the same split on every machine."""
    return _split_hash(name) < val_fraction * 1_000_000


def _split_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 1_000_000


def prepare(
    sources: list[str],
    out: str | Path,
    options: PrepareOptions = PrepareOptions(),
    globs: list[str] | None = None,
    progress: bool = False,
    log=print,
) -> PrepareReport:
    """Prepare a dataset directory from the sources (default: the standard-library corpus)."""
    options.check()
    out = Path(out)
    if out.name in ("", ".", ".."):  # "." or "a/..": the temporary directory goes beside the real name
        out = out.resolve()
    if not out.name:
        raise InputError(f"--out '{out}' is the root directory. Pass a path for a new dataset directory.")
    # A directory source may contain the output (or its temporary siblings): never read a dataset as text.
    files = [f for f in resolve_sources(sources, globs) if not _inside(f.path, out.parent, out.name)]
    fingerprint = fingerprint_of(files, options)
    existing = read_meta(out)
    if _up_to_date(out, existing, fingerprint, options):
        return _report_from_meta(out, existing)
    _check_replaceable(out, existing)
    staging = _make_staging(out)
    try:
        report = _build(_Inputs(files, sources, fingerprint), staging, options, progress, log)
        _publish(staging, out, fingerprint)
    except OSError as e:  # reading the sources reports its own errors: this is writing (a full or read-only disk)
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(_write_error(out, e, existing)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.path = out
    return report


def _inside(path: Path, parent: Path, name: str) -> bool:
    """Whether path lies in parent/name or in one of prepare's temporary directories beside it."""
    try:
        first = path.resolve().relative_to(parent.resolve()).parts[0]
    except (ValueError, IndexError):
        return False
    return first == name or first.startswith((f".{name}.tmp-", f".{name}.old-"))


def fingerprint_of(files: list[InputFile], options: PrepareOptions) -> str:
    """Changes when an input file or an output-shaping option changes."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options.shaping()}, sort_keys=True).encode())
    for line in fingerprint_inputs(files):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def _intact_copy(out: Path, existing: dict | None, fingerprint: str) -> bool:
    """Whether the dataset at `out` is what these inputs and options give, and undamaged since."""
    if not is_dataset_meta(existing) or existing["inputs_fingerprint"] != fingerprint:
        return False
    if existing["format_version"] != FORMAT_VERSION:
        return False
    return not (meta_problem(existing) or damaged_shard(out, existing))


def _up_to_date(out: Path, existing: dict | None, fingerprint: str, options: PrepareOptions) -> bool:
    if not _intact_copy(out, existing, fingerprint):
        return False
    # Strict mode does not change the output, only whether unusable inputs stop the run: a dataset prepared
    # without it that skipped such inputs is prepared again, which stops at the first of them.
    skipped = existing.get("skipped")
    skipped = skipped if isinstance(skipped, dict) else {}
    rejected = {reason for reason, n in skipped.items() if n and reason not in LENIENT_REASONS}
    return not (options.strict and rejected)


def _check_replaceable(out: Path, existing: dict | None) -> None:
    """Only an empty directory or an earlier dataset of nothing but prepare's files may be replaced: never the
    user's own files, which a meta.json of theirs, or their notes put into a dataset directory, must not cost."""
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"output '{out}' is a file. Pass a directory path for the dataset with --out.")
        if not out.is_dir():
            return
        if not is_dataset_meta(existing):
            if any(out.iterdir()):
                raise InputError(
                    f"output directory '{out}' is not empty and holds no dataset (no meta.json written by `hvdlm "
                    "data prepare`). Pass a new or empty directory with --out; prepare never deletes files it did "
                    "not write."
                )
            return
        foreign = foreign_files(out)
    except OSError as e:
        raise InputError(f"cannot read the output directory '{out}': {e.strerror or e}. Pass another --out.") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"output directory '{out}' holds a dataset and files prepare did not write ({shown}). Preparing again "
            "replaces the whole directory and never deletes files it did not write: move them out of it, or pass "
            "another --out."
        )


def _write_error(out: Path, e: OSError, existing: dict | None) -> str:
    """One line for a failed write: the path, the cause, that nothing changed, and the fix."""
    kept = "the dataset there is unchanged" if is_dataset_meta(existing) else "nothing was left behind"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free space on that disk, or pass --out a directory on another one"
    else:
        fix = "Pass --out a directory you can write to"
    return f"cannot write the dataset '{out}': {e.strerror or e}; {kept}. {fix}."


def _make_staging(out: Path) -> Path:
    """The temporary directory beside the output that the dataset is written into."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        # Name the culprit: a file where a parent directory should be reads as "File exists" otherwise.
        blocker = next((p for p in out.parents if p.exists()), None)
        why = f"'{blocker}' is a file, not a directory" if blocker and not blocker.is_dir() else (e.strerror or str(e))
        raise InputError(
            f"cannot create the dataset directory '{out}': {why}. Pass --out a path in a directory you can write to."
        ) from None


@dataclass
class _Inputs:
    files: list[InputFile]  # the documents' files, resolved
    sources: list[str]  # as the user named them, for meta.json
    fingerprint: str  # of the files and the options (fingerprint_of): an unchanged one needs no new prepare


def _build(inputs: _Inputs, staging: Path, options: PrepareOptions, progress: bool, log) -> PrepareReport:
    """The dataset in `staging`: the tokenizer, the token shards of both splits, meta.json (last)."""
    start = time.perf_counter()
    tokenizer = _make_tokenizer(inputs.files, options, log)
    bpe_seconds = time.perf_counter() - start if options.tokenizer == "bpe" else 0.0
    result = _tokenize(inputs.files, tokenizer, staging, options, progress, force={})
    force = _check_split(result, len(inputs.files))
    if force:
        for split in SPLITS:
            for path in staging.glob(f"{split}-*"):
                path.unlink()
        result = _tokenize(inputs.files, tokenizer, staging, options, progress, force=force)
    meta = _write_meta(staging, tokenizer, result, inputs, options)
    report = _report_from_meta(staging, meta, up_to_date=False)
    report.seconds, report.bpe_seconds = time.perf_counter() - start, bpe_seconds
    return report


def _make_tokenizer(files: list[InputFile], options: PrepareOptions, log):
    """The byte tokenizer, a pretrained one, or a BPE tokenizer trained here on the training split's documents."""
    if options.tokenizer == "byte":
        return ByteTokenizer()
    if options.tokenizer != "bpe":
        return load_pretrained_tokenizer(options.tokenizer)
    log(f"training a {options.vocab_size:,}-token BPE tokenizer on the training documents ...")
    skipped = SkipReport()
    texts = (
        d.text
        for _, d in read_documents(files, options.text_field, options.strict, skipped)
        if not is_validation(d.name, options.val_fraction)
    )
    return train_bpe(_reporting_progress(texts, log), options.vocab_size, show_progress=sys.stderr.isatty())


def _reporting_progress(texts: Iterable[str], log, every_s: float = PROGRESS_EVERY_S) -> Iterator[str]:
    """The texts, passed on as they are, with a log line every `every_s` seconds of how much has been read (the
    trainer counts as it reads; a large corpus takes minutes)."""
    read, last = 0, time.monotonic()
    for text in texts:
        read += len(text)
        if time.monotonic() - last >= every_s:
            log(f"  ... {format_count(read)} characters of training text read")
            last = time.monotonic()
        yield text


def _check_split(result: _Tokenized, input_files: int) -> dict[str, str]:
    """Refuse sources with fewer than two documents. Returns the documents to tokenize again into the other
    split ({}: none) when one split came out empty."""
    docs = sum(w.documents for w in result.writers.values())
    if docs == 0:
        what = f" Skipped: {result.skipped.describe()}." if result.skipped.total else ""
        raise InputError(
            f"the sources hold no usable documents ({input_files} input files).{what} Check the paths, the --glob "
            "patterns and --text-field, or pass other sources."
        )
    if docs == 1:
        raise InputError(
            "the sources hold a single document, and the train / validation split is by document (a corpus of one "
            f"text file is cut into documents when it holds at least {2 * MIN_PART_CHARS} characters). Pass more "
            "text, or at least two documents."
        )
    if result.writers["val"].documents and result.writers["train"].documents:
        return {}
    # A small corpus can hash every document into one split: move the one nearest the threshold across.
    return {result.lowest: "val"} if not result.writers["val"].documents else {result.highest: "train"}


def _describe_cut(files: list[InputFile], cuts: Counter) -> str | None:
    """What was done to a corpus of one text file, for the report (None: nothing; every file is a document)."""
    parts = sum(cuts.values())
    if parts < 2:
        return None
    places = ", ".join(f"{n} at {where}" for where, n in cuts.items() if where != END)
    return (
        f"the corpus is one text file: {files[0].name} was cut into {parts} documents ({places}), as the train / "
        "validation split is by document"
    )


def _write_meta(staging: Path, tokenizer, result: _Tokenized, inputs: _Inputs, options: PrepareOptions) -> dict:
    """Close the shards, save the tokenizer and write meta.json, which makes `staging` a complete dataset."""
    shards = {split: w.close() for split, w in result.writers.items()}
    tokenizer.save(staging)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.describe(),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {
            split: {"documents": w.documents, "tokens": w.tokens, "shards": shards[split]}
            for split, w in result.writers.items()
        },
        "bytes": result.bytes,
        "skipped": dict(result.skipped.counts),
        "sources": list(inputs.sources) or ["stdlib"],
        "input_files": len(inputs.files),
        "cut": _describe_cut(inputs.files, result.cuts),
        "options": options.shaping(),
        "content_hash": "sha256:" + result.content_hash,
        "inputs_fingerprint": inputs.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hvdlm_version": __version__,
    }
    # mkdtemp made the directory private; a dataset is for every user and rank that may read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    # meta.json last: a directory with a meta.json is a complete dataset.
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class _Tokenized:
    writers: dict[str, ShardWriter]
    skipped: SkipReport
    bytes: int
    content_hash: str
    lowest: str  # the document name with the lowest split hash (the first to move into validation)
    highest: str
    cuts: Counter = field(default_factory=Counter)  # a single text file cut into documents: its parts by where they end


def _tokenize(
    files: list[InputFile], tokenizer, staging: Path, options: PrepareOptions, progress: bool, force: dict[str, str]
) -> _Tokenized:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(staging, split, dtype, options.shard_tokens) for split in SPLITS}
    skipped, content, cuts = SkipReport(), hashlib.sha256(), Counter()
    n_bytes, lowest, highest = 0, (1 << 64, ""), (-1, "")
    batch: list[tuple[str, str]] = []  # (split, text)
    batch_chars = 0

    def flush() -> None:
        nonlocal batch, batch_chars
        for (split, _), ids in zip(batch, tokenizer.encode_many([text for _, text in batch])):
            writers[split].add(ids, tokenizer.separator)
        batch, batch_chars = [], 0

    bar = tqdm(total=total_size(files), unit="B", unit_scale=True, desc="tokenize", disable=not progress, ncols=100)
    current = None
    for f, doc in read_documents(files, options.text_field, options.strict, skipped):
        if f is not current:
            if current is not None:
                bar.update(os.path.getsize(current.path))
            current = f
        if doc.cut_at:
            cuts[doc.cut_at] += 1
        h = _split_hash(doc.name)
        lowest, highest = min(lowest, (h, doc.name)), max(highest, (h, doc.name))
        split = force.get(doc.name) or ("val" if h < options.val_fraction * 1_000_000 else "train")
        data = doc.text.encode("utf-8")
        content.update(doc.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        n_bytes += len(data)
        batch.append((split, doc.text))
        batch_chars += len(doc.text)
        if batch_chars >= _ENCODE_BATCH_CHARS:
            flush()
    flush()
    bar.update(bar.total - bar.n)
    bar.close()
    return _Tokenized(writers, skipped, n_bytes, content.hexdigest(), lowest[1], highest[1], cuts)


def _publish(staging: Path, out: Path, fingerprint: str) -> None:
    """Rename the finished dataset into place; an earlier dataset there is replaced, an identical one kept."""
    fsync_directory(staging, files=True)  # on the disk in full before it gets its name
    try:
        os.rename(staging, out)  # atomic; succeeds when `out` is absent or an empty directory
    except OSError:
        pass
    else:
        fsync_directory(out.parent)  # the rename survives a crash
        return
    existing = read_meta(out)
    if _intact_copy(out, existing, fingerprint):
        shutil.rmtree(staging)  # a concurrent preparer of the same inputs published first: keep its copy
        return
    _check_replaceable(out, existing)  # again: what is there now may not be what was there at the start
    # Swap: move the old dataset aside, the new one in, then delete the old one. A reader that opens `out`
    # between the two renames finds nothing and says so; it never sees a mix of the two.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old / out.name, out)  # the old dataset goes back where it was
        os.rmdir(old)
        raise
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)  # the new dataset is in place; a leftover is only wasted space


def _report_from_meta(path: Path, meta: dict, up_to_date: bool = True) -> PrepareReport:
    splits, tokenizer = meta["splits"], meta["tokenizer"]
    shaping = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    requested = shaping.get("vocab_size", 0) if tokenizer["type"] == "bpe" else 0
    return PrepareReport(
        path=path,
        up_to_date=up_to_date,
        documents={s: splits[s]["documents"] for s in SPLITS},
        tokens={s: splits[s]["tokens"] for s in SPLITS},
        bytes=meta["bytes"],
        seconds=0.0,
        skipped=meta.get("skipped", {}),
        tokenizer=f"{tokenizer['type']} (vocab {tokenizer['vocab_size']:,})",
        dtype=meta["dtype"],
        vocab_size=tokenizer["vocab_size"],
        requested_vocab=requested if isinstance(requested, int) else 0,
        cut=meta.get("cut") if isinstance(meta.get("cut"), str) else None,
    )
