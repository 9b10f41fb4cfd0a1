"""Crash-safe file helpers: atomic writes, durable renames and file hashing.

Every artifact the pipeline commits (tokenizer JSON, shard metadata, checkpoints' side files) is
written through :func:`atomic_write_bytes` and friends: the data goes to a temporary file in the
same folder, is flushed and fsynced, then ``os.replace``-d over the target and the folder is
fsynced. A reader therefore sees either the old file or the complete new one, never a torn write,
even after a kill or a power loss. Only portable calls are used (Linux and macOS; on platforms
where a folder cannot be opened for fsync, that step is skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "sha256_bytes",
    "sha256_file",
]

_CHUNK = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import; files created here get the same permissions as ``open(path, "w")`` would.
_FILE_MODE = 0o666 & ~_current_umask()
FILE_MODE = _FILE_MODE  # public: for files written by other libraries (e.g. safetensors)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entry table to disk so a rename/create inside it survives a crash."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; nothing more we can do portably
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)`` followed by an fsync of the destination folder."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The parent folder is created if needed. On any error the temp file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        atomic_replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` atomically (see :func:`atomic_write_bytes`). Newlines are not translated."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically, keys sorted, UTF-8, with a trailing newline.

    The output is a pure function of ``obj`` (stable key order), so rewriting the same object
    gives byte-identical files.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of an in-memory byte string."""
    return hashlib.sha256(data).hexdigest()


def is_temp_name(name: str) -> bool:
    """True for the names deeplm's writers give unfinished files: ``.<name>.<random>.tmp``
    (:func:`atomic_write_bytes`), ``.<name>.tmp-<pid>`` and ``.<name>.tmp.<ext>``."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or ".tmp." in name)


def remove_stale_temps(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Delete unfinished temp files left in ``folder`` by a writer that was killed mid-write.

    Call it only where no other process writes into ``folder`` (deeplm: at the start of the
    stage that owns it, under the run's lock). Returns what was removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in root.rglob(".*") if recursive else root.glob(".*"):
        if path.is_file() and is_temp_name(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
