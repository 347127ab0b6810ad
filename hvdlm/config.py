"""Job configuration: typed dataclasses loaded from a TOML job file, plus dotted `--set key=value` overrides.

A job file has one table per section below; every key is optional and falls back to the default here:

    [model]
    n_layer = 4
    [train]
    lr = 1e-3

Unknown sections or keys and ill-typed values raise `InputError` naming the key (and the closest known key), so a
typo never silently trains with a default. This module must stay import-light: the job-preparation commands
load configs on login nodes, where importing torch would cost seconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

from hvdlm.devices import check_share_gpu
from hvdlm.errors import InputError, not_a_file

# The settings that take one of a few words. Each set is spelled here only: validation, the click options of the
# command line and the launch code read them with choices(); the field comments below say what each word means.
Tokenizer = Literal["byte", "bpe"]
Corpus = Literal["stdlib"]
Optimizer = Literal["adamw", "sgd", "muon"]
Precision = Literal["fp32", "bf16", "fp16", "fp8"]
GradCompression = Literal["none", "fp16"]
Launcher = Literal["mpirun", "horovodrun", "srun"]
Controller = Literal["gloo", "mpi"]
Mpi = Literal["openmpi", "mpich"]
Switch = Literal["auto", "on", "off"]
Device = Literal["auto", "cuda", "cpu"]
Schedule = Literal["1f1b", "gpipe"]
Recompute = Literal["none", "selective", "full"]
Arch = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class ArchTraits:
    """What an architecture's parts are, as numbers (the model builds its modules from them, hvdlm.model.parts; the
    size and the planner count with them without torch)."""

    bias: bool  # model.bias when the job leaves it out
    learned_positions: bool  # a position table added to the token embeddings; otherwise RoPE on queries and keys
    mlp_matrices: int  # 2: GELU's fc and proj; 3: SwiGLU's gate, up and down
    norm_shift: bool  # the norms have a shift where biases are on (LayerNorm); RMSNorm has a gain only
    ffn_factor: tuple[int, int]  # d_ff = 0: d_model x this fraction ...
    ffn_multiple: int  # ... rounded up to a multiple of this

    def default_d_ff(self, d_model: int) -> int:
        num, den = self.ffn_factor
        return -(-d_model * num // (den * self.ffn_multiple)) * self.ffn_multiple


ARCH_TRAITS = {
    # GPT-2 (Radford et al. 2019): learned positions, LayerNorm, a 4x GELU MLP, biases everywhere.
    "gpt2": ArchTraits(
        bias=True, learned_positions=True, mlp_matrices=2, norm_shift=True, ffn_factor=(4, 1), ffn_multiple=1
    ),
    # Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU with 2/3 of 4d (Shazeer 2020, to keep the parameter count
    # of a 4d MLP) rounded up to a multiple of 256 (Meta's multiple_of), no biases.
    "llama": ArchTraits(
        bias=False, learned_positions=False, mlp_matrices=3, norm_shift=False, ffn_factor=(8, 3), ffn_multiple=256
    ),
}


@dataclass
class ModelConfig:
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention (query) heads per block; must divide d_model
    d_model: int = 128  # width of the residual stream
    seq_len: int = 128  # context length in tokens (the length of every training window)
    vocab_size: int = 256  # at least the dataset tokenizer's: the trainer raises it to that; a larger value pads
    dropout: float = 0.0  # on attention weights and residual branches; 0 keeps replicas' math deterministic
    bias: bool | None = None  # biases in Linear layers and LayerNorms; unset: the arch's (gpt2 true, llama false)
    recompute: Recompute = "none"  # activations recomputed in backward: selective (attention core) or full (blocks)
    arch: Arch = "gpt2"  # gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU (ARCH_TRAITS)
    n_kv_head: int = 0  # key/value heads (grouped-query attention, llama); 0: n_head; must divide n_head
    d_ff: int = 0  # MLP hidden width; 0: the arch's, 4 d_model (gpt2) or 8/3 d_model up to a multiple of 256 (llama)
    tie_embeddings: bool = True  # the output head is the token embedding matrix (gpt2 always; llama either)
    rope_theta: float = 10000.0  # llama: RoPE's base wavelength (Llama 2: 10000, Llama 3: 500000)
    norm_eps: float = 1e-5  # added to the variance in LayerNorm / RMSNorm (GPT-2 and Llama 3: 1e-5)

    def __post_init__(self) -> None:
        # A per-arch default written into the config itself, so that config.toml, checkpoints and the shape checks
        # hold the value the model was built with (TOML has no "unset" to write back).
        if self.bias is None:
            self.bias = self.traits.bias

    @property
    def traits(self) -> ArchTraits:
        return ARCH_TRAITS.get(self.arch, ARCH_TRAITS["gpt2"])  # an unknown arch is refused by validate()

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head (multi-head attention) where it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_width(self) -> int:
        """The MLP's hidden width: d_ff, or the arch's default where it is 0."""
        return self.d_ff or self.traits.default_d_ff(self.d_model)


# The keys that shape a model's tensors (or cut them differently: n_head, n_kv_head) or change what they compute
# (arch, rope_theta, norm_eps): weights load only where they agree. vocab_size is not among them: a larger
# vocabulary is padding, and checkpoints are checked tensor by tensor. Compare them through model_shape (n_kv_head
# and d_ff resolved; seq_len shapes only a position table, rope_theta only RoPE).
MODEL_SHAPE_KEYS = (
    "arch",
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "d_ff",
    "seq_len",
    "bias",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)


def model_shape(model: dict[str, Any]) -> dict[str, Any]:
    """The MODEL_SHAPE_KEYS of a recorded [model] table (a checkpoint's, a run's config.toml), resolved: keys it
    leaves out take their defaults (files written before a key existed are gpt2 with a tied head), n_kv_head and
    d_ff their meaning (0 -> n_head, the arch's width); seq_len and rope_theta are None where they shape nothing
    (seq_len without a position table: a llama trains at any length up to it; rope_theta without RoPE)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in known})
    table = cfg.traits.learned_positions
    return {
        **{k: getattr(cfg, k) for k in MODEL_SHAPE_KEYS},
        "n_kv_head": cfg.kv_heads,
        "d_ff": cfg.ffn_width,
        "seq_len": cfg.seq_len if table else None,
        "rope_theta": None if table else cfg.rope_theta,
    }


