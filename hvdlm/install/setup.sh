#!/usr/bin/env bash
# hvdlm set-up: system MPI, a virtual environment in .venv, torch, Horovod built from source with PyTorch,
# MPI and Gloo (cached as a wheel), then mpi4py, click, numpy, pytest and hvdlm itself.
#
# Idempotent: a finished set-up leaves a stamp, and a second run with the same inputs returns in seconds.
# Knobs (environment): TORCH_SPEC (pip requirement for torch), HVDLM_VENV, HVDLM_CACHE, PYTHON.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/hvdlm/install
VENV=${HVDLM_VENV:-$ROOT/.venv}
CACHE=${HVDLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdlm}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
HOROVOD_PATCH=$HERE/horovod-$HOROVOD_VERSION-cxx17.patch
# The torch we install when the environment has none; TORCH_SPEC overrides (and forces an install).
DEFAULT_TORCH_SPEC=torch==2.13.0

vpip() { "$VPY" -m pip "$@"; }
say() { printf '[setup] %s\n' "$*"; }
die() {
    printf '\n[setup] FAILED: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '[setup]   %s\n' "$line" >&2; done
    exit 1
}

# ---------------------------------------------------------------------------------------------------------
# 1. System MPI and a C++ tool chain (Horovod and mpi4py link against the system's MPI).
# ---------------------------------------------------------------------------------------------------------
ensure_system_tools() {
    local missing=()
    if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
        missing+=(openmpi-bin libopenmpi-dev)
    fi
    command -v cmake >/dev/null || missing+=(cmake)
    command -v g++ >/dev/null || missing+=(g++)
    command -v patch >/dev/null || missing+=(patch)
    [ ${#missing[@]} -eq 0 ] && return 0

    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} from the system's packages (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
            >"$CACHE/logs/apt.log" 2>&1 ||
            die "apt-get could not install ${missing[*]} (log: $CACHE/logs/apt.log)." \
                "Install them yourself, or provide MPI another way (e.g. 'module load openmpi'), then run 'make' again."
    else
        die "these are missing: ${missing[*]} (mpicc and mpirun come from an MPI implementation)." \
            "On a cluster: 'module load openmpi' (or your site's MPI module) and a compiler module, then 'make' again." \
            "On Debian/Ubuntu as root: apt-get install openmpi-bin libopenmpi-dev cmake g++ patch."
    fi
}

# ---------------------------------------------------------------------------------------------------------
# 2. The virtual environment, and torch in it.
# ---------------------------------------------------------------------------------------------------------
ensure_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on the PATH." "Set PYTHON=/path/to/python3.11 (or newer)."
    local flags=()
    # Keep a torch that the environment already has (a cluster module, a GPU image) instead of a second copy.
    if [ -z "${TORCH_SPEC:-}" ] && "$PYTHON" -c 'import torch' 2>/dev/null; then
        say "using the environment's torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        flags+=(--system-site-packages)
    fi
    say "creating the virtual environment $VENV"
    "$PYTHON" -m venv "${flags[@]}" "$VENV" || die "could not create $VENV with $PYTHON -m venv." \
        "On Debian/Ubuntu: apt-get install python3-venv."
}

