"""`ptserve store check [--repair]`: verify every stored artifact against the
digest recorded with it, on the store itself (a directory or Redis), with no
server and no model."""

from __future__ import annotations

import os
import sys

from .common import Command


def _arguments(p) -> None:
    what = p.add_subparsers(dest="store_command", required=True)
    check = what.add_parser("check", help="verify every kept version of every task; report what is damaged")
    check.add_argument("--store", default=os.environ.get("PTSERVE_STORE", "./ptserve-data"),
                       help="a directory, or a redis:// URL (default: PTSERVE_STORE or ./ptserve-data)")  # fmt: skip
    check.add_argument("--repair", action="store_true",
                       help="remove the damaged versions: a task whose latest version goes serves its newest whole "
                       "one, a task with none left is gone")  # fmt: skip


def _run(args) -> None:
    from prompt_store.check import check_store
    from prompt_store.factory import open_store

    store = open_store(args.store)
    try:
        damaged = check_store(store, repair=args.repair)
    finally:
        store.close()
    if damaged and not args.repair:
        print("run again with --repair to remove them, or upload the damaged tasks' artifacts again")
        sys.exit(1)


STORE = Command("store", "check the prompt store: every stored artifact against its recorded digest", _arguments, _run)