@dataclass
class ParallelConfig:
    tp: int = 1  # ranks per model replica (tensor parallel); divides the ranks and n_head; data parallel = ranks / tp
    pp: int = 1  # pipeline stages, each a run of consecutive layers on its own tp ranks; dp = ranks / (pp x tp)
    pp_layers: str | list[int] = ""  # layers per stage, e.g. "3,5" or [3, 5]; empty: as even as possible
    microbatches: int = 1  # pp > 1: micro-batches of batch_size per step (the accumulation); >= pp keeps stages busy
    schedule: Schedule = "1f1b"  # pp > 1: 1f1b (one forward one backward, fewer saved activations) or gpipe
    virtual_stages: int = 1  # pp > 1, 1f1b: chunks of layers per stage, interleaved (bubble / v, v x the sends)


@dataclass
class BlendSource:
    """One dataset of a blend: a `[[data.blend]]` table of the job file (docs/guides/data.md, Blends)."""

    dataset: str  # a directory written by `hvdlm data prepare`
    weight: float  # its share of the training sequences: weight / the sum of the blend's weights
    name: str = ""  # the label of its validation loss (val_loss/NAME); empty: the dataset directory's name

    @property
    def label(self) -> str:
        return self.name or Path(self.dataset).resolve().name


@dataclass
class DataConfig:
    dataset: str = ""  # a directory written by `hvdlm data prepare`; empty: the built-in corpus below
    corpus: Corpus = "stdlib"  # built-in corpus, prepared in the cache on first use: the interpreter's stdlib sources
    tokenizer: Tokenizer = "byte"  # built-in corpus: byte (256 tokens) or bpe (trained on the corpus)
    vocab_size: int = 4096  # built-in corpus with tokenizer "bpe": bytes + end-of-document + merges
    val_fraction: float = 0.05  # built-in corpus: share of documents held out for validation
    blend: list[BlendSource] = field(default_factory=list)  # [[data.blend]] tables: datasets mixed by weight

    def __post_init__(self) -> None:
        # A recorded config (config.toml, a checkpoint's) holds the blend's tables as plain dicts.
        self.blend = [b if isinstance(b, BlendSource) else BlendSource(**b) for b in self.blend]


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per replica per micro-step; global batch: batch_size x dp x accumulation_steps
    max_steps: int = 200  # optimizer steps
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not biases, norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1337  # seeds the initial weights and the sample order
    log_interval: int = 10  # steps between log lines and metrics.jsonl rows
    eval_interval: int = 100  # steps between validation-loss evaluations (and one at the end); 0 disables
    eval_batches: int = 8  # batches per rank per evaluation
    checkpoint_interval: int = 0  # steps between checkpoints; 0 writes only the final one
    sample_tokens: int = 200  # length of the text sample generated at the end; 0 disables
    threads: int = 0  # torch threads per rank; 0 takes OMP_NUM_THREADS (set by `hvdlm launch`) or torch's default
    init_from: str = ""  # a run directory (its newest checkpoint), a checkpoint file, or a transformers model directory
    optimizer: Optimizer = "adamw"  # sgd is with momentum; muon: Muon for the blocks' matrices, AdamW for the rest
    momentum: float = 0.9  # SGD momentum
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov) of the matrices' gradients
    scale_lr: bool = False  # multiply lr and min_lr by the number of replicas (dp), for a batch that grows with it
    accumulation_steps: int = 1  # micro-batches per optimizer step; gradients are allreduced on the last one only
    precision: Precision = "fp32"  # bf16: autocast, CPU and GPU; fp16: + gradient scaler, GPU; fp8: Hopper + torchao
    grad_compression: GradCompression = "none"  # fp16: Horovod sends gradients as fp16 (GPU tensors only)
    ema_decay: float = 0.0  # exponential moving average of the weights, used for evaluation; 0 disables
    local_sgd_interval: int = 0  # >0: local SGD, replicas step alone and average weights every this many steps
    max_skipped_steps: int = 5  # a non-finite loss or gradient norm skips the step; this many in a row stop the run
    keep_checkpoints: int = 3  # newest complete checkpoints kept in the run directory; 0 keeps all
    async_checkpoint: Switch = (
        "auto"  # periodic saves written by a thread while training goes on; auto: if RAM holds a copy
    )
    deterministic: bool = False  # torch's deterministic algorithms (GPU kernels; CPU fp32 is deterministic anyway)
    tensorboard: bool = True  # TensorBoard event files in RUN_DIR/tensorboard (rank 0)
    profile_steps: int = 0  # rank 0 records this many steps with torch.profiler: RUN_DIR/profile.txt
    peak_tflops: float = 0.0  # the device's peak for MFU, in TFLOP/s; 0: known GPUs by name, none on CPU
    device: Device = "auto"  # auto: one GPU per rank where CUDA sees GPUs, else CPU; cuda: GPUs required; cpu
    share_gpu: bool = False  # ranks may share a GPU (checks, workstations): dp = 1 (TP / PP), no ZeRO, no NCCL used
    compile: Switch = "auto"  # torch.compile the model; auto: on GPUs (on CPUs the compile costs more than it saves)
    fused_optimizer: Switch = "auto"  # one kernel updates every parameter, a skip decided on the device; auto: GPUs
    sample_prompt: str = ""  # text the end-of-run sample continues; empty: a new document (the tokenizer's separator)
    zero: int = 0  # 1: optimizer state sharded over the DP group (ZeRO-1); 2: gradients too; 3: weights too; 0: none
    zero_bucket_mb: float = 25.0  # ZeRO-2: gradient bucket size, reduce-scattered during backward as each fills
    watchdog_s: float = -1.0  # a rank with no progress this long ends the job (exit 124); 0: off; -1: 300 GPU, 900 CPU
    watchdog_first_s: float = 1800.0  # the watchdog's allowance for setup and the first step (data, compilation)
    commit_interval: int = 10  # launch --elastic: steps between in-memory commits (a lost worker costs those since)
    spike_rollback: bool = False  # a loss spike rolls the run back to the checkpoint before it and skips its data
    spike_sigma: float = 5.0  # a step is high when its loss is this many noise std devs above the running mean
    spike_steps: int = 3  # a spike: this many high steps in a row (one high batch is noise; a spike persists)
    spike_window: int = 100  # span in steps of the loss's running mean and noise (EMAs); judged after this many steps
    spike_max_rollbacks: int = 3  # rollbacks in a row (a spike back before the last one was passed); then exit 65


