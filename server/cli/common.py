"""What several commands share: the Command record, flags whose default and help
come from a Settings field, --model-cache, tokens and JSON-object flags.

Nothing here imports torch: `ptserve tasks` and the other client commands stay
fast. Heavy imports live inside the functions that need them."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ptcore.errors import InvalidRequest

MODEL_FAMILIES = ["auto", "causal", "masked", "encoder"]


@dataclass(frozen=True)
class Command:
    """One subcommand. `arguments` adds its flags to its parser (importing what its
    choices and defaults need); `run` does the work."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def settings_help(name: str) -> str:
    """The help of the flag for Settings field `name`: its choices (an enum's values),
    its description, its default, and the environment variable that sets it."""
    from server.settings import Settings

    info = Settings.model_fields[name]
    parts = []
    if isinstance(info.annotation, type) and issubclass(info.annotation, Enum):
        parts.append(" | ".join(str(member.value) for member in info.annotation))
    if info.description:
        parts.append(info.description)
    if info.default is not None:
        parts.append(f"default: {info.default}")
    env = Settings.model_config["env_prefix"] + name.upper()
    return f"{'; '.join(parts)} ({env})".lstrip().replace("%", "%%")  # argparse %-formats help


def settings_option(parser, name: str, **kwargs) -> None:
    """--NAME for Settings field `name`, with no default of its own: a flag that is not
    given is None, so the environment (PTSERVE_*) or the field's default applies."""
    from server.settings import Settings

    kind = Settings.model_fields[name].annotation
    if kind in (int, float):
        kwargs.setdefault("type", kind)
    parser.add_argument("--" + name.replace("_", "-"), help=settings_help(name), **kwargs)


def add_model_cache(parser) -> None:
    settings_option(parser, "model_cache")


def model_cache(args) -> str:
    """--model-cache, else PTSERVE_MODEL_CACHE (as the server reads it), else the default."""
    from ptcore.model_source import DEFAULT_MODEL_CACHE

    return getattr(args, "model_cache", None) or os.environ.get("PTSERVE_MODEL_CACHE") or DEFAULT_MODEL_CACHE


def token(args, access: str) -> str | None:
    """--token, else the variable the server reads for that access."""
    env = "PTSERVE_API_TOKEN" if access == "write" else "PTSERVE_INFERENCE_TOKEN"
    return getattr(args, "token", None) or os.environ.get(env)


def json_arg(flag: str, text: str | None):
    """A flag's JSON object; None when the flag is not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"{flag} is not valid JSON ({e}): {text!r}"
    else:
        if isinstance(value, dict):
            return value
        problem = f'{flag} must be a JSON object, e.g. {{"positive": " good"}}; got {text!r}'
    raise InvalidRequest(problem)
