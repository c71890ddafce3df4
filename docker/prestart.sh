#!/usr/bin/env bash
# Wait for the database by applying the migrations until that succeeds, then run
# the given command (in docker-compose.yml: `sarft serve --host 0.0.0.0 --port 8000`).
#
#   prestart.sh [COMMAND [ARG...]]
#
# `sarft db upgrade` is idempotent: at head it does nothing, so retrying it is a
# safe readiness probe that also leaves the schema current. `sarft serve` runs the
# same upgrade again on start (a no-op by then).
#
# SARFT_DB_WAIT_ATTEMPTS (default 30) and SARFT_DB_WAIT_SECONDS (default 2) tune
# the wait; the defaults give the database about a minute.
set -euo pipefail

attempts="${SARFT_DB_WAIT_ATTEMPTS:-30}"
delay="${SARFT_DB_WAIT_SECONDS:-2}"

attempt=1
# A failed attempt prints a full traceback; keep only the last one's, shown when
# giving up, so that a slow database start does not flood the log.
until output="$(sarft db upgrade 2>&1)"; do
  if [ "${attempt}" -ge "${attempts}" ]; then
    printf '%s\n' "${output}" >&2
    echo "prestart: the database is still unreachable after ${attempts} attempts; giving up" >&2
    exit 1
  fi
  echo "prestart: database not ready (attempt ${attempt}/${attempts}); retrying in ${delay}s" >&2
  attempt=$((attempt + 1))
  sleep "${delay}"
done
printf '%s\n' "${output}"

if [ "$#" -gt 0 ]; then
  # exec: the server becomes the container's main process and gets its signals.
  exec "$@"
fi
