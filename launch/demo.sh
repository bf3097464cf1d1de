#!/usr/bin/env bash
# README command 1: install what is needed, then run the demo (data -> 2-rank DeepSpeed training -> eval -> export).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pipeline demo "$@"
