import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import torch
from safetensors.torch import save_file

from prompt_store.artifact import load_artifact
from ptcore.model import load_model
from server.cli import build_parser, serve_settings


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, cwd=cwd, check=True
    ).stdout


def test_console_script_is_installed():
    assert any(ep.name == "ptserve" and ep.value == "server.cli:main" for ep in entry_points(group="console_scripts"))


def test_tiny_model_and_make_artifact(tmp_path):
    out = run_cli("tiny-model", str(tmp_path / "tiny"), "--arch", "llama")
    assert "random weights" in out
    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")
    assert loaded.model.config.model_type == "llama"

    rows = torch.randn(4, loaded.info["hidden_size"])
    save_file({"prompt_embeddings": rows}, tmp_path / "rows.safetensors")
    run_cli(
        "make-artifact", "--model", str(tmp_path / "tiny"), "--template", "[P:2]{input}[P:2]",
        "--task-type", "classify", "--labels", '{"yes": " yes", "no": " no"}',
        "--embeddings", str(tmp_path / "rows.safetensors"), "-o", str(tmp_path / "a.safetensors"),
    )  # fmt: skip
    a = load_artifact(tmp_path / "a.safetensors")
    assert torch.equal(a.embeddings, rows)  # exact: the same numbers, through a file
    assert a.labels == {"yes": " yes", "no": " no"}
    assert a.base_model["fingerprint"] == loaded.info["fingerprint"]


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PTSERVE_MODEL", "from-env")
    monkeypatch.setenv("PTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PTSERVE_PORT", "9000")
    s = serve_settings(build_parser().parse_args(["serve", "--port", "9100", "--store", "redis://127.0.0.1:1/0"]))
    assert (s.model, s.max_batch_size, s.port, s.store) == ("from-env", 7, 9100, "redis://127.0.0.1:1/0")
    assert s.host == "127.0.0.1" and s.max_wait_ms == 5.0


def test_client_commands_against_a_running_server(tmp_path):
    import json

    from prompt_store.artifact import save_artifact
    from prompt_store.template import render
    from ptcore.task_prompt import task_prompt
    from server.api.app import create_app
    from server.settings import Settings
    from tests.helpers import LiveServer, alone_label_scores, random_prompt

    run_cli("tiny-model", str(tmp_path / "tiny"))
    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")
    save_artifact(random_prompt(loaded, "[P:2]{input}"), tmp_path / "gen.safetensors")
    classifier = random_prompt(loaded, "[P:2]{input}", "classify", {"a": " a", "b": " b"})
    save_artifact(classifier, tmp_path / "cls.safetensors")
    settings = Settings(model=str(tmp_path / "tiny"), store=str(tmp_path / "store"), api_token="tok")
    with LiveServer(create_app(settings, loaded)) as live:
        url = ["--url", live.url]
        env = {**os.environ, "PTSERVE_API_TOKEN": "tok"}
        push_gen = [sys.executable, "-m", "server.cli", "push", str(tmp_path / "gen.safetensors"), "--task-id", "g"]
        out = subprocess.run(push_gen + url, capture_output=True, text=True, check=True, env=env).stdout
        assert json.loads(out)["version"] == 1
        run_cli("push", str(tmp_path / "cls.safetensors"), "--task-id", "c", "--token", "tok", *url)
        denied = subprocess.run(push_gen + url, capture_output=True, text=True)
        assert denied.returncode == 1 and "HTTP 401" in denied.stderr and "Traceback" not in denied.stderr
        answer = json.loads(run_cli("generate", "g", "--input", "hello", "--max-new-tokens", "4", "--json", *url))
        assert len(answer["token_ids"]) == 4 and answer["version"] == 1
        prompt = task_prompt("c", 1, classifier, loaded)
        ids = render(prompt.template, loaded.tokenizer, {"input": "hello"}, loaded.vocab_size)
        scores = alone_label_scores(loaded.model, prompt.rows, ids, loaded.vocab_size, prompt.label_ids)
        assert json.loads(run_cli("classify", "c", "--input", "hello", *url)) == "ab"[scores.index(max(scores))]
        assert [t["task_id"] for t in json.loads(run_cli("tasks", *url))] == ["c", "g"]


