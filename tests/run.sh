#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (a
# Python venv with moto's EC2 server, PostgreSQL), builds every binary, runs
# every test.
#
#   tests/run.sh                 # everything
#   tests/run.sh -p dr-agent     # extra arguments go to `cargo test`
#
# Environment: DR_VENV (default: <repo>/.venv), CARGO_TARGET_DIR (optional
# build cache). Nothing here or in the tests talks to anything but loopback.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$(date +%s)

echo "== test dependencies"
# Freeze tests use real ext4 file systems on loop devices (root required).
if ! command -v mkfs.ext4 >/dev/null || ! command -v losetup >/dev/null || ! command -v fsfreeze >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs util-linux mount
fi
# Build-cleanup tests run against a real clojure.main REPL (brings a JVM).
if ! command -v clojure >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clojure
fi
DR_MOTO_SERVER=$(tests/ensure-moto.sh)
export DR_MOTO_SERVER
# The PostgreSQL store's tests run against a real server from Debian's
# packages: a throw-away cluster on loopback for this run (each test makes
# a database of its own in it), stopped on exit.
pg_dir=$(mktemp -d /tmp/dr-pg.XXXXXX)
trap 'tests/postgres.sh stop "$pg_dir"' EXIT
DR_TEST_PG=$(tests/postgres.sh start "$pg_dir")
export DR_TEST_PG
# The IAM evaluator (tests/iam/evaluator: @cloud-copilot/iam-simulate, a test
# tool, not shipped), pinned by its package-lock.json; first its own checks
# against AWS's documented condition semantics and the policies' negatives.
(cd tests/iam/evaluator && npm ci --no-audit --no-fund --silent && node selftest.mjs >/dev/null) \
  || { echo "tests/iam/evaluator: npm ci or its selftest failed (node selftest.mjs shows which check)"; exit 1; }

# Never let the AWS SDK look for credentials or a region on the network.
export AWS_EC2_METADATA_DISABLED=true
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1

echo "== guard rails (tests/guard-rails.sh: rustfmt, dependency policy, rust-version)"
bash tests/guard-rails.sh

echo "== building"
# --all-targets: the same feature set as `cargo test` below (dev-dependencies
# such as tokio's test-util are unified), so nothing is compiled twice.
cargo build --workspace --all-targets --locked
echo "== clippy (every lint a warning is an error; workspace lints in Cargo.toml)"
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
echo "== testing"
# Every AWS call the controllers under test make is recorded
# (tests/src/iam_record.rs) and then evaluated under the shipped IAM policies.
DR_IAM_RECORD_DIR=$(mktemp -d /tmp/dr-iam-record.XXXXXX)
export DR_IAM_RECORD_DIR
# The end-to-end tests start several processes each: two at a time fits a
# 2-core machine.
cargo test --workspace --locked "$@" -- --test-threads 2
echo "== IAM evaluation of the recorded calls (deploy/iam-*.json)"
# Fails on any denial, any call it cannot judge, any unreadable record and,
# for a full run, any kind of call the workflows make that was not recorded.
# A partial run (extra arguments) cannot cover every kind of call: it is
# checked for denials only.
node tests/iam/evaluator/evaluate.mjs "$DR_IAM_RECORD_DIR" deploy $([ $# -gt 0 ] && echo --partial) \
  || { echo "IAM evaluation failed (the calls above; records kept in $DR_IAM_RECORD_DIR)"; exit 1; }
rm -rf "$DR_IAM_RECORD_DIR"
echo "== tests/run.sh took $(( $(date +%s) - start ))s"
