#!/usr/bin/env bash
# Creates (once) the Python virtual environment the server tests use, with the pinned
# packages of tests/serve/requirements.txt from PyPI, and prints its python's path.
# Idempotent: a finished venv is reused while the requirements file is unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LOGQUANT_PY_VENV:-$root/target/py-venv}"
req="$root/tests/serve/requirements.txt"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
echo "py-venv: creating $venv with $(grep -v '^#' "$req" | tr '\n' ' ')" >&2
rm -rf "$venv"
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
cp "$req" "$stamp"
echo "$venv/bin/python"
