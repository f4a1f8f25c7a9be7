"""The stage runner shared by the preprocessing scripts: their common flags, their inputs,
and one function over many inputs with a worker pool and a report.

``run_tasks(...)`` runs with ``--num_workers`` processes; every result is collected, a
tqdm bar advances on completions, a summary is printed and failed/excluded inputs are
listed in ``<out_dir>/<script>_failures.txt``. Workers exit when their parent dies, even
by SIGKILL. ``run_exclusive(...)`` holds the output folders while a stage runs, so a
second copy on the same folder is refused at once. No torch here: the workers do not
pay for importing it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from pathlib import Path

from common.atomic import WriteError, remove_stale_temps, write_text
from common.cli import BOOL, int_at_least
from common.lock import FolderInUse, hold_folder
from volume_io import VolumeError

DONE, SKIPPED, EXCLUDED, FAILED = "done", "skipped", "excluded", "failed"


class Excluded(Exception):
    """An input that is valid but that the published recipe produces nothing from."""


def add_batch_args(parser, compression=False):
    """The flags every preprocessing stage shares: --num_workers (alias --workers),
    --overwrite and, for stages that write gzip, --compression_level."""
    parser.add_argument("--num_workers", "--workers", type=int_at_least(1),
                        default=default_workers(),
                        help="Worker processes, each holding one volume at a time (default: "
                             "this machine's cores); 1 runs everything in this process.")
    parser.add_argument("--overwrite", default=False, **BOOL,
                        help="Redo outputs that already exist instead of skipping them.")
    if compression:
        parser.add_argument("--compression_level", type=int, default=1, choices=range(1, 10),
                            metavar="{1..9}",
                            help="gzip level of .nii.gz outputs: 1 is fastest, 9 a few %% smaller.")


# ----------------------------------------------------------------------------- inputs

def stage_inputs(in_dir, out_dir, stage, previous_step):
    """The sorted ``*.nii.gz`` volumes of ``in_dir`` (names starting with "." skipped),
    with ``out_dir`` created and cleared of a dead run's temporary files; or None after
    saying on stderr why there are none (``previous_step`` names what makes them)."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        print(f"{stage}: input folder {in_dir} does not exist", file=sys.stderr)
        return None
    inputs = sorted(p for p in in_dir.glob("*.nii.gz") if not p.name.startswith("."))
    if not inputs:
        print(f"{stage}: no *.nii.gz volumes in {in_dir} (run {previous_step} first?)",
              file=sys.stderr)
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    return inputs


def run_exclusive(stage, folders, body, advice="or use another --output_dir"):
    """``body()`` while this run holds every folder of ``folders`` (``common.lock``: one
    run per folder), or 1 after saying which run holds one of them (nothing is done)."""
    try:
        with ExitStack() as held:
            for folder in sorted({os.path.abspath(f) for f in folders}):
                held.enter_context(hold_folder(folder, stage, advice))
            return body()
    except FolderInUse as e:
        print(f"{stage}: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- the pool

def default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _call(fn, name, args):
    """Run one task; turn its outcome into ``(name, status, reason)`` (picklable)."""
    try:
        out = fn(*args)
    except Excluded as e:
        return name, EXCLUDED, str(e)
    except Exception as e:  # reported with the input's name; the batch goes on
        msg = str(e) if isinstance(e, (VolumeError, WriteError)) else f"{type(e).__name__}: {e}"
        return name, FAILED, msg
    return name, (out if out in (DONE, SKIPPED) else DONE), ""


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit as soon as the parent is gone (a SIGKILLed parent
    cannot tell its pool to stop). Linux's PR_SET_PDEATHSIG acts at once; a watchdog
    thread polling the parent covers other systems."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def _threads_per_worker(n):
    """Cap BLAS/OpenMP threads in the worker processes (they read it when they start)."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, str(n))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_tasks(fn, tasks, workers, desc, report_path, prior_failures=()):
    """Run ``fn(*args)`` for every ``(name, args)`` in ``tasks`` and report.

    Args:
        fn: a module-level function returning ``DONE`` or ``SKIPPED``; it raises
            ``Excluded`` for an input the recipe produces nothing from and any other
            exception for a failure (its message should name the file).
        tasks: list of ``(name, args)``; ``name`` identifies the input in messages.
        workers: processes; 1 runs everything in this process.
        desc: the progress bar's label (the script's name).
        report_path: where failed/excluded inputs are listed with their reasons.
        prior_failures: ``(name, reason)`` pairs found before any task ran (e.g. a
            series folder missing from the CSV); reported as failures.

    Returns:
        The exit code: 1 when any input failed, else 0.
    """
    from tqdm import tqdm

    results = [(name, FAILED, reason) for name, reason in prior_failures]
    for name, _, reason in results:
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    workers = max(1, min(int(workers), len(tasks))) if tasks else 1
    t0 = time.time()
    with tqdm(total=len(tasks), desc=desc, unit="vol", dynamic_ncols=True) as bar:
        def collect(res):
            results.append(res)
            if res[1] == FAILED:
                tqdm.write(f"FAILED {res[0]}: {res[2]}", file=sys.stderr)
            bar.update(1)

        if workers == 1:
            for name, args in tasks:
                collect(_call(fn, name, args))
        else:
            threads = max(1, default_workers() // workers)
            with _threads_per_worker(threads), ProcessPoolExecutor(
                    workers, mp_context=mp.get_context("spawn"), initializer=_die_with_parent,
                    initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_call, fn, name, args): name for name, args in tasks}
                for fut in as_completed(futures):
                    try:
                        collect(fut.result())
                    except Exception as e:  # the worker process itself died (e.g. OOM kill)
                        collect((futures[fut], FAILED, f"worker process died: {type(e).__name__}: {e}"))
    counts = {s: sum(1 for r in results if r[1] == s) for s in (DONE, SKIPPED, EXCLUDED, FAILED)}
    print(f"{desc}: {counts[DONE]} done, {counts[SKIPPED]} skipped (already complete), "
          f"{counts[EXCLUDED]} excluded, {counts[FAILED]} failed in {time.time() - t0:.1f} s",
          file=sys.stderr)
    write_report(report_path, desc, results)
    return 1 if counts[FAILED] else 0


def write_report(report_path, desc, results):
    """Write the failed/excluded inputs with reasons to ``report_path`` (or remove it)."""
    report_path = Path(report_path)
    bad = sorted((r for r in results if r[1] in (FAILED, EXCLUDED)), key=lambda r: (r[1], r[0]))
    if not bad:
        report_path.unlink(missing_ok=True)
        return
    report_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {desc}: {len(bad)} of {len(results)} inputs not processed "
             f"({time.strftime('%Y-%m-%d %H:%M:%S')})",
             "# path\tstatus\treason"]
    lines += [f"{name}\t{status}\t{' '.join(reason.split())}" for name, status, reason in bad]
    write_text(report_path, "\n".join(lines) + "\n")
    print(f"{desc}: the {len(bad)} inputs not processed are listed with reasons in {report_path}",
          file=sys.stderr)
