"""What `hvdlm launch` checks before it starts anything: the problems every rank would otherwise find seconds
later, under the launcher's boilerplate (and that `--dry-run` would not see at all).

Import-light like all job preparation (no torch, horovod, mpi4py or numpy): the run directory, the dataset's
meta.json, the run's own config.toml and --init-from's files are read as plain files (a checkpoint's names, not
its contents). The ranks check all of it again (and more: checkpoint contents, the device) when they start.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from hvdlm.checkpoint.store import find_checkpoints, resolve_checkpoint, run_directory, shard_paths
from hvdlm.config import MODEL_SHAPE_KEYS, JobConfig, model_shape
from hvdlm.data.blend import check_blend
from hvdlm.data.meta import check_windows, load_meta, missing_dataset
from hvdlm.errors import InputError
from hvdlm.launch.commands import local_gpus
from hvdlm.runfiles import CHECKPOINT_DIR, CONFIG_FILE, refuse_to_overwrite

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def check_before_launch(cfg: JobConfig, run_dir: Path, resume: str | None, local_only: bool) -> None:
    """Raise the first problem found. `local_only`: every rank runs on this machine (no --hosts, no hostfile,
    not srun), so this machine's devices are the ranks' devices."""
    _check_run_dir(run_dir, resume, cfg)
    if not (resume and find_checkpoints(run_dir)):  # a resumed run continues from its own checkpoint instead
        _check_init_from(cfg)
    _check_dataset(cfg)
    _check_precision(cfg, local_only)


def _check_run_dir(run_dir: Path, resume: str | None, cfg: JobConfig) -> None:
    if resume is None:
        refuse_to_overwrite(run_dir)
        return
    if resume != "auto":
        shard_paths(resolve_checkpoint(resume))  # a named checkpoint has every shard
    _check_same_shape(run_dir, cfg)


def _check_same_shape(run_dir: Path, cfg: JobConfig) -> None:
    """A resumed run must have the model its checkpoints hold: the run's config.toml says which (it is rewritten
    by every attempt, so it is that of the attempt that wrote the newest checkpoints)."""
    differ = _model_differences(run_dir, cfg)
    if differ:
        raise InputError(
            f"the run in '{run_dir}' trains another model than this job: {'; '.join(differ)} (its config.toml). "
            "Set the [model] keys to the run's to resume it, or start a new run from its weights with --init-from."
        )


def _model_differences(run_dir: Path, cfg: JobConfig) -> list[str]:
    """How the model in the run's config.toml differs from the job's, one phrase per key of its shape."""
    try:
        # Resolved as the ranks resolve a checkpoint's (hvdlm.checkpoint.reshard): n_kv_head = 0 is n_head, d_ff = 0
        # the arch's width, a llama's seq_len shapes nothing; keys a file leaves out take their defaults.
        theirs = model_shape(tomllib.loads((run_dir / CONFIG_FILE).read_text()).get("model", {}))
    except (OSError, ValueError, TypeError, AttributeError):  # no run yet, or not ours: the ranks decide
        return []
    ours = model_shape(cfg.model.__dict__)
    return [f"{k} is {theirs[k]} there, {ours[k]} here" for k in MODEL_SHAPE_KEYS if theirs[k] != ours[k]]


def _check_init_from(cfg: JobConfig) -> None:
    """--init-from (train.init_from) names weights that are there: a transformers directory (its config.json,
    which the ranks read), or an hvdlm run directory or checkpoint with every shard; a run's model must be the
    job's (its config.toml)."""
    source = cfg.train.init_from
    path = Path(source)
    if not source or (path.is_dir() and (path / "config.json").is_file()):
        return
    if not path.exists() and not any(path.parent.glob(f"{path.name.removesuffix('.pt')}.*-of-*.pt")):
        raise InputError(
            f"--init-from '{source}' (train.init_from) does not exist. Name an hvdlm run directory (its newest "
            "checkpoint is used), a checkpoint file, or a directory saved by transformers (with its config.json)."
        )
    shard_paths(resolve_checkpoint(path))  # a run with no complete checkpoint, a checkpoint missing shards
    run = run_directory(path) or (path.parent.parent if path.parent.name == CHECKPOINT_DIR else None)
    differ = _model_differences(run, cfg) if run else []  # a checkpoint outside a run: the ranks compare
    if differ:
        raise InputError(
            f"--init-from '{source}' holds another model than this job: {'; '.join(differ)} (the config.toml of "
            f"its run). Set the [model] keys to its own to start from its weights."
        )


def _check_dataset(cfg: JobConfig) -> None:
    """A named dataset must be prepared, whole, and hold a window of seq_len + 1 tokens in each split (the
    built-in corpus is prepared by the ranks on first use). A blend's datasets too, and they share a tokenizer."""
    if cfg.data.blend:
        check_blend(cfg.data, cfg.model.seq_len)
        return
    if not cfg.data.dataset:
        return
    path = Path(cfg.data.dataset)
    what = missing_dataset(path)
    if what:
        raise InputError(
            f"data.dataset '{path}' {what}: it must be a directory written by `hvdlm data prepare`. Prepare it "
            f"with `hvdlm data prepare SOURCES... --out {path}`, or leave data.dataset empty for the built-in "
            "corpus."
        )
    check_windows(path, load_meta(path), cfg.model.seq_len)  # damaged, foreign or of another version: its advice


def _check_precision(cfg: JobConfig, local_only: bool) -> None:
    """fp16 needs GPUs: refuse it where the ranks will certainly run on CPUs."""
    t = cfg.train
    wants = [f'train.{key} = "fp16"' for key in ("precision", "grad_compression") if getattr(t, key) == "fp16"]
    if not wants:
        return
    on_cpu = t.device == "cpu" or (t.device == "auto" and local_only and not local_gpus())
    if on_cpu:
        where = 'train.device = "cpu"' if t.device == "cpu" else f"{socket.gethostname()} has no NVIDIA GPU"
        raise InputError(
            f"{' and '.join(wants)} needs GPUs, but the ranks run on CPUs ({where}). Use "
            'precision = "bf16" on CPUs (and grad_compression = "none"), or launch on GPU nodes.'
        )
