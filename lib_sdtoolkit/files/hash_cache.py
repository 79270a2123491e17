"""Persistent hash cache, and the WebUI's own hash cache.

``HashCache``: our cache, one SQLite file (stdlib ``sqlite3``; default ``$SDTOOLKIT_CACHE_DIR/hashes-v2.sqlite`` or
``~/.cache/sd-toolkit/hashes-v2.sqlite``: the schema version is in the default file name, because one cache folder
is shared by every copy of the toolkit a user runs (the WebUI extension, the CLI, the app, maybe of different
versions), and an older copy writing rows of its own shape into a newer table failed every write, which in the
real A1111 stopped ``<sdtlora>`` from applying; a database whose ``meta`` names a newer schema is not used). An entry is keyed by the file's real path and is valid only while the
file's size, mtime, ctime (nanoseconds; ctime cannot be set back by ``touch``/``utime``, so ``rsync -t``,
``cp -p``, ``tar x`` over a file invalidate its entry) and inode are unchanged, so a second scan of an unchanged
folder only ``stat``s files and reads no file data. The cache speeds up reports only: no destructive action
trusts it (``dedup`` compares the files themselves before it links or moves anything).

The cache never stops hashing: a damaged database is moved aside (``hashes.sqlite.corrupt-<time>``) and a new one
started; a cache that cannot be written (read-only file or folder) is not used, with a ``warning``. An entry holds a JSON object with independent parts
(``hashes``: the algorithms computed so far; ``content``: the canonical content hash of ``dedup``), merged as
they come. A file that changed while it was hashed is never stored (``cached_hash_file`` reports it).

``WebUIHashCache``: the A1111 WebUI's cache, so hashes computed here are the ones the WebUI shows and writes to
infotext. Layout (A1111 ``modules/cache.py``, ``modules/hashes.py``):

* since 1.8: a ``diskcache.Cache`` per subsection in ``<data_dir>/cache/<subsection>`` (``SD_WEBUI_CACHE_DIR``),
  opened with ``size_limit=2**32, disk_min_file_size=2**18``; subsections ``hashes`` and ``hashes-addnet``;
* before: ``<data_dir>/cache.json`` (``SD_WEBUI_CACHE_FILE``) ``{subsection: {title: value}}``; 1.8 converts it
  once into the cache folder when that folder does not exist yet.

A value is ``{"mtime": <os.path.getmtime at hashing>, "sha256": <64 hex>}`` under a title: ``checkpoint/<name>``
(``name`` = the path relative to the checkpoint folder, with the OS separator, extension kept) in ``hashes``;
``lora/<file stem>`` in ``hashes-addnet`` holding the addnet hash (our AutoV3) for ``.safetensors`` LoRAs, in
``hashes`` holding the sha256 for others. The WebUI trusts an entry while the file's mtime is not newer than the
cached one. VAEs are looked up under the single fixed title ``vae`` (``sd_vae.get_loaded_vae_hash``), shared by
every VAE file; writing it for one VAE would make the WebUI report that hash for another, so VAE hashes are not
written there.

Backend choice: the cache folder if it exists; else ``cache.json`` if it exists (an older WebUI, or a 1.8+ one
that will convert it, our entries included); else the cache folder. ``diskcache`` (the WebUI pins 5.6.3) is needed
only for the folder backend.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import ModelFileError, SdToolkitError
from .hashes import FileHashes, ProgressFn, hash_file, normalize_algos

PathLike = Union[str, "os.PathLike[str]"]

SCHEMA_VERSION = 2
#: the default file name: one file per schema, so copies of the toolkit of different versions never share a table
DEFAULT_NAME = f"hashes-v{SCHEMA_VERSION}.sqlite"

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    env = os.environ.get("SDTOOLKIT_CACHE_DIR")
    if env:
        return Path(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd-toolkit"


def _key(path: PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _stat_ok(row: Tuple[int, int, int, int], st: os.stat_result) -> bool:
    size, mtime_ns, ino, ctime_ns = row
    if size != st.st_size or mtime_ns != st.st_mtime_ns or ctime_ns != st.st_ctime_ns:
        return False
    return not (ino and st.st_ino and ino != st.st_ino)


def _full_key(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


_COLS = "size, mtime_ns, ino, ctime_ns, data"


class HashCache:
    """SQLite cache of per-file facts, valid while (size, mtime_ns, ctime_ns, inode) are unchanged. Thread-safe.

    Never raises for the cache's own troubles: ``warning`` says why it is not used (``enabled`` False), and a
    damaged database is moved aside and rebuilt (``warning`` says where the old one went)."""

    def __init__(self, path: Optional[PathLike] = None) -> None:
        p = Path(path) if path is not None else default_cache_dir() / DEFAULT_NAME
        if p.is_dir():
            p = p / DEFAULT_NAME
        self.path = p
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self.warning: Optional[str] = None
        try:
            self._db = self._open(p)
        except (OSError, sqlite3.Error) as e:
            self._trouble(e)

    # ---- opening, damage, read-only ------------------------------------------------------------------------
    @staticmethod
    def _open(p: Path) -> sqlite3.Connection:
        p.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(p), timeout=30, check_same_thread=False, isolation_level=None)
        try:
            if db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
                row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
                if row and str(row[0]).isdigit() and int(row[0]) > SCHEMA_VERSION:
                    raise sqlite3.OperationalError(f"written by a newer SD Toolkit (schema {row[0]}, this one "
                                                   f"reads {SCHEMA_VERSION})")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            ok = db.execute("PRAGMA quick_check").fetchone()
            if not ok or ok[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({ok[0] if ok else '?'})")
            cols = [r[1] for r in db.execute("PRAGMA table_info(files)")]
            if cols and "ctime_ns" not in cols:  # schema 1: entries without ctime cannot be trusted
                db.execute("DROP TABLE files")
            db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                       "mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, "
                       "data TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _damaged(e: BaseException) -> bool:
        m = str(e).lower()
        return isinstance(e, sqlite3.DatabaseError) and ("malformed" in m or "not a database" in m
                                                         or "corrupt" in m)

    def _disable(self, e: BaseException) -> None:
        self._close_db()
        self.warning = f"hash cache {self.path} not used ({e}); hashing without a cache"
        log.warning(self.warning)

    def _set_aside(self, e: BaseException) -> None:
        """The database is damaged: move it (and its WAL/SHM files) aside and start a new one."""
        self._close_db()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self._db = self._open(self.path)
        except (OSError, sqlite3.Error) as e2:
            self._disable(e2)
            return
        self.warning = f"hash cache {self.path} was damaged ({e}); moved to {aside.name}, rebuilt"
        log.warning(self.warning)

    def _trouble(self, e: BaseException) -> None:
        """An error while using the database (caller holds the lock)."""
        if self._damaged(e):
            self._set_aside(e)
        else:
            self._disable(e)

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def _fetch(self, key: str) -> Optional[tuple]:
        if self._db is None:
            return None
        try:
            return self._db.execute(f"SELECT {_COLS} FROM files WHERE path=?", (key,)).fetchone()
        except sqlite3.Error as e:
            self._trouble(e)
            return None

    # ---- raw entries -----------------------------------------------------------------------------------
    def lookup(self, path: PathLike, st: Optional[os.stat_result] = None) -> Optional[Dict[str, Any]]:
        """The stored data of ``path`` if the file is unchanged since it was stored, else None."""
        if st is None:
            try:
                st = os.stat(path)
            except OSError:
                return None
        with self._lock:
            row = self._fetch(_key(path))
        if row is None or not _stat_ok(row[:4], st):
            return None
        try:
            data = json.loads(row[4])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def store(self, path: PathLike, st: os.stat_result, **parts: Any) -> None:
        """Merge ``parts`` (``hashes=...``, ``content=...``) into the entry of ``path`` as of ``st``."""
        key = _key(path)
        with self._lock:
            if self._db is None:
                return
            row = self._fetch(key)
            data: Dict[str, Any] = {}
            if row is not None and _stat_ok(row[:4], st):
                try:
                    data = json.loads(row[4]) or {}
                except ValueError:
                    data = {}
            for k, v in parts.items():
                if isinstance(v, dict) and isinstance(data.get(k), dict):
                    data[k] = {**data[k], **v}
                else:
                    data[k] = v
            if self._db is None:
                return
            try:
                self._db.execute(f"INSERT OR REPLACE INTO files (path, {_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                                 (key, st.st_size, st.st_mtime_ns, st.st_ino or 0, st.st_ctime_ns,
                                  json.dumps(data)))
            except sqlite3.Error as e:
                self._trouble(e)

    def _run(self, sql: str, args: Any = (), many: bool = False) -> list:
        with self._lock:
            if self._db is None:
                return []
            try:
                cur = self._db.executemany(sql, args) if many else self._db.execute(sql, args)
                return cur.fetchall()
            except sqlite3.Error as e:
                self._trouble(e)
                return []

    def __len__(self) -> int:
        rows = self._run("SELECT COUNT(*) FROM files")
        return int(rows[0][0]) if rows else 0

    # ---- hashes -----------------------------------------------------------------------------------------
    def get_hashes(self, path: PathLike, algos: Optional[Iterable[str]] = None,
                   st: Optional[os.stat_result] = None) -> Optional[FileHashes]:
        """Cached hashes of ``path`` if every algorithm in ``algos`` is there and the file is unchanged."""
        wanted = normalize_algos(algos)
        if st is None:
            try:
                st = os.stat(path)
            except OSError:
                return None
        data = self.lookup(path, st)
        hs = (data or {}).get("hashes") or {}
        if not all(a in hs for a in wanted):
            return None
        res = FileHashes(path=os.fspath(path), size=st.st_size, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns,
                         source="cache", algos=wanted)
        for a in wanted:
            setattr(res, a, hs[a])
        return res

    def put_hashes(self, res: FileHashes, st: Optional[os.stat_result] = None) -> bool:
        """Store a result unless the file changed while (or since) it was hashed. Returns whether stored.

        ``st``: the file's ``stat`` taken before it was hashed; the entry is stored only when the file's stat now
        is the same (size, mtime, ctime, inode), so a change during or after the hashing is never cached."""
        if res.changed:
            return False
        try:
            now = os.stat(res.path)
        except OSError:
            return False
        if st is None:
            st = now
        if now.st_size != res.size or now.st_mtime_ns != res.mtime_ns or _full_key(now) != _full_key(st):
            return False
        self.store(res.path, st, hashes=res.values())
        return True

    def close(self) -> None:
        with self._lock:
            self._close_db()

    def __enter__(self) -> "HashCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cached_hash_file(path: PathLike, algos: Optional[Iterable[str]] = None, cache: Optional[HashCache] = None,
                     progress: Optional[ProgressFn] = None,
                     on_computed: Optional[Callable[[FileHashes], None]] = None) -> FileHashes:
    """Hashes of ``path`` from ``cache`` when valid, else computed in one read and stored.

    A result with ``changed=True`` (the file moved under us) is returned for the caller to report and is not
    stored. ``on_computed`` is called with each freshly computed, unchanged result (e.g. to mirror it into the
    WebUI's cache).
    """
    wanted = normalize_algos(algos)
    st = None
    if cache is not None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None:
            hit = cache.get_hashes(path, wanted, st)
            if hit is not None:
                return hit
            # compute what is missing together with what is there: one read either way
    res = hash_file(path, wanted, progress=progress)
    if not res.changed:
        if cache is not None:
            cache.put_hashes(res, st)
        if on_computed is not None:
            on_computed(res)
    return res


# ------------------------------------------------------------------------------------------------ the WebUI's cache

WEBUI_CACHE_SETTINGS = {"size_limit": 2 ** 32, "disk_min_file_size": 2 ** 18}


def webui_title(kind: str, path: PathLike, model_dirs: Sequence[PathLike] = ()) -> Optional[str]:
    """The WebUI's cache title of a model file: ``checkpoint/<name>`` or ``lora/<stem>``; None for other kinds.

    ``name`` is the path relative to the first folder of ``model_dirs`` holding the file (the WebUI's
    ``CheckpointInfo.name``), else the file name.
    """
    p = os.path.abspath(os.fspath(path))
    if kind == "checkpoint":
        name = os.path.basename(p)
        for d in model_dirs:
            d = os.path.abspath(os.fspath(d))
            if p.startswith(d.rstrip(os.sep) + os.sep):
                name = p[len(d.rstrip(os.sep)) + 1:]
                break
        return f"checkpoint/{name}"
    if kind == "lora":
        return "lora/" + os.path.splitext(os.path.basename(p))[0]
    return None


class WebUIHashCache:
    """Read and write the A1111 WebUI's hash cache (see the module docstring for the layout)."""

    def __init__(self, data_dir: PathLike, cache_dir: Optional[PathLike] = None,
                 cache_file: Optional[PathLike] = None) -> None:
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / "cache"
        self.cache_file = Path(cache_file) if cache_file else self.data_dir / "cache.json"
        if self.cache_dir.is_dir():
            self.backend = "diskcache"
        elif self.cache_file.is_file():
            self.backend = "json"
        else:
            self.backend = "diskcache"
        self._caches: Dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_webui_env(cls, data_dir: PathLike) -> "WebUIHashCache":
        """Honour ``SD_WEBUI_CACHE_DIR`` / ``SD_WEBUI_CACHE_FILE`` as the WebUI does."""
        return cls(data_dir, os.environ.get("SD_WEBUI_CACHE_DIR"), os.environ.get("SD_WEBUI_CACHE_FILE"))

    # ---- backends ----------------------------------------------------------------------------------------
    def _disk(self, subsection: str) -> Any:
        with self._lock:
            c = self._caches.get(subsection)
            if c is None:
                try:
                    import diskcache
                except ImportError:
                    raise SdToolkitError("the WebUI's hash cache is a diskcache folder; install the 'diskcache' "
                                         "package (the WebUI ships 5.6.3) to read or write it",
                                         self.cache_dir) from None
                c = diskcache.Cache(str(self.cache_dir / subsection), **WEBUI_CACHE_SETTINGS)
                self._caches[subsection] = c
            return c

    def _read_json(self) -> Dict[str, Any]:
        try:
            with open(self.cache_file, "r", encoding="utf8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ModelFileError(f"cannot read the WebUI's cache.json: {e}", self.cache_file) from None
        return data if isinstance(data, dict) else {}

    def entry(self, subsection: str, title: str) -> Optional[Dict[str, Any]]:
        if self.backend == "diskcache":
            v = self._disk(subsection).get(title)
        else:
            v = (self._read_json().get(subsection) or {}).get(title)
        return v if isinstance(v, dict) else None

    def put_many(self, items: Sequence[Tuple[str, str, Dict[str, Any]]]) -> None:
        """Write ``(subsection, title, value)`` entries."""
        if not items:
            return
        if self.backend == "diskcache":
            for sub, title, value in items:
                self._disk(sub)[title] = value
            return
        with self._lock:
            data = self._read_json()
            for sub, title, value in items:
                s = data.get(sub)
                if not isinstance(s, dict):
                    s = data[sub] = {}
                s[title] = value
            from .writer import atomic_path  # imports torch: only when a JSON cache is written

            with atomic_path(self.cache_file, overwrite=True) as tmp:
                with open(tmp, "w", encoding="utf8") as fh:
                    json.dump(data, fh, indent=4)

    # ---- the WebUI's rules -------------------------------------------------------------------------------
    def sha256(self, path: PathLike, title: str, addnet: bool = False) -> Optional[str]:
        """What the WebUI's ``hashes.sha256_from_cache`` answers: the cached value unless the file is newer."""
        e = self.entry("hashes-addnet" if addnet else "hashes", title)
        if not e or e.get("sha256") is None:
            return None
        try:
            if os.path.getmtime(path) > float(e.get("mtime", 0)):
                return None
        except OSError:
            return None
        return str(e["sha256"])

    def entries_for(self, kind: str, res: FileHashes, model_dirs: Sequence[PathLike] = ()
                    ) -> List[Tuple[str, str, Dict[str, Any]]]:
        """The entries the WebUI would make for this file and kind (none where a value was not computed)."""
        title = webui_title(kind, res.path, model_dirs)
        if title is None:
            return []
        if kind == "lora" and res.path.lower().endswith(".safetensors"):
            return [("hashes-addnet", title, {"mtime": res.mtime, "sha256": res.autov3})] if res.autov3 else []
        return [("hashes", title, {"mtime": res.mtime, "sha256": res.sha256})] if res.sha256 else []

    def record(self, kind: str, results: Iterable[FileHashes], model_dirs: Sequence[PathLike] = ()) -> int:
        """Write the entries for unchanged results. Returns how many were written."""
        items = [it for r in results if not r.changed for it in self.entries_for(kind, r, model_dirs)]
        self.put_many(items)
        return len(items)

    def close(self) -> None:
        for c in self._caches.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._caches.clear()


__all__ = ["HashCache", "cached_hash_file", "default_cache_dir", "WebUIHashCache", "webui_title",
           "WEBUI_CACHE_SETTINGS"]
