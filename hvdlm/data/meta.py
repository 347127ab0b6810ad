"""meta.json: what makes a directory an hvdlm dataset, and which of its files prepare wrote.

A directory is a dataset only when its meta.json is a JSON object with this project's markers: any program may
write a file called meta.json, and prepare must never take a user's directory for an earlier dataset and replace
it. Readers (the trainer, `load_tokenizer`) check the keys they use, so a damaged or foreign meta.json is one
clear error, not a KeyError deep in the loader.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from hvdlm.errors import InputError

META_FILE = "meta.json"
# The dataset directory's format (shards, document index, meta.json); here, not beside the numpy shard code, so
# that login-node commands (hvdlm launch checks a dataset before it starts) read it without numpy.
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Keys only hvdlm's prepare writes together: their presence tells an hvdlm dataset from someone else's meta.json.
MARKERS = ("format_version", "inputs_fingerprint", "content_hash", "splits", "tokenizer")
DTYPES = ("uint16", "uint32")
# Every file prepare ever writes into a dataset directory (see shards.py and tokenizer.py for the formats).
_WRITTEN = re.compile(r"(meta\.json|tokenizer\.json|(train|val)-\d{5}\.(bin|docs\.npy))")


def read_meta(directory: Path) -> dict | None:
    """The parsed meta.json when it is a JSON object; None when it is missing, unreadable or anything else."""
    try:
        meta = json.loads((Path(directory) / META_FILE).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return meta if isinstance(meta, dict) else None


def is_dataset_meta(meta: dict | None) -> bool:
    """Whether meta.json was written by `hvdlm data prepare` (of any format version)."""
    return isinstance(meta, dict) and all(key in meta for key in MARKERS)


def is_dataset_dir(directory: Path) -> bool:
    return is_dataset_meta(read_meta(directory))


def foreign_files(directory: Path) -> list[str]:
    """Names in a dataset directory that prepare did not write (a user's notes, a subdirectory, ...)."""
    names = []
    for p in Path(directory).iterdir():
        # A subdirectory or a symbolic link is never ours, even under a shard's name.
        if not (_WRITTEN.fullmatch(p.name) and p.is_file() and not p.is_symlink()):
            names.append(p.name)
    return sorted(names)


def prepare_advice(directory: str | Path) -> str:
    """How to make a dataset for `directory`, as a sentence whose command `hvdlm data prepare` accepts.

    A folder of the user's own files (or a single text file) is the source, never the output: prepare refuses to
    write into a directory of files it did not write, so the advice names a new directory beside it.
    """
    path = Path(directory)
    if path.is_file() or (path.is_dir() and _holds_user_files(path)):
        target = path.with_name(f"{path.stem if path.is_file() else path.name}-dataset")
        return (
            f"To train on its text, prepare a dataset from it into a new directory: `hvdlm data prepare "
            f'{shlex.quote(str(path))} --out {shlex.quote(str(target))}`, then set data.dataset = "{target}"'
        )
    return f"Create it with `hvdlm data prepare SOURCES... --out {shlex.quote(str(path))}`"


def _holds_user_files(directory: Path) -> bool:
    """Whether the directory holds anything prepare would refuse to replace (see prepare._check_replaceable)."""
    try:
        if is_dataset_dir(directory):
            return bool(foreign_files(directory))
        return any(directory.iterdir())
    except OSError:
        return False


def load_meta(directory: Path) -> dict:
    """A dataset's meta.json, checked for every key the readers use; an InputError names what is wrong."""
    directory = Path(directory)
    if not (directory / META_FILE).exists():
        raise InputError(f"'{directory}' is not a prepared dataset (no meta.json). {prepare_advice(directory)}.")
    meta = read_meta(directory)
    if is_dataset_meta(meta) and meta["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"dataset '{directory}' has format version {meta['format_version']}, this hvdlm reads version "
            f"{FORMAT_VERSION}. Prepare it again with `hvdlm data prepare`."
        )
    problem = meta_problem(meta) or damaged_shard(directory, meta)
    if problem:
        again = f"prepare it again with `hvdlm data prepare SOURCES... --out {shlex.quote(str(directory))}`"
        if not is_dataset_meta(meta):
            # prepare replaces only a directory its own meta.json vouches for: this one must go first, or the
            # dataset goes elsewhere.
            again = (
                f"its files are prepare's, but its meta.json is not, so prepare will not replace it: remove the "
                f"directory, then {again}"
                if not foreign_files(directory)
                else prepare_advice(directory)
            )
        raise InputError(f"dataset at {directory} is damaged or not an hvdlm dataset: {problem}. {again}.")
    return meta


def meta_problem(meta) -> str | None:
    """What is wrong with a parsed meta.json, or None when the readers can use it."""
    if not isinstance(meta, dict):
        return "meta.json is not a readable JSON object"
    missing = [key for key in MARKERS + ("dtype", "bytes") if key not in meta]
    if missing:
        return f"meta.json lacks {', '.join(missing)}"
    if not isinstance(meta["format_version"], int):
        return f"format_version is {meta['format_version']!r}, not a number"
    if meta["dtype"] not in DTYPES:
        return f"dtype is {meta['dtype']!r}, not one of {', '.join(DTYPES)}"
    return _tokenizer_problem(meta["tokenizer"]) or _splits_problem(meta["splits"])


def _tokenizer_problem(tokenizer) -> str | None:
    """What is wrong with meta.json's tokenizer entry."""
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("type"), str):
        return "the tokenizer entry has no type"
    if not isinstance(tokenizer.get("vocab_size"), int):
        return "the tokenizer entry has no vocab_size"
    if not _WRITTEN.fullmatch(str(tokenizer.get("file", "tokenizer.json"))):
        return f"the tokenizer entry names file {tokenizer['file']!r}, not tokenizer.json"
    return None


