"""docker-compose.yml passes the settings .env.example offers through to the
server, as `docker-compose config` renders them."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed (.ci/run installs it from Debian)"
)


def server_service(**env: str) -> dict:
    """The ptserve service as `docker-compose config` renders it with `env` (and no other PTSERVE_*)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")}
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], env={**clean, **env},
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout  # fmt: skip
    return yaml.safe_load(out)["services"]["ptserve"]


def server_environment(**env: str) -> dict:
    return server_service(**env)["environment"]


def test_tokens_set_in_the_environment_reach_the_server():
    env = server_environment(PTSERVE_API_TOKEN="write-secret", PTSERVE_INFERENCE_TOKEN="read-secret")
    assert (env["PTSERVE_API_TOKEN"], env["PTSERVE_INFERENCE_TOKEN"]) == ("write-secret", "read-secret")


def test_without_tokens_the_server_gets_empty_values_which_mean_none():
    env = server_environment()
    assert (env["PTSERVE_API_TOKEN"], env["PTSERVE_INFERENCE_TOKEN"]) == ("", "")
    assert env["PTSERVE_STORE"] == "redis://redis:6379/0" and env["PTSERVE_MODEL"] == ""


def test_every_setting_named_in_env_example_is_passed_through():
    named = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.lstrip("# ").split("=", 1)[0]
        if key.startswith("PTSERVE_") and "=" in line and key != "PTSERVE_PORT":  # the port is nginx's
            named.add(key)
    assert named <= set(server_environment()), named - set(server_environment())


def test_the_shutdown_grace_ends_before_docker_kills_the_server():
    service = server_service()
    assert service["stop_grace_period"] == "30s"
    assert float(service["environment"]["PTSERVE_SHUTDOWN_GRACE_S"]) + 10 == 30
