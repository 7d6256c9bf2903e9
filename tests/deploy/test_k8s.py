"""deploy/k8s: both overlays render with kubectl kustomize, and the rendered
objects say what docs/deployment.md promises (probes, a locked-down pod, the GPU only
in the gpu overlay, Redis as the store, the HPA and the PDB)."""

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (.ci/run installs it from Debian)"
)


@cache
def render(path: Path) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} objects"
    return found[0]


def server(objects) -> tuple[dict, dict]:
    """The ptserve Deployment's pod spec and its one container."""
    pod = one(objects, "Deployment", "ptserve")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def settings(objects) -> dict:
    _, container = server(objects)
    (ref,) = container["envFrom"]
    return one(objects, "ConfigMap", ref["configMapRef"]["name"])["data"]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.fixture(params=["gpu", "cpu"])
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def test_the_default_is_the_gpu_overlay():
    assert render(K8S) == render(K8S / "overlays" / "gpu")


def test_probes(overlay):
    _, objects = overlay
    _, container = server(objects)
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    # The first start downloads and converts the default model before the port opens.
    assert startup["periodSeconds"] * startup["failureThreshold"] == 900


def test_the_shutdown_grace_ends_before_kubernetes_kills_the_pod(overlay):
    _, objects = overlay
    pod, container = server(objects)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(settings(objects)["PTSERVE_SHUTDOWN_GRACE_S"])
    assert int(pre_stop[1]) + grace + 10 == pod["terminationGracePeriodSeconds"] == 60


