#!/usr/bin/env bash
# hvdlm set-up: system MPI, a virtual environment in .venv, torch, Horovod built from source with PyTorch,
# MPI and Gloo (cached as a wheel), then mpi4py, click, numpy, pytest and hvdlm itself.
#
# Idempotent: a finished set-up leaves a stamp, and a second run with the same inputs returns in seconds.
# Knobs (environment): TORCH_SPEC (pip requirement for torch), HVDLM_VENV, HVDLM_CACHE, PYTHON.
# Offline (machines without a network; bench/gpu_carry.sh fills such a folder):
#   HVDLM_OFFLINE=1          pip reads only local files (--no-index), never the package index;
#   HVDLM_WHEELHOUSE=DIR     the wheels pip may use (--find-links DIR); its requirements.txt, if any, lists the
#                            hvdlm dependencies to install offline (hvdlm itself goes in with --no-deps);
#   HVDLM_HOROVOD_SDIST=F    the Horovod source distribution (default: DIR/horovod-0.28.1.tar.gz, or the cache's).
# CUDA (when torch has CUDA): nvcc is looked up in HOROVOD_CUDA_HOME, CUDA_HOME, CUDA_PATH, the PATH,
#   /usr/local/cuda and /usr/local/cuda-*; HOROVOD_BUILD_CUDA_CC_LIST (e.g. 90) overrides the detected GPUs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/hvdlm/install
VENV=${HVDLM_VENV:-$ROOT/.venv}
CACHE=${HVDLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdlm}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
HOROVOD_PATCH=$HERE/horovod-$HOROVOD_VERSION-cxx17.patch
# Applied on top when needed (see horovod_patches): g++ >= 13, and CUDA builds.
HOROVOD_GCC13_PATCH=$HERE/horovod-$HOROVOD_VERSION-gcc13.patch
HOROVOD_CUDA_PATCH=$HERE/horovod-$HOROVOD_VERSION-cuda.patch
OFFLINE=${HVDLM_OFFLINE:-0}
WHEELHOUSE=${HVDLM_WHEELHOUSE:-}
# Where pip may take packages from: the index (default), or only the wheelhouse when offline.
PIP_SOURCE=()
[ "$OFFLINE" = 1 ] && PIP_SOURCE+=(--no-index)
[ -n "$WHEELHOUSE" ] && PIP_SOURCE+=(--find-links "$WHEELHOUSE")
# The torch we install when the environment has none; TORCH_SPEC overrides (and forces an install).
DEFAULT_TORCH_SPEC=torch==2.13.0