def test_serve_and_train_default_to_the_default_model(monkeypatch):
    monkeypatch.delenv("PTSERVE_MODEL", raising=False)
    monkeypatch.setenv("PTSERVE_MODEL_CACHE", "/somewhere/models")
    s = serve_settings(build_parser().parse_args(["serve"]))
    assert s.model is None and s.model_cache == "/somewhere/models"  # None: resolve_model's default model
    assert build_parser().parse_args(["train", "--data", "d.jsonl", "-o", "t.safetensors"]).model is None


def test_help_shows_the_defaults_of_settings_and_train_config():
    """serve's flags are Settings fields and train's are TrainConfig fields: each
    flag's help and default come from its field, nowhere else."""
    from dataclasses import fields

    from ptuning.config import TrainConfig
    from server.settings import Settings

    def help_of(command) -> dict[str, str]:
        """--flag -> its entry in `ptserve COMMAND --help`, on one line."""
        out = subprocess.run([sys.executable, "-m", "server.cli", command, "--help"], capture_output=True, text=True,
                             check=True, env={**os.environ, "COLUMNS": "1000"}).stdout  # fmt: skip
        entries = re.split(r"\n(?=  -)", out.split("options:")[1])
        return {entry.split()[0]: " ".join(entry.split()) for entry in entries[1:]}

    serve = help_of("serve")
    for name in ("port", "max_wait_ms", "header_timeout_s"):
        field = Settings.model_fields[name]
        assert f"default: {field.default} (PTSERVE_{name.upper()})" in serve["--" + name.replace("_", "-")]
    assert Settings.model_fields["store"].description in serve["--store"]

    train = help_of("train")
    config = {f.name: f for f in fields(TrainConfig)}
    for name in ("epochs", "lr", "min_dev_examples", "encoder"):
        line = train["--" + name.replace("_", "-")]
        assert config[name].metadata["help"] in line and f"(default: {config[name].default})" in line
    args = build_parser().parse_args(["train", "--data", "d.jsonl", "-o", "out.safetensors"])
    assert (args.epochs, args.lr, args.head_pooling) == (TrainConfig.epochs, TrainConfig.lr, TrainConfig.head_pooling)


def test_jobs_create_trains_on_the_server_and_follows_the_job_to_its_end(tmp_path):
    import json

    from server.api.app import create_app
    from server.settings import Settings
    from tests.helpers import LiveServer

    run_cli("tiny-model", str(tmp_path / "tiny"))
    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"w {i}", "label": "ab"[i % 2]}) + "\n" for i in range(12)))
    settings = Settings(model=str(tmp_path / "tiny"), store=str(tmp_path / "store"), api_token="tok")
    with LiveServer(create_app(settings, loaded)) as live:
        url = ["--url", live.url, "--token", "tok"]
        out = run_cli("jobs", "create", "--data", str(data), "--task-id", "ab", "--labels", '{"a": " a", "b": " b"}',
                      "--epochs", "2", "--promote", "always", *url)  # fmt: skip
        lines = out.splitlines()
        assert lines[-1] == "succeeded: fine_tuned_model=ab"
        assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == ["epoch 0", "epoch 1", "epoch 2"]
        assert json.loads(run_cli("jobs", "list", *url))[0]["status"] == "succeeded"
        assert [t["task_id"] for t in json.loads(run_cli("tasks", *url))] == ["ab"]
        onward = run_cli("jobs", "create", "--data", str(data), "--task-id", "ab", "--go-on", "--epochs", "1",
                         "--promote", "always", *url).splitlines()  # fmt: skip
        assert "Going on from version 1 of task 'ab'" in onward and onward[-1] == "succeeded: fine_tuned_model=ab"
        assert json.loads(run_cli("tasks", *url))[0]["version"] == 2
        bad = subprocess.run([sys.executable, "-m", "server.cli", "jobs", "create", "--data", str(data), "--task-id",
                              "x", *url], capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 1 and "line 1: missing ['output']" in bad.stderr and "Traceback" not in bad.stderr


def test_the_command_line_imports_no_torch_but_for_the_commands_that_need_it():
    """`import server.cli` loads no torch, and neither does parsing (or running, up to
    the request) a client command or serve's flags: `ptserve tasks` starts fast."""
    check = """
import sys
import server.cli
assert "torch" not in sys.modules
server.cli.build_parser("serve").parse_args(["serve", "--port", "1"])
for argv in (["tasks", "--help"], ["tasks", "--url", "http://127.0.0.1:1"]):
    try:
        server.cli.main(argv)
    except SystemExit:
        pass
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", check], check=True)