def _splits_problem(splits) -> str | None:
    """What is wrong with meta.json's splits: each with its counts and a list of shard entries."""
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            return f"splits.{split}.shards is missing"
        if not all(isinstance(entry.get(k), int) for k in ("documents", "tokens")):
            return f"splits.{split} lacks its document or token count"
        for shard in entry["shards"]:
            if problem := _shard_problem(shard):
                return f"a shard entry of splits.{split} {problem}"
    return None


def _shard_problem(shard) -> str | None:
    """What is wrong with one shard entry (said after "a shard entry of splits.S")."""
    if not isinstance(shard, dict) or not isinstance(shard.get("tokens"), int) or shard["tokens"] <= 0:
        return "has no positive token count"
    for key in ("file", "docs"):
        # Plain names only: a shard is a file of this directory, never a path elsewhere.
        name = shard.get(key)
        if not isinstance(name, str) or not _WRITTEN.fullmatch(name):
            return f"names {key} {name!r}, not a shard file"
    return None


def damaged_shard(directory: Path, meta: dict) -> str | None:
    """The first shard file that is missing or has another size than meta.json says (meta checked already)."""
    itemsize = 2 if meta["dtype"] == "uint16" else 4
    for split in SPLITS:
        for entry in meta["splits"][split]["shards"]:
            file = Path(directory) / entry["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != entry["tokens"] * itemsize:
                return (
                    f"shard {entry['file']} should hold {entry['tokens']} tokens ({entry['tokens'] * itemsize} bytes) "
                    f"but has {max(size, 0)} bytes"
                )
            if not (Path(directory) / entry["docs"]).is_file():
                return f"the document index {entry['docs']} is missing"
    return None


def tokenizer_setting_note(data_cfg, meta: dict) -> str | None:
    """A note for the run's log when data.tokenizer differs from the tokenizer of the dataset data.dataset names.

    The run always uses the dataset's own tokenizer (its shards are in those tokens); data.tokenizer and
    data.vocab_size shape only the built-in corpus. The config cannot tell a default "byte" from one the user
    wrote, so this is a note to print, not an error. `data_cfg` is a hvdlm.config.DataConfig, `meta` the
    dataset's checked meta.json (load_meta).
    """
    if not data_cfg.dataset:
        return None
    theirs = meta["tokenizer"]
    if theirs["type"] == data_cfg.tokenizer:
        return None
    return (
        f"note: dataset '{data_cfg.dataset}' is in {theirs['type']} tokens (vocabulary {theirs['vocab_size']:,}), "
        f'and the run uses that tokenizer; data.tokenizer = "{data_cfg.tokenizer}" applies only to the built-in '
        "corpus (data.dataset empty). To train on other tokens, prepare the dataset again with that --tokenizer."
    )


def check_windows(path: Path, meta: dict, seq_len: int, where: str = "") -> None:
    """Each split of a prepared dataset must hold a window of seq_len + 1 tokens in one shard (windows never
    cross shards); `where` names a blend's entry before the message."""
    window = seq_len + 1
    for split in SPLITS:
        longest = max((shard["tokens"] for shard in meta["splits"][split]["shards"]), default=0)
        if longest < window:
            raise InputError(
                f"{where + ': ' if where else ''}the {split} split of '{path}' has no shard of {window:,} tokens "
                f"(model.seq_len + 1; the longest has {longest:,}), so it holds no window. Use a shorter "
                "model.seq_len, or more data."
            )


def missing_dataset(path: Path) -> str | None:
    """What stops `path` being a prepared dataset before its meta.json is read ("does not exist", "has no
    meta.json", "is a file, not a directory"), or None: it has one."""
    if (path / META_FILE).is_file():
        return None
    if not path.exists():
        return "does not exist"
    return "has no meta.json" if path.is_dir() else "is a file, not a directory"
