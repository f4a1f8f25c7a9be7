"""One run per folder: ``hold_folder(folder, command, advice)`` around everything a command
writes there, so that a second copy started on the same folder is refused at once with
``FolderInUse`` naming the folder and the process that holds it.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<folder>/.desd.lock``, a file that
also names the holder (host, PID, command, start time) for the message a second run
gets. The operating system drops the lock when its holder ends in any way, SIGKILL and a
lost node included (NFS: once the server notices), so a killed run leaves no lock
behind; the file is removed by a holder that ends normally. POSIX locks work on local
file systems and on the shared ones clusters use when they have locking: NFSv4, NFSv3
with its lock daemon (``lockd``), Lustre mounted with ``-o flock``, GPFS, BeeGFS. They
belong to the process, not to its forked children (DataLoader workers do not hold it).

Where the file system refuses locks (ENOLCK, EOPNOTSUPP, ENOSYS: NFS mounted with
``nolock``, Lustre without ``flock``) the record decides: the file is created
exclusively, and one left behind is taken over only when it names this host and a
process that no longer runs; anything else is refused, with the advice to delete the
file if that run is known to be gone (a run on another host cannot be checked from here).

Standard library only.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from common.atomic import pid_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the record alone decides
    fcntl = None

LOCK_NAME = ".desd.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set[str] = set()  # lock files this process holds (a POSIX lock is per process)


class FolderInUse(OSError):
    """Another live process holds the folder."""


@contextmanager
def hold_folder(folder, command: str, advice: str = "or use another output folder"):
    """Hold ``folder`` (created if needed) for ``command`` while the block runs.

    Raises ``FolderInUse`` naming the folder, the holder's command, PID, host and start
    time, and what to do (``advice`` completes "wait for it to end, ...").
    A folder this process already holds is held again without a second lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    if key in _held:
        yield
        return
    record = (f"{socket.gethostname()} {os.getpid()} {command} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fd = _acquire(path, record, advice)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        try:
            if _same_file(fd, path):
                os.unlink(path)  # while still locked: a waiter re-checks which file it locked
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _acquire(path: Path, record: str, advice: str) -> int:
    if fcntl is None:
        return _acquire_by_record(path, record, advice)
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise FolderInUse(_busy(path, _holder(path), advice)) from None
            if e.errno in _NO_LOCKS:
                return _acquire_by_record(path, record, advice)
            raise
        if not _same_file(fd, path):  # the holder ended and removed it meanwhile: again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, record.encode())
        return fd
    raise FolderInUse(f"{path.parent}: could not take {path} (it keeps being replaced)")


def _acquire_by_record(path: Path, record: str, advice: str) -> int:
    """Without file-system locks: an exclusively created file naming the holder."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if not _stale(path, holder):
                raise FolderInUse(
                    _busy(path, holder, advice) + f" This file system does not support locks, "
                    f"so {path} itself marks the folder as in use: if that run is gone, "
                    f"delete the file.") from None
            path.unlink(missing_ok=True)
            continue
        os.write(fd, record.encode())
        return fd
    raise FolderInUse(f"{path.parent}: could not take {path}; delete it if no run uses the folder")


def _holder(path: Path) -> tuple[str, int | None, str]:
    """(host, PID, the rest) of a lock file's record; ('', None, '') when unreadable."""
    try:
        parts = path.read_text(errors="replace").split(maxsplit=2)
        return parts[0], int(parts[1]), parts[2].strip() if len(parts) > 2 else ""
    except (OSError, IndexError, ValueError):
        return "", None, ""


def _stale(path: Path, holder) -> bool:
    host, pid, _ = holder
    if pid is None:  # a record not written yet, or garbage: stale after a moment
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return True
    return host == socket.gethostname() and not pid_alive(pid)


def _busy(path: Path, holder, advice: str) -> str:
    host, pid, rest = holder
    who = (f"{rest.split(' since ')[0] or 'another run'} (PID {pid} on {host}"
           f"{', since ' + rest.split(' since ')[1] if ' since ' in rest else ''})"
           if pid is not None else "another run (which has not written its name yet)")
    return (f"{path.parent} is in use by {who}; two runs on one folder would overwrite each "
            f"other's files. Wait for it to end, {advice}.")
