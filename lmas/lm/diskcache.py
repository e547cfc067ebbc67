"""A content-addressed on-disk store shared by the runs of a sweep (``eval.cache``), and the keys that address it.

A sweep over strategies or seeds on the same data pays the same frozen computations in every run: the
untrained model's scores (:mod:`lmas.evaluation.cache`) and the frozen trunk's activations
(:class:`lmas.lm.trunk.SharedTrunk`). :class:`DiskCache` keeps them once, for every run and process:

* **content-addressed**: an entry's name is a hash (:func:`key`) of everything its value depends on: the
  weights (:func:`fingerprint`: names, shapes, dtypes and bytes of the parameters involved), the token
  ids and their layout, the scoring options, the code that computes it (:func:`code_version`: the source
  of the modules named and the torch / transformers / peft versions). A changed input is a different
  name, so it never reads a stale entry; stale entries are never overwritten, only evicted.
* **safe for parallel jobs**: an entry is written to a temp file in the same directory and moved into
  place with ``os.replace``, so a reader sees a whole file or none; every file carries a checksum of its
  payload, so a truncated or corrupt file is a miss (and is removed), never wrong numbers; a file that
  another process evicts between listing and reading is a miss; a write that fails (a full disk) is
  logged once and skipped, the run goes on.
* **bounded**: ``max_mb``; a hit touches the file (its mtime is its last use), and the least recently
  used entries go first. The limit is enforced when the store is opened and then each time this
  process has written another ``max_mb / 16`` (at least 1 MB) since its last sweep of the directory, so
  between sweeps the directory can exceed the limit by that much per writing process.

Entries hold tensors (:func:`pack` / :func:`unpack`: a JSON header and raw bytes, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
MAGIC = b"LMASC001"  # format of an entry file: MAGIC, the payload's SHA-256 (first 16 bytes), the payload
SUFFIX = ".lmc"
_DIGEST = 16


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:_DIGEST]


class DiskCache:
    """Entries (bytes) by key (:func:`key`) in ``path``, at most ``max_mb`` megabytes (module docstring).

    ``hits``, ``misses`` and ``stores`` count this object's lookups and writes.
    """

    def __init__(self, path: str | Path, max_mb: float = 4096.0) -> None:
        if not max_mb > 0:
            raise ValueError(f"eval.cache_mb={max_mb}: the cache's size limit must be > 0 (megabytes)")
        self.path = Path(path).expanduser()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"eval.cache={path}: cannot create the cache directory ({e})") from e
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"eval.cache={path}: the cache directory is not writable")
        self.max_bytes = int(max_mb * 2**20)
        self.sweep_every = max(self.max_bytes // 16, 2**20)
        self.written = 0  # bytes written since the last sweep
        self.hits = self.misses = self.stores = self.failures = 0
        self.enforce_limit()

    def _file(self, key: str) -> Path:
        return self.path / f"{key}{SUFFIX}"

    def get(self, key: str) -> bytes | None:
        """The entry's payload, or None (absent, vanished, truncated or corrupt: the last two are removed)."""
        file = self._file(key)
        try:
            data = file.read_bytes()
        except OSError:  # absent, or evicted by another process meanwhile
            self.misses += 1
            return None
        head = len(MAGIC) + _DIGEST
        payload = data[head:]
        if data[: len(MAGIC)] != MAGIC or _checksum(payload) != data[len(MAGIC) : head]:
            log.warning("eval.cache: %s is truncated or corrupt; removed (recomputed)", file)
            self.discard(key)
            self.misses += 1
            return None
        try:
            os.utime(file)  # its last use: the least recently used entries are evicted first
        except OSError:
            pass
        self.hits += 1
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key`` atomically (a temp file in the same directory, then ``os.replace``)."""
        data = MAGIC + _checksum(payload) + payload
        if len(data) > self.max_bytes:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)  # (removed by hand meanwhile)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=SUFFIX)
        except OSError as e:
            return self._failed(e)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._file(key))
        except OSError as e:  # a full disk: the run goes on without storing
            Path(tmp).unlink(missing_ok=True)
            return self._failed(e)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stores += 1
        self.written += len(data)
        if self.written >= self.sweep_every:
            self.enforce_limit()

    def _failed(self, error: OSError) -> None:
        if not self.failures:
            log.warning(
                "eval.cache: cannot write to %s (%s); entries are computed without being stored", self.path, error
            )
        self.failures += 1

    def discard(self, key: str) -> None:
        """Remove an entry (a bad one; absent is fine)."""
        self._file(key).unlink(missing_ok=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, file) of every entry now in the directory."""
        out: list[tuple[float, int, Path]] = []
        try:
            listing = list(os.scandir(self.path))
        except FileNotFoundError:
            return out
        for entry in listing:
            try:
                st = entry.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if entry.name.startswith(".tmp-"):
                if time.time() - st.st_mtime > 3600:  # left by a process that died while writing
                    Path(entry.path).unlink(missing_ok=True)
                continue
            if entry.name.endswith(SUFFIX):
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def enforce_limit(self) -> None:
        """Evict the least recently used entries until the directory holds at most ``max_mb``."""
        self.written = 0
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, file in entries:
            if total <= self.max_bytes:
                break
            file.unlink(missing_ok=True)
            total -= size


