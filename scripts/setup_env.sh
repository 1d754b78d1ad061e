#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs the pinned requirements into it.
# Sourced by demo.sh and test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
pip_install() {
  # (grep drops pip's notes about package-index folders a machine's pip config names but lacks)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  pip_install --upgrade pip
fi
pip_install -r "$ROOT/${REQUIREMENTS:-requirements.txt}"
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
