#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch) and runs a job.
#   bash scripts/dev.sh demo [ARGS]   set up, then run the demo on the embedded pair
#   bash scripts/dev.sh test [ARGS]   set up, then run ruff, mypy and the test suite
#   bash scripts/dev.sh setup         set up only
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TL_TRANSPLANT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.tl_transplant_stamp" want
  want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned to the CPU build (constraints/cpu.txt); then the package.
  # Where a local wheel folder exists (our dev and CI machines), pip takes the CPU wheel from it.
  local links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  "$VENV/bin/python" -m pip install -q "${links[@]}" -c constraints/cpu.txt "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -c constraints/cpu.txt -e ".[test,lm_eval]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, tl_transplant; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    || { echo "setup failed: torch 2.13.0 (CPU) or tl_transplant did not install" >&2; exit 1; }
  echo "$want" > "$stamp"
}

browser() {
  # The report test renders report.html in headless Chromium (Debian package); it skips,
  # saying why, only where Chromium cannot be installed.
  command -v chromium >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || true
  fi
  command -v chromium >/dev/null 2>&1 || echo "note: chromium unavailable; the browser test will skip" >&2
}

disk_check() {
  # The suite needs about 1 GB of temporary files at its peak (real-model exports) and, on
  # its first run, about 5 GB of real-model caches; a full disk fails tests in fixture setup.
  local tmp=${TMPDIR:-/tmp} cache=${TL_TRANSPLANT_CACHE:-$HOME/.cache}
  [ -d "$cache" ] || cache=$HOME
  local t c
  t=$(df -Pk "$tmp" 2>/dev/null | awk 'NR==2 {print int($4/1048576)}') || true
  c=$(df -Pk "$cache" 2>/dev/null | awk 'NR==2 {print int($4/1048576)}') || true
  [ -n "$t" ] && [ -n "$c" ] || return 0  # never fail the tests over the check itself
  echo "disk: ${t} GB free in $tmp, ${c} GB free for caches in $cache"
  if [ "$t" -lt 3 ] || [ "$c" -lt 6 ]; then
    echo "warning: the tests need ~1 GB free in $tmp and ~5 GB for the real-model caches" \
      "on a first run; tests will fail in setup if the disk fills" >&2
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/tl-transplant" demo "$@"
    ;;
  test)
    setup
    browser
    "$VENV/bin/ruff" check tl_transplant tests benchmarks
    "$VENV/bin/mypy" tl_transplant
    disk_check
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *) echo "usage: bash scripts/dev.sh {setup|demo|test} [ARGS]" >&2; exit 2 ;;
esac
