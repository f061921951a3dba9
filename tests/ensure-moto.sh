#!/usr/bin/env bash
# Makes sure a Python venv with moto's EC2 server exists and prints the path
# of its moto_server. Used by tests/run.sh and deploy/demo.sh.
#   DR_VENV   where the venv lives (default: <repo>/.venv)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DR_VENV:-$repo/.venv}
if ! "$venv/bin/moto_server" --help >/dev/null 2>&1; then
  echo "installing moto[server]==5.2.5 into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' >&2
fi
echo "$venv/bin/moto_server"