def test_the_pod_runs_as_the_images_user_on_a_read_only_root(overlay):
    _, objects = overlay
    pod, container = server(objects)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"useradd .*--uid 1000 --gid 1000 ptserve", dockerfile)
    assert "\nUSER 1000:1000\n" in dockerfile
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_writable_places_are_volumes(overlay):
    _, objects = overlay
    pod, container = server(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert set(mounts) == {"/models", "/tmp", "/home/ptserve"}
    assert mounts["/tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert mounts["/home/ptserve"]["emptyDir"] == {"sizeLimit": "1Gi"}
    claim = mounts["/models"]["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    config = settings(objects)
    assert config["PTSERVE_MODEL_CACHE"] == "/models/ptserve"
    assert config["HF_HOME"] == "/models/huggingface"
    assert "PTSERVE_MODEL" not in config  # the default model


def test_the_gpu_is_requested_only_by_the_gpu_overlay(overlay):
    name, objects = overlay
    pod, container = server(objects)
    resources = container["resources"]
    config = settings(objects)
    if name == "gpu":
        assert resources["requests"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}
        assert resources["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 1}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert config["PTSERVE_DEVICE"] == "cuda"
        assert container["image"] == "ptserve:latest"
    else:
        assert resources == {"requests": {"cpu": "4", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
        assert "tolerations" not in pod
        assert config["PTSERVE_DEVICE"] == "cpu"
        assert container["image"] == "ptserve:cpu"


def test_tokens_come_from_the_secret_and_nowhere_else(overlay):
    _, objects = overlay
    _, container = server(objects)
    assert container["env"] == [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": "ptserve-tokens", "key": key}}}
        for key in ("PTSERVE_API_TOKEN", "PTSERVE_INFERENCE_TOKEN")
    ]
    assert not [o for o in objects if o["kind"] == "Secret"]  # created by hand, never shipped
    assert not [key for key in settings(objects) if "TOKEN" in key]
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert example["metadata"]["name"] == "ptserve-tokens"
    assert all(value.startswith("REPLACE-WITH-") for value in example["stringData"].values())


def test_the_store_is_the_redis_service(overlay):
    _, objects = overlay
    store = urlsplit(settings(objects)["PTSERVE_STORE"])
    assert (store.scheme, store.hostname, store.port, store.path) == ("redis", "ptserve-redis", 6379, "/0")
    service = one(objects, "Service", store.hostname)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis"}]
    redis = one(objects, "StatefulSet", "ptserve-redis")
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    headless = one(objects, "Service", redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "redis:7"
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert container["volumeMounts"] == [{"name": claim["metadata"]["name"], "mountPath": "/data"}]


def test_the_service_reaches_the_servers(overlay):
    _, objects = overlay
    labels = one(objects, "Deployment", "ptserve")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "ptserve")
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]


def test_hpa_and_pdb(overlay):
    name, objects = overlay
    deployment = one(objects, "Deployment", "ptserve")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = one(objects, "HorizontalPodAutoscaler", "ptserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ptserve"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50 if name == "gpu" else 70},
            },
        }
    ]
    pdb = one(objects, "PodDisruptionBudget", "ptserve")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def router(objects) -> tuple[dict, dict, dict]:
    """The router Deployment's pod spec, its one container, and its ConfigMap's files."""
    pod = one(objects, "Deployment", "ptserve-router")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/ptserve-router"]
    files = one(objects, "ConfigMap", volumes[config["name"]]["configMap"]["name"])["data"]
    return pod, container, files


def test_the_router_runs_nginx_with_re_resolvable_servers(overlay):
    _, objects = overlay
    pod, container, files = router(objects)
    name, tag = container["image"].split(":")
    version = tuple(int(n) for n in tag.removesuffix("-alpine").split("."))
    assert name == "nginx" and version >= (1, 27, 3)  # `resolve` and `service=` on an upstream server
    assert container["command"] == ["sh", "/etc/ptserve-router/start.sh"]
    assert set(files) == {"nginx.conf", "start.sh"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "http"}
    assert pod["securityContext"]["runAsUser"] == 101 and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/ptserve-router", "/tmp", "/var/cache/nginx"}
    assert "pid /tmp/nginx.pid;" in files["nginx.conf"]
    assert "/tmp/nginx.conf" in files["start.sh"] and "exec nginx -c /tmp/nginx.conf" in files["start.sh"]


def test_the_router_hashes_the_task_over_every_server_pod(overlay):
    """The upstream lists the pods by the headless Service's SRV records (one
    name per pod), and the task map and hash are deploy/nginx.conf's."""
    _, objects = overlay
    _, _, files = router(objects)
    conf = files["nginx.conf"]
    upstream = re.search(r"upstream ptserve \{(.*?)\n    \}", conf, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in upstream.splitlines()]
    assert [line for line in lines if line] == [
        "zone ptserve 256k;",
        "hash $ptserve_task consistent;",
        "server ptserve-headless.@SERVICE_DOMAIN@ service=http resolve;",
    ]
    assert "resolver @RESOLVER@ valid=10s ipv6=off;" in conf
    for placeholder in ("@RESOLVER@", "@SERVICE_DOMAIN@"):
        assert f"s/{placeholder}/" in files["start.sh"]
    compose = (ROOT / "deploy" / "nginx.conf").read_text()
    task_map = re.search(r"    map \$uri \$ptserve_task \{.*?\n    \}\n", compose, re.S).group(0)
    assert task_map in conf and "proxy_pass http://ptserve;" in conf
    headless = one(objects, "Service", "ptserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    labels = one(objects, "Deployment", "ptserve")["spec"]["template"]["metadata"]["labels"]
    assert selects(headless["spec"]["selector"], labels)


def test_the_router_service_reaches_only_the_routers(overlay):
    _, objects = overlay
    routers = one(objects, "Deployment", "ptserve-router")
    labels = routers["spec"]["template"]["metadata"]["labels"]
    assert selects(routers["spec"]["selector"]["matchLabels"], labels)
    service = one(objects, "Service", "ptserve-router")
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    servers = one(objects, "Deployment", "ptserve")["spec"]["template"]["metadata"]["labels"]
    for other in ("ptserve", "ptserve-headless"):  # the servers' Services do not pick up routers
        assert not selects(one(objects, "Service", other)["spec"]["selector"], labels)
        assert selects(one(objects, "Service", other)["spec"]["selector"], servers)
    pdb = one(objects, "PodDisruptionBudget", "ptserve")
    assert not selects(pdb["spec"]["selector"]["matchLabels"], labels)
