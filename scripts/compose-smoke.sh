#!/usr/bin/env bash
# Brings the docker-compose stack up on this machine and checks it end to end,
# with nothing pulled from an image registry:
#   1. a base image from Debian's packages (mmdebstrap): Python 3.11, redis-server,
#      nginx; plus this machine's CA bundle (pip trusts the same certificates as
#      here) and the CPU torch wheel found in $TORCH_WHEELS, preinstalled;
#   2. the ptserve image built FROM it by our Dockerfile (torch is already there,
#      the rest comes from PyPI);
#   3. docker-compose.yml as it is, minus the GPU reservation (no GPU runtime here),
#      with that base image standing in for the redis and nginx images and a tiny
#      random model (ptserve tiny-model) bind-mounted as the model;
#   4. upload a prompt, generate and classify through nginx's published port,
#      restart the server container, and show the prompt is still served (from Redis);
#   5. tear down its own containers, volumes, images, and the dockerd it started.
#
#   sudo bash scripts/compose-smoke.sh        # about 5-10 minutes; needs `ptserve` on PATH (README install)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
project=ptserve-smoke
base=ptserve-smoke-base:bookworm
image=ptserve-smoke:latest
work=$(mktemp -d)
started_dockerd=""
compose=(docker-compose -p "$project" --project-directory "$repo" -f "$work/docker-compose.yml")

say() { printf '\n== %s\n' "$*"; }

cleanup() {
    say "teardown"
    if [ -f "$work/docker-compose.yml" ]; then "${compose[@]}" down -v --remove-orphans || true; fi
    docker rmi -f "$image" "$base" >/dev/null 2>&1 || true
    if [ -n "$started_dockerd" ]; then kill "$started_dockerd" 2>/dev/null || true; wait "$started_dockerd" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

say "dockerd and mmdebstrap (Debian packages)"
if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v docker-compose >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose mmdebstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    dockerd >"$work/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info --format 'docker server {{.ServerVersion}}, storage {{.Driver}}'

say "base image from Debian packages"
mmdebstrap --quiet --variant=apt \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,redis-server,nginx-light,curl \
    bookworm "$work/rootfs.tar"
docker import "$work/rootfs.tar" "$base-rootfs" >/dev/null
wheel=$(ls "$TORCH_WHEELS"/torch-*cpu*cp311*.whl | head -n 1)
mkdir -p "$work/base"
cp "$CA_BUNDLE" "$work/base/ca-certificates.crt"
cp "$wheel" "$work/base/"
cat >"$work/base/Dockerfile" <<EOF
FROM $base-rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
COPY $(basename "$wheel") /tmp/
RUN pip install /tmp/$(basename "$wheel") && rm /tmp/*.whl
EOF
docker build --network host -q -t "$base" "$work/base"
docker rmi "$base-rootfs" >/dev/null

say "ptserve image (Dockerfile, CPU torch already in the base)"
docker build --network host -t "$image" --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX=cuda "$repo" \
    | grep -E "^Step|Successfully" || true
docker image inspect "$image" --format 'image {{.RepoTags}} {{.Size}} bytes, user {{.Config.User}}'

say "tiny model and compose file"
ptserve tiny-model "$work/models/tiny" >/dev/null 2>&1
chmod -R a+rX "$work/models"
# the compose file as shipped, without its GPU reservation (no GPU runtime on this machine)
sed '/    deploy:/,/capabilities: \[gpu\]/d' docker-compose.yml >"$work/docker-compose.yml"
cat >"$work/override.yml" <<EOF
services:
  ptserve:
    volumes:
      - $work/models:/models:ro
EOF
compose+=(-f "$work/override.yml")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PTSERVE_MODEL=/models/tiny PTSERVE_PORT=$port PTSERVE_IMAGE=$image REDIS_IMAGE=$base NGINX_IMAGE=$base
"${compose[@]}" config -q
url="http://127.0.0.1:$port"

wait_ready() {
    for _ in $(seq 120); do
        if curl -fsS "$url/ready" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    "${compose[@]}" logs --tail 50
    return 1
}

say "up"
"${compose[@]}" up -d --no-build
wait_ready
curl -sS "$url/ready"; echo
"${compose[@]}" ps

say "upload, generate, classify through nginx on $url"
( cd "$work" && ptserve make-artifact --model models/tiny --template "[P:3]{input}[P:3]" -o gen.safetensors \
    && ptserve make-artifact --model models/tiny --task-type classify --template "[P:2] Review: {input} [P:2] Sentiment:" \
        --labels '{"positive": " good", "negative": " bad"}' -o cls.safetensors ) >/dev/null 2>&1
curl -sS -X PUT --data-binary @"$work/gen.safetensors" "$url/v1/tasks/smoke-gen"; echo
curl -sS -X PUT --data-binary @"$work/cls.safetensors" "$url/v1/tasks/smoke-cls"; echo
before=$(curl -sS -X POST "$url/v1/tasks/smoke-gen/generate" -H 'content-type: application/json' \
    -d '{"input": "Hello there", "max_new_tokens": 8}')
echo "$before"
curl -sS -X POST "$url/v1/tasks/smoke-cls/classify" -H 'content-type: application/json' -d '{"input": "A fine film"}'; echo

say "restart the server container; the prompts come back from Redis"
"${compose[@]}" restart ptserve
wait_ready
after=$(curl -sS -X POST "$url/v1/tasks/smoke-gen/generate" -H 'content-type: application/json' \
    -d '{"input": "Hello there", "max_new_tokens": 8}')
echo "$after"
curl -sS "$url/v1/tasks" | python3 -c 'import json,sys; print([(t["task_id"], t["version"]) for t in json.load(sys.stdin)])'
if [ "$before" != "$after" ]; then echo "FAIL: the answer changed across the restart"; exit 1; fi
echo "OK: same answer from the same stored prompt after the restart"
