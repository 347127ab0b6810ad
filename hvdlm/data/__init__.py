"""Data: sources -> tokenizer -> token shards on disk (`hvdlm data prepare`) -> memory-mapped splits.

    from hvdlm.data.prepare import prepare       # write a dataset directory
    from hvdlm.data import open_dataset          # read one: .train / .val splits, .tokenizer, .meta
    from hvdlm.data import load_tokenizer        # just its tokenizer: encode / decode
    from hvdlm.data.sampler import WindowSampler # the trainer's batches (imports torch)
    from hvdlm.data.blend_sampler import BlendSampler  # a blend's batches

The names below load on first use (PEP 562): importing `hvdlm.data` (as the CLI does) must not pull in numpy,
because the job-preparation commands answer on login nodes without it.

- sources: where documents come from (the built-in corpus, text, directories, JSON Lines, Parquet, gzip, zstd);
- tokenizer: byte-level and BPE tokenizers;
- prepare: `hvdlm data prepare`, sources to shards and meta.json;
- units: the inputs cut into work units, and a unit encoded into its files (resumable);
- spread: units encoded over worker processes (`--workers`);
- ranks: the MPI world of a preparation under mpirun or srun;
- assemble: the finished units put together in order into shards and counts;
- progress: the bar on a terminal, plain log lines elsewhere;
- shards: the on-disk token shards;
- meta: meta.json, what makes a directory a dataset;
- dataset: reading a prepared dataset;
- corpus: the dataset a job trains on, a built-in one prepared on first use;
- sampler: which windows each data-parallel rank trains on, and where in the data the run is;
- blend: a blend of datasets ([[data.blend]]): its parts, their shares, the checks before a run starts;
- blend_sampler: a blend's training order (a fixed interleaving), exact position, and validation sets.
"""

from __future__ import annotations

import importlib

_HOMES = {"Dataset": "dataset", "TokenSplit": "dataset", "open_dataset": "dataset", "load_tokenizer": "tokenizer"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'hvdlm.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"hvdlm.data.{_HOMES[name]}"), name)
