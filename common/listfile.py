"""The list file: one sub-volume per line, each path relative to the list file's own
folder (absolute paths stay absolute). ``write_list_file`` and ``read_list_file`` are the
only writer and reader of that rule (``write_list_entries``/``read_list_entries`` the
lines as written, for the converter, which keeps each line's form). UTF-8, a byte-order
mark accepted; a sub-volume listed twice is refused."""
from __future__ import annotations

import codecs
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
    write_list_entries(list_file, lines)
    return lines


def write_list_entries(list_file, entries) -> None:
    """Write the list file (atomically) with ``entries`` as its lines, as they are."""
    write_text(list_file, "".join(f"{e}\n" for e in entries))


def read_list_entries(list_file) -> list[str]:
    """The lines of a list file as written (stripped, blank ones skipped), checked:
    FileNotFoundError for a missing list file; ValueError naming the file (and the line)
    for bytes that are not UTF-8, no entries, entries of an unsupported type, or a
    sub-volume named twice (``a.nii.gz`` and ``./a.nii.gz`` too)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(
            f"list file {list_file} does not exist; write it with splitting_to_patches.py "
            f"(one sub-volume per line, relative to the list file's folder) or pass the "
            f"right path")
    raw = list_file.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # some editors begin a UTF-8 file with one
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"list file {list_file} line {line} is not UTF-8 text (byte "
                         f"0x{raw[e.start]:02x} at column {column}); save it as UTF-8, or "
                         f"rewrite it with splitting_to_patches.py") from None
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
    entries = [e for _, e in numbered]
    if not entries:
        raise ValueError(f"list file {list_file} names no sub-volumes; re-run "
                         f"splitting_to_patches.py or check that the preprocessing produced files")
    bad_type = [e for e in entries if not volume_suffix(e)]
    if bad_type:
        raise ValueError(f"list file {list_file} has {len(bad_type)} entries that are not "
                         f"{'/'.join(VOLUME_SUFFIXES)} files, e.g. {', '.join(bad_type[:3])}")
    first_line, repeats = {}, []
    folder = os.path.abspath(list_file.parent)
    for n, e in numbered:
        key = os.path.normpath(os.path.join(folder, e))
        if key in first_line:
            repeats.append((e, first_line[key], n))
        else:
            first_line[key] = n
    if repeats:
        e, a, b = repeats[0]
        raise ValueError(f"list file {list_file} names {len(repeats)} sub-volume(s) more than "
                         f"once, e.g. {e} (lines {a} and {b}); a repeat would be drawn twice as "
                         f"often: list each sub-volume once")
    return entries


def read_list_file(list_file) -> list[str]:
    """The sub-volumes a list file names, as paths: each line resolved against the list
    file's folder (absolute lines as they are). Raises FileNotFoundError for a missing
    list file or entries, ValueError as ``read_list_entries`` does; the message names
    the first few and the count."""
    list_file = Path(list_file)
    entries = read_list_entries(list_file)
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