ensure_torch() {
    if [ -z "${TORCH_SPEC:-}" ] && "$VPY" -c 'import torch' 2>/dev/null; then
        return 0
    fi
    local spec=${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
    say "installing $spec"
    # numpy with it: torch warns at every import when numpy is missing.
    vpip install -q "$spec" numpy || die "pip could not install '$spec'." "Set TORCH_SPEC to a torch you can install."
}

# ---------------------------------------------------------------------------------------------------------
# 3. Horovod: built once per (Horovod, torch, Python, CUDA, patch) and cached as a wheel.
# ---------------------------------------------------------------------------------------------------------
horovod_cache_key() {
    local torch_key cuda_key patch_key
    torch_key=$("$VPY" -c 'import torch; print(torch.__version__)')
    cuda_key=$("$VPY" -c 'import torch; print("cuda" + torch.version.cuda if torch.version.cuda else "cpu")')
    patch_key=$(sha256sum "$HOROVOD_PATCH" | cut -c1-8)
    echo "horovod-$HOROVOD_VERSION-torch$torch_key-py$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-$cuda_key-$patch_key"
}

build_horovod_wheel() {
    local out=$1 work src log=$CACHE/logs/horovod-build.log
    work=$(mktemp -d)
    local sdist=$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz
    if [ ! -f "$sdist" ]; then
        say "downloading the Horovod $HOROVOD_VERSION source distribution"
        vpip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CACHE/src" ||
            die "could not download horovod==$HOROVOD_VERSION from the package index." \
                "Put horovod-$HOROVOD_VERSION.tar.gz into $CACHE/src/ by hand, then 'make' again."
    fi
    tar -xzf "$sdist" -C "$work" || die "$sdist is damaged." "Delete it and run 'make' again to download it anew."
    src=$work/horovod-$HOROVOD_VERSION
    patch -s -p1 -d "$src" <"$HOROVOD_PATCH" || die "our patch $HOROVOD_PATCH no longer applies to $sdist."

    # Horovod's own build needs these importable (we build without isolation so it sees our torch).
    vpip install -q setuptools wheel packaging psutil pyyaml cloudpickle

    local -a build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j$(nproc))
    if [ "$("$VPY" -c 'import torch; print(bool(torch.version.cuda))')" = True ] && command -v nvcc >/dev/null; then
        build_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
        # Kernels only for the GPUs present, when there are any (every architecture takes far longer).
        local arch
        arch=$("$VPY" -c 'import torch; print(",".join(sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))')
        [ -n "$arch" ] && build_env+=(HOROVOD_BUILD_CUDA_CC_LIST=$arch)
        # torch's wheels bring NCCL as the nvidia-nccl package, whose lib has libnccl.so.2 but no libnccl.so for
        # CMake to find: point Horovod at it through a directory with that link.
        local nccl
        nccl=$("$VPY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
        if [ -z "${HOROVOD_NCCL_HOME:-}" ] && [ -f "$nccl/include/nccl.h" ]; then
            mkdir -p "$work/nccl-lib" && ln -s "$(ls "$nccl"/lib/libnccl.so.* | head -n 1)" "$work/nccl-lib/libnccl.so"
            build_env+=(HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_NCCL_LINK=SHARED)
        fi
        say "CUDA found: building with NCCL GPU operations (compute capability: ${arch:-all})"
    fi
    say "building Horovod $HOROVOD_VERSION (a few minutes; log: $log)"
    if ! (cd "$src" && env "${build_env[@]}" "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$work/dist" .) \
        >"$log" 2>&1; then
        # pip buries the compiler's message under its own footer: show the first error lines, then the end.
        { echo "[setup] first errors in the build log:"; grep -iE -m 15 'error|fatal' "$log" || true
          echo "[setup] end of the build log:"; tail -n 8 "$log"; } >&2
        die "the Horovod build failed (full log: $log)." \
            "Usual causes: MPI headers missing (apt-get install libopenmpi-dev, or 'module load openmpi')," \
            "no C++17 compiler (g++ >= 9), or cmake < 3.13. Fix that, then 'make' again."
    fi
    mkdir -p "$out"
    mv "$work"/dist/horovod-*.whl "$out/"
    rm -rf "$work"
}

ensure_horovod() {
    local key dir
    key=$(horovod_cache_key)
    dir=$CACHE/wheels/$key
    if [ "$(cat "$VENV/.horovod-key" 2>/dev/null)" = "$key" ] && "$VPY" -c 'import horovod.torch' 2>/dev/null; then
        return 0
    fi
    if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
        build_horovod_wheel "$dir"
    else
        say "using the cached Horovod wheel $dir"
    fi
    vpip install -q --force-reinstall --no-deps "$dir"/horovod-*.whl
    vpip install -q cloudpickle psutil pyyaml packaging
    echo "$key" >"$VENV/.horovod-key"
}

verify_horovod() {
    local report
    report=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed:" "$report"
    local need needs=(PyTorch MPI Gloo)
    [ "$("$VPY" -c 'import torch; print(bool(torch.version.cuda))')" = True ] && command -v nvcc >/dev/null &&
        needs+=(NCCL)
    for need in "${needs[@]}"; do
        grep -Eq "\[X\] $need\b" <<<"$report" ||
            die "Horovod was built without $need:" "$report" "Delete $CACHE/wheels and $VENV, then 'make' again."
    done
}

# ---------------------------------------------------------------------------------------------------------
main() {
    mkdir -p "$CACHE/logs" "$CACHE/src" "$CACHE/wheels"
    # Any change to these inputs re-runs the set-up; otherwise a finished one is a no-op.
    local stamp_key
    stamp_key=$(cat "$0" "$HOROVOD_PATCH" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${TORCH_SPEC:-}
    if [ "$(cat "$VENV/.hvdlm-setup" 2>/dev/null)" = "$stamp_key" ] && command -v mpirun >/dev/null; then
        return 0
    fi

    ensure_system_tools
    ensure_venv
    VPY=$VENV/bin/python
    ensure_torch
    ensure_horovod
    say "installing hvdlm and its dependencies"
    vpip install -q --no-build-isolation -e "$ROOT[test]" || die "pip could not install hvdlm from $ROOT/pyproject.toml."
    verify_horovod
    echo "$stamp_key" >"$VENV/.hvdlm-setup"
    say "ready: $VENV ($("$VPY" -c 'import torch, horovod; print("torch", torch.__version__, "+ horovod", horovod.__version__)'))"
}

main "$@"
