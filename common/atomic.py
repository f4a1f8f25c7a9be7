"""One way to write a file: under a temporary name beside it, proved complete, fsynced,
then renamed into place.

``atomic_output(path)`` / ``atomic_write(path, mode)``: every file of the project is
written as ``.<name>.tmp-<pid><ext>`` in the same folder and renamed only when the block
succeeded (and ``before_replace``, e.g. a read-back check, passed). A killed or failed
write never leaves a file under its final name; a full disk, quota or size limit raises
``WriteError`` naming the file. ``remove_stale_temps`` deletes a dead run's leftovers.

Standard library only: the lowest floor of the project, imported by everything that writes.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"


class WriteError(OSError):
    """A file could not be written completely (a full disk, a quota, a size limit)."""


def _full_suffix(path: Path) -> str:
    """``.nii.gz`` for compressed names (writers choose the format by it), else the suffix."""
    if path.suffix == ".gz" and Path(path.stem).suffix:
        return Path(path.stem).suffix + ".gz"
    return path.suffix


# ----------------------------------------------------------------------------- writing

def is_temp_name(name):
    """True for the temporary names that ``atomic_output`` uses."""
    return name.startswith(".") and TEMP_MARK in name


def temp_path(path):
    """``.<name>.tmp-<pid><ext>``: hidden, tied to this process, with the same extension
    (writers such as SimpleITK and matplotlib choose the format by it)."""
    path = Path(path)
    ext = _full_suffix(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}{ext}")


def free_space(path) -> str:
    """'N MiB free there' for the folder of ``path`` (empty when it cannot be told)."""
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
    except OSError:
        return ""


def fsync_path(path, directory=False):
    """fsync a file (errors such as ENOSPC propagate) or a directory (best effort)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # e.g. directories on some platforms
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full_errno(e: BaseException) -> int | None:
    """The errno of a full disk, quota or size limit anywhere in `e`'s chain (torch.save
    replaces the OSError of its write by a RuntimeError of its zip writer)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def atomic_output(path, before_replace=None):
    """Yield a temporary path beside ``path``; when the block succeeds, fsync the file,
    run ``before_replace(tmp)`` (a check that raises if the file is incomplete, or
    keeping the file it replaces) and rename it to ``path``. On any exception the
    temporary file is removed and ``path`` is left untouched; a failed write (full disk,
    quota, size limit) raises ``WriteError`` naming ``path``.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, WriteError):
            raise WriteError(e.errno, str(e).replace(str(tmp), str(path))) from None
        full = _disk_full_errno(e)
        if full is not None:
            raise WriteError(full, f"no space left writing {path} ({os.strerror(full)}; "
                                   f"{free_space(path)})") from e
        if isinstance(e, RuntimeError) and ("file write failed" in str(e)
                                            or "PytorchStreamWriter failed" in str(e)):
            # torch.save's own zip writer reports a failed write as a RuntimeError
            raise WriteError(errno.EIO, f"could not write {path}: is the disk full? "
                                        f"({free_space(path)}; {str(e).splitlines()[0]})") from e
        raise
    fsync_path(path.parent, directory=True)


@contextmanager
def atomic_write(path, mode="wb", before_replace=None):
    """Open a temporary file beside ``path`` for writing (``mode`` 'wb' or 'w'); on
    success it is flushed, fsynced and renamed to ``path`` (see ``atomic_output``)."""
    with atomic_output(path, before_replace) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


def write_text(path, text):
    """Atomically write a text file."""
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_stale_temps(folder, names=None):
    """Delete temporary files in ``folder`` left by processes that no longer run (a
    killed write); return how many. Files of a live process are left alone. With
    ``names``, only the temporaries of those final names (a command that writes into a
    folder it does not own cleans up after itself only)."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if (is_temp_name(p.name) and p.is_file() and not pid_alive(_temp_pid(p.name))
                    and (names is None or p.name[1:].rsplit(TEMP_MARK, 1)[0] in names)):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _temp_pid(name: str) -> int | None:
    digits = ""
    for ch in name.rsplit(TEMP_MARK, 1)[-1]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def pid_alive(pid: int | None) -> bool:
    """True when a process ``pid`` runs on this machine (this one included)."""
    if pid is None or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
