"""The trainer's checkpoints: what `checkpoint.pth` holds (plain tensors and values, names
as in the released checkpoint), writing it atomically with the previous one kept, reading
it back with a fallback to that previous one, loading it into the run's objects, and
mapping a checkpoint of the published release onto this trainer's names."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from common import atomic
from models import read_checkpoint
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

    with atomic.atomic_write(path, "wb", before_replace=demote_current) as f:
        torch.save(obj, f)


def previous_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def load_checkpoint_with_fallback(path: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """Load `path`, or its `_prev` copy when `path` is missing, truncated, corrupt (its
    CRCs are checked) or not a training checkpoint; a warning names the file that failed.
    Returns (checkpoint, the file it came from) or (None, None) when there is nothing to
    resume; raises RuntimeError when neither file can be used."""
    path = Path(path)
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = read_checkpoint(candidate)
            if not isinstance(ckpt, dict) or "epoch" not in ckpt:
                raise KeyError("not a DeSD training checkpoint (no 'epoch' entry)")
            return ckpt, candidate
        except Exception as err:  # any failure to read means: try the previous copy
            warnings.warn(f"could not load checkpoint {candidate} ({type(err).__name__}: {err}); "
                          f"trying the previous one", stacklevel=2)
    if path.exists() or previous_path(path).exists():
        raise RuntimeError(f"neither {path} nor {previous_path(path)} could be loaded; move them "
                           f"away to start from scratch, or point --output_dir elsewhere")
    return None, None


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
