"""Writing files so that nothing half-written is ever trusted, and a full disk is named, not a traceback.

Every file the toolkit writes for later reading goes through `atomic_write_text` / `atomic_write_json`
(a temporary sibling renamed into place: a kill leaves the old file or the new one, never a mix).
`disk_full_guard` turns the many shapes a full disk takes (`OSError: [Errno 28]`, torch's
`RuntimeError ... unexpected pos`, `basic_ios::clear`) into one `error:` line with the free space,
the folder and what to do, after removing our temporary files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import UsageError

# Below this many free bytes a failed write is taken as a full disk even when the library that
# failed (torch's zip writer, safetensors) did not report ENOSPC.
NEARLY_FULL_BYTES = 64 * 2**20


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through `<path>.tmp` + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding=encoding)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj, **kwargs) -> Path:
    """JSON (UTF-8, indented, non-ASCII kept) written atomically; extra kwargs go to json.dumps."""
    kwargs.setdefault("ensure_ascii", False)
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", str)
    return atomic_write_text(path, json.dumps(obj, **kwargs))


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the file system holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_disk_full(exc: BaseException, folder: str | Path) -> bool:
    """True when `exc` (or an exception it was raised from) says ENOSPC/EDQUOT, or when the write failed
    while `folder`'s file system is (nearly) full: torch and safetensors report a full disk as
    `RuntimeError: ... unexpected pos` or `basic_ios::clear` without an errno."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(folder) < NEARLY_FULL_BYTES
    except OSError:
        return False


def remove_paths(paths: Iterable[str | Path]) -> None:
    """Best-effort removal of temporary files and folders (used when a write failed)."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def disk_full_guard(folder: str | Path, cleanup: Iterable[str | Path] = (), advice: str = "") -> Iterator[None]:
    """Run a write; if it fails because the disk is full, remove `cleanup` (our temporary files, so they
    do not keep the disk full) and raise one UsageError naming the free space, the folder and `advice`.
    Other errors pass through unchanged (after the same cleanup)."""
    cleanup = list(cleanup)
    try:
        yield
    except BaseException as e:
        remove_paths(cleanup)
        if isinstance(e, Exception) and is_disk_full(e, folder):
            free = human_bytes(free_bytes(folder))
            raise UsageError(f"disk full while writing {folder} ({free} free); temporary files removed. "
                             f"Free some space or choose another folder{'; ' + advice if advice else ''}") from e
        raise
