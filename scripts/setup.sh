#!/usr/bin/env bash
# Set up a virtual environment for UniFilter on a fresh machine.
#
#   bash scripts/setup.sh            # runtime + dev + training + ray extras (what tests need)
#   UNIFILTER_EXTRAS= bash scripts/setup.sh      # runtime only (what `make demo` needs)
#   UNIFILTER_TORCH=cuda bash scripts/setup.sh   # force the CUDA build of torch
#   UNIFILTER_TORCH=cpu  bash scripts/setup.sh   # force the CPU build of torch
#   UNIFILTER_BROWSER=1  bash scripts/setup.sh   # also install Debian's chromium for browser tests
#
# torch is installed FIRST and on purpose: a bare `torch` requirement on a machine without torch pulls a
# multi-GB CUDA build from PyPI. On a machine with no NVIDIA GPU we install the CPU build; with one (or with
# UNIFILTER_TORCH=cuda) the default PyPI build, which ships CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${UNIFILTER_VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${UNIFILTER_EXTRAS-dev,training,ray}"  # set but empty: no extras
TORCH_VERSION="${UNIFILTER_TORCH_VERSION:-2.13.0}"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade "pip>=24" setuptools wheel

mode="${UNIFILTER_TORCH:-auto}"
if [ "$mode" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi

if "$VPY" -c "import torch" >/dev/null 2>&1; then
    log "torch already installed: $("$VPY" -c 'import torch; print(torch.__version__)')"
elif [ "$mode" = cuda ]; then
    log "installing CUDA build of torch"
    "$VPY" -m pip install -q "torch>=2.6,<2.15"
else
    log "installing CPU build of torch $TORCH_VERSION"
    # The local-version tag (+cpu) never matches PyPI's CUDA wheels: it is found in a local wheel
    # folder/index when the machine has one, else on PyTorch's CPU index.
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "$VPY" -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

# DeepSpeed builds from source: without --no-build-isolation its build environment would fetch its own
# (CUDA) torch. Install its build requirements into the venv, then the project.
if [[ ",$EXTRAS," == *",training,"* ]]; then
    "$VPY" -m pip install -q ninja packaging psutil py-cpuinfo hjson pydantic
    DS_BUILD_OPS=0 "$VPY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
fi
if [ -n "$EXTRAS" ]; then
    log "installing unifilter[$EXTRAS]"
    "$VPY" -m pip install -q -e ".[${EXTRAS}]"
else
    log "installing unifilter (no extras)"
    "$VPY" -m pip install -q -e .
fi

if [ "${UNIFILTER_BROWSER:-0}" = 1 ]; then
    if ! command -v chromium >/dev/null 2>&1; then
        log "installing Debian's chromium for browser tests"
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
    fi
fi
log "done: $("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
