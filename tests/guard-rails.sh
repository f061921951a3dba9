#!/usr/bin/env bash
# The checks that need no build, run first by tests/run.sh (and by hand):
#   - rustfmt: the committed rustfmt.toml, no diff;
#   - the dependency policy (deny.toml) with cargo-deny, offline: bans (ring
#     and any second TLS stack), licenses, sources (crates.io only);
#   - rust-version in Cargo.toml is at least what every locked dependency
#     declares (so it tells the truth);
#   - deploy/dr-controller.service stays hardened: `systemd-analyze security`
#     rates its exposure 3.0 or lower.
# cargo-deny is installed from crates.io into DR_TOOLS (default
# /var/tmp/dr-tools) the first time, pinned; systemd-analyze with apt-get
# (package systemd) when it is missing and we are root, else that check is
# skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- cargo fmt --check"
cargo fmt --all -- --check || { echo "rustfmt: the files above differ from rustfmt.toml's style; run 'cargo fmt --all'"; exit 1; }

tools=${DR_TOOLS:-/var/tmp/dr-tools}
deny_version=0.20.2
if ! "$tools/bin/cargo-deny" --version 2>/dev/null | grep -q " $deny_version\$"; then
  echo "-- installing cargo-deny $deny_version into $tools (once)"
  cargo install --quiet --locked --root "$tools" "cargo-deny@$deny_version"
fi
# cargo-deny reads the locked crates from cargo's cache: on a fresh machine
# that cache is empty until something downloads them.
echo "-- cargo fetch --locked"
cargo fetch --locked --quiet
echo "-- cargo deny check bans licenses sources (offline)"
"$tools/bin/cargo-deny" --offline --locked check --hide-inclusion-graph bans licenses sources

echo "-- rust-version"
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
members = set(m["workspace_members"])
v = lambda s: tuple(int(x) for x in s.split("."))
ours = {p["rust_version"] for p in m["packages"] if p["id"] in members}
need = max((p for p in m["packages"] if p["id"] not in members and p.get("rust_version")), key=lambda p: v(p["rust_version"]))
assert len(ours) == 1 and None not in ours, f"every workspace crate must inherit one rust-version, found {ours}"
(have,) = ours
name, version, wants = need["name"], need["version"], need["rust_version"]
if v(have) < v(wants):
    sys.exit(f"rust-version = {have} in Cargo.toml, but {name} {version} needs {wants}")
print(f"rust-version {have} (the most demanding dependency: {name} needs {wants})")
'

echo "-- systemd-analyze security deploy/dr-controller.service (exposure at most 3.0)"
if ! command -v systemd-analyze >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
fi
if command -v systemd-analyze >/dev/null; then
  unit=deploy/dr-controller.service
  # --threshold counts tenths of the level shown (3.0 is 30; systemd 252);
  # the exit status is 1 above it.
  if ! security=$(systemd-analyze security --offline=true --threshold=30 "$unit" 2>&1); then
    level=$(echo "$security" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [ -z "$level" ]; then
      echo "$security"
      echo "$unit: systemd-analyze security could not assess it (above)"
      exit 1
    fi
    # The settings that cost exposure: the lines ending in their share.
    echo "$security" | sed 's/ *$//' | grep -E ' [0-9]+\.[0-9]$' | tr -s ' ' || true
    echo "$unit: exposure $level, above 3.0 (the settings above cost it); harden the unit again rather than raise the threshold"
    exit 1
  fi
  echo "$security" | grep -o 'Overall exposure level.*'
else
  echo "systemd-analyze not found (and not installable here: no apt-get or not root): the unit's hardening check is skipped"
fi
