"""Settings: choices are enums, and contradictory settings are startup errors naming both fields."""

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.settings import Dtype, EngineKind, LogLevel, ModelFamily, Settings, settings_error


def error_of(**values) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(model="m", **values)
    return settings_error(caught.value)


def test_choices_are_str_enums_that_round_trip_through_json():
    s = Settings(model="m", engine="static", model_family="masked", dtype="bfloat16", log_level="debug")
    assert (s.engine, s.model_family, s.dtype, s.log_level) == (
        EngineKind.STATIC, ModelFamily.MASKED, Dtype.BFLOAT16, LogLevel.DEBUG,
    )  # fmt: skip
    assert s.engine == "static" and f"{s.dtype}" == "bfloat16"
    dumped = json.loads(s.model_dump_json())
    assert [dumped[k] for k in ("engine", "model_family", "dtype", "log_level")] == [
        "static", "masked", "bfloat16", "debug",
    ]  # fmt: skip


def test_choices_ignore_case(monkeypatch):
    monkeypatch.setenv("PTSERVE_LOG_LEVEL", "INFO")
    assert Settings(model="m", engine="Static").engine == EngineKind.STATIC
    assert Settings(model="m").log_level == LogLevel.INFO


def test_an_unknown_choice_names_the_field_and_the_choices():
    assert error_of(engine="fast") == "invalid settings: engine: Input should be 'auto', 'continuous' or 'static'"
    assert error_of(dtype="float8") == (
        "invalid settings: dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16'"
    )


def test_continuous_engine_with_device_map():
    assert error_of(engine="continuous", device_map="auto") == (
        "invalid settings: engine=continuous contradicts device_map='auto': a model spread by device_map runs "
        "on the static engine; unset one of them"
    )
    assert Settings(model="m", engine="auto", device_map="auto").device_map == "auto"  # auto: static, as asked
    assert Settings(model="m", engine="continuous", device_map="").device_map is None  # blank is unset


def test_continuous_engine_with_a_family_that_cannot_generate():
    assert error_of(engine="continuous", model_family="encoder") == (
        "invalid settings: engine=continuous contradicts model_family=encoder: only a causal LM generates, "
        "continuously or not; unset engine"
    )


def test_compile_without_the_continuous_engine():
    assert error_of(engine="static", compile=True) == (
        "invalid settings: compile=true contradicts engine=static: compile fuses the continuous engine's "
        "decode step, which this server would not run"
    )
    assert error_of(device_map="auto", compile=True) == (
        "invalid settings: compile=true contradicts device_map='auto': compile fuses the continuous engine's "
        "decode step, which this server would not run"
    )


def test_default_max_new_tokens_over_the_limit():
    assert error_of(default_max_new_tokens=65, max_new_tokens_limit=64) == (
        "invalid settings: default_max_new_tokens 65 exceeds max_new_tokens_limit 64: every generate request "
        "that keeps the default would be refused"
    )
    assert Settings(model="m", default_max_new_tokens=64, max_new_tokens_limit=64).default_max_new_tokens == 64


def test_tokens_in_flight_below_one_full_length_request_is_allowed():
    """A request alone is always admitted (the slot backend's fits), so a small bound only
    keeps long requests from running beside others; the static engine ignores it."""
    assert Settings(model="m", max_tokens_in_flight=512, max_seq_len=1024).max_tokens_in_flight == 512
    assert Settings(model="m", max_tokens_in_flight=600, engine="static").max_tokens_in_flight == 600
    assert Settings(model="m", max_tokens_in_flight=0, max_seq_len=1024).max_tokens_in_flight == 0  # 0 = derived


def test_compile_with_a_model_that_only_classifies():
    assert error_of(compile=True, model_family="encoder") == (
        "invalid settings: compile=true contradicts model_family=encoder: compile fuses the decode step, and "
        "this model only classifies"
    )


def test_every_contradiction_is_reported_at_once():
    message = error_of(engine="static", compile=True, default_max_new_tokens=9, max_new_tokens_limit=8)
    assert message.startswith("invalid settings: compile=true contradicts engine=static: ")
    assert message.endswith("; default_max_new_tokens 9 exceeds max_new_tokens_limit 8: every generate request "
                            "that keeps the default would be refused")  # fmt: skip


def test_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("PTSERVE_DEFAULT_MAX_NEW_TOKENS", "100")
    monkeypatch.setenv("PTSERVE_MAX_NEW_TOKENS_LIMIT", "50")
    assert error_of() == (
        "invalid settings: default_max_new_tokens 100 exceeds max_new_tokens_limit 50: every generate request "
        "that keeps the default would be refused"
    )


def test_settings_errors_do_not_quote_values():
    message = error_of(api_token="s3cret-token", engine="continuous", device_map="auto")
    assert "s3cret-token" not in message


def serve(*flags: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")} | env
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *flags], capture_output=True, text=True,
                          env=environ, timeout=120)  # fmt: skip


def test_serve_with_contradictory_flags_exits_with_the_message():
    done = serve("--engine", "continuous", "--device-map", "auto")
    assert done.returncode == 1
    assert done.stderr == (
        "ptserve serve: invalid settings: engine=continuous contradicts device_map='auto': a model spread by "
        "device_map runs on the static engine; unset one of them\n"
    )


def test_serve_with_a_flag_contradicting_the_environment_exits_with_the_message():
    done = serve("--engine", "static", PTSERVE_COMPILE="true", PTSERVE_API_TOKEN="s3cret-token")
    assert done.returncode == 1
    assert done.stderr == (
        "ptserve serve: invalid settings: compile=true contradicts engine=static: compile fuses the continuous "
        "engine's decode step, which this server would not run\n"
    )


def test_continuous_engine_on_a_model_found_not_to_be_causal(tmp_path):
    from ptcore.model import load_model
    from ptcore.tiny_model import write_tiny_model
    from server.build import build_engine

    masked = load_model(str(write_tiny_model(tmp_path / "bert", arch="bert")), device="cpu", dtype="float32")
    settings = Settings(model=masked.info["name_or_path"], store=str(tmp_path / "store"), engine="continuous")
    with pytest.raises(ValueError) as caught:
        build_engine(settings, masked)
    name = masked.info["name_or_path"]
    assert str(caught.value) == f"engine=continuous needs a causal LM; {name!r} is a masked model"


def test_a_default_length_that_leaves_no_room_for_an_input(gpt2, tmp_path):
    from server.build import build_engine

    settings = Settings(model="m", store=str(tmp_path / "store"), max_seq_len=64, default_max_new_tokens=64)
    with pytest.raises(ValueError) as caught:
        build_engine(settings, gpt2)
    assert str(caught.value) == (
        f"default_max_new_tokens 64 leaves no room for any input in the 64 positions a request may use here "
        f"(max_seq_len 64, the model's {gpt2.max_positions}): every generate request that keeps the default "
        "would be refused"
    )


def test_the_servers_default_keeps_as_many_versions_as_a_store_opened_without_settings(tmp_path):
    from prompt_store.disk_store import DiskStore
    from prompt_store.store import DEFAULT_KEEP_VERSIONS

    assert Settings().keep_versions == DEFAULT_KEEP_VERSIONS == DiskStore(tmp_path).keep_versions
