#!/bin/sh
# The router's command. nginx's own resolver reads neither /etc/resolv.conf nor
# its search domains, so fill in both from the pod's resolv.conf: the cluster's
# DNS server, and the first search domain, <namespace>.svc.<cluster domain>.
set -eu
resolver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
case "$resolver" in *:*) resolver="[$resolver]" ;; esac
domain=$(awk '$1 == "search" { print $2; exit }' /etc/resolv.conf)
sed -e "s/@RESOLVER@/$resolver/" -e "s/@SERVICE_DOMAIN@/$domain/" /etc/ptserve-router/nginx.conf >/tmp/nginx.conf
exec nginx -c /tmp/nginx.conf -g 'daemon off;'
