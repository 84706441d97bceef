#!/bin/sh
# First start of the compose PostgreSQL only (docker-entrypoint-initdb.d): one role and one
# database per service, each database owned by its role and closed to everyone else. Passwords
# come from the environment (.env, written by deploy/scripts/init_secrets.py).
set -eu

for service in referrals panel conferences actionplans; do
  var="$(echo "${service}_DB_PASSWORD" | tr '[:lower:]' '[:upper:]')"
  eval "password=\${$var:?$var is not set}"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v role="csx_${service}" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
SQL
done
