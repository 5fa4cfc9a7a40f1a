#!/usr/bin/env bash
# The PostgreSQL server binaries the tests start (tests/conftest.py, lockgate/bench/pgserver.py).
# Present already on most of our machines (/usr/lib/postgresql/<N>/bin); otherwise, as root on
# Debian/Ubuntu, installed from the distribution's packages (the server is not started: the tests
# start their own in a temporary directory). Anywhere else: say what to install, and go on.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then
    exit 0
fi
if [ -n "${LOCKGATE_PG_BIN:-}" ] && [ -x "${LOCKGATE_PG_BIN}/postgres" ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing PostgreSQL server binaries (apt-get install postgresql) for the tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    exit 0
fi
echo "note: no PostgreSQL server binaries; the PostgreSQL tests need them (install postgresql, or set LOCKGATE_PG_BIN)" >&2
