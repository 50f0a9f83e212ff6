"""Writing files so that nothing half-written is ever trusted, and a full disk is named, not a traceback.

Every file the toolkit writes for later reading goes through `atomic_write_text` / `atomic_write_json`
(a temporary sibling renamed into place: a kill leaves the old file or the new one, never a mix), and
every folder (a checkpoint, model/, an LM) through `atomic_dir` (built as `<name>.tmp`, renamed over the
old one only when complete).
`disk_full_guard` turns the many shapes a full disk takes (`OSError: [Errno 28]`, torch's
`RuntimeError ... unexpected pos`, `basic_ios::clear`) into one `error:` line with the free space,
the folder and what to do, after removing our temporary files. `folder_lock` keeps two commands from
writing into one folder at once. `file_stamp` / `stamp_changed` tell whether a file still holds what was
recorded of it (the ONNX export's record of the weights it was made from).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import UsageError

log = logging.getLogger(__name__)

# Below this many free bytes a failed write is taken as a full disk even when the library that
# failed (torch's zip writer, safetensors) did not report ENOSPC.
NEARLY_FULL_BYTES = 64 * 2**20
LOCK_FILE = ".lock"  # inside the locked folder: who holds it (pid, host, start time, command) as JSON


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


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a folder in `<final>.tmp` (emptied first) and rename it over `final` only when the block
    completes; on an error (or a kill) the old `final` is untouched and the .tmp is removed (or left for
    the next call to clear). -> the .tmp folder to write into."""
    final = Path(final)
    tmp = fresh_dir(final.with_name(final.name + ".tmp"))
    try:
        yield tmp
    except BaseException:
        remove_paths([tmp])
        raise
    replace_dir(tmp, final)


def fresh_dir(path: str | Path) -> Path:
    """An empty folder at `path` (whatever was there is removed)."""
    path = Path(path)
    remove_paths([path])
    path.mkdir(parents=True)
    return path


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Swap the complete folder `tmp` into `final`. The old `final` is first renamed aside, so at every
    moment either it or the new folder is complete under some name, never a half-deleted tree."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    remove_paths([old])
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    remove_paths([old])
    return final


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


# --------------------------------------------------------------------------------------------- file stamps
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> dict:
    """{"bytes", "mtime_ns", "sha256"} of a file, for `stamp_changed` to compare later."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def stamp_changed(path: str | Path, stamp: dict) -> str:
    """"" when `path` still holds what `stamp` recorded, else what differs: "missing", "size" or "content".
    Size and modification time are compared first and the file is hashed only when its time differs (a
    copy, a touch), so checking a multi-GB file costs one stat until something rewrote it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    if st.st_size != stamp.get("bytes"):
        return "size"
    if st.st_mtime_ns == stamp.get("mtime_ns"):
        return ""
    return "" if sha256_file(path) == stamp.get("sha256") else "content"


# --------------------------------------------------------------------------------------------- folder lock
@contextmanager
def folder_lock(folder: str | Path, setting: str = "output_dir", command: str = "") -> Iterator[Path | None]:
    """Hold an exclusive `flock` on `<folder>/.lock` while the block runs; the file names the holder
    (pid, host, start time, command) and is removed afterwards, with `folder` itself if this call made it
    and it stayed empty.

    A second holder fails at once with one UsageError naming the holder and `setting` (the config key
    to change). The kernel drops the lock when its process dies, so a killed run never blocks the next
    one; when the recorded holder is dead but a process it forked still holds the lock, the lock file
    is replaced. -> the lock file (None where the file system cannot lock: then nothing is guarded)."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        fd = _acquire(folder / LOCK_FILE, folder, setting)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            log.warning("cannot lock %s (%s); make sure no other command writes into it", folder, e.strerror)
            yield None
            return
        raise UsageError(f"cannot write into {folder} ({e.strerror}); choose another {setting}") from e
    try:
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": command}).encode())
        yield folder / LOCK_FILE
    finally:
        # Removed while still held: a process that opened it meanwhile sees it is gone and locks afresh.
        (folder / LOCK_FILE).unlink(missing_ok=True)
        for path in made:
            try:
                path.rmdir()
            except OSError:  # not empty: the command wrote something
                break
        os.close(fd)


def _acquire(path: Path, folder: Path, setting: str) -> int:
    """-> an open descriptor of `path`, emptied, holding the exclusive lock; or UsageError naming the holder."""
    taken_over = False
    for _ in range(10):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            current = _is_current(path, fd)
            os.close(fd)
            if not taken_over and holder and current and not _alive(holder):
                # The recorded holder died; a child it forked (a data loader worker) still holds the
                # file. A new file is a new lock; the orphan keeps only the old, unlinked one.
                log.warning("taking over the lock on %s from pid %s, which is no longer running", folder,
                            holder["pid"])
                path.unlink(missing_ok=True)
                taken_over = True
                continue
            raise UsageError(f"{folder} is in use by {_describe(holder)}; wait, or choose another {setting}")
        if _is_current(path, fd):
            os.ftruncate(fd, 0)  # what a killed holder left
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the file now at `path`
    raise UsageError(f"{folder} is in use (its lock changed hands 10 times); wait, or choose another {setting}")


def _is_current(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder is writing it right now
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def _alive(holder: dict) -> bool:
    """False only when the holder ran on this host and its pid is gone (another host: assume alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = time.localtime(float(holder.get("started", 0)))
    fmt = "%H:%M" if started[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M"
    host = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
    return f"pid {holder['pid']}{host} (started {time.strftime(fmt, started)})"