# --- keys -------------------------------------------------------------------------------------
def _feed(h: Any, part: Any) -> None:
    """Feed one key part to the hash, tagged with its type and length so that no two parts collide."""
    if part is None or isinstance(part, (bool, int, float, str)):
        text = repr(part).encode()
        h.update(b"s" + struct.pack("<Q", len(text)) + text)
    elif isinstance(part, bytes):
        h.update(b"b" + struct.pack("<Q", len(part)) + part)
    elif isinstance(part, Tensor):
        t = part.detach().cpu().contiguous().reshape(-1)
        _feed(h, (str(part.dtype), tuple(part.shape)))
        raw = t.view(torch.uint8).numpy()  # hashed in place, not copied
        h.update(b"b" + struct.pack("<Q", raw.nbytes))
        h.update(raw)
    elif isinstance(part, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(part)))
    elif isinstance(part, dict):
        h.update(b"d" + struct.pack("<Q", len(part)))
        for k in sorted(part, key=repr):
            _feed(h, k)
            _feed(h, part[k])
    elif isinstance(part, (list, tuple)):
        h.update(b"l" + struct.pack("<Q", len(part)))
        for p in part:
            _feed(h, p)
    else:
        raise TypeError(f"cache key: cannot hash a {type(part).__name__}")


def key(*parts: Any) -> str:
    """The hex blake2b digest of ``parts`` (None, bool, int, float, str, bytes, tensors, arrays, lists, dicts)."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


_PARAMS: dict[int, tuple[weakref.ref, tuple, bytes]] = {}  # id(param) -> (param, its state, digest)


def _param_digest(p: Tensor) -> bytes:
    """SHA-256 of a parameter's dtype, shape and bytes, memoised until it changes (see :func:`fingerprint`)."""
    state = (p._version, p.data_ptr(), p.dtype, tuple(p.shape), p.device.type)
    memo = _PARAMS.get(id(p))
    if memo is not None and memo[0]() is p and memo[1] == state:
        return memo[2]
    h = hashlib.sha256()  # hardware-accelerated: about 1.7 GB/s here, twice blake2b's
    _feed(h, p)
    _PARAMS[id(p)] = (weakref.ref(p), state, h.digest())
    return _PARAMS[id(p)][2]


def fingerprint(named: Iterable[tuple[str, Tensor]], config: Any = None) -> str:
    """A hash of parameters (names, dtypes, shapes, bytes) and of a model config.

    Each parameter's bytes are hashed once per parameter object and again only when it changes:
    an in-place update (``torch.no_grad()`` writes, ``load_state_dict``, optimizer steps) bumps its
    version counter, a replaced ``.data`` changes its pointer, dtype or device. (Writes through
    ``param.data`` are the one thing not seen: they bypass the version counter.)
    """
    h = hashlib.blake2b(digest_size=20)
    for name, p in named:
        _feed(h, name)
        h.update(_param_digest(p))
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        _feed(h, json.dumps(as_dict, sort_keys=True, default=str))
        _feed(h, str(getattr(config, "_attn_implementation", None)))
    return h.hexdigest()


def base_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The frozen base's parameters of a (peft) model, named as in the plain model: no LoRA weights,
    peft's ``base_layer`` wrappers left out of the names (so where LoRA sits does not change them)."""
    from lmas.lm.likelihood import causal_lm

    return [(n.replace(".base_layer.", "."), p) for n, p in causal_lm(model).named_parameters() if "lora_" not in n]


_CODE: dict[tuple[str, ...], str] = {}


def code_version(*modules: str) -> str:
    """A hash of the named modules' source files and of torch / transformers / peft versions."""
    if modules not in _CODE:
        import importlib

        import peft
        import transformers

        h = hashlib.blake2b(digest_size=20)
        _feed(h, (torch.__version__, transformers.__version__, peft.__version__))
        for name in modules:
            file = importlib.import_module(name).__file__
            _feed(h, Path(file).read_bytes() if file else name)
        _CODE[modules] = h.hexdigest()
    return _CODE[modules]


