#!/usr/bin/env bash
# Set up we_dist on a fresh Debian/Ubuntu machine: FFCV's build dependencies and the
# Fashion-MNIST data package (apt), a virtual environment in .venv, and the package with its dev extra.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists opencv4 || pkg-config --exists opencv || need_apt+=(libopencv-dev)
    pkg-config --exists libturbojpeg || need_apt+=(libturbojpeg0-dev)
else
    need_apt+=(libopencv-dev libturbojpeg0-dev)
fi
# Fashion-MNIST's IDX files (`we-dist convert fashion-mnist`, its recipes and tests).
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get (FFCV's build dependencies, Fashion-MNIST)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi

stamp="$VENV/.we_dist-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing we_dist and its dependencies into $VENV (first time: a few minutes)"
    "$VENV/bin/pip" install -q -e ".[dev]"
    touch "$stamp"
fi