@dataclass
class LaunchConfig:
    launcher: Launcher = "mpirun"  # srun: inside a Slurm allocation
    np: int = 2  # number of ranks (overridden by `hvdlm launch --np`)
    hosts: str = ""  # "host:slots,host:slots"; empty means this machine with as many slots as cores
    controller: Controller = "gloo"  # horovodrun only: its --gloo or --mpi
    cycle_time_ms: float = 5.0  # Horovod's negotiation cycle (its default, 1 ms, costs CPU ranks ~25%); 0 keeps it
    mpi: Mpi = "openmpi"  # which MPI's mpirun: Open MPI or MPICH (Hydra); their options differ
    nic: str = ""  # network interface for MPI, NCCL and Gloo together (e.g. "ib0"); empty lets each choose
    env: list[str] = field(default_factory=list)  # more variables every rank must see (mpirun -x NAME)
    fusion_threshold_mb: float = 0.0  # horovodrun: tensor fusion buffer in MB; 0 keeps Horovod's 128
    timeline: str = ""  # horovodrun: write a Horovod timeline (chrome://tracing) to this file
    autotune: bool = False  # horovodrun: let Horovod tune fusion and cycle time while training
    autotune_log: str = ""  # horovodrun: where autotuning logs the settings it tried


@dataclass
class SlurmConfig:
    nodes: int = 1  # nodes to allocate
    gpus_per_node: int = 0  # GPUs per node; each gets one rank. 0: CPU-only nodes
    ntasks_per_node: int = 0  # ranks per node; 0: gpus_per_node, or launch.np / nodes on CPU-only nodes
    cpus_per_task: int = 0  # cores per rank (and its OMP_NUM_THREADS); 0: 4 per GPU rank, 1 per CPU rank
    time: str = "01:00:00"  # wall-clock limit, [D-]HH:MM:SS
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""  # empty: your default account
    launcher: Launcher = "srun"  # the batch script's launcher
    mpi: str = "pmix"  # srun --mpi plugin (pmix starts Open MPI ranks without mpirun)
    cpu_bind: str = ""  # srun --cpu-bind (e.g. "cores", "none"); empty: Slurm's default
    gpu_bind: str = ""  # srun --gpu-bind (e.g. "closest", "single:1"); empty: Slurm's default
    modules: list[str] = field(default_factory=list)  # `module load` these first (e.g. ["openmpi/4.1.5"])
    venv: str = ""  # virtual environment to activate; empty: the one running `hvdlm sbatch`, if any
    setup: list[str] = field(default_factory=list)  # shell lines run before the launch, exactly as written
    directives: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=a100"]
    max_restarts: int = 0  # requeue a failed job (not bad input, exit 2) this often; counted with SLURM_RESTART_COUNT


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def default_run_dir(job_name: str) -> Path:
    """runs/JOB-TIMESTAMP, relative to the working directory."""
    return Path("runs") / f"{job_name}-{datetime.now():%Y%m%d-%H%M%S}"


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The words a Literal-typed field of a dataclass allows (e.g. choices(LaunchConfig, "launcher")), in order."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def check_choice(what: str, value: str, options: tuple[str, ...]) -> None:
    """Refuse a word outside `options` where no config key names it (an argument of a library function)."""
    if value not in options:
        raise InputError(f"unknown {what} '{value}'. Use one of {', '.join(options)}.")


MIN_BPE_VOCAB = 257 + 1  # 256 byte tokens, the end-of-document token, and at least one merge
# The BPE trainer's Rust side allocates for the requested size up front (2**32 aborts the process), and a million
# tokens is already far past what a corpus prepared here yields. Above 65,536 the shards hold uint32 ids.
MAX_BPE_VOCAB = 2**20


