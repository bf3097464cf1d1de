#!/usr/bin/env bash
# README command 2: install what is needed, then run the test suite (extra arguments go to pytest, e.g. -m slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
