"""The Python side of bench/gpu_check.sh's phases `share`, `multigpu`, `large` and `fp8`: each trains hvdlm (through
`hvdlm launch`, real ranks) in the layouts it compares, checks the figures, prints one line a check and a JSON
line of figures, and exits 1 when a check failed (0 when all passed, or the phase was skipped with its reason).

    python bench/gpu_phases.py share --work DIR              # on the GPU machine (gpu_check.sh runs these)
    python bench/gpu_phases.py share --work DIR --tiny        # the same logic on a CPU, tiny shapes, in seconds

- share: TP=2 and PP=2 (and PP=2 x TP=2 where the machine has 4 slots) with train.share_gpu, every rank on the one
  GPU, against one rank at the same global batch, bf16, 20 steps. Each step's loss within bf16 noise of the one
  rank's: 2 x the largest relative distance of the one-rank bf16 run from its fp32 twin (what bf16 rounding alone
  does to this model in these steps), plus 8 bf16 units of rounding (8 x 2^-9) for the first steps, where that
  distance is near 0 (tests/tp_bf16_checks.py's rule); a wrong sum or a lost message moves a loss by far more.
  TP and PP bytes per step as hvdlm.plan.counts counts them, which CPU runs match exactly (bench/plan_check.py),
  and the path the CUDA collectives took: CUDA-aware MPI, or staged through host memory (where MPI says it is
  CUDA-aware, TP=2 runs once more with the host path forced, HVDLM_MPI_CUDA_AWARE=0: both paths checked).
- multigpu: with 2 or more GPUs (else skipped, saying so): DP=2 over NCCL against one GPU at the same global batch
  (one rank accumulating two micro-batches: the same kernels' shapes), fp32 within 1e-5 and bf16 within its noise;
  TP=2 and PP=2 (fp32, 1e-5) against one GPU; ZeRO-1 and ZeRO-2 against DP=2 (fp32, 1e-6), the tolerances the CPU
  tests prove (tests/test_tp_training.py, test_pipeline.py, test_zero.py); TF32 off (NVIDIA_TF32_OVERRIDE=0) in
  every run of the phase, so fp32 means fp32. Then Horovod's allreduce at 1, 16 and 256 MB: algbw = size / time and
  busbw = algbw x 2 (n - 1) / n (nccl-tests' formula: what each rank's link carries in a ring).
- large: a ~1.4B Llama (jobs/llama-1b.toml's shape, its head untied as bench/plain_gpt2.py's Llama) or GPT-2-XL
  (--shape gpt2-xl), bf16, one GPU, in hvdlm and in bench/plain_gpt2.py one after the other: tokens/s ratio
  (>= 0.95), MFU (>= 45 %), peak memory ratio (<= 1.05, max_memory_allocated in both).
- fp8: the large shape in train.precision = "fp8" against bf16 (large's run when it ran in the same work folder):
  tokens/s ratio and the last loss within 1 %; where fp8 is refused (a CPU, a GPU before Hopper, no torchao), the
  refusal is checked (exit 2, its reason) and the phase skipped with that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_UNIT = 2.0**-9  # bf16 keeps 8 significant bits: relative rounding of at most 2^-9
FP32_TOL, ZERO_TOL = 1e-5, 1e-6
TARGET_RATIO, TARGET_MFU, TARGET_MEMORY = 0.95, 0.45, 1.05
ALLREDUCE_MB = (1, 16, 256)

# The runs' shapes: tiny (a CPU, seconds) and the GPU's.
TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32", "model.vocab_size=256"]
SHARE_GPU = ["model.n_layer=4", "model.n_head=8", "model.d_model=512", "model.seq_len=256", "model.vocab_size=512"]
LARGE = {
    "llama-1b": {
        "sets": [
            "model.arch=llama",
            "model.n_layer=16",
            "model.n_head=32",
            "model.n_kv_head=8",
            "model.d_model=2048",
            "model.d_ff=8192",
            "model.seq_len=2048",
            "model.vocab_size=128256",
            "model.tie_embeddings=false",
        ],
        "plain": [
            "--arch",
            "llama",
            "--n-layer",
            "16",
            "--n-head",
            "32",
            "--n-kv-head",
            "8",
            "--d-model",
            "2048",
            "--d-ff",
            "8192",
            "--seq-len",
            "2048",
            "--vocab",
            "128256",
        ],
        "batch": 4,
    },
    "gpt2-xl": {
        "sets": [
            "model.n_layer=48",
            "model.n_head=25",
            "model.d_model=1600",
            "model.seq_len=1024",
            "model.vocab_size=50304",
        ],
        "plain": ["--n-layer", "48", "--n-head", "25", "--d-model", "1600", "--seq-len", "1024", "--vocab", "50304"],
        "batch": 8,
    },
    "tiny": {
        "sets": TINY,
        "plain": [
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--d-model",
            "32",
            "--seq-len",
            "32",
            "--vocab",
            "256",
            "--no-compile",
        ],
        "batch": 4,
    },
}
COMMON = [
    "data.tokenizer=byte",
    "train.eval_interval=0",
    "train.sample_tokens=0",
    "train.tensorboard=false",
    "train.checkpoint_interval=0",
    "train.keep_checkpoints=1",
    "train.warmup_steps=2",
]


# --- what is compared (pure) ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def worst_relative(reference: list[float], other: list[float]) -> float:
    """The largest relative distance between two runs' losses, step by step (inf when they logged different steps)."""
    if not reference or len(reference) != len(other):
        return float("inf")
    return max(abs(a - b) / abs(a) for a, b in zip(reference, other))