# ------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Read a job file (None: all defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    overridden = {_apply_override(raw, item) for item in overrides}
    config = _from_dict(raw, source=str(path) if path else "the defaults", overridden=overridden)
    validate(config)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        hint = ""
        jobs = sorted(p.name for p in Path("jobs").glob("*.toml")) if Path("jobs").is_dir() else []
        if jobs:
            hint = f" Job files in ./jobs: {', '.join(jobs)}."
        raise InputError(f"job file '{path}' {not_a_file(path)}. Pass the path of a TOML job file.{hint}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"job file '{path}' is not valid TOML: {e}. Fix the file and try again.") from None
    except UnicodeDecodeError:
        raise InputError(f"job file '{path}' is not UTF-8 text. Pass a TOML job file.") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value): the one --set parser of every command (train, launch, sbatch,
    config), so a value one command takes, every command takes. The value is TOML (3e-4, true, "x", ["a", "b"]);
    text that does not parse as TOML is taken as a bare string (--set launch.nic=ib0)."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise InputError(f"override '{item}' is not of the form section.key=value (for example train.lr=3e-4).")
    return section, name, _parse_value(text.strip())


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, str]:
    """Set one `section.key=value` in the raw tables; returns (section, key)."""
    section, name, value = parse_override(item)
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise InputError(f"'{section}' in the job file is not a table, so '{item}' cannot override a key in it.")
    raw[section][name] = value
    return section, name


def _parse_value(text: str) -> Any:
    """A TOML value (1e-3, true, "x"); anything that does not parse as one is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]


# Other names of a choice: spelled unlike it, they are what a person means by it ("gpu" is nearest "cpu" letter by
# letter).
_SAME_MEANING = {
    "gpu": "cuda",
    "gpus": "cuda",
    "nvidia": "cuda",
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}


def _closest(word: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    meant = _SAME_MEANING.get(str(word).lower())
    match = [meant] if meant in options else difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def _from_dict(raw: dict[str, Any], source: str, overridden: set[tuple[str, str]]) -> JobConfig:
    """Typed sections from raw tables; errors name where a key came from (the file, or --set)."""
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in _SECTIONS and not isinstance(values, dict):
            raise InputError(_outside_any_section(section, source))
        if section not in _SECTIONS:
            where = "--set" if any(s == section for s, _ in overridden) else source
            raise InputError(
                f"unknown section '[{section}]' in {where}.{_closest(section, _SECTIONS)} "
                f"Known sections: {', '.join(_SECTIONS)}."
            )
        if not isinstance(values, dict):
            raise InputError(f"'{section}' in {source} must be a table ([{section}]), not a single value.")
        cls = _SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            where = "--set" if (section, key) in overridden else source
            if key not in hints:
                raise InputError(
                    f"unknown key '{section}.{key}' in {where}.{_closest(key, hints)} "
                    f"Keys of [{section}]: {', '.join(hints)}."
                )
            values[key] = _check_type(f"{section}.{key}", value, hints[key], where)
        sections[section] = cls(**values)
    return JobConfig(**sections)


def _outside_any_section(key: str, source: str) -> str:
    """A `key = value` above every [section] header: TOML puts it in no section. Say which one it belongs in."""
    owners = [name for name, cls in _SECTIONS.items() if key in typing.get_type_hints(cls)]
    if owners:
        fix = " or ".join(f"under [{o}] (as {o}.{key})" for o in owners)
        return f"key '{key}' in {source} is outside any section: every key belongs to one. Move it {fix}."
    known = {f"{name}.{k}": k for name, cls in _SECTIONS.items() for k in typing.get_type_hints(cls)}
    match = difflib.get_close_matches(key, list(known.values()), n=1, cutoff=0.6)
    hint = next((f" Did you mean {full}?" for full, k in known.items() if match and k == match[0]), "")
    return (
        f"key '{key}' in {source} is outside any section, and no section has a key of that name.{hint} "
        f"Put each key under its section: {', '.join(f'[{s}]' for s in _SECTIONS)}."
    )


def _check_type(name: str, value: Any, expected: Any, source: str) -> Any:
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    # A Literal's words are checked by validate(), which names them; here it is only their type (str).
    allowed = tuple(type(typing.get_args(k)[0]) if typing.get_origin(k) is Literal else k for k in allowed)
    for kind in allowed:
        if typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            return _tables(name, value, typing.get_args(kind)[0], source)  # [[data.blend]]
        if typing.get_origin(kind) is list:
            if isinstance(value, str):  # --set slurm.modules=openmpi,cuda
                value = [v.strip() for v in value.split(",") if v.strip()]
            item = typing.get_args(kind)[0]  # str, or int (parallel.pp_layers)
            if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return value
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # TOML writes 1 for 1.0; accept it
        if kind is int and isinstance(value, bool):
            continue  # bool is an int subclass in Python, but `true` is no step count
        if isinstance(value, kind):
            return value
    wanted = " or ".join(
        f"a list of {typing.get_args(k)[0].__name__}s" if typing.get_origin(k) is list else k.__name__ for k in allowed
    )
    raise InputError(f"'{name}' in {source} must be {wanted}, got {value!r} ({type(value).__name__}).")


def _tables(name: str, value: Any, cls: type, source: str) -> list:
    """An array of tables (`[[data.blend]]`, or --set's TOML `[{dataset = "a", weight = 0.7}, ...]`, or its
    shorthand `PATH:WEIGHT,...`) as a list of `cls`, each key checked as a section's keys are."""
    if isinstance(value, str):
        value = _blend_shorthand(name, value, source)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InputError(
            f"'{name}' in {source} must be tables ([[{name}]] in a job file), got {value!r}. On the command line: "
            f"--set {name}=data/web:0.7,data/code:0.3"
        )
    hints = typing.get_type_hints(cls)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    tables = []
    for i, table in enumerate(value, start=1):
        where = f"{name} entry {i}"
        for key in table:
            if key not in hints:
                raise InputError(
                    f"unknown key '{key}' in {where} in {source}.{_closest(key, hints)} Keys of [[{name}]]: "
                    f"{', '.join(hints)}."
                )
        missing = [key for key in required if key not in table]
        if missing:
            raise InputError(f"{where} in {source} lacks {' and '.join(missing)}: each [[{name}]] names both.")
        tables.append(cls(**{k: _check_type(f"{where}: {k}", v, hints[k], source) for k, v in table.items()}))
    return tables