vpip() { "$VPY" -m pip "$@"; }
# pip install from the allowed sources (the expansion stays empty, not unbound, when PIP_SOURCE is).
vpip_install() { "$VPY" -m pip install ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} "$@"; }
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
    # Our patches go in with patch, or with git apply where a minimal image has git but no patch.
    command -v patch >/dev/null || command -v git >/dev/null || missing+=(patch)
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
    if [ ${#flags[@]} -gt 0 ]; then
        # When $PYTHON is itself a virtual environment (a GPU image's /opt/torch/.venv), --system-site-packages
        # reaches only its base interpreter's packages, not the torch installed in it: name its own site-packages
        # in a .pth file of the new environment.
        local parent site
        parent=$("$PYTHON" -c 'import sys, sysconfig
if sys.prefix != sys.base_prefix:
    print("\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))))')
        if [ -n "$parent" ]; then
            site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            printf '%s\n' "$parent" >"$site/hvdlm-environment.pth"
        fi
    fi
}

ensure_torch() {
    if [ -z "${TORCH_SPEC:-}" ] && "$VPY" -c 'import torch' 2>/dev/null; then
        return 0
    fi
    local spec=${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
    say "installing $spec"
    # numpy with it: torch warns at every import when numpy is missing.
    vpip_install -q "$spec" numpy || die "pip could not install '$spec'." "Set TORCH_SPEC to a torch you can install."
}

# ---------------------------------------------------------------------------------------------------------
# 3. Horovod: built once per (Horovod, torch, Python, CUDA, patch) and cached as a wheel.
# ---------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------
# CUDA: decided once (detect_cuda), read by the cache key, the build and the verification.
# ---------------------------------------------------------------------------------------------------------
BUILD_NCCL=0 NVCC="" CUDA_ROOT="" CUDA_ARCHS=""

find_nvcc() {
    local c
    local -a candidates=("${HOROVOD_CUDA_HOME:+$HOROVOD_CUDA_HOME/bin/nvcc}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
        "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc)
    # Versioned toolkits, newest first (the PATH of a batch job often lacks them).
    for c in /usr/local/cuda-*/bin/nvcc; do [ -x "$c" ] && candidates+=("$c"); done
    for c in "${candidates[@]}"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# The toolkit directory of an nvcc: the one holding bin/nvcc and the CUDA headers. A wrapper nvcc (a
# distribution's /usr/bin/nvcc, a module's shim) is not in its toolkit; nvcc's dry run names the real one (TOP).
cuda_home_of() {
    local nvcc=$1 home top
    home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    if [ -x "$home/bin/nvcc" ] && { [ -f "$home/include/cuda_runtime.h" ] || compgen -G "$home/targets/*/include/cuda_runtime.h" >/dev/null; }; then
        echo "$home"
        return 0
    fi
    top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    if [ -n "$top" ] && [ -x "$top/bin/nvcc" ]; then
        readlink -f "$top"
        return 0
    fi
    echo "$home"
}

detect_cuda() {
    [ "$("$VPY" -c 'import torch; print(bool(torch.version.cuda))')" = True ] || return 0
    if ! NVCC=$(find_nvcc); then
        say "torch has CUDA, but no nvcc was found (PATH, CUDA_HOME, /usr/local/cuda): Horovod gets no NCCL GPU" \
            "operations. Install the CUDA toolkit or set CUDA_HOME to it for GPU training."
        return 0
    fi
    CUDA_ROOT=$(cuda_home_of "$NVCC")
    # torch (cpp_extension.CUDA_HOME) and Horovod's CMake (HOROVOD_CUDA_HOME/bin/nvcc) otherwise guess from the
    # PATH or /usr/local/cuda, which is wrong when nvcc is a wrapper or the toolkit lives elsewhere.
    export CUDA_HOME=$CUDA_ROOT HOROVOD_CUDA_HOME=$CUDA_ROOT
    export PATH=$CUDA_ROOT/bin:$PATH
    # Kernels only for the GPUs present (every architecture takes far longer); none visible: nvcc's whole list.
    CUDA_ARCHS=${HOROVOD_BUILD_CUDA_CC_LIST:-$("$VPY" -c 'import torch; print(",".join(sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))' 2>/dev/null || true)}
    BUILD_NCCL=1
}

# The patches for this build, in order: always C++17; the gcc >= 13 includes; the CUDA build's changes.
horovod_patches() {
    echo "$HOROVOD_PATCH"
    local gcc_major
    gcc_major=$(g++ -dumpversion 2>/dev/null | cut -d. -f1)
    [ "${gcc_major:-0}" -ge 13 ] 2>/dev/null && echo "$HOROVOD_GCC13_PATCH"
    [ "$BUILD_NCCL" = 1 ] && echo "$HOROVOD_CUDA_PATCH"
    return 0
}

horovod_cache_key() {
    local torch_key cuda_key patch_key
    torch_key=$("$VPY" -c 'import torch; print(torch.__version__)')
    cuda_key=$("$VPY" -c 'import torch; print("cuda" + torch.version.cuda if torch.version.cuda else "cpu")')
    # A wheel's kernels run only on the architectures it was built for (sm_90 code is no A100 code).
    [ "$BUILD_NCCL" = 1 ] && cuda_key+="-nccl-sm${CUDA_ARCHS:-all}"
    cuda_key=${cuda_key//,/.}
    # The C++17 patch alone hashes as it always did (the same bytes): existing CPU wheels stay valid.
    patch_key=$(horovod_patches | xargs cat | sha256sum | cut -c1-8)
    echo "horovod-$HOROVOD_VERSION-torch$torch_key-py$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-$cuda_key-$patch_key"
}

# pip's NCCL (nvidia-nccl-cu12 / -cu13, under site-packages/nvidia/): "INCLUDE_DIR LIB_DIR LIB_DIR_FROM_SITE_PACKAGES".
find_pip_nccl() {
    "$VPY" - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
for root in list(nvidia.__path__):
    for header in sorted(glob.glob(os.path.join(root, "**", "include", "nccl.h"), recursive=True)):
        lib = os.path.join(os.path.dirname(os.path.dirname(header)), "lib")
        if glob.glob(os.path.join(lib, "libnccl.so.*")):
            print(os.path.dirname(header), lib, os.path.relpath(lib, os.path.dirname(root)))
            raise SystemExit(0)
PY
}

build_horovod_wheel() {
    local out=$1 work src log=$CACHE/logs/horovod-build.log
    work=$(mktemp -d)
    local sdist=$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz
    local carried=${HVDLM_HOROVOD_SDIST:-${WHEELHOUSE:+$WHEELHOUSE/horovod-$HOROVOD_VERSION.tar.gz}}
    if [ ! -f "$sdist" ] && [ -n "$carried" ] && [ -f "$carried" ]; then
        cp "$carried" "$sdist"
    fi
    if [ ! -f "$sdist" ]; then
        [ "$OFFLINE" = 1 ] && die "offline (HVDLM_OFFLINE=1) and no Horovod source distribution: ${carried:-none given}." \
            "Set HVDLM_HOROVOD_SDIST to horovod-$HOROVOD_VERSION.tar.gz (bench/gpu_carry.sh downloads it)," \
            "or put it into $CACHE/src/, then run again."
        say "downloading the Horovod $HOROVOD_VERSION source distribution"
        vpip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CACHE/src" ||
            die "could not download horovod==$HOROVOD_VERSION from the package index." \
                "Put horovod-$HOROVOD_VERSION.tar.gz into $CACHE/src/ by hand, then 'make' again."
    fi
    tar -xzf "$sdist" -C "$work" || die "$sdist is damaged." "Delete it and run 'make' again to download it anew."
    src=$work/horovod-$HOROVOD_VERSION
    local p
    for p in $(horovod_patches); do
        if command -v patch >/dev/null; then
            patch -s -p1 -d "$src" <"$p"
        else
            git -C "$src" apply -p1 "$p"
        fi || die "our patch $p no longer applies to $sdist."
    done

    # Horovod's own build needs these importable (we build without isolation so it sees our torch).
    vpip_install -q setuptools wheel packaging psutil pyyaml cloudpickle cffi ||
        die "pip could not install Horovod's build requirements (setuptools wheel packaging psutil pyyaml cloudpickle cffi)."

    local -a build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 "MAKEFLAGS=-j$(nproc)")
    # CMake >= 4 refuses cmake_minimum_required below 3.5, which Gloo (2.8.12) and other third-party parts ask for.
    local cmake_major
    cmake_major=$(cmake --version | sed -n 's/^cmake version \([0-9]*\).*/\1/p')
    [ "${cmake_major:-0}" -ge 4 ] && build_env+=(CMAKE_POLICY_VERSION_MINIMUM=3.5)
    if [ "$BUILD_NCCL" = 1 ]; then
        build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT")
        [ -n "$CUDA_ARCHS" ] && build_env+=("HOROVOD_BUILD_CUDA_CC_LIST=$CUDA_ARCHS")
        # Linked as a shared library: the process then holds one NCCL, torch's (a static copy would be a second).
        build_env+=(HOROVOD_NCCL_LINK=SHARED)
        # torch's wheels bring NCCL as the nvidia-nccl package, whose lib has libnccl.so.2 but no libnccl.so for
        # CMake to find: point Horovod at it through a directory with that link. The run path, relative to the
        # installed library (site-packages/horovod/torch/), finds it without torch having loaded it first.
        local nccl_inc nccl_lib nccl_rel
        read -r nccl_inc nccl_lib nccl_rel <<<"$(find_pip_nccl)"
        if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_LIB:-}" ] && [ -n "$nccl_lib" ]; then
            local so
            so=$(compgen -G "$nccl_lib/libnccl.so.*" | head -n 1)
            mkdir -p "$work/nccl-lib" && ln -s "$so" "$work/nccl-lib/libnccl.so"
            # shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
            build_env+=(HOROVOD_NCCL_INCLUDE="$nccl_inc" HOROVOD_NCCL_LIB="$work/nccl-lib"
                HVDLM_HOROVOD_RPATH='$ORIGIN/../../'"$nccl_rel")
        fi
        local nccl_from=${nccl_lib:-${HOROVOD_NCCL_HOME:-${HOROVOD_NCCL_LIB:-the CUDA toolkit}}}
        say "CUDA found ($NVCC, CUDA_HOME=$CUDA_ROOT): building with NCCL GPU operations" \
            "(compute capability: ${CUDA_ARCHS:-all}; NCCL from $nccl_from)"
    fi
    say "building Horovod $HOROVOD_VERSION (a few minutes; log: $log)"
    if ! (cd "$src" && env "${build_env[@]}" "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$work/dist" .) \
        >"$log" 2>&1; then
        # pip buries the compiler's message under its own footer: show the first error lines, then the end.
        { echo "[setup] first errors in the build log:"; grep -iE -m 15 'error|fatal' "$log" || true
          echo "[setup] end of the build log:"; tail -n 8 "$log"; } >&2
        die "the Horovod build failed (full log: $log)." \
            "Usual causes: MPI headers missing (apt-get install libopenmpi-dev, or 'module load openmpi')," \
            "no C++17 compiler (g++ >= 9), or cmake < 3.13; with CUDA: nccl.h not found (set HOROVOD_NCCL_HOME)," \
            "or a g++ newer than nvcc supports. Fix that, then 'make' again."
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
    vpip_install -q cloudpickle psutil pyyaml packaging
    echo "$key" >"$VENV/.horovod-key"
}

verify_horovod() {
    local report
    report=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed:" "$report"
    local need needs=(PyTorch MPI Gloo)
    [ "$BUILD_NCCL" = 1 ] && needs+=(NCCL)
    for need in "${needs[@]}"; do
        grep -Eq "\[X\] $need\b" <<<"$report" ||
            die "Horovod was built without $need:" "$report" "Delete $CACHE/wheels and $VENV, then 'make' again."
    done
    # Horovod's GPU ops load the driver library at run time; the CUDA toolkit alone (a build node) has only stubs.
    if [ "$BUILD_NCCL" = 1 ] && ! "$VPY" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
        say "note: no NVIDIA driver library (libcuda.so.1) loads here, so GPU training cannot run on this machine;" \
            "the Horovod build itself is fine for GPU nodes with the driver installed."
    fi
}

install_hvdlm() {
    if [ "$OFFLINE" = 1 ]; then
        # Offline, only what the wheelhouse holds can be installed: hvdlm without its dependencies, then the
        # ones the wheelhouse lists (the rest must already be there, e.g. torch, numpy and mpi4py of a GPU image).
        vpip install -q --no-build-isolation --no-deps -e "$ROOT" || die "pip could not install hvdlm from $ROOT."
        if [ -f "$WHEELHOUSE/requirements.txt" ]; then
            vpip_install -q -r "$WHEELHOUSE/requirements.txt" ||
                die "pip could not install $WHEELHOUSE/requirements.txt from $WHEELHOUSE (offline)." \
                    "Fill the folder again with bench/gpu_carry.sh for this machine's Python version."
        fi
        return 0
    fi
    vpip install -q --no-build-isolation -e "${ROOT}[test]" || die "pip could not install hvdlm from $ROOT/pyproject.toml."
}

# ---------------------------------------------------------------------------------------------------------
main() {
    mkdir -p "$CACHE/logs" "$CACHE/src" "$CACHE/wheels"
    # Any change to these inputs re-runs the set-up; otherwise a finished one is a no-op.
    local stamp_key
    stamp_key=$(cat "$0" "$HERE"/horovod-*.patch "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${TORCH_SPEC:-}-$OFFLINE
    if [ "$(cat "$VENV/.hvdlm-setup" 2>/dev/null)" = "$stamp_key" ] && command -v mpirun >/dev/null; then
        return 0
    fi

    ensure_system_tools
    ensure_venv
    VPY=$VENV/bin/python
    ensure_torch
    detect_cuda
    ensure_horovod
    say "installing hvdlm and its dependencies"
    install_hvdlm
    verify_horovod
    echo "$stamp_key" >"$VENV/.hvdlm-setup"
    say "ready: $VENV ($("$VPY" -c 'import torch, horovod; print("torch", torch.__version__, "+ horovod", horovod.__version__)'))"
}

main "$@"
