"""The `ptserve` command line: main() builds the parser from the commands of the
modules beside this one and runs the one asked for.

serve.py      serve (flags and help from the Settings fields)
train.py      train (flags and help from the TrainConfig fields)
peft.py       import-peft, export-peft
client.py     push, generate, classify, tasks (against a running server)
store.py      store check (on the store itself)
jobs.py       jobs: fine-tuning jobs on a running server
models.py     models, tiny-model, make-artifact
common.py     what they share

Importing this package loads no torch; a command's flags are added only when
that command is parsed, so each imports only what its own flags need (the
client commands: no torch, no pydantic)."""

from __future__ import annotations

import argparse
import sys

from ptcore.errors import PtserveError  # torch-free, as every import of the parser

from . import client, jobs, models, peft, serve, store, train
from .serve import serve_settings

__all__ = ["COMMANDS", "build_parser", "main", "serve_settings"]

# in the order `ptserve --help` lists them
COMMANDS = (
    serve.SERVE, models.TINY_MODEL, train.TRAIN, peft.IMPORT_PEFT, peft.EXPORT_PEFT, client.PUSH, client.GENERATE,
    client.CLASSIFY, client.TASKS, jobs.JOBS, store.STORE, models.MAKE_ARTIFACT, models.MODELS,
)  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `command`, only that command gets its flags
    (all that parsing a command line for it needs; "" gives none any)."""
    parser = argparse.ArgumentParser(prog="ptserve", description="Serve P-tuning soft prompts on one frozen LM")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help)
        if command is None or command == c.name:
            c.arguments(p)
        p.set_defaults(func=c.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    from ptclient.client import ClientError

    argv = sys.argv[1:] if argv is None else argv
    # the command is the first word that names one (ptserve itself takes no option with a value)
    command = next((word for word in argv if word in {c.name for c in COMMANDS}), "")
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
    except Exception as e:  # the user's mistake: one line, no traceback
        if not isinstance(e, (ClientError, OSError, ValueError, PtserveError)):
            raise
        sys.exit(f"ptserve {args.command}: error: {e}")
