"""The list file: one sub-volume per line, each path relative to the list file's own
folder (absolute paths stay absolute). ``write_list_file`` and ``read_list_file`` are the
only writer and reader of that rule."""
from __future__ import annotations

import os
from pathlib import Path

from common.atomic import write_text
from volume_io import VOLUME_SUFFIXES, volume_suffix


# ----------------------------------------------------------------------------- the list file

def write_list_file(list_file, paths) -> list[str]:
    """Write the list file (atomically): one line per path, each relative to the list
    file's folder, sorted. Returns the lines."""
    list_file = Path(list_file)
    base = list_file.resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    lines = sorted(Path(os.path.relpath(Path(p).resolve(), base)).as_posix() for p in paths)
    write_text(list_file, "".join(f"{line}\n" for line in lines))
    return lines


def read_list_file(list_file) -> list[str]:
    """The sub-volumes a list file names, as paths: each line resolved against the list
    file's folder (absolute lines as they are). Raises FileNotFoundError for a missing
    list file or entries, ValueError for an empty list or entries of an unsupported
    type; the message names the first few and the count."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(
            f"list file {list_file} does not exist; write it with splitting_to_patches.py "
            f"(one sub-volume per line, relative to the list file's folder) or pass the "
            f"right path")
    entries = [ln.strip() for ln in list_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not entries:
        raise ValueError(f"list file {list_file} names no sub-volumes; re-run "
                         f"splitting_to_patches.py or check that the preprocessing produced files")
    bad_type = [e for e in entries if not volume_suffix(e)]
    if bad_type:
        raise ValueError(f"list file {list_file} has {len(bad_type)} entries that are not "
                         f"{'/'.join(VOLUME_SUFFIXES)} files, e.g. {', '.join(bad_type[:3])}")
    base = list_file.parent
    paths = [os.path.join(base, e) for e in entries]
    # One directory listing per folder instead of one stat per file (125k files).
    listing: dict[str, set[str]] = {}
    missing = []
    for entry, p in zip(entries, paths):
        folder, name = os.path.split(p)
        if folder not in listing:
            try:
                listing[folder] = set(os.listdir(folder or "."))
            except OSError:
                listing[folder] = set()
        if name not in listing[folder]:
            missing.append(entry)
    if missing:
        raise FileNotFoundError(
            f"list file {list_file} names {len(missing)} of {len(entries)} sub-volumes that do "
            f"not exist, e.g. {', '.join(missing[:5])}; its entries are relative to its own "
            f"folder {base.resolve()}. Re-run splitting_to_patches.py to rewrite the list.")
    return paths
