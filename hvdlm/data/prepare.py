"""`hvdlm data prepare`: sources -> documents -> tokenizer -> token shards + meta.json, published atomically.

Everything is written into a temporary directory beside the output and renamed into place at the end, so an
interrupted or failed prepare leaves no half dataset, and concurrent preparers of the same inputs (one rank per
node on a shared file system) each publish a complete copy or find one already there. A dataset remembers a
fingerprint of its inputs (paths, sizes, modification times) and options: preparing again with nothing changed
does nothing.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hvdlm import __version__
from hvdlm.config import DataConfig, choices
from hvdlm.data.assemble import Merged, assemble_shards, content_hash, merge_records
from hvdlm.data.meta import (
    FORMAT_VERSION,
    SPLITS,
    damaged_shard,
    foreign_files,
    is_dataset_meta,
    meta_problem,
    read_meta,
)
from hvdlm.data.progress import Progress
from hvdlm.data.ranks import World, my_units
from hvdlm.data.shards import DEFAULT_SHARD_TOKENS, token_dtype
from hvdlm.data.sources import (
    END,
    LENIENT_REASONS,
    MIN_PART_CHARS,
    InputFile,
    Piece,
    SkipReport,
    fingerprint_inputs,
    read_piece,
    resolve_sources,
    total_size,
)
from hvdlm.data.spread import encode_units, one_thread, tokenizer_from_recipe, tokenizer_recipe
from hvdlm.data.tokenizer import (
    BPE_FILE,
    HF_TOKENIZER_CONFIG,
    BpeTokenizer,
    ByteTokenizer,
    check_bpe_vocab,
    load_pretrained_tokenizer,
    train_bpe,
)
from hvdlm.data.units import UnitJob, encode_unit, finished_record, plan_units, split_of
from hvdlm.errors import InputError
from hvdlm.fsutil import fsync_directory
from hvdlm.units import format_count

PROGRESS_EVERY_S = 5.0  # a phase that runs longer says how far it is this often
# BPE learns from at most about this much of the corpus (bytes on disk; see _bpe_sample): training is serial and
# its time grows with the text, while a sample of a few hundred megabytes already gives the frequent merges.
BPE_SAMPLE_BYTES = 512 << 20
DEFAULT_UNIT_BYTES = 64_000_000  # a JSON Lines or Parquet file is cut into work units of about this much input


@dataclass(frozen=True)
class PrepareOptions:
    # byte, bpe (trained here), or a directory holding a tokenizer.json (a transformers model's, used as it is)
    tokenizer: str = "byte"
    vocab_size: int = 4096  # BPE only: bytes + end-of-document + merges
    val_fraction: float = 0.05  # share of documents held out for validation (chosen by a hash of their names)
    text_field: str = "text"  # the field of a JSON Lines record (the column of a Parquet file) that holds the document
    strict: bool = False  # reject unusable inputs instead of skipping and counting them
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # a shard is closed once it holds this many tokens
    unit_bytes: int = DEFAULT_UNIT_BYTES  # input per work unit (how the work is cut, not what comes out)

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
        if self.unit_bytes <= 0:
            raise InputError(f"the work unit size must be positive, got {self.unit_bytes} bytes.")

    def shaping(self) -> dict:
        """The options that change the output (strict does not: it only decides whether to stop)."""
        shape = {k: v for k, v in asdict(self).items() if k not in ("strict", "unit_bytes")}
        if self.tokenizer != "bpe":
            shape.pop("vocab_size")
        if self.tokenizer not in choices(DataConfig, "tokenizer"):
            # A pretrained tokenizer is its files: a changed one prepares the data again, a moved one does not.
            shape["tokenizer"] = _pretrained_files_hash(Path(self.tokenizer))
        return shape


@dataclass(frozen=True)
class Spread:
    """Where the encoding runs: `workers` processes on each rank of `world` (one rank: this process alone)."""

    workers: int = 1
    world: World = field(default_factory=World)
    # Each worker encodes on one thread (one core). Off: a lone worker lets the BPE encoder use its own threads,
    # as `hvdlm train` does for the built-in corpus, where nothing else runs beside it.
    one_thread: bool = True

    def check(self) -> None:
        if self.workers < 1:
            raise InputError(
                f"--workers must be 1 or more (the processes that encode at once), got {self.workers}. Leave it out "
                "for one per core."
            )


ALONE = Spread(one_thread=False)  # one process, no MPI: what `hvdlm train` uses for the built-in corpus


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
    spread: str = ""  # how the encoding was shared out (ranks, workers, units)

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
            *([f"  spread     {self.spread}"] if self.spread else []),
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
    return split_of(name, val_fraction, {})[1] == "val"


def prepare(
    sources: list[str],
    out: str | Path,
    options: PrepareOptions = PrepareOptions(),
    globs: list[str] | None = None,
    progress: bool = False,
    log=print,
    spread: Spread = ALONE,
) -> PrepareReport:
    """Prepare a dataset directory from the sources (default: the standard-library corpus), encoding its units on
    `spread.workers` processes of each of `spread.world`'s ranks (every rank calls prepare with the same arguments)."""
    options.check()
    spread.check()
    world = spread.world
    out = _output_path(Path(out))
    # A directory source may contain the output (or its temporary siblings): never read a dataset as text.
    files = [f for f in resolve_sources(sources, globs) if not _inside(f.path, out.parent, out.name)]
    fingerprint = fingerprint_of(files, options)
    _check_same_inputs(world, fingerprint, len(files))
    existing = read_meta(out)
    done = world.on_root(lambda: _up_to_date(out, existing, fingerprint, options))
    if done:
        return _report_from_meta(out, existing)
    world.on_root(lambda: _check_replaceable(out, existing))
    work = world.on_root(lambda: _make_work_dir(out, fingerprint))
    _check_shared(world, work)
    try:
        report = _build(_Inputs(files, sources, fingerprint), work, out, options, _Run(spread, progress, log))
    except OSError as e:  # reading the sources reports its own errors: this is writing (a full or read-only disk)
        if world.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        if _intact_copy(out, read_meta(out), fingerprint):  # a concurrent preparer of the same inputs finished first
            return _report_from_meta(out, read_meta(out))
        raise InputError(_write_error(out, e, existing)) from None
    except InputError:  # bad input: nothing is kept (an interrupted run keeps its units, for a rerun to reuse)
        if world.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _check_shared(world: World, work: Path) -> None:
    """Every rank must see the work directory rank 0 made: the ranks write their units into it."""
    blind = [rank for rank, sees in enumerate(world.allgather(work.is_dir())) if not sees]
    if blind:
        if world.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise InputError(
            f"rank(s) {', '.join(map(str, blind[:8]))} cannot see the directory '{work.parent}' that rank 0 writes "
            "the dataset into: the ranks write their shares there. Pass --out a directory on a file system every "
            "node sees (and the sources on one too)."
        )


