"""The trainer's checkpoints: what `checkpoint.pth` holds (plain tensors and values, names
as in the released checkpoint), writing it atomically with the previous one kept, reading
it back with a fallback to that previous one (a damaged file is set aside, never
promoted), refusing a relaunch with other network or optimiser flags, loading it into the
run's objects, and mapping a checkpoint of the published release onto this trainer's
names. SIGINT/SIGTERM (`stop_on_signals`) let a save in progress finish, or a second
signal abandon it, and stop the run with `Stopped`."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import atomic
from models import declared_arch, read_checkpoint
from utils import gather_rng_states, print_rank0, read_log


def plain(value: Any) -> Any:
    """Turn argparse values into plain Python (tuples -> lists, Paths -> str)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write `obj` with torch.save so that `path` is always a complete file.

    The bytes go through `atomic.atomic_write` (a temporary file in the same folder,
    fsynced, renamed over `path`; a full disk raises `atomic.WriteError` naming
    `path`). With `keep_previous`, the file that was at `path` is first kept as
    `<stem>_prev<suffix>` through a hard link, so `path` exists at every instant and a
    good previous copy survives a checkpoint that later turns out bad.
    """
    path = Path(path)

    def demote_current(_tmp):  # the new file is complete on disk: keep the one it replaces
        if keep_previous and path.exists():
            with atomic.atomic_output(previous_path(path)) as prev_tmp:
                try:
                    os.link(path, prev_tmp)
                except OSError:  # file systems without hard links
                    shutil.copy2(path, prev_tmp)

    with signals_deferred():  # a signal now lets the save finish (seconds), then stops
        try:
            with atomic.atomic_write(path, "wb", before_replace=demote_current) as f:
                torch.save(obj, f)
        except BaseException as e:
            # a second signal: torch.save turns it into a RuntimeError of its zip writer
            stop = _interruption(e)
            if stop is None:
                raise
            if isinstance(stop, Stopped):
                stop.abandoned = path
            raise stop from None


def previous_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def damaged_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint that failed to load is set aside: `<name>.damaged`."""
    path = Path(path)
    return path.with_name(path.name + ".damaged")


def load_checkpoint_with_fallback(path: str | os.PathLike, set_aside: bool = False
                                  ) -> tuple[dict | None, Path | None]:
    """Load `path`, or its `_prev` copy when `path` is missing, truncated, corrupt (its
    CRCs are checked) or not a training checkpoint; a warning names the file that failed.
    With `set_aside` (rank 0 of the trainer), a failed `path` is renamed to
    `damaged_path(path)` once the previous copy has loaded, so that the next save cannot
    promote it to the previous copy over the good one.
    Returns (checkpoint, the file it came from) or (None, None) when there is nothing to
    resume; raises RuntimeError when neither file can be used."""
    path = Path(path)
    failed = None
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = read_checkpoint(candidate)
            if not isinstance(ckpt, dict) or "epoch" not in ckpt:
                raise KeyError("not a DeSD training checkpoint (no 'epoch' entry)")
        except Exception as err:  # any failure to read means: try the previous copy
            warnings.warn(f"could not load checkpoint {candidate} ({type(err).__name__}: {err}); "
                          f"trying the previous one", stacklevel=2)
            failed = failed or candidate
            continue
        if failed == path and candidate != path and set_aside:
            os.replace(path, damaged_path(path))
            warnings.warn(f"{path} set aside as {damaged_path(path)}; {candidate} stays the "
                          f"previous checkpoint until the next save", stacklevel=2)
        return ckpt, candidate
    if path.exists() or previous_path(path).exists():
        raise RuntimeError(f"neither {path} nor {previous_path(path)} could be loaded; move them "
                           f"away to start from scratch, or point --output_dir elsewhere")
    return None, None


# The flags that decide the kinds and shapes of what a checkpoint holds (networks,
# optimiser state): a run resumes only under the same ones. Others (--lr, --epochs, ...)
# may change between launches.
RUN_DEFINING_FLAGS = ("arch", "out_dim", "head_hidden_dim", "head_bottleneck_dim",
                      "use_bn_in_head", "norm_last_layer", "optimizer")