def _blend_shorthand(name: str, text: str, source: str) -> list[dict[str, Any]]:
    """`[NAME=]PATH:WEIGHT,...` (--set data.blend=data/web:0.7,code=data/code:0.3): the weight after the path's
    last colon, an optional name before its first "="."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        label, eq, rest = item.partition("=")
        path, colon, weight = (rest if eq else item).rpartition(":")
        value = _parse_value(weight.strip())
        if not colon or not path.strip() or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
            raise InputError(
                f"'{name}' in {source}: '{item}' is not PATH:WEIGHT. Write the blend as "
                f"{name}=data/web:0.7,data/code:0.3 (optionally NAME=PATH:WEIGHT), or as TOML tables: "
                f"'{name}=[{{dataset=\"data/web\", weight=0.7}}, ...]'."
            )
        entries.append({"dataset": path.strip(), "weight": value, **({"name": label.strip()} if eq else {})})
    return entries


# ------------------------------------------------------------------------------------------------------------
# Validation of values (types are already right)
# ------------------------------------------------------------------------------------------------------------


# Ranges, by key. Positive: a count or size of zero makes no run. Zero or more: 0 switches the setting off.
POSITIVE = (
    "model.n_layer",
    "model.n_head",
    "model.d_model",
    "model.seq_len",
    "model.vocab_size",
    "model.rope_theta",
    "model.norm_eps",
    "parallel.tp",
    "parallel.pp",
    "parallel.microbatches",
    "parallel.virtual_stages",
    "train.batch_size",
    "train.max_steps",
    "train.lr",
    "train.log_interval",
    "train.eval_batches",
    "train.commit_interval",
    "train.spike_sigma",
    "train.spike_steps",
    "train.spike_window",
    "launch.np",
    "train.accumulation_steps",
    "train.zero_bucket_mb",
    "slurm.nodes",
)
NON_NEGATIVE = (
    "model.n_kv_head",
    "model.d_ff",
    "train.min_lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "train.eval_interval",
    "train.seed",
    "train.checkpoint_interval",
    "train.sample_tokens",
    "train.profile_steps",
    "train.threads",
    "launch.cycle_time_ms",
    "train.ema_decay",
    "train.local_sgd_interval",
    "train.max_skipped_steps",
    "train.keep_checkpoints",
    "train.peak_tflops",
    "train.momentum",
    "train.muon_momentum",
    "train.watchdog_first_s",
    "train.spike_max_rollbacks",
    "launch.fusion_threshold_mb",
    "slurm.gpus_per_node",
    "slurm.ntasks_per_node",
    "slurm.cpus_per_task",
    "slurm.max_restarts",
)
# Decay rates and probabilities: in [0, 1).
UNIT_INTERVAL = (
    "model.dropout",
    "train.beta1",
    "train.beta2",
    "train.ema_decay",
    "train.momentum",
    "train.muon_momentum",
)
# Upper bounds far above any real setting: fusion MB are turned into a byte count with int(), which a finite
# 1e308 would overflow.
FLOAT_MAXIMA = {"launch.fusion_threshold_mb": 1024.0 * 1024, "launch.cycle_time_ms": 3_600_000.0}


def value_of(config: JobConfig, key: str):
    """The value of a dotted key such as "train.lr"."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def validate(config: JobConfig) -> None:
    """Every check a job must pass before anything runs; the first problem is an InputError naming the key."""
    _check_finite(config)
    _check_ranges(config)
    _check_maxima(config)
    _check_model_and_data(config)
    _check_blend(config.data)
    _validate_tp(config.model, config.parallel)
    _check_combinations(config.train, config.parallel)
    _check_pipeline(config)
    _validate_choices(config)


def _check_finite(config: JobConfig) -> None:
    # First, and for every float key: TOML and --set accept nan and inf, and every range check below would let
    # nan through (nan < 0 is False), to crash later (int(nan)) or reach a launcher as HOROVOD_CYCLE_TIME=nan.
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"'{section.name}.{f.name}' must be a finite number, got {value}.")