def _output_path(out: Path) -> Path:
    if out.name in ("", ".", ".."):  # "." or "a/..": the temporary directory goes beside the real name
        out = out.resolve()
    if not out.name:
        raise InputError(f"--out '{out}' is the root directory. Pass a path for a new dataset directory.")
    return out


def _check_same_inputs(world: World, fingerprint: str, files: int) -> None:
    """The ranks of an MPI preparation must see the same input files (paths, sizes, times) and options."""
    seen = world.allgather(fingerprint)
    differ = [rank for rank, theirs in enumerate(seen) if theirs != seen[0]]
    if differ:
        shown = ", ".join(map(str, differ[:8])) + (" ..." if len(differ) > 8 else "")
        raise InputError(
            f"the ranks of this preparation see different inputs: rank(s) {shown} list other files (or sizes, "
            f"modification times or options) than rank 0, which lists {files} input file(s). Put the sources on a "
            "file system every node sees, give every rank the same arguments, and run it again."
        )


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
    """The temporary directory beside the output that the dataset is written into, named by this host and process
    (`_remove_dead_staging`)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    except OSError as e:
        # Name the culprit: a file where a parent directory should be reads as "File exists" otherwise.
        blocker = next((p for p in out.parents if p.exists()), None)
        why = f"'{blocker}' is a file, not a directory" if blocker and not blocker.is_dir() else (e.strerror or str(e))
        raise InputError(
            f"cannot create the dataset directory '{out}': {why}. Pass --out a path in a directory you can write to."
        ) from None


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.tmp-stage-{socket.gethostname()}-"


def _remove_dead_staging(out: Path) -> None:
    """The staging directories of preparations into this output killed on this host while they assembled it (their
    process is gone): as large as the dataset, and never to be published. Another host's, or a live process's (a
    concurrent preparer), stay."""
    prefix = _staging_prefix(out)
    for staging in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = staging.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)) and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def _make_work_dir(out: Path, fingerprint: str) -> Path:
    """The directory beside the output where the units are encoded: named by the inputs' fingerprint, so a rerun
    of an interrupted preparation of the same inputs finds the units it finished (and no other run's)."""
    work = out.parent / f".{out.name}.tmp-work-{fingerprint[:16]}"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:
        _make_staging(out)  # says why the directory cannot be made
        raise
    return work


@dataclass
class _Inputs:
    files: list[InputFile]  # the documents' files, resolved
    sources: list[str]  # as the user named them, for meta.json
    fingerprint: str  # of the files and the options (fingerprint_of): an unchanged one needs no new prepare


@dataclass
class _Run:
    spread: Spread
    progress: bool  # a bar on a terminal, else log lines
    log: Any

    def say(self, message: str) -> None:
        """A log line from rank 0 (the ranks do the same work in step: one of them speaks)."""
        if self.spread.world.rank == 0:
            self.log(message)


def _build(inputs: _Inputs, work: Path, out: Path, options: PrepareOptions, run: _Run) -> PrepareReport:
    """The tokenizer (trained once), the units encoded over the workers and ranks, then on rank 0 the dataset
    assembled from them and published."""
    start = time.perf_counter()
    world = run.spread.world
    tokenizer = _shared_tokenizer(inputs.files, work, options, run)
    bpe_seconds = time.perf_counter() - start if options.tokenizer == "bpe" else 0.0
    units = world.on_root(lambda: plan_units(inputs.files, options.unit_bytes))
    tokenizer_id = _tokenizer_id(tokenizer)
    jobs = [
        UnitJob(
            unit,
            str(work),
            options.text_field,
            options.strict,
            options.val_fraction,
            len(inputs.files) == 1,
            tokenizer_id,
            token_dtype(tokenizer.vocab_size).name,
            {},
        )
        for unit in units
    ]
    mine = my_units([u.size for u in units], world)
    _encode_share([jobs[i] for i in mine], tokenizer, run, out)
    world.barrier()
    report = world.on_root(lambda: _finish(inputs, work, out, jobs, tokenizer, options, run))
    report.seconds, report.bpe_seconds = time.perf_counter() - start, bpe_seconds
    report.spread = f"{world.size} rank(s) x {run.spread.workers} worker(s), {len(units)} work unit(s)"
    return report


def _tokenizer_id(tokenizer) -> str:
    """Names the tokenizer in the units' records: units encoded with another one are not reused."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    return "sha256:" + hashlib.sha256(tokenizer.to_json().encode()).hexdigest()


def _encode_share(jobs: list[UnitJob], tokenizer, run: _Run, out: Path) -> None:
    """Encode this rank's units that no earlier run finished; bad input or a failed write anywhere stops every
    rank (a failed write said as for the dataset `out`: its units are then removed, the old dataset untouched)."""
    world = run.spread.world
    todo = [job for job in jobs if finished_record(job) is None]
    reused = world.allgather(len(jobs) - len(todo))
    if sum(reused):
        run.say(f"resuming: {sum(reused)} unit(s) encoded by an interrupted preparation are reused")
    quiet = world.rank != 0
    size = sum(job.unit.size for job in todo)
    progress = Progress(
        size,
        len(todo),
        run.progress and not quiet,
        (lambda m: None) if quiet else run.log,
        label="encode" if world.size == 1 else f"encode (rank 0 of {world.size})",
    )
    try:
        _, error = encode_units(todo, tokenizer, run.spread.workers, progress, run.spread.one_thread)
    except OSError as e:  # a full disk: every rank must hear of it, or the others wait for this one forever
        error = (-1, _write_error(out, e, read_meta(out)))
    progress.close(finished=error is None)
    errors = [e for e in world.allgather(error) if e is not None]
    if errors:
        raise InputError(min(errors)[1])


def _finish(inputs: _Inputs, work: Path, out: Path, jobs: list[UnitJob], tokenizer, options, run: _Run):
    """Rank 0: merge the units' records, mend an empty split, assemble the shards and meta.json, publish."""
    records = [finished_record(job) for job in jobs]
    if any(r is None for r in records):  # removed under us: a concurrent preparer published and cleaned up
        raise FileNotFoundError(errno.ENOENT, "a unit of the preparation disappeared", str(work))
    merged = merge_records(records)
    moved = _check_split(merged, len(inputs.files))
    if moved:  # a small corpus hashed every document into one split: that unit again, with one document moved
        index, force = moved
        with one_thread():
            records[index] = encode_unit(replace(jobs[index], force=force), tokenizer)
        merged = merge_records(records)
    _remove_dead_staging(out)  # a killed assembly's copy, before this one writes another
    staging = _make_staging(out)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        shards = assemble_shards(work, len(jobs), staging, dtype, options.shard_tokens, len(tokenizer.separator))
        done = _Assembled(merged, shards, content_hash(work, len(jobs)))
        meta = _write_meta(staging, tokenizer, done, inputs, options)
        _publish(staging, out, inputs.fingerprint)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    _remove_stale_work(out)
    return _report_from_meta(out, meta, up_to_date=False)


def _remove_stale_work(out: Path) -> None:
    """The work directories of interrupted preparations of other inputs into this output: the dataset now there
    replaced what they were for, and they can hold as much as the dataset."""
    prefix = f".{out.name}.tmp-work-"
    for stale in out.parent.iterdir():
        if stale.name.startswith(prefix) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _shared_tokenizer(files: list[InputFile], work: Path, options: PrepareOptions, run: _Run):
    """The byte or pretrained tokenizer (every rank makes its own), or the BPE one: trained once, on rank 0, and
    handed to the other ranks; kept in the work directory, so a rerun of an interrupted preparation reuses it."""
    if options.tokenizer == "byte":
        return ByteTokenizer()
    if options.tokenizer != "bpe":
        return load_pretrained_tokenizer(options.tokenizer)
    recipe = run.spread.world.on_root(lambda: tokenizer_recipe(_trained_bpe(files, work, options, run.log)))
    return tokenizer_from_recipe(recipe)


def _trained_bpe(files: list[InputFile], work: Path, options: PrepareOptions, log):
    saved = work / BPE_FILE
    if saved.is_file():
        from tokenizers import Tokenizer

        log("reusing the BPE tokenizer trained by an interrupted preparation of these inputs")
        return BpeTokenizer(Tokenizer.from_file(str(saved)))
    tokenizer = _make_tokenizer(files, options, log)
    temp = work / f"{BPE_FILE}.part-{os.getpid()}"
    temp.write_text(tokenizer.to_json())
    os.replace(temp, saved)
    return tokenizer


def _make_tokenizer(files: list[InputFile], options: PrepareOptions, log):
    """A BPE tokenizer trained here on a deterministic sample of the training split's documents."""
    log(f"training a {options.vocab_size:,}-token BPE tokenizer on the training documents ...")
    texts = _reporting_progress(_bpe_sample(files, options), log)
    return train_bpe(texts, options.vocab_size, show_progress=sys.stderr.isatty())


def _bpe_sample(files: list[InputFile], options: PrepareOptions) -> Iterator[str]:
    """The training documents BPE learns from: all of them for a corpus up to BPE_SAMPLE_BYTES, else from every
    file its share of that much (by its size), read from its start: a sample of the whole corpus, the same on
    every machine, that costs a bounded time however large the corpus is."""
    total = total_size(files)
    skipped = SkipReport()
    for f in files:
        budget = BPE_SAMPLE_BYTES * _file_size(f) / total if total > BPE_SAMPLE_BYTES else float("inf")
        taken = 0
        for doc in read_piece(Piece(f), options.text_field, options.strict, skipped, whole_corpus=len(files) == 1):
            if taken >= budget:
                break
            if not is_validation(doc.name, options.val_fraction):
                taken += len(doc.text)
                yield doc.text


def _file_size(f: InputFile) -> int:
    try:
        return f.path.stat().st_size
    except OSError:
        return 0


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


def _check_split(merged: Merged, input_files: int) -> tuple[int, dict[str, str]] | None:
    """Refuse sources with fewer than two documents. Returns the unit to encode again and the document it must
    move into the other split (None: none) when one split came out empty."""
    docs = sum(merged.documents.values())
    if docs == 0:
        what = f" Skipped: {merged.skipped.describe()}." if merged.skipped.total else ""
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
    if merged.documents["val"] and merged.documents["train"]:
        return None
    # A small corpus can hash every document into one split: move the one nearest the threshold across.
    if not merged.documents["val"]:
        return merged.lowest_unit, {merged.lowest[1]: "val"}
    return merged.highest_unit, {merged.highest[1]: "train"}


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


@dataclass
class _Assembled:
    merged: Merged  # the units' counts
    shards: dict[str, list[dict]]  # meta.json's shard entries by split
    content_hash: str


def _write_meta(staging: Path, tokenizer, done: _Assembled, inputs: _Inputs, options: PrepareOptions) -> dict:
    """Save the tokenizer and write meta.json, which makes `staging` a complete dataset. Nothing in it depends on
    when or how (workers, ranks) it was prepared: the same inputs give the same bytes."""
    merged = done.merged
    tokenizer.save(staging)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.describe(),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {
            split: {"documents": merged.documents[split], "tokens": merged.tokens[split], "shards": done.shards[split]}
            for split in SPLITS
        },
        "bytes": merged.bytes,
        "skipped": dict(merged.skipped.counts),
        "sources": list(inputs.sources) or ["stdlib"],
        "input_files": len(inputs.files),
        "cut": _describe_cut(inputs.files, merged.cuts),
        "options": options.shaping(),
        "content_hash": "sha256:" + done.content_hash,
        "inputs_fingerprint": inputs.fingerprint,
        "hvdlm_version": __version__,
    }
    # mkdtemp made the directory private; a dataset is for every user and rank that may read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    # meta.json last: a directory with a meta.json is a complete dataset.
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


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
