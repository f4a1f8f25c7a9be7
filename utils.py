"""Training helpers: distributed set-up, schedules, optimiser pieces, randomness,
checkpoint I/O, the loop's meter and record, device flags, and the default depth and a
checkpoint's depth.

Nothing here starts work at import time. Everything works in one process without a
process group; collectives are only called when `torch.distributed` is initialised.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common import atomic, cli
from common.speed import CudaGraphStep, DeviceHyperparameters, fill_momentum_buffers_
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


def print_rank0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


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
    def update(self, momentum: float | torch.Tensor) -> None:
        """One pass over memory. A 0-dim float64 device tensor `momentum` is read on the
        device (what a captured CUDA graph needs); 1 - m is then rounded as on the float
        path, so both give the same bits."""
        if isinstance(momentum, torch.Tensor):
            weight = (1.0 - momentum).to(self.t[0].dtype)
            torch._foreach_lerp_(self.t, self.s, [weight] * len(self.t))
        else:
            torch._foreach_lerp_(self.t, self.s, 1.0 - momentum)


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


def gather_rng_states() -> list[dict]:
    state = rng_state()
    if not is_dist():
        return [state]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def sub_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, rank, epoch, iteration ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def seed_worker(worker_id: int, base_seed: int) -> None:
    """DataLoader worker_init_fn (use with functools.partial): global RNGs of each worker
    seeded apart. The dataset itself draws from per-sample streams."""
    seed_everything(sub_seed(base_seed, worker_id))


# ----------------------------------------------------------------------------- the training loop

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


class NonFinite(RuntimeError):
    """The loss or the weights became NaN/inf."""


class Meter:
    """The logged values of one epoch: running sums kept on the device, the first
    iteration whose loss was not finite, and the progress line every `print_freq` steps,
    the only host sync of the loop (agreed by all processes, so all stop together)."""

    def __init__(self, niter: int, print_freq: int, samples_per_step: int, device: torch.device):
        self.niter, self.print_freq, self.samples_per_step = niter, print_freq, samples_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.t_last, self.steps_since = time.time(), 0

    def update(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        """Add step `i`'s values (device tensors; nothing is read back here)."""
        bad = ~torch.isfinite(terms["total_loss"]) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, i), self.first_bad)
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps_since += 1

    def maybe_report(self, epoch: int, i: int, lr: float, wd: float) -> None:
        """At the end of a print interval: raise `NonFinite` if any process saw a non-finite
        loss, else print the running loss and the rate (rank 0)."""
        if (i + 1) % self.print_freq and i + 1 != self.niter:
            return
        # host sync: once per print interval
        bad_at = int(all_reduce_(self.first_bad.clone(), dist.ReduceOp.MAX if is_dist() else None).item())
        if bad_at >= 0:
            raise NonFinite(f"non-finite loss at epoch {epoch}, iteration {bad_at} (on at least "
                            f"one process); training stopped, the last good checkpoint is left "
                            f"untouched")
        if is_main_process():
            now = time.time()
            rate = self.steps_since * self.samples_per_step / max(now - self.t_last, 1e-9)
            print(f"epoch {epoch} [{i + 1}/{self.niter}] loss "
                  f"{self.sums['total_loss'].item() / (i + 1):.4f} lr {lr:.3g} wd {wd:.3g} "
                  f"{rate:.1f} samples/s", flush=True)
            self.t_last, self.steps_since = now, 0

    def means(self) -> dict[str, float]:
        """`train_<name>`: the epoch mean of every value over all steps and processes."""
        names = sorted(self.sums)  # the same on every process
        total = all_reduce_(torch.stack([self.sums[k] for k in names]))
        return {f"train_{k}": v for k, v in zip(names, (total / (self.niter * get_world_size())).tolist())}


