"""Encoding units over worker processes: `--workers N` on one machine, and within each MPI rank.

Each worker is one core: it encodes with one thread (TOKENIZERS_PARALLELISM=false; the Rust encoder would
otherwise start a thread per core in every worker), and gets the tokenizer once, as its JSON, when it starts.
Workers are started with `spawn`, not `fork`: prepare may run in a process that has initialised MPI (a rank
under mpirun) or has the tokenizer's thread pool running, and a forked copy of either is unsafe.

A unit that holds bad input in strict mode stops the encoding: the units before it still finish (so the error
reported is that of the first bad unit in input order, whichever worker met it first), the ones after are dropped.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from hvdlm.data.tokenizer import BpeTokenizer, ByteTokenizer, PretrainedTokenizer
from hvdlm.data.units import UnitJob, encode_unit
from hvdlm.errors import InputError

_worker_tokenizer = None  # a worker process's tokenizer, set by _start_worker


def tokenizer_recipe(tokenizer) -> tuple:
    """What rebuilds the tokenizer in another process (a Hugging Face tokenizer does not pickle)."""
    if isinstance(tokenizer, ByteTokenizer):
        return ("byte",)
    source = getattr(tokenizer, "source", "")
    return (tokenizer.kind, tokenizer.to_json(), tokenizer.eot, source)


def tokenizer_from_recipe(recipe: tuple):
    if recipe[0] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    kind, text, eot, source = recipe
    hf = Tokenizer.from_str(text)
    return PretrainedTokenizer(hf, eot, source) if kind == "pretrained" else BpeTokenizer(hf, eot)


@contextmanager
def one_thread() -> Iterator[None]:
    """The tokenizer's Rust encoder on one thread while encoding in this process (it reads the variable per call)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _start_worker(recipe: tuple) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer_from_recipe(recipe)


def _encode_in_worker(job: UnitJob) -> tuple[int, dict | None, str | None]:
    try:
        return job.unit.index, encode_unit(job, _worker_tokenizer), None
    except InputError as e:
        return job.unit.index, None, str(e)


def encode_units(
    jobs: list[UnitJob], tokenizer, workers: int, progress, single_threaded: bool = True
) -> tuple[dict[int, dict], tuple | None]:
    """Encode the jobs; returns the records by unit index, and the first error in unit order as (index, message)
    (None when there was none). `single_threaded` False lets a lone worker's encoder use its own threads."""
    records: dict[int, dict] = {}
    if not jobs:
        return records, None
    if workers == 1 or len(jobs) == 1:
        with one_thread() if single_threaded else nullcontext():
            for job in jobs:
                try:
                    records[job.unit.index] = encode_unit(job, tokenizer)
                except InputError as e:
                    return records, (job.unit.index, str(e))
                progress.advance(job.unit.size)
        return records, None
    return _encode_in_pool(jobs, tokenizer_recipe(tokenizer), min(workers, len(jobs)), progress)


def _encode_in_pool(jobs: list[UnitJob], recipe: tuple, workers: int, progress) -> tuple[dict[int, dict], tuple | None]:
    records: dict[int, dict] = {}
    errors: list[tuple[int, str]] = []
    sizes = {job.unit.index: job.unit.size for job in jobs}
    pending = set(sizes)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(recipe,))
    try:
        for index, record, error in pool.imap_unordered(_encode_in_worker, jobs, chunksize=1):
            pending.discard(index)
            if error is not None:
                errors.append((index, error))
            else:
                records[index] = record
                progress.advance(sizes[index])
            if errors and all(i > min(errors)[0] for i in pending):
                break  # every unit before the first bad one is done: the rest cannot change the error
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return records, min(errors) if errors else None
