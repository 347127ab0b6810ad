"""A run's checkpoint as the readers outside training load it: the newest intact one (or a named one) as one
unsharded state, the model configuration it records, and the tokenizer of the dataset that configuration names.

`hvdlm generate` and `hvdlm export` (hvdlm.checkpoint.hf) start from these, so both read the same checkpoint the
same way: any TP size or pipeline split, merged (hvdlm.checkpoint.reshard); a damaged newer checkpoint of a run
directory reported on stderr and passed over, as `--resume auto` does. Import-light: torch, the data package and
the configuration load inside the functions, so `hvdlm generate`'s option errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hvdlm.errors import InputError


def load_run_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """The named checkpoint, or RUN_DIR's newest one that reads (a damaged newer one is reported on stderr and
    passed over, as `--resume auto` does), as one unsharded state."""
    from hvdlm.checkpoint.reshard import load_full_state, merge_states
    from hvdlm.checkpoint.store import newest_loadable, resolve_checkpoint, shard_paths

    # The EMA weights, when the run kept them, are merged like the model's.
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        return shard_paths(path)[0], load_full_state(path)
    found = newest_loadable(run_dir, warn=lambda message: print(message, file=sys.stderr, flush=True))
    if found is None:
        resolve_checkpoint(run_dir)  # raises: there is no complete checkpoint, and its error says where it looked
    return found[0].paths[0], merge_states(found[1])


def model_config(state: dict[str, Any], path: Path):
    """The ModelConfig the checkpoint records, for inference (no dropout)."""
    from hvdlm.config import ModelConfig

    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(
            f"checkpoint '{path}' records no model configuration ('config' -> 'model'), so its model cannot be "
            "rebuilt. Use a checkpoint written by `hvdlm train`."
        )
    try:
        cfg = ModelConfig(**config["model"])
    except TypeError as e:
        raise InputError(f"checkpoint '{path}' has a model configuration this hvdlm does not know ({e}).") from None
    cfg.dropout = 0.0  # inference: no dropout, whatever training used
    return cfg


def run_tokenizer(config: dict[str, Any], path: Path):
    """The tokenizer of the dataset the checkpoint's configuration names."""
    from hvdlm.config import DataConfig
    from hvdlm.data.corpus import dataset_dir
    from hvdlm.data.meta import META_FILE, prepare_advice
    from hvdlm.data.tokenizer import ByteTokenizer, load_tokenizer

    try:
        data = DataConfig(**config.get("data", {}))
    except TypeError as e:
        raise InputError(f"checkpoint '{path}' has a data configuration this hvdlm does not know ({e}).") from None
    directory = dataset_dir(data)
    if not (directory / META_FILE).exists():
        if not data.dataset and data.tokenizer == "byte":
            return ByteTokenizer()  # the built-in corpus in bytes: nothing to load, the cache may be elsewhere
        how = (
            prepare_advice(directory)
            if data.dataset
            else "Run with the HVDLM_CACHE the training used (the built-in corpus is prepared in that cache), or "
            "train once on this machine to prepare it"
        )
        raise InputError(
            f"the run's dataset '{directory}' is not there, and its tokenizer with it, so the prompt cannot be "
            f"encoded as the run's tokens. {how}."
        )
    return load_tokenizer(directory)
