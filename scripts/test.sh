#!/usr/bin/env bash
# The test suite on the CPU: `bash scripts/test.sh [pytest args]`. GPU tests are skipped without CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS=requirements-test.txt source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export WANDB_MODE=offline
exec python -m pytest "$@"