def bf16_tolerance(one_bf16: list[float], one_fp32: list[float]) -> float:
    """Within bf16 noise: twice what bf16 rounding alone moves the one-rank run from fp32, plus 8 bf16 units."""
    return 2 * worst_relative(one_fp32, one_bf16) + 8 * BF16_UNIT


def compare_losses(name: str, reference: list[float], other: list[float], tolerance: float) -> Check:
    worst = worst_relative(reference, other)
    learned = len(reference) > 1 and reference[-1] < reference[0]
    return Check(
        name,
        worst <= tolerance and learned,
        f"worst relative loss difference {worst:.2e} over {len(other)} steps (tolerance {tolerance:.2e})"
        + ("" if learned else "; the reference did not learn"),
    )


def bus_bandwidth(size_bytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s of an allreduce of `size_bytes` taking `seconds` on `ranks` ranks (nccl-tests)."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * 2 * (ranks - 1) / ranks


def multigpu_skip_reason(device: str, gpus: int) -> str | None:
    """Why the multi-GPU phase cannot run here (None: it runs). On a CPU (--tiny) it runs with CPU ranks."""
    if device == "cuda" and gpus < 2:
        return f"this machine shows {gpus} GPU(s); DP, TP, PP and ZeRO across GPUs need 2 or more"
    return None


def large_checks(hvdlm: dict, plain: dict, judged: bool) -> list[Check]:
    """The large shape: hvdlm against the plain loop (judged on GPUs only: a CPU's speed says nothing of them)."""
    ratio = hvdlm["tokens_per_s"] / plain["tokens_per_s"]
    memory = hvdlm["memory_mb"] / (plain["max_memory_GiB"] * 1024) if plain.get("max_memory_GiB") else None
    mfu = hvdlm.get("mfu")
    show = "" if judged else " (reported, not judged: a CPU run)"
    return [
        Check("tokens/s hvdlm / plain", ratio >= TARGET_RATIO or not judged, f"{ratio:.3f} (>= {TARGET_RATIO}){show}"),
        Check(
            "MFU",
            (mfu or 0) >= TARGET_MFU or not judged,
            (f"{mfu:.1%}" if mfu is not None else "n/a (no peak known)") + f" (>= {TARGET_MFU:.0%}){show}",
        ),
        Check(
            "peak memory hvdlm / plain",
            (memory or 0) <= TARGET_MEMORY if judged else True,
            (f"{memory:.3f}" if memory is not None else "n/a (not a GPU)") + f" (<= {TARGET_MEMORY}){show}",
        ),
    ]


# --- running hvdlm ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    code: int
    rows: list[dict] = field(default_factory=list)
    tail: str = ""

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows if "loss" in r]

    def last(self, key: str):
        values = [r[key] for r in self.rows if r.get(key) is not None]
        return values[-1] if values else None


