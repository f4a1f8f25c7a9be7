"""Training helpers: distributed set-up, schedules, optimiser pieces, checkpoint I/O.

Nothing here starts work at import time. Everything works in one process without a
process group; collectives are only called when `torch.distributed` is initialised.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import volume_io
from models import read_checkpoint

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


class TeacherEMA:
    """`t <- m t + (1 - m) s` for every teacher parameter, paired with the student's
    parameter of the same name, in one fused `_foreach` call."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_params = dict(student.named_parameters())
        t_named = list(teacher.named_parameters())
        missing = [n for n, _ in t_named if n not in s_params]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        for n, t in t_named:
            if s_params[n].shape != t.shape:
                raise ValueError(f"shape mismatch for {n}: student {tuple(s_params[n].shape)}, "
                                 f"teacher {tuple(t.shape)}")
        self.t = [t for _, t in t_named]
        self.s = [s_params[n] for n, _ in t_named]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        torch._foreach_lerp_(self.t, self.s, 1.0 - momentum)  # one pass over memory


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


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write `obj` with torch.save so that `path` is always a complete file.

    The bytes go through `volume_io.atomic_write` (a temporary file in the same folder,
    fsynced, renamed over `path`; a full disk raises `volume_io.WriteError` naming
    `path`). With `keep_previous`, the file that was at `path` is first kept as
    `<stem>_prev<suffix>` through a hard link, so `path` exists at every instant and a
    good previous copy survives a checkpoint that later turns out bad.
    """
    path = Path(path)

    def demote_current(_tmp):  # the new file is complete on disk: keep the one it replaces
        if keep_previous and path.exists():
            with volume_io.atomic_output(previous_path(path)) as prev_tmp:
                try:
                    os.link(path, prev_tmp)
                except OSError:  # file systems without hard links
                    shutil.copy2(path, prev_tmp)

    with volume_io.atomic_write(path, "wb", before_replace=demote_current) as f:
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


# ----------------------------------------------------------------------------- the training loop

def read_log(path: str | os.PathLike) -> list[dict]:
    """The epochs of a main_desd.py `log.txt` (or of the `log.txt` in a folder), in order.

    An epoch logged twice keeps its last line.
    Raises FileNotFoundError or ValueError naming the file when it is missing, empty or
    not JSON lines.
    """
    path = Path(path)
    if not path.is_file() and path.suffix != ".txt":  # an OUTPUT_DIR, existing or not
        path = path / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the --output_dir of a "
                                f"main_desd.py run (it writes log.txt after each epoch)")
    by_epoch: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e}); is it a main_desd.py "
                             f"log.txt?") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {n} is not a JSON object")
        by_epoch[int(record.get("epoch", len(by_epoch)))] = record
    if not by_epoch:
        raise ValueError(f"{path} is empty: no epoch of that run has finished yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def view_retrieval(emb_a: torch.Tensor, emb_b: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Label-free learning signal: row i of `emb_a` and of `emb_b` ([N, C]) embed two views
    of sample i; for each of the 2N embeddings, where does its partner rank among the other
    2N - 1 by cosine similarity? Returns `top{k}` (the fraction with the partner among the k
    nearest) and its chance level `chance{k}` = k / (2N - 1). Ties count in expectation: a
    partner tied with t others is in the top k with probability (k - g) / (t + 1), g being
    the number strictly closer, so a constant embedding scores chance, not 1."""
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or len(emb_a) < 2:
        raise ValueError(f"need two [N, C] tensors of one shape with N >= 2, got "
                         f"{tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    n = len(emb_a)
    e = torch.nn.functional.normalize(torch.cat([emb_a, emb_b]).double(), dim=1)
    sim = e @ e.T
    idx = torch.arange(2 * n)
    partner = (idx + n) % (2 * n)
    others = torch.ones_like(sim, dtype=torch.bool)
    others[idx, idx] = others[idx, partner] = False
    s_p = sim[idx, partner].unsqueeze(1)
    tol = 1e-9  # cosines of equal vectors can differ in the last bits
    closer = ((sim > s_p + tol) & others).sum(1).double()
    tied = (((sim - s_p).abs() <= tol) & others).sum(1).double()
    out = {}
    for k in ks:
        out[f"top{k}"] = float(((k - closer) / (tied + 1)).clamp(0, 1).mean())
        out[f"chance{k}"] = min(1.0, k / (2 * n - 1))
    return out


@torch.no_grad()
def retrieval_by_stage(backbone: nn.Module, pairs: tuple[torch.Tensor, torch.Tensor],
                       device: torch.device, batch_size: int = 16, ks=(1, 5)) -> dict[str, float]:
    """`view_retrieval` of the four pooled stage features of a frozen `ResNet3D` on the
    view pairs of `data_loader_ssl.retrieval_pairs`: `retrieval_top{k}_stage{s}` and
    `retrieval_chance{k}`."""
    was_training = backbone.training
    backbone.eval()
    embeds = []
    for views in pairs:
        stages = [[] for _ in range(4)]
        for start in range(0, len(views), batch_size):
            for s, f in enumerate(backbone(views[start:start + batch_size].to(device))):
                stages[s].append(f.float().cpu())  # host sync: once per batch, once per epoch
        embeds.append([torch.cat(s) for s in stages])
    backbone.train(was_training)
    out = {}
    for s in range(4):
        r = view_retrieval(embeds[0][s], embeds[1][s], ks)
        out |= {f"retrieval_top{k}_stage{s + 1}": r[f"top{k}"] for k in ks}
    return out | {f"retrieval_chance{k}": r[f"chance{k}"] for k in ks}


def check_collapse(stats: dict[str, float], out_dim: int) -> list[str]:
    """DINO's collapse signatures: a uniform or a one-hot teacher, a student equal to it."""
    warns = []
    ln_k = math.log(out_dim)
    h = stats.get("teacher_entropy")
    if h is not None and h > 0.99 * ln_k:
        warns.append(f"teacher entropy {h:.3f} > 0.99 ln(out_dim) = {0.99 * ln_k:.3f}: the teacher "
                     f"is uniform (collapse); lower --teacher_temp or check the centering")
    if h is not None and h < 0.01 * ln_k:
        warns.append(f"teacher entropy {h:.4f} < 0.01 ln(out_dim) = {0.01 * ln_k:.4f}: the teacher "
                     f"is one-hot (collapse to one prototype)")
    for k in range(1, 5):
        kl = stats.get(f"kl_stage{k}")
        if kl is not None and kl < 1e-3:
            warns.append(f"KL(teacher || student) on stage {k} is {kl:.2e} < 1e-3: the student "
                         f"copies the teacher (collapse)")
    return warns


def set_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Apply `--precision` on `device`; returns the autocast dtype (None = no autocast:
    fp32, tf32). Process-wide: TF32 for fp32 matrix products with tf32 only (fp32 keeps
    PyTorch's defaults), and cuDNN's autotuner on CUDA (the crop sizes are fixed)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def gather_rng_states() -> list[dict]:
    state = rng_state()
    if not is_dist():
        return [state]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


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


def all_finite(*modules: nn.Module) -> bool:
    """True when every parameter of `modules` is finite on every process (one fused norm,
    one all-reduce, one host sync: call once per epoch)."""
    params = [p.detach() for m in modules for p in m.parameters()]
    ok = torch.stack(torch._foreach_norm(params)).isfinite().all().to(torch.int32)
    return bool(all_reduce_(ok, dist.ReduceOp.MIN if is_dist() else None))


def to_device(loader, device: torch.device):
    """Yield the loader's batches on `device`. On CUDA the next batch is copied on a side
    stream while the current step runs (same-stream copies would wait for the step)."""
    if device.type != "cuda":
        for views in loader:
            yield [v.to(device) for v in views]
        return
    stream = torch.cuda.Stream(device)
    batches = iter(loader)

    def copy_next():
        views = next(batches, None)
        if views is None:
            return None
        with torch.cuda.stream(stream):
            return [v.to(device, non_blocking=True) for v in views]

    nxt = copy_next()
    while nxt is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for v in nxt:
            v.record_stream(current)  # the caching allocator must not reuse it early
        views, nxt = nxt, copy_next()
        yield views


# ----------------------------------------------------------------------------- misc


def add_device_args(p) -> None:
    """--device and --threads, as the example and the tools take them."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; bf16 autocast is used on CUDA")
    p.add_argument("--threads", "--num_threads", default=0, type=volume_io.int_at_least(0),
                   help="CPU threads for PyTorch (0: PyTorch's default)")


def check_patch_size(parser, arch: str, patch_size, flag: str = "--patch_size") -> None:
    """parser.error unless a `patch_size` input keeps more than one voxel at stage 4."""
    from models import ResUNet3D
    try:
        with torch.device("meta"):  # shapes only
            ResUNet3D(arch).check_input_size(patch_size)
    except ValueError as e:
        parser.error(f"{flag}: {e}")


def setup_device(args) -> torch.device:
    """The device of `add_device_args`' flags, with the thread count applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


class RunLog:
    """What rank 0 reports of a run: `log.txt` (one JSON line per epoch, rewritten from the
    checkpoint's own record so that it always matches the checkpoint it belongs to, after
    a kill or a fallback too), the epoch's console line, the collapse warnings and, with
    `tensorboard`, TensorBoard scalars (a warning when the package is missing)."""

    def __init__(self, out_dir: str | os.PathLike, out_dim: int, tensorboard: bool = False):
        self.path, self.out_dim, self.writer = Path(out_dir) / "log.txt", out_dim, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:
                warnings.warn("--tensorboard given but the tensorboard package is not "
                              "installed; pip install tensorboard")

    def rewrite(self, rows: list[dict]) -> None:
        volume_io.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def epoch_done(self, rows: list[dict]) -> None:
        """Rewrite log.txt with `rows` and report the last one."""
        self.rewrite(rows)
        row, epoch = rows[-1], rows[-1]["epoch"]
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, epoch)
            self.writer.flush()
        print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items() if k != "epoch"), flush=True)
        for w in check_collapse({k.removeprefix("train_"): v for k, v in row.items()}, self.out_dim):
            print(f"WARNING (epoch {epoch}): {w}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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

