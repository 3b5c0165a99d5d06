#!/bin/sh
# The official postgres image's first-run contract, for the stand-in: initialise, create the
# user and the database named by the environment, then run in the foreground.
set -eu
bin=/usr/lib/postgresql/15/bin
user="${POSTGRES_USER:-postgres}" db="${POSTGRES_DB:-${POSTGRES_USER:-postgres}}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # UTF8, as the official image: under SQL_ASCII psycopg hands back bytes, and SQLAlchemy fails.
    "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >/dev/null
    echo "host all all 0.0.0.0/0 ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >> "$PGDATA/pg_hba.conf"
    "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    [ "$user" = postgres ] || "$bin/../bin/psql" -U postgres -h /var/run/postgresql -qc "CREATE ROLE \"$user\" LOGIN SUPERUSER"
    [ "$db" = postgres ] || "$bin/../bin/psql" -U postgres -h /var/run/postgresql -qc "CREATE DATABASE \"$db\" OWNER \"$user\""
    "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql
