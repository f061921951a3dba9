#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests, from Debian's packages:
# installs `postgresql` if missing, makes a cluster in a temporary
# directory (initdb, as the `postgres` user when run as root: PostgreSQL
# refuses to run as root), starts it on 127.0.0.1 and a free port, and
# prints its URL. The tests create a database of their own in it per test.
#
#   url=$(tests/postgres.sh start DIR)   # DIR: the cluster's directory (new)
#   tests/postgres.sh restart DIR        # a database restart (same port)
#   tests/postgres.sh stop DIR
#
# Nothing listens beyond loopback; the server's log is DIR/log.
set -euo pipefail
cmd=${1:?usage: tests/postgres.sh start|stop DIR}
dir=${2:?usage: tests/postgres.sh start|stop DIR}

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(bindir)" ]; then
  echo "installing postgresql (Debian's packages)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
bin=$(bindir)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    # Loopback only, a socket in DIR, room for many test databases' sessions.
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c shared_buffers=64MB" start >&2 \
      || { cat "$dir/log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  restart)
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -m fast -w -t 60 restart >&2
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
    rm -rf "$dir"
    ;;
  *) echo "tests/postgres.sh: unknown command $cmd (start, restart or stop)" >&2; exit 2 ;;
esac
