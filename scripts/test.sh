#!/usr/bin/env bash
# The README's second command (and what CI runs): set up with the dev extras, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check fusekit scripts tests
.venv/bin/mypy fusekit
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
