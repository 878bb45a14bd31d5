"""Persistent tuning results: the on-disk cache and shippable tuning artifacts.

**Cache.**  One JSON file per key under ``$TILEBACKEND_CACHE_DIR`` (else
``$XDG_CACHE_HOME/tilebackend``, else ``~/.cache/tilebackend``), in a ``v<FORMAT>``
folder.  A key (``CacheKey``) is the kernel name, its key tuple (dtype, shape buckets,
flags), a hash of the kernel's source, the device (name + compute capability, or
``"interpreter"``) and the torch and triton versions: change any of them and the old
entry is simply never looked up again.  Writes go to a temporary file in the same folder
and are renamed into place (``os.replace``), so concurrent processes never see a partial
file; two writers of one key both write a complete file and the last one wins.  A corrupt,
truncated or other-format file is ignored (one warning per cache); a folder that cannot be
written makes the cache in-memory only (one warning).

**Artifact.**  ``save_artifact`` / ``load_artifact``: one JSON file with a format version,
the torch / triton versions and device it was tuned on, the entries, and a sha256 over the
entries.  A file that cannot be read, parsed or whose hash does not match raises
``TuningArtifactError``; one made for another device or other versions is reported with
a warning by ``Artifact.mismatch`` / ``autotune`` and not used.

This module imports nothing from tilebackend at import time (only inside functions), so a
test can load it on its own in a subprocess.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("tilebackend")

#: Format of one cache file (``{"format": FORMAT_VERSION, "key": ..., "entry": ...}``).
FORMAT_VERSION = 1
#: ``"format"`` field of a tuning artifact, and its version.
ARTIFACT_FORMAT = "tilebackend-tuning"
ARTIFACT_VERSION = 1


# --- keys ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$TILEBACKEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/tilebackend``, else ``~/.cache/tilebackend``."""
    env = os.environ.get("TILEBACKEND_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tilebackend"


@functools.lru_cache(maxsize=256)
def _file_hash(filename: str) -> str:
    try:
        return hashlib.sha256(Path(filename).read_bytes()).hexdigest()[:16]
    except OSError:
        return "nosource:" + filename


def source_hash(obj: Any) -> str:
    """A short hash of a kernel's source.

    ``obj`` is a ``@triton.jit`` function (``JITFunction`` on a GPU, ``InterpretedFunction``
    under ``TRITON_INTERPRET=1``: both wrap the Python function as ``.fn``), a plain
    function, or a launch closure; a closure (or anything whose source cannot be read)
    hashes the whole file it is defined in, which covers the kernels, their helpers and
    the tuning space of that file.  Several objects may be given as a tuple.
    """
    if isinstance(obj, (tuple, list)):
        h = hashlib.sha256("|".join(source_hash(o) for o in obj).encode())
        return h.hexdigest()[:16]
    fn = getattr(obj, "fn", obj)
    code = getattr(fn, "__code__", None)
    if code is not None and (code.co_freevars or fn.__name__ == "<lambda>"):
        return _file_hash(code.co_filename)  # a launch closure: its whole file
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = getattr(obj, "src", None)
    if src is None:
        if code is not None:
            return _file_hash(code.co_filename)
        return "nosource:" + repr(obj)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _fmt(v: Any) -> str:
    try:
        import torch

        if isinstance(v, torch.dtype):
            return str(v).removeprefix("torch.")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return repr(v)


def key_string(key: Iterable[Any]) -> str:
    """The key tuple of a ``select`` call (dtype, buckets, flags) as a stable string."""
    return ",".join(_fmt(k) for k in key)


def device_id(device: Any = None) -> str:
    """``"interpreter"`` under ``TRITON_INTERPRET=1``, else ``"<GPU name> sm<major><minor>"``
    of ``device`` (default: the current CUDA device), else ``"cpu"``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "interpreter"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    idx = torch.cuda.current_device() if device is None else torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    major, minor = torch.cuda.get_device_capability(idx)
    return f"{torch.cuda.get_device_name(idx)} sm{major}{minor}"


def environment(device: Any = None) -> dict[str, str]:
    """What a tuning result depends on besides the kernel: device and versions."""
    import torch
    import triton

    return {"device": device_id(device), "torch": torch.__version__, "triton": triton.__version__}


@dataclasses.dataclass(frozen=True)
class CacheKey:
    kernel: str
    key: str  # key_string(...) of the select key
    source: str  # source_hash(...) of the kernel
    device: str
    torch: str
    triton: str

    @staticmethod
    def make(kernel: str, key: Iterable[Any], source: str, env: Mapping[str, str]) -> CacheKey:
        return CacheKey(kernel, key_string(key), source, env["device"], env["torch"], env["triton"])

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def env(self) -> dict[str, str]:
        return {"device": self.device, "torch": self.torch, "triton": self.triton}


# --- the on-disk cache --------------------------------------------------------------------


class TuningCache:
    """File-per-key JSON cache with an in-memory layer (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.root = Path(directory) if directory is not None else default_cache_dir()
        self.dir = self.root / f"v{FORMAT_VERSION}"
        self._mem: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.writable = True
        self._warned_corrupt = False
        self._warned_readonly = False

    def path(self, ck: CacheKey) -> Path:
        return self.dir / f"{ck.kernel}-{ck.digest()}.json"

    def get(self, ck: CacheKey) -> dict | None:
        """The entry stored for ``ck``, or None (missing, corrupt or other format)."""
        digest = ck.digest()
        hit = self._mem.get(digest)
        if hit is not None:
            return hit
        p = self.path(ck)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._corrupt(p, f"cannot be read ({e})")
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError is a ValueError
            self._corrupt(p, f"is not valid JSON ({e})")
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            fmt = data.get("format") if isinstance(data, dict) else None
            self._corrupt(p, f"has format {fmt!r}, expected {FORMAT_VERSION}")
            return None
        entry = data.get("entry")
        if data.get("key") != ck.as_dict() or not valid_entry(entry):
            self._corrupt(p, "does not hold a valid entry for its key")
            return None
        self._mem[digest] = entry
        return entry

    def put(self, ck: CacheKey, entry: dict) -> None:
        """Store ``entry`` (JSON-serialisable, with a ``"config"``) for ``ck``."""
        self._mem[ck.digest()] = entry
        if not self.writable:
            return
        payload = json.dumps({"format": FORMAT_VERSION, "key": ck.as_dict(), "entry": entry})
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path(ck), payload)
        except OSError as e:
            with self._lock:
                self.writable = False
                if not self._warned_readonly:
                    self._warned_readonly = True
                    warnings.warn(
                        f"tilebackend: the tuning cache {str(self.root)!r} cannot be written "
                        f"({e}); keeping tuning results in memory for this process",
                        RuntimeWarning,
                        stacklevel=3,
                    )

    def clear_memory(self) -> None:
        self._mem.clear()

    def _corrupt(self, p: Path, why: str) -> None:
        with self._lock:
            first = not self._warned_corrupt
            self._warned_corrupt = True
        if first:
            warnings.warn(
                f"tilebackend: ignoring tuning cache file {str(p)!r}: it {why} "
                "(further unusable cache files are only logged)",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            log.debug("ignoring tuning cache file %s: it %s", p, why)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def valid_entry(entry: Any) -> bool:
    """An entry is a dict whose ``"config"`` is ``{"kwargs": {...}, "num_warps": int, "num_stages": int}``."""
    if not isinstance(entry, dict):
        return False
    cfg = entry.get("config")
    return (
        isinstance(cfg, dict)
        and isinstance(cfg.get("kwargs"), dict)
        and isinstance(cfg.get("num_warps"), int)
        and isinstance(cfg.get("num_stages"), int)
    )


_caches: dict[str, TuningCache] = {}


def get_cache() -> TuningCache:
    """The process-wide cache of the current cache folder."""
    root = str(default_cache_dir())
    c = _caches.get(root)
    if c is None:
        c = _caches[root] = TuningCache(root)
    return c


# --- artifacts ------------------------------------------------------------------------------


def _entries_digest(entries: list[dict]) -> str:
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class Artifact:
    """A loaded tuning artifact: where it was tuned, and its entries by (kernel, key, source)."""

    path: str
    env: dict[str, str]
    entries: dict[tuple[str, str, str], dict]
    created: str = ""

    def mismatch(self, env: Mapping[str, str]) -> str | None:
        """How ``env`` (device, torch, triton) differs from the artifact's, or None."""
        diffs = [
            f"{k} {self.env.get(k)!r} (here {env.get(k)!r})"
            for k in ("device", "torch", "triton")
            if self.env.get(k) != env.get(k)
        ]
        return ", ".join(diffs) or None

    def lookup(self, ck: CacheKey) -> dict | None:
        """The entry for ``ck`` (the caller has checked ``mismatch``)."""
        return self.entries.get((ck.kernel, ck.key, ck.source))

    def other_sources(self, ck: CacheKey) -> bool:
        """Whether entries exist for ``ck``'s kernel and key, tuned for another source."""
        return any(k[:2] == (ck.kernel, ck.key) and k[2] != ck.source for k in self.entries)


def save_artifact(path: str | os.PathLike, env: Mapping[str, str], entries: list[dict]) -> dict:
    """Write a tuning artifact atomically; return the JSON object written.

    ``entries``: dicts with ``kernel``, ``key``, ``source`` and ``config`` (plus any
    timing fields).  Duplicates of one (kernel, key, source) keep the last one.
    """
    import datetime

    by_key: dict[tuple, dict] = {}
    for e in entries:
        by_key[(e["kernel"], e["key"], e["source"])] = dict(e)
    ordered = [by_key[k] for k in sorted(by_key)]
    data = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": env["device"],
        "torch": env["torch"],
        "triton": env["triton"],
        "entries": ordered,
        "sha256": _entries_digest(ordered),
    }
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


_artifacts: dict[tuple, Artifact] = {}


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check a tuning artifact (cached by path, mtime and size).

    Raises ``TuningArtifactError`` when the file cannot be read or parsed, is not a
    tilebackend tuning artifact, has another format version, or its sha256 does not match
    its entries.
    """
    from ..exc import TuningArtifactError

    p = str(Path(path).expanduser())
    try:
        st = os.stat(p)
    except OSError as e:
        raise TuningArtifactError(path=p, reason=f"cannot be read ({e})") from None
    ident = (os.path.abspath(p), st.st_mtime_ns, st.st_size)
    hit = _artifacts.get(ident)
    if hit is not None:
        return hit

    def bad(reason: str):
        return TuningArtifactError(path=p, reason=reason)

    try:
        with open(p, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise bad(f"cannot be read ({e})") from None
    except ValueError as e:
        raise bad(f"is not valid JSON ({e}); it may be truncated") from None
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise bad(f'is not a tilebackend tuning artifact (no "format": {ARTIFACT_FORMAT!r})')
    if data.get("version") != ARTIFACT_VERSION:
        raise bad(
            f"has format version {data.get('version')!r}; this tilebackend reads version "
            f"{ARTIFACT_VERSION} (re-run `python -m tilebackend tune`)"
        )
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise bad('has no "entries" list')
    if data.get("sha256") != _entries_digest(entries):
        raise bad("its sha256 does not match its entries (the file was modified or damaged)")
    table: dict[tuple[str, str, str], dict] = {}
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and valid_entry(e)) or not all(
            isinstance(e.get(k), str) for k in ("kernel", "key", "source")
        ):
            raise bad(f"entry {i} is malformed")
        table[(e["kernel"], e["key"], e["source"])] = e
    env = {k: str(data.get(k)) for k in ("device", "torch", "triton")}
    art = Artifact(path=p, env=env, entries=table, created=str(data.get("created", "")))
    _artifacts[ident] = art
    return art
