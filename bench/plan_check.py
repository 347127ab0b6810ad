"""The planner's counts against hvdlm's own measurements: small real jobs on this machine, predicted against
measured, per layout.

    python bench/plan_check.py             # the figures for bench/RESULTS.md (--record appends them)
    python bench/plan_check.py --quick     # a smaller model and fewer steps, to see that it runs

Each layout is a real `hvdlm train` under mpirun (one thread per rank, the built-in corpus, no evaluation, a row a
step). Rank 0's metrics rows give the measurements: the memory account of the first step (params_mb: 4 bytes a
parameter; activations_mb: what the micro-batches in flight saved for backward, hvdlm's ActivationMeter), the
payload bytes of the step's TP and pipeline collectives (tp_bytes_per_step, pp_bytes_per_step) and ms_per_step
(the median over the steps after the first two). The predictions are hvdlm.plan.counts, from the job's settings:

- parameters: params_per_rank, exact;
- activation bytes: activation_bytes x in_flight (the 1F1B warm-up), within 10 % (exact so far);
- TP and pipeline bytes: tp_bytes_per_step, pp_bytes_per_step (group), exact;
- step time, within 25 %: calibrated from the first layout (one rank, fp32), whose steps 2-6 torch.profiler takes
  apart (train.profile_steps). Its FLOP operators (matmuls, attention, GELU: the work tensor parallelism divides)
  give the CPU's achieved FLOP/s; its optimizer step and the rest (LayerNorms, residual sums, the loss, Python
  between operators: work that TP ranks repeat) are times of their own. Each fp32 layout's time is then its
  rank's FLOPs per step (the pipeline: m + p - 1 slots of the slowest stage, the bubble) at that rate, plus the
  rest for each slot and the optimizer step, both scaled by the stage's share of the layers, all scaled by how
  fast the layout's ranks compute at the time against the calibration run's rank, plus its messages: each a
  synchronisation between computing ranks, their payload at a 4 MB allreduce's rate (the TP collectives, the
  pipeline messages), and the logged loss every step (hvdlm.parallel.jobwide: one more synchronisation with TP
  or pipeline stages, which send it over MPI; a Horovod allreduce with DP alone) and with DP the gradients (a
  Horovod allreduce, or with ZeRO a reduce-scatter, the clipping norm and an all-gather, and 4 bytes a parameter;
  ZeRO's optimizer steps 1 / d of the elements); a Horovod collective as long as one measured between computing
  ranks (Horovod's background cycles). These are probed just before each layout runs, on this machine as it is
  loaded then: four 256 x 256 matmuls a loop on the layout's ranks, alone, then with an MPI allreduce of 256 KB
  (a TP collective's size here) after each, beyond its payload time, and with a Horovod one; a 4 MB allreduce. Horovod
  is initialised in the probe, as in every hvdlm rank, and at the cycle the layout's ranks run it with
  (topology.IDLE_CYCLE_MS for one replica): its background thread's coordination every HOROVOD_CYCLE_TIME delays the
  main thread's MPI calls (bench/tp_horovod.py: TP=2 steps 40-48 ms without Horovod, 52-69 ms with it at 5 ms).
  The fp32 layouts run in --repeats rounds (2), and each keeps its fastest round with that round's probe: on a
  machine shared with other jobs the load only ever adds time.
  FLOPs per token: 6 x the rank's matmul parameters + 12 L_s T d / p (attention, as hvdlm.training.flops counts
  it); recomputation adds a forward (2 x parameters + 4 L_s T d / p for full recompute, the attention core's
  4 L_s T d / p for selective). bf16 layouts check the counts only: the fp32 calibration says nothing about
  this CPU's bf16 speed.

It exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hvdlm.config import ModelConfig, load_config  # noqa: E402
from hvdlm.parallel.split import stage_layers  # noqa: E402
from hvdlm.parallel.topology import horovod_cycle_ms  # noqa: E402
from hvdlm.plan import counts  # noqa: E402

MB = 1024**2
PROFILE_STEPS = 5  # of the calibration run, taken apart with torch.profiler
MESSAGE_FLOATS = 1 << 16  # the probe's synchronisation: 256 KB, a TP collective's size here (B x T x d floats)
ACTIVATION_TOLERANCE, TIME_TOLERANCE = 0.10, 0.25


@dataclass
class Machine:
    """This machine as a layout's ranks see it, probed by `probe_worker` just before the layout runs (it is shared:
    other jobs take CPU time, and a rank that waits for another waits for the scheduler too)."""

    compute_s: float  # one 256 x 256 matmul on each of the layout's ranks computing at once
    latency_s: float  # one synchronisation (MPI allreduce) between 2 ranks that compute in between, as training does
    horovod_s: float  # one Horovod allreduce between 2 such ranks (its background cycles, HOROVOD_CYCLE_TIME)
    bytes_per_s: float  # payload of a 4 MB allreduce between 2 ranks

    def seconds(self, payload: float, messages: int) -> float:
        return payload / self.bytes_per_s + messages * self.latency_s


def probe_worker(cycle_ms: float) -> None:
    """On 1 or 2 MPI ranks: seconds per iteration of a matmul loop (four 256 x 256, one thread) alone, and with a
    256 KB allreduce after each iteration (2 ranks: the excess beyond its payload time is what one synchronisation
    costs between computing ranks); the time of a 4 MB allreduce. Medians of 9 rounds, about 3 s in all (the load
    on a shared machine changes from second to second); rank 0 prints them."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
    msg, msg_out = np.ones(MESSAGE_FLOATS, dtype=np.float32), np.empty(MESSAGE_FLOATS, dtype=np.float32)
    big, big_out = np.ones(1 << 20, dtype=np.float32), np.empty(1 << 20, dtype=np.float32)

    def loop(sync: bool, iterations: int = 40) -> float:
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(iterations):
            for _ in range(4):
                a @ a
            if sync and comm.Get_size() > 1:
                comm.Allreduce(msg, msg_out)
        return (time.perf_counter() - start) / iterations

    def allreduce_big() -> float:
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(big, big_out)
        return time.perf_counter() - start

    def horovod_loop(iterations: int = 20) -> float:
        import horovod.torch as hvd
        import torch

        x = torch.ones(1)
        hvd.allreduce(x, name="probe.warmup")
        comm.Barrier()
        start = time.perf_counter()
        for i in range(iterations):
            a @ a
            hvd.allreduce(x, name=f"probe.{i}")
        return (time.perf_counter() - start) / iterations

    if comm.Get_size() > 1:
        # As in training: Horovod's background thread runs its coordination cycles (HOROVOD_CYCLE_TIME) in every
        # rank, and a synchronisation of the main thread that meets one waits for it.
        import horovod.torch as hvd

        if cycle_ms:
            os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_ms:g}"  # as init_topology sets it for one replica
        hvd.init(comm=comm)
    loop(True, 20)  # warm-up
    rounds = [(loop(False), loop(True), allreduce_big()) for _ in range(9)]
    compute, synced, large = (statistics.median(r[i] for r in rounds) for i in range(3))
    horovod = horovod_loop() - compute if comm.Get_size() > 1 else 0.0
    if comm.Get_rank() == 0:
        payload_s = large * MESSAGE_FLOATS / (1 << 20) if comm.Get_size() > 1 else 0.0
        found = {"compute_s": compute, "sync_s": max(synced - compute - payload_s, 0.0), "horovod_s": max(horovod, 0.0)}
        print("PROBE " + json.dumps({**found, "large_s": large}))


