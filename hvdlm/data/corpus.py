"""The dataset a job trains on: a directory from `hvdlm data prepare`, a blend of them (hvdlm.data.blend), or a
built-in corpus prepared on first use.

The built-in corpus (`stdlib`: the running interpreter's standard-library sources, so every machine has real text
and the demo and tests need no download) is prepared into the cache (hvdlm/cache.py), in a directory named by
a fingerprint of its inputs and options: a changed Python or tokenizer gets a new dataset, an unchanged one is
reused. `prepare` publishes atomically, so concurrent preparers (one rank per node) are safe.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hvdlm.cache import cache_root
from hvdlm.config import DataConfig
from hvdlm.data.blend import check_blend
from hvdlm.data.meta import META_FILE, is_dataset_dir, load_meta, prepare_advice
from hvdlm.data.prepare import PrepareOptions, fingerprint_of, prepare
from hvdlm.data.sources import resolve_sources
from hvdlm.errors import InputError


def builtin_dataset_dir(cfg: DataConfig) -> Path:
    options = _options(cfg)
    key = fingerprint_of(resolve_sources([cfg.corpus]), options)[:12]
    vocab = f"{cfg.vocab_size}" if cfg.tokenizer == "bpe" else ""
    py = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    return cache_root() / "datasets" / f"{cfg.corpus}-{py}-{cfg.tokenizer}{vocab}-{key}"


def dataset_dir(cfg: DataConfig) -> Path:
    """Where the job's dataset is (or will be, for a built-in corpus not yet prepared); for a blend, its first
    dataset, whose tokenizer every dataset of the blend shares."""
    if cfg.blend:
        return Path(cfg.blend[0].dataset)
    return Path(cfg.dataset) if cfg.dataset else builtin_dataset_dir(cfg)


def ensure_dataset(cfg: DataConfig, log=print) -> Path:
    """The job's dataset directory, prepared first when it is the built-in corpus and not yet in the cache; a
    blend's datasets are checked (prepared, one tokenizer), and its first one's directory returned."""
    if cfg.blend:
        check_blend(cfg)
        return dataset_dir(cfg)
    if cfg.dataset:
        path = Path(cfg.dataset)
        if not (path / META_FILE).exists():
            raise InputError(
                f"data.dataset '{path}' is not a prepared dataset (no meta.json). {prepare_advice(path)}; or "
                f"leave data.dataset empty to train on the built-in '{cfg.corpus}' corpus."
            )
        load_meta(path)  # a damaged or foreign meta.json: one clear error, from the rank that checks
        return path
    path = builtin_dataset_dir(cfg)
    if not is_dataset_dir(path):
        log(f"preparing the built-in '{cfg.corpus}' corpus ({cfg.tokenizer} tokens) in {path} (first use) ...")
        log(prepare([cfg.corpus], path, _options(cfg), log=log).summary())
    return path


def model_vocab_size(configured: int, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the tokenizer's, or the configured size where that is larger (padding)."""
    return max(configured, tokenizer_vocab)


def _options(cfg: DataConfig) -> PrepareOptions:
    return PrepareOptions(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction)