def check_same_run(ckpt: dict, args, source: str | os.PathLike) -> None:
    """Raise ValueError naming every flag of `RUN_DEFINING_FLAGS` (and the stages with a
    head, from --stage_weights) on which this command and the checkpoint's own `args`
    differ: loading it would fail halfway or resume something else. Flags the checkpoint
    does not record (the release's) are not compared."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        return
    saved = dict(saved, arch=declared_arch(ckpt))  # the release's own arch names: unknown
    was, now = {}, {}
    for flag in RUN_DEFINING_FLAGS:
        if saved.get(flag) is not None and plain(saved[flag]) != plain(getattr(args, flag)):
            was[flag], now[flag] = saved[flag], getattr(args, flag)

    def heads(weights):
        return [k for k, w in enumerate(weights, 1) if float(w)]
    if saved.get("stage_weights") and heads(saved["stage_weights"]) != heads(args.stage_weights):
        was["stage_weights"], now["stage_weights"] = saved["stage_weights"], args.stage_weights
    if was:
        def flags(values):
            return " ".join(f"--{k} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple))
                                         else str(v)) for k, v in values.items())
        source = Path(source)
        raise ValueError(f"{source} belongs to a run started with {flags(was)}, but this command "
                         f"has {flags(now)}, which would not fit its networks or optimiser. To "
                         f"continue that run, relaunch it with its own flags; to start a new "
                         f"run, pass another --output_dir (or move the checkpoints out of "
                         f"{source.parent})")


def adapt_published_checkpoint(ckpt: dict, widths: dict[int, int],
                               optimizer: torch.optim.Optimizer) -> list[str]:
    """Map a training checkpoint of the published release onto this trainer's names, in
    place; returns what was changed, for the log. `widths` maps the input width of each of
    this run's deep heads to its stage.

    The release named the student's deep heads `head_1..head_3` and kept an extra
    `loss_center` buffer in its loss. Deep heads are matched to stages by their input
    width (stage widths are distinct). Its optimizer state is positional, so it is kept
    only when every state tensor has the shape of this trainer's parameter at the same
    position; otherwise the optimizer starts fresh (resuming is then not exact).
    """
    notes = []
    state = {k.removeprefix("module."): v for k, v in ckpt["student"].items()}
    heads = sorted({k.split(".", 1)[0] for k in state if k.startswith("head_")})
    for head in heads:
        k = widths.get(state[f"{head}.mlp.0.weight"].shape[1])
        if k is None:
            raise ValueError(f"the checkpoint's {head} takes "
                             f"{state[f'{head}.mlp.0.weight'].shape[1]} features, which no deep "
                             f"head of this run does (stages {sorted(widths.values())}); check "
                             f"--arch and --stage_weights")
        state = {(f"deep_heads.stage{k}." + n.split(".", 1)[1] if n.startswith(head + ".") else n): v
                 for n, v in state.items()}
        notes.append(f"the published student's {head} mapped to deep_heads.stage{k} (by width)")
    ckpt["student"] = {"module." + k: v for k, v in state.items()}
    if "loss_center" in ckpt.get("desd_loss", {}):
        ckpt["desd_loss"] = {k: v for k, v in ckpt["desd_loss"].items() if k != "loss_center"}
        notes.append("the published loss's extra loss_center dropped (the loss does not use it)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = ckpt.get("optimizer", {})
    fits = (sum(len(g["params"]) for g in saved.get("param_groups", [])) == len(params)
            and all(int(i) < len(params) and all(
                not torch.is_tensor(v) or v.ndim == 0 or v.shape == params[int(i)].shape
                for v in s.values()) for i, s in saved.get("state", {}).items()))
    if not fits:
        ckpt.pop("optimizer", None)
        notes.append("the published optimizer state does not fit this trainer's parameter "
                     "order: the optimizer starts fresh (resuming is not exact)")
    return notes


def checkpoint_state(args, nets, optimizer, loss_fn, scaler, epoch: int,
                     log: list[dict]) -> dict:
    """What `checkpoint.pth` holds after `epoch`: plain tensors and values only, network
    names as in the released checkpoint (`module.backbone.*`, `module.head.*`)."""
    state = {net: {"module." + k: v for k, v in getattr(nets, net).state_dict().items()}
             for net in ("student", "teacher")}
    state |= {"optimizer": optimizer.state_dict(), "epoch": epoch + 1,
              "args": plain(vars(args)), "desd_loss": loss_fn.state_dict(),
              "rng": gather_rng_states(), "log": log}
    if scaler.is_enabled():
        state["fp16_scaler"] = scaler.state_dict()
    return state


def load_state(ckpt: dict, nets, optimizer, loss_fn, scaler) -> None:
    """Load a checkpoint into the networks, the optimiser, the loss's centre and the fp16
    scaler; a checkpoint of the published release is mapped onto this trainer's names."""
    if any(k.removeprefix("module.").startswith("head_") for k in ckpt["student"]):
        widths = {nets.student.backbone.stage_channels[k - 1]: k for k in nets.student.deep_stages}
        for note in adapt_published_checkpoint(ckpt, widths, optimizer):
            print_rank0(f"resume: {note}")
    for net, key in ((nets.student, "student"), (nets.teacher, "teacher")):
        net.load_state_dict({k.removeprefix("module."): v for k, v in ckpt[key].items()})
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    loss_fn.load_state_dict(ckpt["desd_loss"])
    if "fp16_scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["fp16_scaler"])