def probe_machine(ranks: int, cycle_ms: float = 0.0) -> Machine:
    """The probe on `ranks` ranks, Horovod's cycle at `cycle_ms` (0: as the launch sets it)."""
    from helpers import mpirun

    argv = [sys.executable, str(Path(__file__).resolve()), "--probe-worker", f"{cycle_ms:g}"]
    proc = mpirun(ranks, argv, timeout=300)
    rows = [json.loads(line[6:]) for line in proc.out.splitlines() if line.startswith("PROBE ")]
    if proc.code or not rows:
        sys.exit(f"the machine probe failed\n{proc.out[-3000:]}")
    found = rows[0]
    rate = 4 * (1 << 20) / found["large_s"] if ranks > 1 else float("inf")
    return Machine(found["compute_s"], found["sync_s"], found["horovod_s"], rate)


def tp_grid_worker() -> None:
    """On 2 MPI ranks, a TP=2 GPT's forward and backward in one step's worth: the bytes saved for backward
    (ActivationMeter) and the TP bytes (the group's bytes_moved, plus the clipping norm's 4 bytes the trainer adds)
    against activation_bytes and tp_bytes_per_step, over recompute x precision x dropout x bias x a vocabulary
    that does and one that does not divide into 64-row shards. Rank 0 prints the mismatches and a count."""
    import contextlib
    import itertools

    import torch
    from mpi4py import MPI

    from hvdlm.model import GPT
    from hvdlm.parallel.topology import GridPosition, make_tp_group
    from hvdlm.training.memory_account import ActivationMeter

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    group = make_tp_group(GridPosition(world.Get_rank(), 2, 2), world)
    settings = list(itertools.product(["none", "selective", "full"], ["fp32", "bf16"], [0.0, 0.1], [True, False]))
    wrong = []
    for (recompute, precision, dropout, bias), vocab in itertools.product(settings, [256, 300]):
        shape = dict(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=vocab)
        cfg = ModelConfig(**shape, dropout=dropout, bias=bias, recompute=recompute)
        torch.manual_seed(0)
        model = GPT(cfg, group).train()
        idx = torch.randint(0, vocab, (3, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
        meter = ActivationMeter(model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        before = group.bytes_moved
        with meter:
            with autocast:
                _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss.backward()
        moved = group.bytes_moved - before + 4
        predicted = (
            counts.activation_bytes(counts.Shape(cfg, 3, 2, precision=precision)),
            counts.tp_bytes_per_step(counts.Shape(cfg, 3, 2, precision=precision)),
        )
        if predicted != (meter.peak_bytes, moved):
            setting = f"{recompute} {precision} dropout {dropout} bias {bias} vocab {vocab}"
            wrong.append(f"{setting}: predicted {predicted}, measured {(meter.peak_bytes, moved)}")
    if world.Get_rank() == 0:
        print("GRID " + json.dumps({"settings": 2 * len(settings), "wrong": wrong}), flush=True)


def tp_grid() -> dict:
    from helpers import mpirun

    proc = mpirun(2, [sys.executable, str(Path(__file__).resolve()), "--tp-grid-worker"], timeout=600)
    rows = [json.loads(line[5:]) for line in proc.out.splitlines() if line.startswith("GRID ")]
    if proc.code or not rows:
        sys.exit(f"the TP=2 grid failed\n{proc.out[-3000:]}")
    return rows[0]


MODEL = dict(n_layer=4, n_head=4, d_model=128, seq_len=128)
QUICK_MODEL = dict(n_layer=2, n_head=2, d_model=32, seq_len=32)


@dataclass
class Layout:
    name: str
    ranks: int
    sets: list[str] = field(default_factory=list)
    timed: bool = True  # fp32: its step time is predicted from the calibration

    def setting(self, key: str, default: str) -> str:
        found = [s.split("=", 1)[1] for s in self.sets if s.split("=", 1)[0] == key]
        return found[-1] if found else default

    @property
    def horovod_cycle_ms(self) -> float:
        """Horovod's cycle in this layout's ranks, by init_topology's rule (CPU ranks, no local SGD here); 0: as the
        launch sets it."""
        model_parallel = int(self.setting("parallel.tp", "1")) * int(self.setting("parallel.pp", "1"))
        if model_parallel == 1:
            return 0.0  # init_topology leaves plain data parallelism's cycle alone
        quiet = self.setting("train.zero", "0") == "0"
        return float(horovod_cycle_ms(None, self.ranks // model_parallel, quiet) or 0)


LAYOUTS = [
    Layout("1 rank (calibration)", 1),
    Layout("DP=2", 2),
    Layout("DP=2, ZeRO-1", 2, ["train.zero=1"]),
    Layout("TP=2", 2, ["parallel.tp=2"]),
    Layout("PP=2, m=4, 1F1B", 2, ["parallel.pp=2", "parallel.microbatches=4"]),
    Layout("TP=2, bf16, full recompute", 2, ["parallel.tp=2", "train.precision=bf16", "model.recompute=full"], False),
    Layout(
        "PP=2, m=4, bf16, selective, dropout 0.1, no bias",
        2,
        ["parallel.pp=2", "parallel.microbatches=4", "train.precision=bf16", "model.recompute=selective"]
        + ["model.dropout=0.1", "model.bias=false"],
        False,
    ),
]


def run(layout: Layout, shape: dict, batch: int, steps: int, tmp: Path, profile: int = 0) -> tuple[ModelConfig, dict]:
    """Train the layout; the resolved model config and rank 0's measurements. `profile` > 0: that many steps after
    the second are recorded with torch.profiler (train.profile_steps) and taken apart (`profiled_parts`); the step
    time is then the median of the steps after them (the one after them also writes the profile)."""
    from helpers import TINY_JOB, mpirun, sets, train_argv

    job = tmp / "job.toml"
    job.write_text(TINY_JOB)
    common = [f"model.{k}={v}" for k, v in shape.items()]
    unsettled = 2 + (profile + 1 if profile else 0)  # rows left out of the median (see the docstring)
    common += [f"train.batch_size={batch}", f"train.max_steps={steps - 2 + unsettled}"]
    common += ["train.warmup_steps=1", "train.eval_interval=0", "train.sample_tokens=0", "train.log_interval=1"]
    common += ["train.tensorboard=false", "train.threads=1", "train.checkpoint_interval=0"]
    common += [f"train.profile_steps={profile}"]
    run_dir = tmp / layout.name.replace(" ", "_").replace(",", "").replace("=", "")
    for attempt in (1, 2):  # once more if the run failed (on a shared machine, another job's cleanup may hit it)
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = mpirun(layout.ranks, train_argv(job, run_dir, *sets(*common, *layout.sets)), timeout=900)
        if not proc.code:
            break
        print(f"{layout.name}: the run failed (attempt {attempt}):\n{proc.out[-1500:]}", flush=True)
    else:
        sys.exit(f"{layout.name}: the run failed twice")
    cfg = load_config(run_dir / "config.toml").model  # the vocabulary resolved from the dataset
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    last = rows[-1]
    measured = {
        "params": round(last["params_mb"] * MB / 4),
        "activation_bytes": round(last["activations_mb"] * MB),
        "tp_bytes": last.get("tp_bytes_per_step"),
        "pp_bytes": last.get("pp_bytes_per_step"),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in rows[unsettled:]),
    }
    if profile:
        measured |= profiled_parts(run_dir / "profile.txt")
    return cfg, measured


# The operators whose work a layout divides as it divides the FLOPs (tensor parallelism splits the matmuls, the
# attention heads and the MLP's hidden units, GELU included); the rest of a step it does not (LayerNorms, residual
# sums, the loss, the optimizer's per-tensor work, Python between operators), and tensor-parallel ranks repeat it.
FLOP_OPERATORS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::gelu",
    "aten::gelu_backward",
}
OPTIMIZER_ROW = "Optimizer.step#"
TIME_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3}


def profiled_parts(path: Path) -> dict:
    """From a train.profile_steps table (hvdlm.training.profiling): the milliseconds a step of the FLOP operators
    (their own time) and of the optimizer's step (with what it calls)."""
    text = path.read_text()
    steps = int(re.search(r"over (\d+) step", text).group(1))

    def ms(cell: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(s|ms|us)", cell).groups()
        return float(number) * TIME_UNITS[unit]

    flop_ms = optimizer_ms = 0.0
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())  # name, self %, self, total %, total, average, calls
        if cells[0] in FLOP_OPERATORS:
            flop_ms += ms(cells[2])
        elif cells[0].startswith(OPTIMIZER_ROW):
            optimizer_ms += ms(cells[4])
    if not flop_ms or not optimizer_ms:
        sys.exit(f"{path}: no matmuls or no optimizer step in the profile")
    return {"flop_ms": flop_ms / steps, "optimizer_ms": optimizer_ms / steps}


def flops_per_token(cfg: ModelConfig, tp: int, layers: int, last: bool, recompute: str) -> float:
    """Training FLOPs per token on a rank (see the module docstring)."""
    d, t = cfg.d_model, cfg.seq_len
    matmul = layers * counts.block_params_per_rank(cfg, tp)
    if last:
        matmul += counts.vocab_rows_per_rank(cfg.vocab_size, tp) * d  # the head
    attention = 4 * layers * t * d / tp  # forward: QK^T and the product with V
    flops = 6 * matmul + 3 * attention
    if recompute == "full":
        flops += 2 * matmul + attention
    elif recompute == "selective":
        flops += attention
    return flops


def predict(layout: Layout, cfg: ModelConfig, batch: int, machine: Machine) -> dict:
    """What hvdlm.plan.counts says rank 0 holds and sends, its FLOPs per step and its communication time."""
    tp, pp = int(layout.setting("parallel.tp", "1")), int(layout.setting("parallel.pp", "1"))
    m = int(layout.setting("parallel.microbatches", "1"))
    dp = layout.ranks // (tp * pp)
    precision, schedule = layout.setting("train.precision", "fp32"), layout.setting("parallel.schedule", "1f1b")
    split = stage_layers(cfg.n_layer, pp)
    first, last = True, pp == 1
    params = counts.params_per_rank(cfg, tp, pp, 0)
    shape = counts.Shape(cfg, batch, tp, split[0], first, last, precision=precision)
    activations = counts.activation_bytes(shape)
    tp_bytes = counts.tp_bytes_per_step(shape, m)
    p2p, pp_bytes = counts.pp_bytes_per_step(cfg, batch, pp, 0, m, precision)
    tokens = batch * cfg.seq_len
    # The slowest stage sets the pipeline's pace: (m + p - 1) slots of one micro-batch's forward and backward.
    per_micro = max(flops_per_token(cfg, tp, split[s], s == pp - 1, cfg.recompute) * tokens for s in range(pp))
    slots = m + pp - 1
    messages = 0
    if tp > 1:
        # Per micro-batch: 2 L_s forward (and what full recompute reduces again) and 2 L_s backward, the embedding's
        # (first stage), the head's and the loss's 2 (last stage); the norm's once a step.
        blocks = (4 + (0 if cfg.recompute != "full" else 2 if cfg.dropout > 0 else 1)) * split[0]
        messages += m * (blocks + 1 + (3 if last else 0)) + 1
    messages += 2 * m if pp > 1 else 0  # a stage's exchanges: one a micro-batch each way (rank 0: forward only)
    # A ring allreduce sends 2 (p - 1) / p of the payload a rank, as the measured 4 MB allreduce did (p = 2).
    comm_s = machine.seconds(tp_bytes + p2p, messages)
    # Over all ranks, the logged loss every step (the stop vote rides along, asynchronous): over MPI with TP or
    # pipeline stages, else through Horovod (hvdlm.parallel.jobwide). One rank sends nothing. With DP the
    # gradients, through Horovod, each collective waiting for its cycle: one fused allreduce, or ZeRO's
    # reduce-scatter, the clipping norm and the all-gather of the updated slices (hvdlm.optim.zero); their
    # payload (an allreduce's, either way) at the 4 MB rate.
    zero = dp > 1 and layout.setting("train.zero", "0") != "0"
    if layout.ranks > 1:
        comm_s += machine.latency_s if tp > 1 or pp > 1 else machine.horovod_s
    if dp > 1:
        clipped = float(layout.setting("train.grad_clip", "1")) > 0
        comm_s += ((2 + clipped) if zero else 1) * machine.horovod_s + 4 * params / machine.bytes_per_s
    return {
        "params": params,
        "activation_bytes": activations * counts.in_flight(pp, 0, m, schedule),
        "tp_bytes": tp_bytes,
        "pp_bytes": pp_bytes,
        "flops": per_micro * slots,
        "slots": slots,
        "layer_share": max(split) / cfg.n_layer,  # of the step's work outside the FLOP operators (see run)
        # ZeRO's optimizer steps one flat slice, 1 / d of the elements (an upper bound: no per-tensor overhead)
        "optimizer_share": 1 / dp if zero else 1.0,
        "comm_s": comm_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tests' tiny model, 4 steps")
    p.add_argument("--steps", type=int, default=0, help="steps per fp32 layout (default 12, --quick 4; bf16 layouts 3)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the fp32 layouts; each keeps its fastest")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--probe-worker", type=float, default=None, help=argparse.SUPPRESS)  # Horovod's cycle, ms
    p.add_argument("--tp-grid-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe_worker is not None:
        return probe_worker(args.probe_worker)
    if args.tp_grid_worker:
        return tp_grid_worker()
    shape = QUICK_MODEL if args.quick else MODEL
    steps = args.steps or (4 if args.quick else 12)
    started = time.perf_counter()
    rounds: dict[str, list] = {layout.name: [] for layout in LAYOUTS}
    grid = tp_grid()
    print(f"TP=2 grid: {len(grid['wrong'])} of {grid['settings']} settings wrong", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # rounds over the layouts, so a spell of load touches them alike
            for layout in LAYOUTS if repeat == 0 else [x for x in LAYOUTS if x.timed]:
                machine = probe_machine(layout.ranks, layout.horovod_cycle_ms)
                profile = PROFILE_STEPS if layout is LAYOUTS[0] else 0  # the calibration run is taken apart
                cfg, measured = run(layout, shape, args.batch, steps if layout.timed else 3, Path(tmp), profile)
                rounds[layout.name].append((layout, cfg, measured, predict(layout, cfg, args.batch, machine), machine))
                print(f"{layout.name}: measured {json.dumps(measured)}", flush=True)
    # Each layout's least disturbed round (the fastest, with the probe taken just before it): on a shared machine
    # the other jobs only ever add time.
    results = [min(found, key=lambda r: r[2]["ms_per_step"]) for found in rounds.values()]
    _, _, calib_measured, calib_predicted, calib_machine = results[0]
    # The calibration, one rank: its FLOP operators' time gives the achieved FLOP rate; its optimizer step, and the
    # rest of its step, a micro-batch's work outside the FLOP operators.
    flop_rate = calib_predicted["flops"] / (calib_measured["flop_ms"] / 1000)
    optimizer_s = calib_measured["optimizer_ms"] / 1000
    other_s = calib_measured["ms_per_step"] / 1000 - calib_measured["flop_ms"] / 1000 - optimizer_s

    lines, failures = [], [f"TP=2 grid: {w}" for w in grid["wrong"]]
    lines.append(
        "| layout | parameters (pred / meas) | activation bytes (pred / meas) | TP bytes/step (pred / meas) "
        "| PP bytes/step (pred / meas) | ms/step (pred / meas) |"
    )
    lines.append("|---|---|---|---|---|---|")
    for i, (layout, cfg, meas, pred, machine) in enumerate(results):
        act_error = abs(pred["activation_bytes"] - meas["activation_bytes"]) / meas["activation_bytes"]
        checks = {
            "parameters": pred["params"] == meas["params"],
            "activation bytes": act_error <= ACTIVATION_TOLERANCE,
            "TP bytes": pred["tp_bytes"] == meas["tp_bytes"],
            "PP bytes": pred["pp_bytes"] == meas["pp_bytes"],
        }
        if i == 0:
            time_cell = f"(calibration) / {meas['ms_per_step']:.1f}"
        elif layout.timed:
            speed = calib_machine.compute_s / machine.compute_s  # this layout's ranks now, against the calibration's
            outside = (other_s * pred["slots"] + optimizer_s * pred["optimizer_share"]) * pred["layer_share"]
            ms = 1000 * ((pred["flops"] / flop_rate + outside) / speed + pred["comm_s"])
            time_error = ms / meas["ms_per_step"] - 1
            checks["step time"] = abs(time_error) <= TIME_TOLERANCE
            time_cell = f"{ms:.1f} / {meas['ms_per_step']:.1f} ({time_error:+.0%})"
        else:
            time_cell = f"(bf16: not predicted) / {meas['ms_per_step']:.1f}"
        failures += [f"{layout.name}: {name}" for name, ok in checks.items() if not ok]
        lines.append(
            f"| {layout.name} | {pred['params']:,} / {meas['params']:,} "
            f"| {pred['activation_bytes']:,} / {meas['activation_bytes']:,} ({act_error:.1%}) "
            f"| {pred['tp_bytes']:,} / {meas['tp_bytes']:,} | {pred['pp_bytes']:,} / {meas['pp_bytes']:,} "
            f"| {time_cell} |"
        )
    cfg = results[0][1]
    about = [
        f"- model: n_layer {cfg.n_layer}, n_head {cfg.n_head}, d_model {cfg.d_model}, seq_len {cfg.seq_len}, "
        f"vocabulary {cfg.vocab_size}; batch {args.batch} a rank; {steps} steps a layout, 1 thread a rank, under "
        f"mpirun; measurements from rank 0 (stage 0 with PP); fp32 layouts: the fastest of {args.repeats} rounds "
        "(ms/step of every round: "
        + "; ".join(
            f"{name}: " + " / ".join(f"{r[2]['ms_per_step']:.1f}" for r in found)
            for name, found in rounds.items()
            if found[0][0].timed
        )
        + ")",
        f"- calibrated from the 1-rank run ({PROFILE_STEPS} steps profiled): {flop_rate / 1e9:.2f} GFLOP/s achieved "
        f"in the FLOP operators ({calib_measured['flop_ms']:.1f} ms a step), the optimizer's step "
        f"{1e3 * optimizer_s:.1f} ms, the rest {1e3 * other_s:.1f} ms; probed before each layout "
        "(four 256 x 256 matmuls on a rank; a 256 KB MPI and a Horovod synchronisation between computing ranks, "
        "Horovod running; a 4 MB allreduce): "
        + "; ".join(
            f"{layout.name}: {1e3 * machine.compute_s:.2f} ms"
            + (
                f", {1e6 * machine.latency_s:.0f} us, {1e3 * machine.horovod_s:.1f} ms, "
                f"{machine.bytes_per_s / 1e9:.2f} GB/s"
                if layout.ranks > 1
                else ""
            )
            for layout, _, _, _, machine in results
        ),
        f"- load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end",
        "",
        *lines,
        "",
        f"- TP=2 on 2 ranks, one forward and backward of a small GPT (n_layer 2, n_head 4, d_model 32, seq_len 16, "
        f"batch 3) over recompute x precision x dropout x bias x vocabulary 256 / 300: activation bytes and TP "
        f"bytes exact in {grid['settings'] - len(grid['wrong'])} of {grid['settings']} settings"
        + "".join(f"\n  - wrong: {w}" for w in grid["wrong"]),
        f"- checks: parameters, TP and PP bytes exact; activations within {ACTIVATION_TOLERANCE:.0%}; fp32 step "
        f"times within {TIME_TOLERANCE:.0%}: " + ("all passed" if not failures else "FAILED " + "; ".join(failures)),
        f"- wall time of the check: {time.perf_counter() - started:.0f} s",
    ]
    print("\n".join(about))
    if args.record:
        import torch
        from recording import record  # bench/ is on sys.path when this script runs

        record("Planner calibration: counted against measured", about, software=f"torch {torch.__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
