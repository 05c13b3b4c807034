#!/usr/bin/env bash
# The README's test command: lint, type-check, then the quick test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh test
echo "== ruff"; .venv/bin/ruff check agent provisioning fleet tests tools bench training
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -q -m "not slow and not system" "$@"