def _check_ranges(config: JobConfig) -> None:
    for key in POSITIVE:
        if (value := value_of(config, key)) <= 0:
            raise InputError(f"'{key}' must be positive, got {value}.")
    for key in NON_NEGATIVE:
        if (value := value_of(config, key)) < 0:
            raise InputError(f"'{key}' must be zero or more, got {value}.")
    for key, limit in FLOAT_MAXIMA.items():
        if (value := value_of(config, key)) > limit:
            raise InputError(f"'{key}' must be at most {limit:.0f}, got {value:g}.")
    for key in UNIT_INTERVAL:
        if not 0.0 <= (value := value_of(config, key)) < 1.0:
            raise InputError(f"'{key}' must be in [0, 1), got {value}.")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise InputError(f"'data.val_fraction' must be between 0 and 1, got {config.data.val_fraction}.")
    if config.train.watchdog_s < 0 and config.train.watchdog_s != -1:
        raise InputError(
            f"'train.watchdog_s' must be seconds (0: off) or -1 (the device's default), got {config.train.watchdog_s}."
        )
    if config.train.min_lr > config.train.lr:
        raise InputError(f"'train.min_lr' ({config.train.min_lr}) must not exceed 'train.lr' ({config.train.lr}).")


def _check_model_and_data(config: JobConfig) -> None:
    m, d = config.model, config.data
    if m.d_model % m.n_head:
        raise InputError(
            f"model.n_head ({m.n_head}) must divide model.d_model ({m.d_model}): each head gets d_model / n_head "
            f"dimensions. Pick an n_head among {[h for h in range(1, 65) if m.d_model % h == 0]}."
        )
    _check_arch(m)
    if m.vocab_size < 256:
        raise InputError(f"'model.vocab_size' must be at least 256 for byte-level tokens, got {m.vocab_size}.")
    if d.tokenizer == "bpe" and not MIN_BPE_VOCAB <= d.vocab_size <= MAX_BPE_VOCAB:
        raise InputError(
            f"'data.vocab_size' must be between {MIN_BPE_VOCAB} (256 bytes, end-of-document, one merge) and "
            f"{MAX_BPE_VOCAB:,} for the BPE tokenizer, got {d.vocab_size:,}."
        )


# A blend's names label metrics (val_loss/NAME) and TensorBoard tags: letters, digits, "_", "." and "-".
_BLEND_NAME = re.compile(r"[\w.-]+")


def _check_blend(d: DataConfig) -> None:
    """[[data.blend]]: one way to name the data, positive finite weights, a dataset each, distinct names."""
    if not d.blend:
        return
    if d.dataset:
        raise InputError(
            f'data.dataset = "{d.dataset}" and [[data.blend]] both name the training data. Keep one: list the '
            "dataset in the blend (with its weight), or remove the blend to train on data.dataset alone."
        )
    for i, part in enumerate(d.blend, start=1):
        if not part.dataset:
            raise InputError(f"data.blend entry {i} has an empty dataset: name a directory from `hvdlm data prepare`.")
        if not (math.isfinite(part.weight) and part.weight > 0):
            raise InputError(
                f"data.blend entry {i} ({part.dataset}) has weight {part.weight}: a weight must be a positive, finite "
                "number (the dataset's share of the sequences is its weight / the sum of the weights). To leave a "
                "dataset out, remove its entry."
            )
        if not _BLEND_NAME.fullmatch(part.label):
            raise InputError(
                f"data.blend entry {i} ({part.dataset}) is named '{part.label}', which cannot label val_loss/NAME: "
                'give it a name = "..." of letters, digits, "_", "." and "-".'
            )
    labels = [part.label for part in d.blend]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(
            f"data.blend names {', '.join(twice)} more than once (a dataset is named after its directory unless it "
            'has a name): give each entry a distinct name = "...", the label of its val_loss/NAME.'
        )


