# Source this file: pg_start installs Debian's PostgreSQL if needed, starts a throwaway server
# and exports MARROWCOUNT_PG_URL; pg_stop stops it and removes its folder. Without root or
# without a package source it prints why and leaves MARROWCOUNT_PG_URL unset, so the
# PostgreSQL tests skip with that message.

pg_start() {
  local bindir
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$bindir" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
        || { echo "CI: PostgreSQL could not be installed; PostgreSQL tests will be skipped" >&2; return 0; }
      bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    else
      echo "CI: PostgreSQL is not installed and this is not root; PostgreSQL tests will be skipped" >&2
      return 0
    fi
  fi
  PG_DIR=$(mktemp -d /tmp/marrowcount-pg.XXXXXX)
  chmod 755 "$PG_DIR"
  local run=()
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$PG_DIR"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" mkdir -m 700 "$PG_DIR/data" || { echo "CI: cannot prepare PostgreSQL; skipped" >&2; return 0; }
  PG_PORT=$((20000 + RANDOM % 20000))
  PG_BIN=$bindir
  if ! "${run[@]}" "$bindir/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null \
    || ! "${run[@]}" "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/pg.log" -w \
         -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null; then
    echo "CI: PostgreSQL server did not start; PostgreSQL tests will be skipped" >&2
    cat "$PG_DIR/pg.log" >&2 2>/dev/null || true
    return 0
  fi
  if ! "$bindir/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE marrowcount LOGIN SUPERUSER PASSWORD 'marrowcount'" \
    -c "CREATE DATABASE marrowcount OWNER marrowcount" >/dev/null; then
    echo "CI: could not create the PostgreSQL test role; PostgreSQL tests will be skipped" >&2
    return 0
  fi
  export MARROWCOUNT_PG_URL="postgresql+psycopg://marrowcount:marrowcount@127.0.0.1:$PG_PORT/marrowcount"
  echo "CI: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') running on port $PG_PORT" >&2
}

pg_stop() {
  [ -n "${PG_DIR:-}" ] || return 0
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  else
    "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$PG_DIR"
  PG_DIR=
}
