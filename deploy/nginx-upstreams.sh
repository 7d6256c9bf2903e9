#!/bin/sh
# The compose stack's nginx command: lists every ptserve replica in
# ptserve-upstreams.conf (one `server IP:PORT;` line each, as nginx.conf's
# consistent hash needs), starts nginx, and every 10 s asks Docker's DNS again;
# when the replicas changed (`--scale`, a recreated container) it rewrites the
# list and reloads nginx. An empty answer keeps the last list.
set -eu
name=${PTSERVE_UPSTREAM_NAME:-ptserve}
port=${PTSERVE_UPSTREAM_PORT:-8000}
conf=/etc/nginx/ptserve-upstreams.conf

addresses() { getent hosts "$name" | awk '{ print $1 }' | sort -u; }
write() { printf '%s\n' "$1" | awk -v port="$port" '{ printf "server %s:%s;\n", $1, port }' >"$conf"; }

until list=$(addresses) && [ -n "$list" ]; do sleep 1; done
write "$list"
nginx -g 'daemon off;' &
pid=$!
trap 'kill -TERM "$pid"' TERM INT
while kill -0 "$pid" 2>/dev/null; do
    sleep 10 & wait $! || true
    now=$(addresses || true)
    if [ -n "$now" ] && [ "$now" != "$list" ]; then
        list=$now
        write "$list"
        nginx -s reload
    fi
done
wait "$pid"