class StepRunner:
    """How one optimisation step runs, from the flags: the views' device augmentation and
    memory format, autocast, the fp16 gradient scaler, clipping and the last layer's
    freeze; with --cuda_graph the schedules' values as device tensors (`device_values`)
    and the step captured once per epoch and replayed (`run`). main_desd's
    `train_one_epoch` calls `views`, `run`, `autocast` and `backward`."""

    def __init__(self, args, device: torch.device, rank: int, augment=None):
        self.device, self.rank, self.seed = device, rank, args.seed
        self.amp_dtype = set_precision(args.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.augment = augment  # batched intensity augmentation on the device, or None
        self.aug_gen = torch.Generator(device=device)
        self.memory_format = (torch.channels_last_3d if args.channels_last and device.type == "cuda"
                              else torch.contiguous_format)
        self.clip_grad, self.freeze_last_layer = args.clip_grad, args.freeze_last_layer
        self.print_freq, self.batch_size = args.print_freq, args.batch_size_per_gpu
        self.device_values = self.graph = None
        if args.cuda_graph:
            if device.type != "cuda" or is_dist():
                raise ValueError("--cuda_graph needs one process on a CUDA device; run without "
                                 "it on a CPU or with several processes")
            self.device_values, self.graph = DeviceHyperparameters(device), CudaGraphStep()

    def views(self, views: list[torch.Tensor], epoch: int, i: int) -> list[torch.Tensor]:
        """Batched intensity augmentation on the device (seeded per step), then the layout."""
        if self.augment is not None:
            self.aug_gen.manual_seed(sub_seed(self.seed, self.rank, epoch, i))
            with torch.no_grad():
                views = self.augment(views, self.aug_gen)
        return [v.contiguous(memory_format=self.memory_format) for v in views]

    def run(self, epoch: int, step_fn, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`step_fn(views)`: eagerly, or (--cuda_graph) captured once per epoch and replayed."""
        return step_fn(views) if self.graph is None else self.graph.run(epoch, step_fn, views)

    def autocast(self):
        # a graph must not keep autocast's cache of cast weights from its capture
        return (torch.autocast(self.device.type, dtype=self.amp_dtype,
                               cache_enabled=self.graph is None) if self.amp_dtype
                else nullcontext())

    def backward(self, loss: torch.Tensor, optimizer, student: nn.Module, epoch: int) -> None:
        """Gradients of `loss`, clipped, the last layer frozen in the first epochs, one
        optimiser step (skipped by the fp16 scaler on overflow)."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(optimizer)
            clip_gradients(student, self.clip_grad)
        cancel_gradients_last_layer(epoch, student, self.freeze_last_layer)
        if self.device_values is not None:  # the groups' weight decay is 0: applied here
            self.device_values.decay_(optimizer)
        fill_momentum_buffers_(optimizer)  # fused SGD only
        self.scaler.step(optimizer)
        self.scaler.update()


def all_finite(*modules: nn.Module) -> bool:
    """True when every parameter of `modules` is finite on every process (one fused norm,
    one all-reduce, one host sync: call once per epoch)."""
    params = [p.detach() for m in modules for p in m.parameters()]
    ok = torch.stack(torch._foreach_norm(params)).isfinite().all().to(torch.int32)
    return bool(all_reduce_(ok, dist.ReduceOp.MIN if is_dist() else None))


# ----------------------------------------------------------------------------- the run's record

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
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

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


# ----------------------------------------------------------------------------- devices (the example, the probes, the benchmarks)

def add_device_args(p) -> None:
    """--device and --threads, as the example and the tools take them."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; bf16 autocast is used on CUDA")
    p.add_argument("--threads", "--num_threads", default=0, type=cli.int_at_least(0),
                   help="CPU threads for PyTorch (0: PyTorch's default)")


def setup_device(args) -> torch.device:
    """The device of `add_device_args`' flags, with the thread count applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def check_patch_size(parser, arch: str, patch_size, flag: str = "--patch_size") -> None:
    """parser.error unless a `patch_size` input keeps more than one voxel at stage 4."""
    from models import ResUNet3D
    try:
        with torch.device("meta"):  # shapes only
            ResUNet3D(arch).check_input_size(patch_size)
    except ValueError as e:
        parser.error(f"{flag}: {e}")


# ----------------------------------------------------------------------------- depth (default, a checkpoint's)

# The one default depth of the trainer, finetune_example.py and the tools: the published
# run's and the released weights' (DeSD_Res50). Tools given a checkpoint read its depth.
DEFAULT_ARCH = "res3d50"


def checkpoint_arch(path: str | os.PathLike, which: str | None = None,
                    checkpoint=None) -> str | None:
    """The `res3d*` depth of a checkpoint's backbone (main_desd.py's checkpoint.pth, the
    released checkpoint, a `.safetensors` backbone, a bare or fine-tuned state dict): what
    its args or metadata say (`models.declared_arch`) and what its tensors are
    (`models.infer_arch`); None when neither tells. ValueError naming the file when the
    two disagree. `checkpoint`: the file already read (`models.read_checkpoint`), if it is."""
    from models import declared_arch, extract_backbone_state, infer_arch, load_safetensors
    path = Path(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state, source = extract_backbone_state(checkpoint, which)
    meta = load_safetensors(path)[1] if path.suffix == ".safetensors" else None
    declared, inferred = declared_arch(checkpoint, meta), infer_arch(state)
    if declared and inferred and declared != inferred:
        raise ValueError(f"{path}: its args/metadata say {declared} but the tensors of its "
                         f"{source} are {inferred}; the file is inconsistent, use another one")
    return declared or inferred


def resolve_arch(arch: str | None, checkpoints, which: str | None = None) -> str:
    """The depth to build for `checkpoints` (paths): theirs (`checkpoint_arch`), which must
    be one depth; an explicit `arch` that differs is refused (ValueError naming the file);
    `arch`, else `DEFAULT_ARCH`, when there is no checkpoint. A checkpoint whose depth
    cannot be told needs `arch` (loading it then says what does not fit)."""
    found = {str(c): checkpoint_arch(c, which) for c in checkpoints}
    unknown = [c for c, a in found.items() if a is None]
    if unknown and arch is None:
        raise ValueError(f"{unknown[0]}: cannot tell the depth of its backbone (no arch in its "
                         f"args or metadata, and its tensor names and shapes are no res3d* "
                         f"depth); is it a DeSD backbone? Pass --arch to try loading it")
    depths = sorted({a for a in found.values() if a is not None})
    if len(depths) > 1:
        raise ValueError("the checkpoints are of different depths (" + ", ".join(
            f"{c}: {a}" for c, a in found.items()) + "); use them in separate calls")
    if depths and arch is not None and arch != depths[0]:
        path = next(c for c, a in found.items() if a is not None)
        raise ValueError(f"{path}: the checkpoint's backbone is {depths[0]} but --arch is "
                         f"{arch}; leave --arch out (it is read from the checkpoint) or pass "
                         f"another checkpoint")
    return depths[0] if depths else (arch or DEFAULT_ARCH)


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
