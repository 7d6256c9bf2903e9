"""Run a module or a script with the serving stack's web and store packages
made unimportable (FastAPI, Starlette, uvicorn, pydantic, redis, ...), the way
a GPU machine that has only torch, transformers, peft and safetensors runs
it. bench/gpu_check.sh runs everything through this, so its CPU smoke run
fails as soon as the engine, the benchmarks or their tests start needing them.

    python -m bench.without_server_deps -m pytest tests/server/test_oracle.py
    python -m bench.without_server_deps bench/engine.py --shape tiny
"""

from __future__ import annotations

import runpy
import sys

UNAVAILABLE = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "pydantic_core", "redis",
               "multipart", "python_multipart")  # fmt: skip


def main() -> None:
    for name in UNAVAILABLE:
        sys.modules[name] = None  # `import name` now raises ImportError
    if sys.argv[1:2] == ["-m"]:
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
