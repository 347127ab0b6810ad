"""Slurm batch scripts: a spec from the job file and the command line, a pure render() to text, submission.

One rank per device: `--ntasks-per-node` is the GPUs per node, or on CPU-only nodes the CPU ranks per node
(launch.np / nodes unless slurm.ntasks_per_node says otherwise), each with `--cpus-per-task` cores that its
OMP_NUM_THREADS matches, so ranks never oversubscribe the cores Slurm granted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hvdlm import __version__
from hvdlm.config import JobConfig, SlurmConfig, check_choice, choices, parse_override
from hvdlm.devices import check_share_gpu
from hvdlm.errors import InputError
from hvdlm.launch.commands import (
    CPU,
    GPU,
    ROOT_VARIABLES,
    CommandSpec,
    LaunchOptions,
    build_command,
    check_gpus_per_node,
    check_tp_layout,
    rank_env,
)
from hvdlm.launch.shell import HOSTNAME, ShellVar, check_name, check_text, join
from hvdlm.runfiles import REQUEUE_EXIT_CODE, SPIKE_EXIT_CODE

# Slurm's --time forms (sbatch(1)): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; ASCII digits ([0-9], not \d, which takes any script's digits).
_TIME = re.compile(r"(?:(?P<days>[0-9]{1,9})-)?(?P<fields>[0-9]{1,9}(?::[0-9]{1,2}){0,2})")
_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 02:00:00 or 1-12:00:00"
# Slurm adds the fields up in seconds in a C int (parse_time.c, time_str2secs) without checking their ranges, so
# 99:99:99 is silently 100 hours and a large day count wraps around. hvdlm asks for a field below its unit.
_TIME_MAX_SECONDS = 2**31 - 1
_NO_TIME_LIMIT = ("infinite", "unlimited")  # Slurm's words for the partition's maximum
_DIRECTIVE = re.compile(r"--([a-z][a-z0-9\-]*)(=[A-Za-z0-9_.\-/+,:=@%]+)?")
# Cores per rank when the job file does not say: a GPU rank needs a few for its Python thread, Horovod's
# background thread and data loading; a CPU rank gets one core per OpenMP thread and can ask for more.
DEFAULT_CPUS_PER_GPU_RANK = 4
DEFAULT_CPUS_PER_CPU_RANK = 1
# Seconds between Slurm's warning signal and the time limit: a checkpoint of a large model on a busy parallel file
# system takes tens of seconds, and Slurm may send the signal up to 60 s early or late (its event resolution).
WARNING_SECONDS = 120


@dataclass
class SlurmOverrides:
    """What `hvdlm sbatch`'s command line says. A value left None keeps the job file's [slurm] value (or, where
    that is 0 or empty, the derived default); see spec_from_config."""

    nodes: int | None = None
    gpus_per_node: int | None = None  # 0: CPU-only nodes
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    launcher: str | None = None
    ntasks_per_node: int | None = None  # must be positive when given
    cpus_per_task: int | None = None  # must be positive when given
    venv: str | None = None  # "": activate none
    job_name: str | None = None
    run_dir: str | None = None
    sets: list[str] = field(default_factory=list)  # the --set items, handed on to every rank
    command: str = ""  # the hvdlm command that makes the script, for its header
    script: str = ""  # where the script is written, for its header


@dataclass
class SbatchSpec:
    job_name: str
    job_file: str  # the TOML as the ranks will read it (absolute, on the shared file system)
    nodes: int
    gpus_per_node: int
    ntasks_per_node: int
    cpus_per_task: int
    time: str
    launcher: str = "srun"
    options: LaunchOptions = field(default_factory=LaunchOptions)
    run_dir: str = ""  # empty: runs/JOB-<job id>, relative to the directory sbatch was called from
    overrides: list[str] = field(default_factory=list)
    partition: str = ""
    account: str = ""
    modules: list[str] = field(default_factory=list)
    venv: str = ""
    python: str = "python"  # the interpreter that runs `-m hvdlm train` (after the venv is activated)
    setup: list[str] = field(default_factory=list)
    directives: list[str] = field(default_factory=list)
    command: str = ""  # the hvdlm command that made the script, for its header
    script: str = ""  # where the script is written, for its header
    max_restarts: int = 0  # slurm.max_restarts: requeues after a failure

    def check(self) -> None:
        """Refuse anything that would put text into the script that the user did not mean as a command."""
        self._check_words()
        check_time(self.time)
        if self.nodes <= 0:
            raise InputError(f"--nodes must be positive, got {self.nodes}.")
        if self.gpus_per_node < 0:
            raise InputError(f"--gpus-per-node must be zero or more, got {self.gpus_per_node}.")
        if self.ntasks_per_node <= 0 or self.cpus_per_task <= 0:
            raise InputError("tasks per node and cpus per task must be positive.")
        check_choice("launcher", self.launcher, choices(SlurmConfig, "launcher"))
        for line in self.setup:
            if "\n" in line or "\r" in line:
                raise InputError(f"slurm.setup line {line!r} holds a line break: write one command per item.")
        self.options.check()
        self.sbatch_directives()
        for item in self.overrides:  # last: the checks above name the key an override set wrong
            check_override(item)
        if "\n" in self.command or "\r" in self.command:  # it goes into a comment line of the header
            raise InputError("the command line holds a line break; pass each value on one line.")

    def _check_words(self) -> None:
        """The names and paths the script will hold: names plain, paths free of shell syntax."""
        check_name("--job-name", self.job_name, HOSTNAME)  # also a directory name: runs/NAME-<job id>
        check_text("job file", self.job_file)
        check_text("python", self.python)
        for what, value in (("--run-dir", self.run_dir), ("slurm.venv", self.venv), ("-o", self.script)):
            if value:
                check_text(what, value)
        for what, value in (("--partition", self.partition), ("--account", self.account)):
            if value:
                check_name(what, value)
        for module in self.modules:
            check_name("module", module)

    def sbatch_directives(self) -> list[str]:
        """#SBATCH options, sorted by name; the job file's extra ones may add but not repeat."""
        options = {
            "job-name": self.job_name,
            "nodes": str(self.nodes),
            "ntasks-per-node": str(self.ntasks_per_node),
            "cpus-per-task": str(self.cpus_per_task),
            "time": self.time,
            "output": "%x-%j.out",
            # USR1 to the batch shell ("B:") 120 s before the time limit: time for a checkpoint. The shell hands it
            # on to the ranks (see _launch_lines for why not to the job steps directly). --requeue lets the script
            # requeue the job, and the log of every start goes into one file (Slurm would truncate it on a restart).
            "signal": f"B:USR1@{WARNING_SECONDS}",
            "requeue": "",
            "open-mode": "append",
        }
        if self.gpus_per_node:
            options["gpus-per-node"] = str(self.gpus_per_node)
        if self.partition:
            options["partition"] = self.partition
        if self.account:
            options["account"] = self.account
        extra: set[str] = set()
        for directive in self.directives:
            m = _DIRECTIVE.fullmatch(directive)
            if not m:
                raise InputError(
                    f"slurm.directives item '{directive}' is not an sbatch option such as --constraint=a100 "
                    "(plain names and values only)."
                )
            if m.group(1) in extra:
                raise InputError(f"slurm.directives sets --{m.group(1)} twice; keep one.")
            if m.group(1) in options:
                raise InputError(f"slurm.directives sets --{m.group(1)}, which hvdlm sets already; use its own key.")
            extra.add(m.group(1))
            options[m.group(1)] = (m.group(2) or "=")[1:]
        return [f"--{name}={value}" if value else f"--{name}" for name, value in sorted(options.items())]