def numerics(device: torch.device) -> tuple[str, str | None]:
    """What changes float results besides the inputs: the device type and the autocast dtype in force."""
    kind = device.type
    on = torch.is_autocast_enabled(kind) if kind in ("cpu", "cuda") else False
    return kind, str(torch.get_autocast_dtype(kind)) if on else None


# --- values -----------------------------------------------------------------------------------
def pack(meta: dict[str, Any], arrays: dict[str, Tensor | np.ndarray]) -> bytes:
    """``meta`` (JSON) and named tensors/arrays as bytes: a JSON header, then each one's raw bytes."""
    parts, specs = [], []
    for name, a in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        specs.append(
            {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "n": len(raw)}
        )
        parts.append(raw)
    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    return struct.pack("<I", len(header)) + header + b"".join(parts)


def unpack(payload: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The inverse of :func:`pack` (tensors on the CPU); raises ``ValueError`` for a malformed payload."""
    try:
        (n,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + n])
        offset, arrays = 4 + n, {}
        for spec in header["arrays"]:
            raw = payload[offset : offset + spec["n"]]
            if len(raw) != spec["n"]:
                raise ValueError("short payload")
            dtype = getattr(torch, spec["dtype"])
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            arrays[spec["name"]] = flat.view(dtype).reshape(spec["shape"])
            offset += spec["n"]
        return header["meta"], arrays
    except (struct.error, json.JSONDecodeError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"malformed cache entry: {e}") from e


class RowCache:
    """Per-row tensors (e.g. one example's hidden states) by key: an in-memory LRU of at most
    ``max_cache_mb``, then (``disk``) a :class:`DiskCache` shared by every run and process.

    Subclasses say what the rows' numbers depend on besides their keys (:meth:`context`, part of
    every disk key). When the context changes (e.g. a strategy that trains the base changed the weights under
    a cached trunk), the memory level is dropped before it is read, so no row computed under other weights is
    returned. ``hits`` counts rows found in either level, ``misses`` rows computed.
    """

    def __init__(self, max_cache_mb: float, disk: DiskCache | None, device: Callable[[], torch.device]) -> None:
        self.max_cache_bytes = int(max_cache_mb * 2**20)
        self.cache: OrderedDict[bytes, Tensor] = OrderedDict()
        self.cache_bytes = 0
        self.hits = self.misses = 0
        self.disk, self.device = disk, device
        self._context: Any = None  # the context the rows in memory were computed under

    def context(self) -> Any:
        """What the rows' numbers depend on besides their keys (weights, options, code)."""
        raise NotImplementedError

    def rows(self, keys: list[bytes], compute: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """Each row's tensor: from memory, else from the disk store, else ``compute(row indices)``
        for the rows found in neither (together, once per distinct key), then stored in both.

        ``keys`` name each row's input completely (token ids and layout); the disk key adds what
        the numbers depend on besides them (:meth:`context`)."""
        found: dict[bytes, Tensor] = {}
        disk_keys: dict[bytes, str] = {}
        context = self.context()  # cheap: parameter hashes are memoised until a parameter changes
        if context != self._context:  # other weights (or options) than the rows in memory were computed under
            self.cache.clear()
            self.cache_bytes, self._context = 0, context
        for k in dict.fromkeys(keys):
            if k in self.cache:
                self.cache.move_to_end(k)
                found[k] = self.cache[k]
            elif self.disk is not None:
                disk_keys[k] = key(context, k)
                payload = self.disk.get(disk_keys[k])
                if payload is None:
                    continue
                try:
                    found[k] = unpack(payload)[1]["h"].to(self.device())
                except (ValueError, KeyError):
                    self.disk.discard(disk_keys[k])
                    continue
                self._store(k, found[k])
        self.hits += sum(k in found for k in keys)
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            for k, value in zip(missing, compute([keys.index(k) for k in missing]), strict=True):
                found[k] = value = value.clone()
                self._store(k, value)
                if self.disk is not None:
                    self.disk.put(disk_keys[k], pack({}, {"h": value}))
            self.misses += len(missing)
        return [found[k] for k in keys]

    def _store(self, k: bytes, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_cache_bytes or k in self.cache:
            return
        while self.cache and self.cache_bytes + size > self.max_cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()
        self.cache[k] = value
        self.cache_bytes += size

    def clear(self) -> None:
        """Drop every entry kept in memory (the disk store stays)."""
        self.cache.clear()
        self.cache_bytes = 0
        self.hits = self.misses = 0
