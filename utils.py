"""Training helpers: distributed set-up, schedules, optimiser pieces, checkpoint I/O.

Nothing here starts work at import time. Everything works in one process without a
process group; collectives are only called when `torch.distributed` is initialised.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from volume_io import fsync_path

# ----------------------------------------------------------------------------- flags


def bool_flag(s: str) -> bool:
    """argparse type for the published `--flag True/False` style."""
    if s.lower() in {"off", "false", "0", "no"}:
        return False
    if s.lower() in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value {s!r} for a boolean flag (use True or False)")


# ----------------------------------------------------------------------------- distributed


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(dist_url: str = "env://", timeout_minutes: float = 30.0) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun or SLURM; otherwise one process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under SLURM (`srun python main_desd.py`)
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are used (MASTER_ADDR/MASTER_PORT must be set
    for several nodes; 127.0.0.1:29500 is assumed on one node). Backend NCCL on CUDA, gloo
    on CPU. Returns (rank, world_size, device).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    else:
        rank, world, local = 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                init_method=dist_url, world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world, device


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op in one process."""
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- schedules


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up from `start_warmup_value` to `base_value`,
    then `final + (base - final)/2 * (1 + cos(pi * i / n))` over the remaining iterations."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ----------------------------------------------------------------------------- optimisation


def get_params_groups(model: nn.Module) -> list[dict]:
    """Weights regularised; biases and 1-D parameters (norms) not (weight decay 0)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as used by
    DINO for ResNets: the update of every parameter with more than one dimension is rescaled
    by `eta * ||p|| / ||g + wd * p||`; 1-D parameters get plain momentum SGD."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    trust = torch.where(p_norm > 0,
                                        torch.where(u_norm > 0, group["eta"] * p_norm / u_norm, one), one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter's gradient to norm `clip` separately (the DINO/DeSD rule), with
    one fused norm over all gradients and no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the heads' last-layer gradients during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


# ----------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def sub_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, rank, epoch, iteration ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def seed_worker(worker_id: int, base_seed: int) -> None:
    """DataLoader worker_init_fn (use with functools.partial): global RNGs of each worker
    seeded apart. The dataset itself draws from per-sample streams."""
    seed_everything(sub_seed(base_seed, worker_id))


# ----------------------------------------------------------------------------- checkpoints


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


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load` with `weights_only=True`; the published checkpoints' `argparse.Namespace`
    is the one extra class allowed. Never falls back to unrestricted unpickling."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write `obj` with torch.save so that `path` is always a complete file.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and the
    file is renamed over `path` (atomic on POSIX). With `keep_previous`, the file that was
    at `path` is first kept as `<stem>_prev<suffix>` through a hard link, so `path` exists
    at every instant and a good previous copy survives a checkpoint that later turns bad.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            prev = previous_path(path)
            prev_tmp = prev.with_name(f".{prev.name}.tmp.{os.getpid()}")
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:  # file systems without hard links
                import shutil
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


def previous_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def load_checkpoint_with_fallback(path: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """Load `path`, or its `_prev` copy when `path` is missing or fails to load for any
    reason (truncation raises EOFError, RuntimeError, struct.error ...). Returns
    (checkpoint, the file it came from) or (None, None) when there is nothing to resume."""
    path = Path(path)
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = safe_load(candidate)
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


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


# ----------------------------------------------------------------------------- misc


def print_rank0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def machine_description() -> str:
    """One line naming CPU model, cores and GPU (for benchmark tables)."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {sys.version.split()[0]}"