def earlier_log(ckpt: dict, out_dir: Path) -> list[dict]:
    """The log rows of the epochs before the checkpoint's: its own record, or for a
    checkpoint without one (the release's, or older) the earlier epochs of log.txt."""
    if "log" in ckpt:
        return list(ckpt["log"])
    old = out_dir / "log.txt"
    return [r for r in (read_log(old) if old.is_file() else []) if r["epoch"] < int(ckpt["epoch"])]


# ----------------------------------------------------------------------------- stopping on a signal

class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except
    Exception` swallows it). `abandoned` names a checkpoint whose write it cut short."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.abandoned = signum, None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_signals = {"defer": 0, "pending": None}


def _on_signal(signum, _frame):
    if _signals["defer"] and _signals["pending"] is None:
        _signals["pending"] = signum  # stop once the save in progress is complete
        return
    raise Stopped(signum)


@contextmanager
def stop_on_signals():
    """While the block runs, SIGINT and SIGTERM raise `Stopped` in the main thread, except
    inside `signals_deferred` (a save), which completes first; a second signal there
    abandons the save (its temporary file is removed). Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _signals.update(defer=0, pending=None)


@contextmanager
def signals_deferred():
    """A block that a first signal does not cut (see `stop_on_signals`): `Stopped` is raised
    when the outermost such block has completed."""
    _signals["defer"] += 1
    try:
        yield
    except BaseException:
        _signals["defer"] -= 1
        if not _signals["defer"]:
            _signals["pending"] = None
        raise
    _signals["defer"] -= 1
    if not _signals["defer"] and _signals["pending"] is not None:
        signum, _signals["pending"] = _signals["pending"], None
        raise Stopped(signum)


def _interruption(e: BaseException | None) -> BaseException | None:
    """The `Stopped` or KeyboardInterrupt in `e`'s chain, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (Stopped, KeyboardInterrupt)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _saved_epoch(path: Path) -> int | None:
    """The `epoch` a checkpoint file records (its tensors memory-mapped, not read), or None."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def stopped_message(stop: Stopped, path: str | os.PathLike) -> str:
    """One line for a run stopped by a signal: the save it abandoned, if any, and the
    checkpoint (`path` or its previous copy) a relaunch resumes from."""
    path = Path(path)
    parts = [f"stopped by {stop.name}"]
    if stop.abandoned is not None:
        parts.append(f"the write of {stop.abandoned} was abandoned and its temporary file removed")
    for candidate in (path, previous_path(path)):
        epoch = _saved_epoch(candidate)
        if epoch is not None:
            parts.append(f"{candidate} (epoch {epoch}) is kept; the same command resumes from it")
            break
    else:
        parts.append("no checkpoint was saved yet")
    return "; ".join(parts)