def check_time(text: str) -> None:
    """Refuse a --time that Slurm would refuse, or read as something else than meant (see _TIME)."""
    if text.lower() in _NO_TIME_LIMIT:
        return
    m = _TIME.fullmatch(text)
    if not m:
        raise InputError(f"--time '{text}' is not a Slurm time limit. Write {_TIME_FORMS}.")
    fields = [int(f) for f in m.group("fields").split(":")]
    days = m.group("days")
    # Each field's name, seconds and bound (None: free, as the first field without days: 90 minutes, 48 hours).
    if days is not None:
        layout = [("hours", 3600, 24), ("minutes", 60, 60), ("seconds", 1, 60)][: len(fields)]
    else:
        layout = {
            1: [("minutes", 60, None)],
            2: [("minutes", 60, None), ("seconds", 1, 60)],
            3: [("hours", 3600, None), ("minutes", 60, 60), ("seconds", 1, 60)],
        }[len(fields)]
    for (name, _, limit), value in zip(layout, fields):
        if limit is not None and value >= limit:
            raise InputError(
                f"--time '{text}' is not a Slurm time limit: {name} must be below {limit}, got {value}. "
                f"Write {_TIME_FORMS}."
            )
    seconds = int(days or 0) * 86400 + sum(unit * value for (_, unit, _), value in zip(layout, fields))
    if seconds > _TIME_MAX_SECONDS:
        raise InputError(
            f"--time '{text}' is longer than Slurm can count ({_TIME_MAX_SECONDS // 86400:,} days). Ask for what the "
            "partition allows (sinfo -o '%P %l'), or UNLIMITED for its maximum."
        )