def _check_arch(m: ModelConfig) -> None:
    """Grouped-query attention, RoPE and an untied head: where they fit the head count and the arch."""
    if m.n_head % m.kv_heads:
        fits = [k for k in range(1, m.n_head + 1) if m.n_head % k == 0]
        raise InputError(
            f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}): each key/value head serves an "
            f"equal group of query heads. Pick an n_kv_head among {fits} (0 means n_head)."
        )
    if m.arch == "gpt2" and (m.kv_heads != m.n_head or not m.tie_embeddings):
        key = f"model.n_kv_head = {m.n_kv_head}" if m.kv_heads != m.n_head else "model.tie_embeddings = false"
        raise InputError(
            f'{key} with model.arch = "gpt2" is not GPT-2: it has one key/value head per query head and an output '
            'head tied to the token embedding. Use model.arch = "llama" for grouped-query attention or an untied '
            "head, or leave the key at its default."
        )
    if m.arch == "llama" and (m.d_model // m.n_head) % 2:
        raise InputError(
            f"model.d_model / model.n_head = {m.d_model // m.n_head} is odd: RoPE rotates each head's dimensions in "
            "two halves, so a llama head needs an even width. Change d_model or n_head."
        )


def _check_combinations(t: TrainConfig, p: ParallelConfig) -> None:
    """Settings that each make sense but not together."""
    if t.local_sgd_interval and t.checkpoint_interval % t.local_sgd_interval:
        raise InputError(
            f"'train.checkpoint_interval' ({t.checkpoint_interval}) must be a multiple of 'train.local_sgd_interval' "
            f"({t.local_sgd_interval}): replicas agree only where they average, and a checkpoint holds one replica."
        )
    if t.precision == "fp16" and p.tp > 1:
        raise InputError(
            'train.precision = "fp16" with parallel.tp > 1 is not supported: each TP rank\'s gradient scaler would '
            'find overflows in its own shard only and skip steps the other shards take. Use precision = "bf16" '
            "(no scaler needed), or tp = 1."
        )
    if t.local_sgd_interval and t.grad_compression != "none":
        raise InputError(
            "'train.grad_compression' compresses the gradient allreduce, which local SGD does not do: set it to "
            "\"none\" or 'train.local_sgd_interval' to 0."
        )
    _check_zero(t)
    _check_muon(t)
    _check_spike_rollback(t)
    _check_gpu_modes(t, p)
    if t.compile == "on" and p.tp > 1:
        raise InputError(
            'train.compile = "on" with parallel.tp > 1 is not supported: the tensor-parallel collectives (mpi4py) '
            'would break the compiled graph at every layer. Use train.compile = "auto" (eager with TP) or tp = 1.'
        )


def _check_gpu_modes(t: TrainConfig, p: ParallelConfig) -> None:
    """train.share_gpu and fp8: the layouts they are for."""
    if t.share_gpu:
        check_share_gpu(None, t.zero, t.local_sgd_interval)  # the replicas are checked when the world is known
    if t.precision == "fp8" and (p.tp > 1 or p.pp > 1):
        raise InputError(
            "train.precision = \"fp8\" is for tp = pp = 1: torchao converts torch's nn.Linear layers, not hvdlm's "
            'tensor-parallel ones, and the pipeline\'s messages have no fp8 wire format. Use precision = "bf16" '
            "with tp or pp > 1."
        )


def _check_pipeline(config: JobConfig) -> None:
    """Pipeline stages: a split that works, and the settings a pipeline does not combine with (yet)."""
    from hvdlm.parallel.split import check_virtual_stages, stage_layers  # pure arithmetic, import-light

    p, t = config.parallel, config.train
    stage_layers(config.model.n_layer, p.pp, p.pp_layers)
    check_virtual_stages(config.model.n_layer, p.pp, p.virtual_stages, p.microbatches, p.pp_layers)
    if p.pp == 1:
        if p.microbatches != 1:
            raise InputError(
                f"parallel.microbatches = {p.microbatches} splits the step of a pipeline (parallel.pp > 1); without "
                "stages, use train.accumulation_steps for micro-batches, and leave microbatches at 1."
            )
        return
    refused = {
        "train.accumulation_steps": (
            t.accumulation_steps != 1,
            "with pipeline stages the micro-batches of a step are parallel.microbatches: set accumulation_steps "
            "to 1 and microbatches to the number of micro-batches (the global batch is batch_size x microbatches "
            "x dp)",
        ),
        "train.local_sgd_interval": (t.local_sgd_interval != 0, "local SGD needs whole replicas on each rank"),
        'train.precision = "fp16"': (
            t.precision == "fp16",
            'each stage\'s gradient scaler would skip on its own; use precision = "bf16"',
        ),
        'train.compile = "on"': (t.compile == "on", "the stages' sends and receives would break the compiled graph"),
        'parallel.schedule = "gpipe" with virtual_stages > 1': (
            p.schedule == "gpipe" and p.virtual_stages > 1,
            'the interleaved schedule is a 1F1B one; use schedule = "1f1b", or virtual_stages = 1',
        ),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise InputError(f"{key} with parallel.pp = {p.pp} is not supported: {why}. Or use parallel.pp = 1.")


def _check_spike_rollback(t: TrainConfig) -> None:
    """train.spike_rollback goes back to a checkpoint from before the spike: there must be one to go back to."""
    if not t.spike_rollback:
        return
    if not t.checkpoint_interval:
        raise InputError(
            "train.spike_rollback = true needs periodic checkpoints to roll back to, and train.checkpoint_interval is "
            "0 (only the final one is written). Set train.checkpoint_interval (e.g. 100), or spike_rollback = false."
        )
    if t.keep_checkpoints == 1:
        raise InputError(
            "train.spike_rollback = true with train.keep_checkpoints = 1 keeps only the newest checkpoint, which may "
            "be one written during the spike, with nothing older to roll back to. Set keep_checkpoints to 2 or more "
            "(0 keeps all), or spike_rollback = false."
        )


def _check_muon(t: TrainConfig) -> None:
    """Muon orthogonalizes each whole matrix of the blocks: TP ranks gather theirs, ZeRO's flat slices cannot."""
    if t.optimizer != "muon":
        return
    refused = {
        "train.zero > 0": (t.zero > 0, "ZeRO's slices of flat buffers are not matrices. Use train.zero = 0"),
        'train.fused_optimizer = "on"': (
            t.fused_optimizer == "on",
            'there is no fused Muon kernel. Use fused_optimizer = "auto" or "off"',
        ),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise InputError(f'train.optimizer = "muon" with {key} is not supported: {why}, or another optimizer.')


def _check_zero(t: TrainConfig) -> None:
    """train.zero: the stages built, and what sharding the optimizer state cannot go with."""
    if t.zero not in (0, 1, 2, 3):
        raise InputError(
            f"'train.zero' must be 0, 1, 2 or 3, got {t.zero}: the stages are 0 (replicated), 1 (optimizer state "
            "sharded over the data-parallel group), 2 (gradients sharded too) and 3 (weights sharded too). Set "
            "train.zero = 0, 1, 2 or 3."
        )
    if t.zero and t.local_sgd_interval:
        raise InputError(
            f"train.zero = {t.zero} with local SGD (train.local_sgd_interval > 0) is not possible: each local-SGD "
            "replica steps alone and so needs its whole optimizer state. Set train.zero = 0, or local_sgd_interval = 0."
        )
    if t.zero == 3 and t.compile == "on":
        raise InputError(
            'train.zero = 3 with train.compile = "on" is not supported: ZeRO-3 gathers and releases each module\'s '
            "weights in hooks around its forward, which torch.compile would trace into the compiled graph. Use "
            'train.compile = "auto" (eager with ZeRO-3) or train.zero = 2.'
        )
    if t.zero and t.precision == "fp16":
        raise InputError(
            f'train.zero = {t.zero} with precision = "fp16" is not supported: each rank\'s gradient scaler would look '
            "for overflows in its own slice of the gradients only, and the replicas would skip different steps. Use "
            'precision = "bf16" (no scaler needed) or train.zero = 0.'
        )


# Upper bounds on counts and sizes. TOML integers are unbounded in Python, and a number such as
# n_layer = 10**23 passed validation only to fail deep inside torch, the allocator or a C long. Each bound is far
# above any published model or cluster (the largest dense models: ~130 layers, d_model ~25,000, 128 heads,
# vocabularies of ~260,000; the largest jobs: ~100,000 GPUs), so it only ever catches a typo or an overflow; whether
# a model within them fits the device's memory is the trainer's check.
_STEPS = 10**9  # a billion optimizer steps: about 30 years at one step per second
_MAXIMA: dict[str, int] = {
    "model.n_layer": 1024,
    "model.n_head": 1024,
    "model.n_kv_head": 1024,
    "model.d_ff": 2**20,
    "model.d_model": 65536,
    "model.seq_len": 2**20,  # a million-token context
    "model.vocab_size": 2**22,  # 16 x the largest real vocabularies; the BPE trainer itself stops at 2**20
    "parallel.tp": 1024,
    "parallel.pp": 1024,
    "parallel.microbatches": 2**20,
    "parallel.virtual_stages": 1024,
    "train.batch_size": 2**20,
    "train.accumulation_steps": 2**20,
    "train.max_steps": _STEPS,
    "train.warmup_steps": _STEPS,
    "train.log_interval": _STEPS,
    "train.eval_interval": _STEPS,
    "train.checkpoint_interval": _STEPS,
    "train.local_sgd_interval": _STEPS,
    "train.commit_interval": _STEPS,
    "train.max_skipped_steps": _STEPS,
    "train.spike_steps": _STEPS,
    "train.spike_window": _STEPS,
    "train.spike_max_rollbacks": 2**20,
    "train.eval_batches": 2**20,
    "train.sample_tokens": 2**20,
    "train.profile_steps": _STEPS,
    "train.keep_checkpoints": 2**20,
    "train.threads": 4096,
    "train.seed": 2**63 - 1,  # torch.manual_seed takes a 64-bit integer
    "launch.np": 2**20,
    "slurm.nodes": 2**20,
    "slurm.gpus_per_node": 1024,
    "slurm.ntasks_per_node": 2**16,
    "slurm.cpus_per_task": 2**16,
    "slurm.max_restarts": 2**20,
}


def maximum(name: str) -> int:
    """The bound on the integer key `name` ("section.key"): for a command that writes the key into a job (hvdlm plan
    --write-job), so what it accepts is what the job file may hold."""
    return _MAXIMA[name]


def _check_maxima(config: JobConfig) -> None:
    for name, limit in _MAXIMA.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value > limit:
            raise InputError(
                f"'{name}' must be at most {limit:,}, got {value:,}. The bound is far above any real setting: "
                "check the value for a typo."
            )


def _validate_choices(config: JobConfig) -> None:
    """Every Literal-typed key holds one of its words (TOML and --set give any string)."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for name, hint in typing.get_type_hints(type(values)).items():
            if typing.get_origin(hint) is not Literal:
                continue
            value, options = getattr(values, name), typing.get_args(hint)
            if value not in options:
                raise InputError(
                    f"'{section.name}.{name}' must be one of {', '.join(options)}, got '{value}'."
                    f"{_closest(value, options)}"
                )


def tp_splits(m: ModelConfig) -> tuple[tuple[str, int, str], ...]:
    """What each TP rank takes an equal share of: (the key, its value, what it counts), every one of which tp must
    divide. The planner (hvdlm.plan.layouts) proposes only a tp that divides them all, so that it never names a
    layout this validation refuses."""
    ffn = "4 x model.d_model" if m.arch == "gpt2" and not m.d_ff else "model.d_ff"  # its default: the arch's width
    return (
        ("model.n_head", m.n_head, "attention heads"),
        ("model.n_kv_head", m.kv_heads, "key/value heads"),
        ("model.d_model", m.d_model, "attention dimensions"),
        (ffn, m.ffn_width, "MLP hidden units"),
    )


def _validate_tp(m: ModelConfig, p: ParallelConfig) -> None:
    """Each TP rank takes n_head / tp query heads, n_kv_head / tp key/value heads and a 1/tp slice of the hidden
    sizes; all must split evenly (tp_splits). Key/value heads are never replicated across TP ranks (as Megatron
    does where tp > n_kv_head): a replicated head's gradient would need its own reduction, so tp must divide
    n_kv_head. (Whether tp divides the number of ranks is checked when the ranks start: see
    hvdlm.parallel.topology.)"""
    for name, value, what in tp_splits(m):
        if value % p.tp:
            fits = [k for k in range(1, value + 1) if value % k == 0 and m.kv_heads % k == 0][:12]
            also = " (they are not replicated)" if name == "model.n_kv_head" else ""
            raise InputError(
                f"parallel.tp = {p.tp} does not divide {name} ({value}): every tensor-parallel rank takes an equal "
                f"share of the {what}{also}. Pick a tp among {fits}, or change {name}."
            )
