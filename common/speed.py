"""What the trainer's speed flags need beyond PyTorch's own: the schedules' values as device
tensors and the training step captured as a CUDA graph (`--cuda_graph`), and the short
measurement behind `--precision auto`. Torch only; imports nothing of the project."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn


class DeviceHyperparameters:
    """The schedules' learning rate, weight decay and teacher momentum as 0-dim tensors on
    the device, written by the host before each step (no sync) and read by the step's
    kernels, so that a step captured as a CUDA graph replays with this iteration's values
    (Python floats would stay those of the capture).

    `set` puts the learning-rate tensor and weight decay 0 on every group of the optimiser
    (torch's SGD and AdamW take a tensor learning rate with `fused=True`, but only a float
    weight decay); `decay_` then applies the weight decay to the first, regularised group
    before the optimiser's step, where torch's optimisers apply it: added to the gradients
    for SGD, the weights multiplied by 1 - lr * wd for AdamW. The host computes in double
    precision as the float path does, and the momentum is kept in float64, so the values
    the kernels see are rounded as on the float path."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        self.lr, self.wd, self.decay = (torch.zeros((), device=device, dtype=dtype) for _ in range(3))
        self.momentum = torch.zeros((), device=device, dtype=torch.float64)

    def set(self, optimizer: torch.optim.Optimizer, lr: float, wd: float, momentum: float) -> None:
        if type(optimizer) not in (torch.optim.SGD, torch.optim.AdamW):
            raise ValueError(f"device-tensor hyperparameters need sgd or adamw, not "
                             f"{type(optimizer).__name__}")
        self.lr.fill_(lr)
        self.wd.fill_(wd)
        self.decay.fill_(1.0 - lr * wd)
        self.momentum.fill_(momentum)
        for group in optimizer.param_groups:  # again after a load_state_dict
            group["lr"] = self.lr
            group["weight_decay"] = 0.0

    @torch.no_grad()
    def decay_(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
        if not params:
            return
        if isinstance(optimizer, torch.optim.AdamW):
            torch._foreach_mul_(params, self.decay)
        else:
            torch._foreach_add_([p.grad for p in params], torch._foreach_mul(params, self.wd))


@torch.no_grad()
def fill_momentum_buffers_(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for the parameters of a fused SGD that have a gradient but no
    buffer yet. Torch's fused SGD fails on such a parameter once the others have buffers
    (the heads' last layer gets its first gradient when --freeze_last_layer ends); a zero
    buffer gives the first step's buffer exactly (0 * momentum + grad = grad)."""
    if not isinstance(optimizer, torch.optim.SGD) or not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if p.grad is not None and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class CudaGraphStep:
    """A fixed-shape training step captured once as a CUDA graph and replayed: one launch
    instead of thousands of kernels per step.

    `run(key, fn, views)` returns `fn(views)`. For a new `key` (the epoch: the teacher
    temperature and the last layer's freeze are fixed within one and are baked into a
    graph) `fn` first runs `warmup` times eagerly on a side stream (cuDNN's autotuner, lazy
    initialisation and compilation happen there), then is captured with static copies of
    the views and replayed; later calls copy the views in and replay. `fn` must read the
    schedules from device tensors (`DeviceHyperparameters`), never synchronise with the
    host and keep its shapes; what it returns is overwritten by the next replay."""

    def __init__(self, warmup: int = 2):
        self.warmup, self.key, self.graph = warmup, None, None
        self.eager_left, self.static_in, self.static_out = 0, None, None

    def run(self, key, fn: Callable, views: list[torch.Tensor]):
        if key != self.key:
            self.key, self.graph, self.static_in, self.static_out = key, None, None, None
            self.eager_left = self.warmup
        if self.graph is None and self.eager_left:
            self.eager_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn(views)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_in = [v.clone() for v in views]
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pinning thread may allocate while this captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_out = fn(self.static_in)
        else:
            for static, v in zip(self.static_in, views):
                static.copy_(v)
        self.graph.replay()
        return self.static_out


AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_precisions(make_net: Callable[[], nn.Module], shapes: Sequence[Sequence[int]],
                    device: torch.device, candidates: Sequence[str], steps: int = 3,
                    warmup: int = 1) -> dict[str, float]:
    """Median seconds of one forward and backward of `make_net()` on random views of
    `shapes` under each candidate precision's autocast. The network is a throwaway, built
    under a forked RNG and freed after: the run's networks and random streams are not
    touched. Eager only (a compiled network would take minutes to measure)."""
    cuda = device.type == "cuda"
    times = {}
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        net = make_net().to(device)
        views = [torch.randn(tuple(s), device=device) for s in shapes]
        for name in candidates:
            secs = []
            for k in range(warmup + steps):
                if cuda:
                    torch.cuda.synchronize(device)  # host sync: a timing, before training
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=AUTOCAST[name] or torch.bfloat16,
                                    enabled=AUTOCAST[name] is not None):
                    out = net(views)
                sum(o.float().mean() for o in out if o is not None).backward()
                net.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(device)
                if k >= warmup:
                    secs.append(time.perf_counter() - t0)
            times[name] = statistics.median(secs)
        del net, views
    if cuda:
        torch.cuda.empty_cache()
    return times


def fastest(times: dict[str, float]) -> str:
    """The key of the smallest time (the first listed on a tie)."""
    return min(times, key=times.get)


def pick_precision(precision: str, device: torch.device, make_net: Callable[[], nn.Module],
                   shapes: Sequence[Sequence[int]], fp16_ok: bool = True) -> str:
    """`precision` unless it is "auto". auto: fp32 on a CPU (bf16 there is slow or emulated);
    on a GPU the faster of fp32 and bf16 (fp16, which needs the gradient scaler, where bf16
    is missing and `fp16_ok`) by `time_precisions`, the times summed over processes so
    that all pick the same; the choice and the times are printed (rank 0)."""
    if precision != "auto" or device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    half = ["bf16"] if torch.cuda.is_bf16_supported() else ["fp16"] if fp16_ok else []
    times = time_precisions(make_net, shapes, device, ["fp32", *half])
    total = torch.tensor(list(times.values()), dtype=torch.float64, device=device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(total)
    times = dict(zip(times, total.tolist()))
    choice = fastest(times)
    if not distributed or torch.distributed.get_rank() == 0:
        print(f"--precision auto: {choice} (" + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in
                                                     times.items()) + " per forward and backward)",
              flush=True)
    return choice
