#!/bin/sh
# The compose stack's nginx command: lists every ptserve replica in
# ptserve-upstreams.conf (one `server IP:PORT;` line each, as nginx.conf's
# consistent hash needs), starts nginx, and every 10 s asks Docker's DNS again;
# when the replicas changed (`--scale`, a recreated container) it rewrites the
# list and reloads nginx. An empty answer keeps the last list. Needs only sh,
# getent and sort (the nginx image's busybox and musl, or Debian's base).
set -eu
name=${PTSERVE_UPSTREAM_NAME:-ptserve}
port=${PTSERVE_UPSTREAM_PORT:-8000}
conf=${PTSERVE_UPSTREAMS_CONF:-/etc/nginx/ptserve-upstreams.conf}

addresses() { getent hosts "$name" | while read -r ip _; do echo "$ip"; done | sort -u; }
write() {
    for ip in $1; do
        case "$ip" in *:*) ip="[$ip]" ;; esac
        echo "server $ip:$port;"
    done >"$conf.new"
    mv "$conf.new" "$conf"
}

until list=$(addresses) && [ -n "$list" ]; do sleep 1; done
write "$list"
nginx -g 'daemon off;' &
pid=$!
trap 'kill -TERM "$pid"' TERM INT
while kill -0 "$pid" 2>/dev/null; do
    sleep 10 &
    wait $! || true
    now=$(addresses || true)
    if [ -n "$now" ] && [ "$now" != "$list" ]; then
        list=$now
        write "$list"
        echo "ptserve replicas changed: $(echo $list)" >&2
        nginx -s reload || echo "nginx -s reload failed; keeping the previous configuration" >&2
    fi
done
wait "$pid"