@dataclass
class Phase:
    work: Path
    device: str  # "cuda" or "cpu"
    tiny: bool
    env: dict = field(default_factory=dict)
    only: set = field(default_factory=set)  # multigpu: these runs (and what they are compared with) only
    memory: list = field(default_factory=list)  # large, fp8: the settings that fit the shape (memory modes)
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def launch(self, name: str, np: int, sets: list[str], env: dict | None = None) -> Run:
        """`hvdlm launch` of np ranks on this machine; the run's rows and its output's tail. A finished run of the
        same name, ranks and settings in the work folder (another phase's: share's and multigpu's one-rank runs)
        is taken as it is: device time is the scarce thing."""
        run_dir, record = self.work / name, self.work / f"{name}.argv.json"
        job = self.work / "job.toml"
        job.write_text("# bench/gpu_phases.py: every setting is a --set\n")
        every = [*COMMON, f"train.device={self.device}", *sets]
        argv = [sys.executable, "-m", "hvdlm", "launch", str(job), "--np", str(np), "--run-dir", str(run_dir)]
        argv += [a for s in every for a in ("--set", s)]
        metrics = run_dir / "metrics.jsonl"
        env = {**self.env, **(env or {})}
        key = json.dumps({"argv": argv[1:], "env": env})
        if record.exists() and record.read_text() == key and metrics.exists():
            print(f"  {name}: taken from an earlier phase's run in {self.work}", flush=True)
            return Run(name, 0, _rows(metrics))
        record.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        (self.work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        rows = _rows(metrics) if metrics.exists() else []
        if proc.returncode == 0:
            record.write_text(key)
        print(f"  {name}: {np} rank(s), exit {proc.returncode}, {time.time() - t0:.0f} s", flush=True)
        return Run(name, proc.returncode, rows, (proc.stdout + proc.stderr)[-1500:])

    def ran(self, run: Run) -> bool:
        if run.code:
            self.checks.append(Check(f"{run.name} ran", False, f"exit {run.code}:\n{run.tail}"))
        return not run.code

    def finish(self, phase: str) -> int:
        for c in self.checks:
            print(c.line())
        self.figures["checks"] = {c.name: c.ok for c in self.checks}
        (self.work / f"{phase}.json").write_text(json.dumps(self.figures))
        print(json.dumps({"phase": phase, **self.figures}))
        return 0 if all(c.ok for c in self.checks) else 1


def collective_path(device: str, env: dict) -> str:
    """How the CUDA tensors of the TP and pipeline collectives of ranks sharing a GPU travel, as the ranks decide
    (hvdlm.parallel.collectives.route_for: no process set), asked of mpi4py in a process of its own; with Open MPI's
    own word (ompi_info) beside it."""
    probe = (
        "import os; from hvdlm.parallel.collectives import _mpi_is_cuda_aware, route_for;"
        "aware = _mpi_is_cuda_aware(); print(aware, route_for(True, aware, False))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    ).stdout.split()
    ompi = ""
    if shutil.which("ompi_info"):
        text = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True).stdout
        ompi = next((line for line in text.splitlines() if "mpi_built_with_cuda_support:value" in line), "")
    if device != "cuda":
        return f"cpu-mpi (CPU tensors; MPI CUDA-aware: {out[0] if out else '?'}; ompi_info: {ompi or 'n/a'})"
    route = out[1] if len(out) > 1 else "unknown"
    how = "CUDA-aware MPI" if route == "cuda-mpi" else "staged through host memory"
    return f"{route}: {how} (mpi4py Query_cuda_support: {out[0] if out else '?'}; ompi_info: {ompi or 'n/a'})"


def local_slots() -> int:
    from hvdlm.launch.hosts import local_cores

    return local_cores()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- the phases ---------------------------------------------------------------------------------------------------


def expected_bytes(run_dir: Path, batch: int, microbatches: int, tp: int, pp: int, precision: str) -> dict:
    """What hvdlm.plan.counts says rank 0 of the run counts a step (the counts CPU runs match exactly)."""
    from hvdlm.config import load_config
    from hvdlm.plan import counts

    model = load_config(run_dir / "config.toml").model  # the vocabulary as the run resolved it
    shape = counts.Shape(model, batch, tp, first=True, last=pp == 1, precision=precision)
    return {
        "tp_bytes_per_step": counts.tp_bytes_per_step(shape, microbatches) if pp == 1 else None,
        "pp_bytes_per_step": counts.pp_bytes_per_step(model, batch, pp, 0, microbatches, precision)[1],
    }


def _small_runs(phase: Phase, steps: int) -> tuple[int, list[str]]:
    """The micro-batch and the settings every run of the share and multigpu phases starts from."""
    batch = 4 if phase.tiny else 8
    shape = TINY if phase.tiny else SHARE_GPU
    return batch, [
        *shape,
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.compile=off",
        f"train.batch_size={batch}",
    ]


def share(phase: Phase, steps: int) -> None:
    """TP=2, PP=2 (and PP=2 x TP=2 with 4 slots) with every rank on one GPU, against one rank (see the docstring)."""
    batch, base = _small_runs(phase, steps)
    layouts = {  # name: (ranks, settings, tp, pp); the global batch is 2 micro-batches of `batch` in every one
        "tp2": (2, ["parallel.tp=2", "train.accumulation_steps=2"], 2, 1),
        "pp2": (2, ["parallel.pp=2", "parallel.microbatches=2"], 1, 2),
        "pp2tp2": (4, ["parallel.pp=2", "parallel.microbatches=2", "parallel.tp=2"], 2, 2),
    }
    if local_slots() < 4:
        del layouts["pp2tp2"]
        phase.figures["pp2tp2"] = f"skipped: {local_slots()} slots here, 4 needed"
    one = phase.launch("one_bf16", 1, [*base, "train.precision=bf16", "train.accumulation_steps=2"])
    fp32 = phase.launch("one_fp32", 1, [*base, "train.precision=fp32", "train.accumulation_steps=2"])
    if not (phase.ran(one) and phase.ran(fp32)):
        return
    tolerance = bf16_tolerance(one.losses, fp32.losses)
    phase.figures.update(bf16_tolerance=tolerance, path=collective_path(phase.device, phase.env))
    phase.figures["gpus"] = gpu_count() if phase.device == "cuda" else 0
    print(f"  collectives: {phase.figures['path']}", flush=True)
    forced = {}
    if phase.figures["path"].startswith("cuda-mpi"):  # the library reads device memory: its host path too, forced
        layouts["tp2_host"] = layouts["tp2"]
        forced["tp2_host"] = {"HVDLM_MPI_CUDA_AWARE": "0"}
    for name, (np, sets, tp, pp) in layouts.items():
        run = phase.launch(name, np, [*base, *sets, "train.precision=bf16", "train.share_gpu=true"], forced.get(name))
        if not phase.ran(run):
            continue
        phase.checks.append(compare_losses(f"{name} losses vs one rank (bf16)", one.losses, run.losses, tolerance))
        expected = expected_bytes(phase.work / name, batch, 2, tp, pp, "bf16")
        measured = {key: run.last(key) for key in expected}
        phase.figures[name] = {"measured": measured, "counted": expected, "loss_last": run.losses[-1]}
        for key, want in expected.items():
            if want is not None and (tp > 1 or key.startswith("pp")):
                got = measured[key]
                phase.checks.append(Check(f"{name} {key}", got == want, f"measured {got:,} counted {want:,}"))


def multigpu(phase: Phase, steps: int) -> None:
    """DP=2 over NCCL, TP=2, PP=2, ZeRO-1/2 on 2 GPUs against their references; allreduce bus bandwidth."""
    batch, base = _small_runs(phase, steps)
    fp32, bf16 = "train.precision=fp32", "train.precision=bf16"
    plan = {  # name: (ranks, settings, reference, tolerance); None: a reference itself
        "one_fp32": (1, [fp32, "train.accumulation_steps=2"], None, 0.0),
        "one_bf16": (1, [bf16, "train.accumulation_steps=2"], None, 0.0),
        "dp2_fp32": (2, [fp32], "one_fp32", FP32_TOL),
        "dp2_bf16": (2, [bf16], "one_bf16", None),  # None: bf16 noise, from the one-rank pair
        "tp2_fp32": (2, [fp32, "parallel.tp=2", "train.accumulation_steps=2"], "one_fp32", FP32_TOL),
        "pp2_fp32": (2, [fp32, "parallel.pp=2", "parallel.microbatches=2"], "one_fp32", FP32_TOL),
        "zero1_fp32": (2, [fp32, "train.zero=1"], "dp2_fp32", ZERO_TOL),
        "zero2_fp32": (2, [fp32, "train.zero=2", "train.zero_bucket_mb=1"], "dp2_fp32", ZERO_TOL),
    }
    runs: dict[str, Run] = {}
    chosen = wanted(plan, phase.only)
    for name, (np, sets, reference, tolerance) in plan.items():
        if name not in chosen:
            continue
        runs[name] = run = phase.launch(name, np, [*base, *sets])
        if not phase.ran(run) or reference is None:
            continue
        if reference not in runs or runs[reference].code:
            continue
        if tolerance is None:
            tolerance = bf16_tolerance(runs["one_bf16"].losses, runs["one_fp32"].losses)
        phase.checks.append(compare_losses(f"{name} vs {reference}", runs[reference].losses, run.losses, tolerance))
    if not phase.only or "allreduce" in phase.only:
        allreduce_bandwidth(phase)


def wanted(plan: dict, only: set) -> set:
    """The runs of `plan` to make for the ones in `only` (all when empty): each with what it is compared with."""
    if not only:
        return set(plan)
    out: set = set()
    todo = [name for name in only if name in plan]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        _, _, reference, tolerance = plan[name]
        todo += [reference] if reference else []
        todo += ["one_fp32", "one_bf16"] if reference and tolerance is None else []
    return out


def allreduce_bandwidth(phase: Phase) -> None:
    """Horovod's allreduce on every GPU (2 CPU ranks in --tiny) at ALLREDUCE_MB: algbw and busbw, by rank 0."""
    from hvdlm.launch.commands import LaunchOptions, LaunchRequest, plan_launch

    ranks = min(gpu_count(), local_slots()) if phase.device == "cuda" else 2
    sizes = "1,16" if phase.tiny else ",".join(map(str, ALLREDUCE_MB))
    program = [sys.executable, str(Path(__file__).resolve()), "allreduce-worker", "--device", phase.device]
    program += ["--sizes", sizes]
    device = "cuda" if phase.device == "cuda" else "cpu"
    launch = plan_launch(LaunchRequest("mpirun", ranks, program, train_device=device), LaunchOptions())
    proc = subprocess.run(
        launch.argv, cwd=ROOT, env={**os.environ, **launch.env, **phase.env}, capture_output=True, text=True
    )
    (phase.work / "allreduce.log").write_text(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        phase.checks.append(Check("allreduce bandwidth", False, f"exit {proc.returncode}: {proc.stderr[-800:]}"))
        return
    phase.figures["allreduce"] = rows
    for row in rows:
        print(
            f"  allreduce {row['mb']} MB on {row['ranks']} ranks: {row['ms']:.2f} ms, algbw {row['algbw']:.2f} GB/s,"
            f" busbw {row['busbw']:.2f} GB/s ({row['device']})",
            flush=True,
        )
    phase.checks.append(Check("allreduce bandwidth", len(rows) == len(sizes.split(",")), f"{len(rows)} sizes"))


def allreduce_worker(device: str, sizes: list[int], repeats: int = 10) -> None:
    """One rank of the bandwidth measurement: Horovod allreduces (NCCL on CUDA tensors), timed after a warm-up."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    if device == "cuda":
        torch.cuda.set_device(hvd.local_rank())

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for mb in sizes:
        x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
        hvd.allreduce(x, op=hvd.Sum, name=f"warm{mb}")  # Horovod: the first call sets up the communicator
        sync()
        start = time.perf_counter()
        for i in range(repeats):
            hvd.allreduce(x, op=hvd.Sum, name=f"bw{mb}.{i}")
        sync()
        seconds = (time.perf_counter() - start) / repeats
        algbw, busbw = bus_bandwidth(x.numel() * 4, seconds, hvd.size())
        if hvd.rank() == 0:
            row = {"mb": mb, "ranks": hvd.size(), "ms": seconds * 1e3, "algbw": algbw, "busbw": busbw, "device": device}
            print(json.dumps(row), flush=True)


def steady(run: Run) -> dict:
    """A run's steady state: the median of its logged intervals but the first two (compilation, warm-up)."""
    rows = [r for r in run.rows if "tokens_per_s" in r]
    settled = rows[2:] or rows
    mfus = [r["mfu"] for r in settled if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in settled),
        "mfu": statistics.median(mfus) if mfus else None,
        "memory_mb": max(r["memory_mb"] for r in rows),
        "loss_last": rows[-1]["loss"],
        "steps": rows[-1]["step"],
        # hvdlm's own account of the memory (weights, gradients, optimizer state, saved activations): what the peak
        # holds beyond them is the allocator's and the compiled graphs' (where a gap to the plain loop would lie)
        "account_mb": {k: rows[-1].get(k) for k in ("params_mb", "grads_mb", "optimizer_mb", "activations_mb")},
    }


def large_sets(phase: Phase, shape: str, steps: int, precision: str) -> list[str]:
    spec = LARGE["tiny" if phase.tiny else shape]
    interval = 2 if phase.tiny else 5
    return [
        *spec["sets"],
        f"train.batch_size={spec['batch']}",
        "train.accumulation_steps=1",
        f"train.max_steps={steps}",
        f"train.log_interval={interval}",
        f"train.precision={precision}",
        *phase.memory,
    ]


def large(phase: Phase, steps: int, shape: str) -> None:
    """The large shape in hvdlm and in the plain loop, one after the other on the same GPU."""
    run = phase.launch("large_hvdlm", 1, large_sets(phase, shape, steps, "bf16"))
    if not phase.ran(run):
        return
    spec = LARGE["tiny" if phase.tiny else shape]
    timed = ["--steps", "4", "--warmup", "2"] if phase.tiny else ["--steps", "20", "--warmup", "10"]
    argv = [sys.executable, str(ROOT / "bench" / "plain_gpt2.py"), *spec["plain"], "--batch", str(spec["batch"])]
    argv += [*timed, "--dtype", "bf16", "--real-vocab", "256", "--device", phase.device]
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **phase.env}, capture_output=True, text=True)
    (phase.work / "large_plain.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        phase.checks.append(Check("plain loop ran", False, f"exit {proc.returncode}: {proc.stderr[-800:]}"))
        return
    hvdlm, plain = steady(run), json.loads(lines[-1])
    phase.figures.update(shape=shape if not phase.tiny else "tiny", memory_modes=phase.memory, hvdlm=hvdlm, plain=plain)
    phase.checks += large_checks(hvdlm, plain, judged=phase.device == "cuda")


def fp8(phase: Phase, steps: int, shape: str) -> None:
    """fp8 against bf16 at the large shape; where fp8 is refused, the refusal and its reason."""
    run = phase.launch("fp8_hvdlm", 1, large_sets(phase, shape, steps, "fp8"))
    if run.code == 2:
        reason = next((line for line in run.tail.splitlines() if 'precision = "fp8"' in line), "")
        phase.figures["skipped"] = reason or run.tail[-400:]
        print(f"SKIPPED fp8: refused here: {reason}", flush=True)
        phase.checks.append(Check("fp8 refused with its reason (exit 2)", bool(reason), reason or run.tail[-400:]))
        return
    if not phase.ran(run):
        return
    reference = phase.work / "large_hvdlm" / "metrics.jsonl"
    if reference.exists() and steady(Run("large", 0, _rows(reference)))["steps"] == steady(run)["steps"]:
        bf16 = Run("large_hvdlm", 0, _rows(reference))  # the large phase's run: the same shape and steps
    else:
        bf16 = phase.launch("fp8_bf16", 1, large_sets(phase, shape, steps, "bf16"))
        if not phase.ran(bf16):
            return
    a, b = steady(run), steady(bf16)
    ratio, loss = a["tokens_per_s"] / b["tokens_per_s"], abs(a["loss_last"] - b["loss_last"]) / b["loss_last"]
    phase.figures.update(fp8=a, bf16=b, speedup=ratio)
    phase.checks.append(Check("fp8 tokens/s over bf16", True, f"{ratio:.3f} (reported)"))
    phase.checks.append(Check("fp8 loss vs bf16 after the same steps", loss <= 0.01, f"{loss:.2%} (<= 1 %)"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=("share", "multigpu", "large", "fp8", "allreduce-worker"))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-phases", help="the runs' folder")
    ap.add_argument("--tiny", action="store_true", help="CPU ranks and tiny shapes: the logic, in seconds")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the phase's own)")
    ap.add_argument("--shape", choices=("llama-1b", "gpt2-xl"), default="llama-1b", help="large and fp8's shape")
    ap.add_argument("--memory", default="", help="large and fp8: settings to fit the shape, e.g. model.recompute=full")
    ap.add_argument("--only", default="", help="multigpu: these runs (comma-separated) and their references")
    ap.add_argument("--device", default="cuda", help="allreduce-worker: cuda or cpu")
    ap.add_argument("--sizes", default="1,16,256", help="allreduce-worker: MB")
    args = ap.parse_args()
    if args.phase == "allreduce-worker":
        allreduce_worker(args.device, [int(s) for s in args.sizes.split(",")])
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    phase = Phase(args.work, "cpu" if args.tiny else "cuda", args.tiny)
    phase.memory = [s for s in args.memory.split(",") if s]
    phase.only = {s for s in args.only.split(",") if s}
    if args.phase in ("share", "multigpu"):
        phase.env["NVIDIA_TF32_OVERRIDE"] = "0"  # cuBLAS and cuDNN: fp32 is fp32 (no TF32) in these comparisons
    if args.phase == "multigpu":
        reason = multigpu_skip_reason(phase.device, gpu_count() if phase.device == "cuda" else 0)
        if reason:
            print(f"SKIPPED multigpu: {reason}")
            phase.figures["skipped"] = reason
            return phase.finish("multigpu")
    default_steps = {"share": 20, "multigpu": 20, "large": 40, "fp8": 40}[args.phase]
    steps = args.steps or (6 if args.tiny else default_steps)
    run = {"share": share, "multigpu": multigpu}.get(args.phase)
    if run:
        run(phase, steps)
    else:
        {"large": large, "fp8": fp8}[args.phase](phase, steps, args.shape)
    return phase.finish(args.phase)


if __name__ == "__main__":
    sys.exit(main())
