#!/usr/bin/env bash
# Create .venv and install fusekit into it. Usage: bash scripts/setup.sh [EXTRAS], e.g. "dev".
# torch is pinned and installed first so that pip takes the CPU build and nothing pulls a newer one.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q torch==2.13.0
if [ -n "$extras" ]; then
  "${pip[@]}" install -q -e ".[$extras]"
else
  "${pip[@]}" install -q -e .
fi
