"""Device time of res3d50's instance norms per training step, by implementation.

    python benchmarks/bench_norm.py                      # GPU: bf16 and fp32, both layouts
    python benchmarks/bench_norm.py --act on --compile off on   # norm + LeakyReLU, fused by compile
    python benchmarks/bench_norm.py --device cpu --batch 2 --crop 16 48 48

The shapes are those every `InstanceNorm3d` of res3d50 sees in the published step (two
16x96x96 global views of a batch of 32: 64 samples), collected with forward hooks. Per
step each norm runs forward with gradients (student) and backward, and forward without
(teacher); the time of that, summed over all norms, is what one implementation costs a
step. Implementations (`InstanceNorm3d(..., impl=...)`, see `models/res3d.py`): `reference`
(PyTorch's own route, a batch norm over an (1, N*C, ...) view), `group_norm` (one channel
per group) and `decomposed` (float32 statistics and one multiply-add in the input's
layout, for torch.compile), checked against each other in float64 first. `--act on`
times each norm followed by its LeakyReLU(0.01), `--compile on` each such pair compiled
(what a compiled network fuses into one pass).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from models import build_backbone  # noqa: E402
from models.res3d import InstanceNorm3d  # noqa: E402

IMPLS = ["reference", "group_norm", "decomposed"]


def norm_shapes(arch: str, batch: int, crop) -> list[tuple[tuple[int, ...], int]]:
    """(input shape, channels) of every InstanceNorm3d, in forward order."""
    net = build_backbone(arch).to("meta")
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape), m.num_features)))
             for m in net.modules() if isinstance(m, InstanceNorm3d)]
    with torch.no_grad():
        net(torch.empty((batch, 1, *crop), device="meta"))
    for h in hooks:
        h.remove()
    return shapes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impl(impl, shapes, device, dtype, channels_last, reps, warmup, act=False,
              compile_=False) -> float:
    """Median seconds of one step's norm work (fwd+bwd with grad, fwd without); with `act`
    each norm is followed by LeakyReLU(0.01), with `compile_` each pair is compiled."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    mods = []
    for _, c in shapes:
        m = InstanceNorm3d(c, affine=True, impl=impl).to(device)
        if act:
            m = torch.nn.Sequential(m, torch.nn.LeakyReLU(0.01))
        mods.append(torch.compile(m) if compile_ else m)
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(s, device=device, generator=g, dtype=dtype).contiguous(memory_format=fmt)
          for s, _ in shapes]
    grads = [torch.randn_like(x) for x in xs]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(
        device.type, enabled=False)
    times = []
    for r in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        for m, x, gy in zip(mods, xs, grads):
            xg = x.detach().requires_grad_()
            with autocast:
                y = m(xg)
            y.backward(gy.to(y.dtype))
            with torch.no_grad(), autocast:
                m(x)
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(shape, channels, device) -> dict[str, float]:
    """Max |out - reference| / max |reference| in float64, forward and input gradient."""
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(device)
    gy = torch.randn_like(x)
    errs, ref = {}, None
    for impl in IMPLS:
        m = InstanceNorm3d(channels, affine=True, impl=impl).to(device, torch.float64)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, channels))
            m.bias.copy_(torch.linspace(-1, 1, channels))
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(gy)
        if ref is None:
            ref = (y.detach(), xg.grad)
        errs[impl] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip((y.detach(), xg.grad), ref))
    return errs


def main(argv=None) -> None:
    p = argparse.ArgumentParser("bench_norm", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="res3d50", help="Backbone whose norms are timed.")
    p.add_argument("--batch", type=int, default=64, help="Samples per forward (published step: 2 x 32).")
    p.add_argument("--crop", type=int, nargs=3, default=[16, 96, 96], metavar=("D", "H", "W"),
                   help="Global view size (published: 16 96 96).")
    p.add_argument("--impl", nargs="+", default=IMPLS, choices=IMPLS,
                   help="Instance-norm routes to time (models.res3d.InstanceNorm3d's impl).")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="Autocast dtypes (default: fp32 bf16 on GPU, fp32 on CPU).")
    p.add_argument("--channels_last", nargs="+", default=None, choices=["off", "on"],
                   help="Layouts (default: off on on GPU, off on CPU).")
    p.add_argument("--act", default="off", choices=["off", "on"],
                   help="Time each norm followed by its LeakyReLU(0.01) (what a step runs).")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="Also time each norm (+ activation) compiled by torch.compile; give "
                        "--warmup >= 2 with 'on' (the first calls compile).")
    p.add_argument("--reps", type=int, default=5, help="Timed repetitions (median reported).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed repetitions first.")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available).")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtypes = args.dtype or (["fp32", "bf16"] if gpu else ["fp32"])
    layouts = args.channels_last or (["off", "on"] if gpu else ["off"])
    shapes = norm_shapes(args.arch, args.batch, args.crop)
    elems = sum(torch.Size(s).numel() for s, _ in shapes)
    errs = check((2, 4, 4, 6, 5), 4, device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"\nInstance norms of {args.arch} per step: {len(shapes)} norms, batch {args.batch}, "
          f"crop {'x'.join(map(str, args.crop))}, {elems / 1e9:.2f} G elements per pass; {name}, "
          f"torch {torch.__version__}")
    print("float64 check, max relative error vs reference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print(f"norm{' + LeakyReLU' if args.act == 'on' else ''}, fwd + bwd + teacher fwd, ms per step")
    print("| dtype | channels_last | compile | " + " | ".join(f"{i} ms" for i in args.impl) + " |")
    print("|---|---|---|" + "---|" * len(args.impl))
    if "on" in args.compile:  # one compiled graph per norm shape: more than dynamo's default
        from torch._dynamo import config as dynamo_config
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 4 * len(shapes))
    for dt in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        for cl in layouts:
            for comp in args.compile:
                ms = [1e3 * time_impl(i, shapes, device, dtype, cl == "on", args.reps, args.warmup,
                                      args.act == "on", comp == "on") for i in args.impl]
                print(f"| {dt} | {cl} | {comp} | " + " | ".join(f"{m:.1f}" for m in ms) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
