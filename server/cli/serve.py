"""`ptserve serve`: the HTTP server. Its flags are Settings fields: the help and the
default of each come from the field, and a flag given overrides the environment."""

from __future__ import annotations

import logging
import sys

from .common import Command, settings_option

# the Settings fields that have a flag, in the order --help lists them (the others: PTSERVE_* only)
FLAGS = (
    "model", "model_cache", "store", "host", "port", "device", "dtype", "device_map", "engine", "max_batch_size",
    "max_wait_ms", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "max_connections", "preload",
)  # fmt: skip
METAVARS = {"preload": "DIR"}


def serve_settings(args):
    """Settings from the environment, with the flags that were given on top;
    invalid ones exit with what is wrong."""
    from pydantic import ValidationError

    from server.settings import Settings, settings_error

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        sys.exit(f"ptserve serve: {settings_error(e)}")


def _arguments(parser) -> None:
    for name in FLAGS:
        settings_option(parser, name, metavar=METAVARS.get(name))


def _serve(args) -> None:
    from ptcore import cpu_threads
    from ptcore.model_source import resolve_model
    from server.api.app import create_app
    from server.api.http_server import server_config
    from server.api.shutdown import DrainingServer

    settings = serve_settings(args)
    cpu_threads.serial()  # before a conversion below computes: only the scheduler's thread uses several
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a download or conversion happens (and fails, with its reason) before the server starts
    settings = settings.model_copy(update={"model": resolve_model(settings.model, settings.model_cache)})
    server = DrainingServer(server_config(create_app(settings), settings), settings.shutdown_grace_s)
    server.run()
    if not server.started:
        sys.exit("ptserve serve: the server did not start (see the log above)")


SERVE = Command("serve", "run the HTTP server (flags override PTSERVE_* environment settings)", _arguments, _serve)
