#!/bin/sh
# Start nats-server for docker-compose with each NATS user's password in its environment, read from
# the compose secrets (/run/secrets/nats-<user>-password), where the services read theirs too: one
# file per password, no copy in .env. accounts.conf refers to them as $NATS_<USER>_PASSWORD.
set -eu

for user in referrals panel conferences actionplans operator; do
  file="/run/secrets/nats-${user}-password"
  [ -r "$file" ] || { echo "missing $file: run deploy/scripts/init_secrets.py compose" >&2; exit 1; }
  var="NATS_$(echo "$user" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  export "$var=$(cat "$file")"
done

exec nats-server --config /etc/nats/nats.conf "$@"