def check_override(item: str) -> None:
    """An override goes into the script as a `--set` argument, shell-quoted. Parsed by the same parser as the
    job's (a TOML list is fine), its key must be a plain name and its strings free of shell syntax; the TOML
    around them may hold its quotes, which the shell quoting covers."""
    section, key, value = parse_override(item)
    check_name("--set key", f"{section}.{key}", HOSTNAME)
    check_text("--set", item, allowed='"')  # no comment (#), escape or other syntax beside the strings
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and text:
            check_text(f"--set {section}.{key}", text)


def default_job_name(job_file: str) -> str:
    """The job file's stem as a Slurm job name and directory name: characters other than letters, digits, '.',
    '-' and '_' become '_' ("my job.toml" -> "my_job"), and it starts with a letter, digit or '_'."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(job_file).stem)
    return re.sub(r"^[.\-]+", "", name) or "hvdlm"


def check_venv(venv: str) -> str:
    """A virtual environment named on the command line or in slurm.venv must be one, where this machine sees its
    file system; one it cannot see (its directory is missing here) may exist on the compute nodes only: that
    returns a note to print. Returns "" when it is fine."""
    path = Path(venv).expanduser()
    if (path / "bin" / "activate").is_file():
        return ""
    if path.exists() or path.parent.is_dir():
        why = "does not exist" if not path.exists() else "is not a virtual environment (it has no bin/activate)"
        raise InputError(
            f"--venv '{venv}' {why}. Name the directory of a virtual environment (python -m venv DIR creates one), "
            "or pass --venv '' to activate none."
        )
    return (
        f"note: --venv '{venv}' is not on this machine ('{path.parent}' does not exist here); the script activates "
        "it on the compute nodes, where it must exist."
    )


def rank_note(cfg: JobConfig, spec: SbatchSpec) -> str:
    """When the script starts another number of ranks than launch.np, say how many and why ("" when the same)."""
    ranks = spec.nodes * spec.ntasks_per_node
    if ranks == cfg.launch.np:
        return ""
    if spec.gpus_per_node and spec.ntasks_per_node == spec.gpus_per_node:
        why = f"{spec.nodes} node(s) x {spec.gpus_per_node} GPU(s) per node, one rank per GPU"
    else:
        why = f"{spec.nodes} node(s) x {spec.ntasks_per_node} task(s) per node"
    return (
        f"note: the script starts {ranks} rank(s) ({why}), not launch.np = {cfg.launch.np}: in a batch job the "
        "allocation sets the ranks. For fewer, pass --nodes, --gpus-per-node or --ntasks-per-node."
    )


def spec_from_config(cfg: JobConfig, job_file: str, overrides: SlurmOverrides) -> SbatchSpec:
    """Command-line values win over the job file's [slurm] section, which wins over the defaults."""
    sl, cli = cfg.slurm, overrides
    nodes = sl.nodes if cli.nodes is None else cli.nodes
    gpus = sl.gpus_per_node if cli.gpus_per_node is None else cli.gpus_per_node
    launcher = cli.launcher or sl.launcher
    if nodes <= 0:
        raise InputError(f"--nodes must be positive, got {nodes}.")
    tasks, cpus = _rank_layout(cfg, cli, nodes, gpus)
    # srun's steps ask for the GPUs the job asked for, and inherit its tasks per node (#SBATCH, where
    # --ntasks-per-node may have won).
    options = LaunchOptions.from_config(cfg, gpus_per_node=gpus, ntasks_per_node=0)
    check_tp_layout(
        cfg.parallel.tp, nodes * tasks, launcher, cfg.launch.controller, ranks_per_node=tasks, pp=cfg.parallel.pp
    )
    check_gpus_per_node(cfg.train.device, tasks, gpus, share=cfg.train.share_gpu)
    if cfg.train.share_gpu:  # ranks sharing GPUs: one replica only (no NCCL)
        check_share_gpu(nodes * tasks // (cfg.parallel.tp * cfg.parallel.pp))
    venv = cli.venv
    if venv is None:
        venv = sl.venv or (sys.prefix if sys.prefix != sys.base_prefix else "")
    spec = SbatchSpec(
        job_name=cli.job_name or default_job_name(job_file),
        job_file=str(Path(job_file).resolve()),
        nodes=nodes,
        gpus_per_node=gpus,
        ntasks_per_node=tasks,
        cpus_per_task=cpus,
        time=cli.time or sl.time,
        launcher=launcher,
        options=options,
        run_dir=cli.run_dir or "",
        overrides=list(cli.sets),
        partition=cli.partition or sl.partition,
        account=cli.account or sl.account,
        modules=list(sl.modules),
        venv=venv,
        python="python" if venv else sys.executable,
        setup=list(sl.setup),
        directives=list(sl.directives),
        command=cli.command,
        script=cli.script,
        max_restarts=sl.max_restarts,
    )
    spec.check()
    return spec


def _rank_layout(cfg: JobConfig, cli: SlurmOverrides, nodes: int, gpus: int) -> tuple[int, int]:
    """Tasks per node and cores per task: the command line's, else the job file's, else derived."""
    sl = cfg.slurm
    # 0 in the job file means "derive it"; on the command line a value must be meant, so 0 is refused, not
    # silently replaced by the default.
    for what, value in (("--ntasks-per-node", cli.ntasks_per_node), ("--cpus-per-task", cli.cpus_per_task)):
        if value is not None and value <= 0:
            raise InputError(f"{what} must be positive, got {value}. Leave it out for the default.")
    tasks = cli.ntasks_per_node or sl.ntasks_per_node or gpus
    if not tasks:
        # CPU-only nodes: the job's ranks, spread evenly.
        if cfg.launch.np % nodes:
            raise InputError(
                f"launch.np = {cfg.launch.np} ranks do not spread evenly over {nodes} CPU-only node(s). Give "
                "--ntasks-per-node (ranks per node), or an np that the node count divides."
            )
        tasks = cfg.launch.np // nodes
    default_cpus = DEFAULT_CPUS_PER_GPU_RANK if gpus else DEFAULT_CPUS_PER_CPU_RANK
    return tasks, cli.cpus_per_task or sl.cpus_per_task or default_cpus


def render(spec: SbatchSpec) -> str:
    """The batch script as text: header, sorted #SBATCH directives, environment set-up, the launch line."""
    spec.check()
    ranks = spec.nodes * spec.ntasks_per_node
    device = f"GPU ({spec.gpus_per_node} per node)" if spec.gpus_per_node else "share of a node's CPU cores"
    lines = [
        "#!/bin/bash",
        f"# Generated by hvdlm {__version__}" + (f": {spec.command}" if spec.command else "."),
        f"# {ranks} rank(s): {spec.nodes} node(s) x {spec.ntasks_per_node} task(s), one per {device}, "
        f"{spec.cpus_per_task} core(s) each.",
        f"# Submit it with:  sbatch {shlex.quote(spec.script) if spec.script else 'FILE'}"
        + ("" if spec.script else "   (after saving it as FILE; or add --submit to the command above)"),
    ]
    lines += [f"#SBATCH {d}" for d in spec.sbatch_directives()]
    # Not -u: `module` and venv activation scripts read variables that may be unset.
    lines += ["", "set -eo pipefail", ""]
    lines += [f"module load {shlex.quote(m)}" for m in spec.modules]
    if spec.venv:
        lines.append(f"source {shlex.quote(str(Path(spec.venv) / 'bin' / 'activate'))}")
    if spec.modules or spec.venv:
        lines.append("")

    env = rank_env(spec.options, spec.launcher, ShellVar("${SLURM_CPUS_PER_TASK}"), device=_device(spec))
    lines.append("# Every rank's variables (Slurm passes the batch script's environment on to srun and mpirun).")
    lines += [f"export {name}={_value(value)}" for name, value in env.items()]
    if spec.launcher in ("mpirun", "horovodrun"):
        root = " ".join(f"{k}={v}" for k, v in ROOT_VARIABLES.items())
        lines.append(f'if [ "$(id -u)" = 0 ]; then export {root}; fi  # Open MPI refuses root without these')
    if spec.setup:
        lines += ["", "# From slurm.setup in the job file, as written there."] + spec.setup
    lines += ["", *_launch_lines(spec, env), ""]
    return "\n".join(lines)


def _device(spec: SbatchSpec) -> str:
    """GPU nodes (slurm.gpus_per_node > 0) run GPU ranks: the launch line's tuning follows (commands.rank_env)."""
    return GPU if spec.gpus_per_node > 0 else CPU


def _value(value: str) -> str:
    return value.rendered() if isinstance(value, ShellVar) else shlex.quote(value)


def _launch_lines(spec: SbatchSpec, env: dict[str, str]) -> list[str]:
    run_dir = spec.run_dir or ShellVar(f"runs/{spec.job_name}-${{SLURM_JOB_ID}}")
    # --resume auto: the first start finds no checkpoint and starts fresh; a requeued start keeps its job id, so
    # its run directory, and continues from the newest checkpoint there.
    program = [spec.python, "-m", "hvdlm", "train", spec.job_file, "--run-dir", run_dir, "--resume", "auto"]
    for item in spec.overrides:
        program += ["--set", item]
    ntasks = ShellVar("${SLURM_NTASKS}")
    lines = []
    if spec.launcher == "horovodrun":
        # horovodrun needs the hosts spelled out: hvdlm reads them from the allocation at run time. It starts the
        # ranks of other nodes over ssh, so multi-node jobs need passwordless ssh between the job's nodes.
        if spec.nodes > 1:
            lines.append("# horovodrun starts the other nodes' ranks over ssh: they must accept this user's key.")
        lines.append(f"HOSTS=$({shlex.quote(spec.python)} -m hvdlm hostfile --from slurm --format horovod)")
        hosts = ShellVar("${HOSTS}")
        command = CommandSpec("horovodrun", "horovodrun", ntasks, program, hosts=hosts, env=env, device=_device(spec))
    else:
        # mpirun finds the hosts in the Slurm allocation by itself; srun uses it directly.
        command = CommandSpec(
            spec.launcher, spec.launcher, ntasks, program, env=env, present=["PATH"], device=_device(spec)
        )
    argv = build_command(command, spec.options)
    launcher = argv[: len(argv) - len(program)]
    return lines + [
        *_preemption_lines(spec.launcher),
        f"{join(launcher)} \\\n    {join(program)} &",
        *_requeue_lines(spec.launcher, spec.max_restarts, run_dir),
    ]


# Why the trap signals what it signals, per launcher (comment lines of the script).
_WHOM = {
    "srun": [
        "# srun forwards USR1 to every task of its step, on every node.",
        "# To preempt by hand: scancel --batch --signal=USR1 JOBID (plain --signal=USR1 reaches srun's ranks too).",
    ],
    "mpirun": [
        "# The trap signals this node's ranks, the processes below mpirun that run `hvdlm train`: they are children",
        "# of this shell, not job steps, which Slurm's plain --signal would miss; and not mpirun itself, which turns",
        "# TERM into killing the job. The ranks of other nodes stop at the same step: the ranks agree on it.",
        "# To preempt by hand: scancel --batch --signal=USR1 JOBID",
    ],
    "horovodrun": [
        "# The trap signals this node's ranks, the processes below horovodrun that run `hvdlm train`: they are",
        "# children of this shell, not job steps, which Slurm's plain --signal would miss; and not horovodrun itself,",
        "# which dies on USR1 and with Gloo turns TERM into SIGKILL after 5 s. The ranks of other nodes stop at the",
        "# same step: the ranks agree on it. To preempt by hand: scancel --batch --signal=USR1 JOBID",
    ],
}
# The ranks on this node: descendants of the launcher whose argv is PYTHON -m hvdlm train ... (fields 3 to 6 after
# pid and ppid), so not the `sh -c "... -m hvdlm train ..."` that horovodrun starts them with (a shell dies on USR1).
_SIGNAL_RANKS = [
    '    ps -e -o pid= -o ppid= -o args= | awk -v root="$launcher" \'',
    '        { parent[$1] = $2; rank[$1] = $4 == "-m" && $5 == "hvdlm" && $6 == "train" }',
    "        END { for (p in parent) if (rank[p]) { q = p; while (q in parent && q != root) q = parent[q]; "
    "if (q == root) print p } }' |",
    "        xargs -r kill -USR1 2>/dev/null || true",
]


def _preemption_lines(launcher: str) -> list[str]:
    """The trap that hands Slurm's signals on to the ranks, with the reasons."""
    forward = ['    kill -USR1 "$launcher" 2>/dev/null || true'] if launcher == "srun" else _SIGNAL_RANKS
    return [
        f"# Preemption. Slurm sends USR1 to this shell {WARNING_SECONDS} s before the time limit (--signal=B:...), "
        "and TERM to",
        "# every process of the job at the limit or on preemption (then KILL after KillWait). The trap hands either "
        "on as",
        f"# USR1: the ranks agree on a step, write its checkpoint and exit {REQUEUE_EXIT_CODE}; the job is requeued "
        "below. The",
        "# launcher runs in the background because bash runs traps only between commands; a `wait` ends early for one.",
        *_WHOM[launcher],
        "signalled=",
        "forward() {",
        "    signalled=1",
        *forward,
        "}",
        "trap forward USR1 TERM",
    ]


def _requeue_lines(launcher: str, max_restarts: int = 0, run_dir: str = "") -> list[str]:
    """Wait for the launcher through trapped signals; requeue the job when the ranks stopped for preemption, or
    (slurm.max_restarts) when they failed."""
    code = REQUEUE_EXIT_CODE
    lines = [
        "launcher=$!",
        "# A signal that came before the launcher started reached nobody: hand it on once the ranks catch it.",
        'if [ -n "$signalled" ]; then sleep 10; forward; fi',
        'while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || true; done',
        "status=0",
        'wait "$launcher" || status=$?  # the launcher\'s exit status, which bash kept (|| keeps set -e quiet)',
    ]
    condition = f'[ "$status" = {code} ]'
    if launcher == "horovodrun":
        lines += [
            f"# horovodrun with Gloo exits 1 when a rank exits non-zero, {code} included: after a preemption signal, "
            "a failed",
            "# run counts as preempted (a requeued one resumes from its newest checkpoint either way).",
        ]
        condition = f'[ "$status" = {code} ] || {{ [ -n "$signalled" ] && [ "$status" != 0 ]; }}'
    lines += [
        f"if {condition}; then",
        '    echo "hvdlm: the run stopped for preemption (exit status $status) after a checkpoint: requeueing job '
        '${SLURM_JOB_ID}, which resumes it"',
        '    scontrol requeue "${SLURM_JOB_ID}" && exit 0',
        '    echo "hvdlm: scontrol requeue failed: submit this script again to resume from the checkpoint" >&2',
        f"    exit {code}",
        "fi",
        *_failure_lines(max_restarts, run_dir),
        'exit "$status"',
    ]
    return lines


# A line of RUN_DIR/restarts.jsonl, as `hvdlm launch --max-restarts` writes them (printf's format).
_RESTART_RECORD = '{"restart": %d, "time": "%s", "cause": "exit status %s", "exit_code": %s, "slurm_job": "%s"}\\n'


def _failure_lines(max_restarts: int, run_dir: str) -> list[str]:
    """slurm.max_restarts: requeue a failed run (a rank died, the watchdog ended it), which resumes from its
    newest checkpoint; not after success, bad input (exit 2) or a loss spike that kept coming back
    (SPIKE_EXIT_CODE: it would again). SLURM_RESTART_COUNT counts every requeue of the
    job, preemptions too."""
    if not max_restarts:
        return []
    run_dir_word = run_dir.rendered() if isinstance(run_dir, ShellVar) else shlex.quote(run_dir)
    count = "${SLURM_RESTART_COUNT:-0}"
    return [
        f"# slurm.max_restarts = {max_restarts}: a failed run (not bad input, exit 2, nor a recurring loss spike, "
        f"exit {SPIKE_EXIT_CODE})",
        "# is requeued and resumes from its newest checkpoint, while the job's requeues (SLURM_RESTART_COUNT,",
        "# preemptions included) are fewer.",
        f'if [ "$status" != 0 ] && [ "$status" != 2 ] && [ "$status" != {SPIKE_EXIT_CODE} ] && '
        f'[ "{count}" -lt {max_restarts} ]; then',
        f'    echo "hvdlm: the run failed (exit status $status): requeueing job ${{SLURM_JOB_ID}} (restart $(({count} '
        f'+ 1)) of {max_restarts}), which resumes from its newest checkpoint"',
        f'    printf {shlex.quote(_RESTART_RECORD)} "$(({count} + 1))" "$(date +%Y-%m-%dT%H:%M:%S%z)" '
        f'"$status" "$status" "${{SLURM_JOB_ID}}" >> {run_dir_word}/restarts.jsonl || true',
        '    scontrol requeue "${SLURM_JOB_ID}" && exit 0',
        '    echo "hvdlm: scontrol requeue failed: submit this script again to resume from the checkpoint" >&2',
        "fi",
    ]


def check_setup(setup: list[str]) -> None:
    """`bash -n` on the slurm.setup lines, which go into the script exactly as written (the rest of the script is
    hvdlm's own). A syntax error in them should stop here, on the login node, and not when the job starts after
    hours in the queue. Checked as one block, so that a construct may span items ("if ...; then", ..., "fi"), and
    on its own, so that an unclosed quote cannot pair with a quote of the launch line below it."""
    bash = shutil.which("bash")
    if not setup or not bash:
        return  # nothing to check, or nothing to check with (Slurm's nodes will say it)
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write("\n".join(setup) + "\n")
        f.flush()
        try:
            proc = subprocess.run([bash, "-n", f.name], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return
    if proc.returncode == 0:
        return
    m = re.search(r"line ([0-9]+): (.*)", proc.stderr)
    number = int(m.group(1)) if m else 0
    where = f" in item {number}, {setup[number - 1]!r}" if 0 < number <= len(setup) else ""
    reason = m.group(2) if m else proc.stderr.strip()
    raise InputError(
        f"slurm.setup has a shell syntax error{where} ({reason}). Fix the job file: each item is a line of the batch "
        "script, and together they must be complete commands."
    )


def submit(script: str, path: str | None) -> str:
    """sbatch the script (the file at `path`, else the text on stdin); returns the job id."""
    if not shutil.which("sbatch"):
        raise InputError("'sbatch' is not on the PATH: submit from a Slurm login node, or drop --submit.")
    argv = ["sbatch", "--parsable"] + ([path] if path else [])
    try:
        proc = subprocess.run(argv, input=None if path else script, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise InputError(
            "sbatch did not answer within 120 s: the Slurm controller may be down or overloaded. Check with "
            "'squeue --me' whether the job was queued before submitting again."
        ) from None
    except OSError as e:
        raise InputError(f"sbatch could not be started: {e.strerror or e}.") from None
    if proc.returncode != 0:
        raise InputError(f"sbatch refused the script: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"
    if not job_id:
        raise InputError(
            "sbatch exited without error but printed no job id, so hvdlm cannot tell whether the job was queued. "
            f"Check with 'squeue --me'{'; sbatch said: ' + proc.stderr.strip() if proc.stderr.strip() else ''}."
        )
    return job_id
