"""The faster routes to the same function (issue 23), each against the plain computation on
the CPU: the stem convolution folded into a 2D convolution, the layout-keeping instance
norm, the fused optimiser, the EMA and the optimiser with device-tensor hyperparameters
(what a captured CUDA graph needs). Float64 where the route is exact up to summation
order; the bound is stated where it is not bitwise."""
import pytest
import torch
import torch.nn.functional as F

from models import build_backbone
from models.res3d import NORM_IMPLS, STEM_IMPLS, InstanceNorm3d, StemConv3d

CL = torch.channels_last_3d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------- stem


def _stem_case(cin, kernel, stride, padding, size, impl, channels_last=False, seed=0):
    """(route's output, grad input, grad weight), (F.conv3d's), in float64."""
    g = torch.Generator().manual_seed(seed)
    conv = StemConv3d(cin, 6, kernel_size=kernel, stride=stride, padding=padding, bias=False,
                      impl=impl).double()
    x = torch.randn((2, cin, *size), generator=g, dtype=torch.float64)
    gy_shape = F.conv3d(x, conv.weight, None, stride, padding).shape
    gy = torch.randn(gy_shape, generator=g, dtype=torch.float64)
    if channels_last:
        conv = conv.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    results = []
    for fn in (conv, lambda t: F.conv3d(t, conv.weight, None, stride, padding)):
        conv.weight.grad = None
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.backward(gy)
        results.append((y.detach(), xg.grad, conv.weight.grad.clone()))
    return results


@pytest.mark.parametrize("stride", [(1, 2, 2), (1, 1, 1), (2, 2, 2), (2, 1, 3), (3, 2, 1)])
@pytest.mark.parametrize("cin", [1, 3])
def test_folded_stem_equals_conv3d_in_float64(stride, cin):
    """Output and the gradients for input and weight, odd sizes, every stride (the depth
    stride too); the published 7x7x7 stem with padding 3 and a non-cubic kernel."""
    for kernel, padding in ((7, 3), ((3, 5, 7), (1, 0, 2))):
        got, want = _stem_case(cin, kernel, stride, padding, (9, 13, 11), "conv2d")
        for a, b, what in zip(got, want, ("output", "grad input", "grad weight")):
            assert a.shape == b.shape, what
            assert _rel(a, b) < 1e-12, (what, kernel, stride, cin)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_stem_keeps_the_model_layout(channels_last):
    """A channels_last_3d model gets a channels_last_3d stem output without a copy, a
    contiguous model a contiguous one; both equal F.conv3d."""
    got, want = _stem_case(1, 7, (1, 2, 2), 3, (5, 12, 10), "conv2d", channels_last)
    y = got[0]
    assert y.is_contiguous(memory_format=CL) == channels_last
    assert y.is_contiguous() == (not channels_last)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-12


def test_folded_stem_takes_one_conv2d_and_falls_back_where_it_does_not_apply(monkeypatch):
    calls = []
    conv2d, conv3d = F.conv2d, F.conv3d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append("2d") or conv2d(*a, **k))
    monkeypatch.setattr(F, "conv3d", lambda *a, **k: calls.append("3d") or conv3d(*a, **k))
    x = torch.randn(1, 2, 5, 8, 8, dtype=torch.float64)
    folded = StemConv3d(2, 4, 3, padding=1, bias=False, impl="conv2d").double()
    assert folded.foldable(x)
    folded(x)
    assert calls == ["2d"]
    # dilation, groups, 'same' padding, reflect padding, unbatched input: the plain route
    cases = [(dict(dilation=2, padding=2), x), (dict(groups=2, padding=1), x),
             (dict(padding="same"), x), (dict(padding=1, padding_mode="reflect"), x),
             (dict(padding=1), x[0])]
    for kw, inp in cases:
        calls.clear()
        conv = StemConv3d(2, 4, 3, bias=False, impl="conv2d", **kw).double()
        plain = torch.nn.Conv3d(2, 4, 3, bias=False, **kw).double()
        plain.load_state_dict(conv.state_dict())
        assert not conv.foldable(inp), kw
        y = conv(inp)
        assert "2d" not in calls, kw
        assert torch.equal(y, plain(inp)), kw


def test_folded_stem_with_bias():
    conv = StemConv3d(1, 4, 3, stride=(1, 2, 2), padding=1, bias=True, impl="conv2d").double()
    x = torch.randn(2, 1, 4, 7, 9, dtype=torch.float64)
    assert _rel(conv(x), F.conv3d(x, conv.weight, conv.bias, (1, 2, 2), 1)) < 1e-12


def test_unknown_routes_list_the_choices():
    with pytest.raises(ValueError, match="conv3d, conv2d"):
        StemConv3d(1, 4, 3, impl="fft")
    with pytest.raises(ValueError, match="auto, reference, group_norm, decomposed"):
        InstanceNorm3d(4, affine=True, impl="fast")
    with pytest.raises(ValueError, match="conv3d, conv2d"):
        build_backbone("res3d10", stem="winograd")


# ----------------------------------------------------------------------------- norm


@pytest.mark.parametrize("size", [(1, 3, 3), (3, 1, 1), (2, 5, 7), (4, 6, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_decomposed_norm_and_activation_equal_instance_norm_in_float64(size, channels_last):
    """InstanceNorm3d(impl='decomposed') + LeakyReLU(0.01) against F.instance_norm +
    F.leaky_relu: output and the gradients for input, weight and bias; maps as small as
    1x3x3; a channels_last_3d input stays channels_last_3d (no layout conversion)."""
    g = torch.Generator().manual_seed(1)
    c = 4
    x = (torch.randn((2, c, *size), generator=g, dtype=torch.float64) * 3 + 2)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    norm = InstanceNorm3d(c, affine=True, impl="decomposed").double()
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    act = torch.nn.LeakyReLU(0.01, inplace=True)
    xg = x.clone().requires_grad_()
    y = act(norm(xg))
    y.backward(gy)
    got = (y.detach(), xg.grad, norm.weight.grad, norm.bias.grad)
    if channels_last and size[0] * size[1] * size[2] > 1:
        assert y.is_contiguous(memory_format=CL) and xg.grad.is_contiguous(memory_format=CL)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yr = F.leaky_relu(F.instance_norm(xr, weight=wr, bias=br, eps=1e-5), 0.01)
    yr.backward(gy)
    for a, want, what in zip(got, (yr.detach(), xr.grad, wr.grad, br.grad),
                             ("output", "grad input", "grad weight", "grad bias")):
        assert a.shape == want.shape and a.dtype == want.dtype, what
        assert _rel(a, want) < 1e-10, (what, size)


def test_decomposed_norm_keeps_the_input_dtype_under_autocast():
    """Statistics in float32, the output in the activations' dtype (half the bytes of a
    float32 output) and close to the float32 norm."""
    norm = InstanceNorm3d(3, affine=True, impl="decomposed")
    x = torch.randn(2, 3, 4, 6, 6) * 5 + 3
    with torch.no_grad():
        want = F.instance_norm(x, weight=norm.weight, bias=norm.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert float((y.detach().float() - want).abs().max()) < 0.05


def test_routes_are_chosen_per_network_not_per_process():
    """Two networks built with different routes each keep theirs (no class attribute),
    have the same state-dict names and shapes, and give the same output in float64."""
    torch.manual_seed(0)
    plain = build_backbone("res3d10").double()
    fast = build_backbone("res3d10", stem="conv2d", norm_impl="decomposed").double()
    ref = build_backbone("res3d10", norm_impl="reference").double()
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in fast.state_dict().items()}
    fast.load_state_dict(plain.state_dict())
    ref.load_state_dict(plain.state_dict())
    norms = {net: {m.impl for m in net.modules() if isinstance(m, InstanceNorm3d)}
             for net in (plain, fast, ref)}
    assert norms == {plain: {"auto"}, fast: {"decomposed"}, ref: {"reference"}}
    assert (plain.conv1.impl, fast.conv1.impl) == ("conv3d", "conv2d")
    assert not hasattr(InstanceNorm3d, "impl") and not hasattr(StemConv3d, "impl")
    x = torch.randn(2, 1, 16, 40, 36, dtype=torch.float64)
    want = plain(x)
    for net in (fast, ref):
        for a, b in zip(net(x), want):
            assert _rel(a, b) < 1e-10
    assert set(NORM_IMPLS) == {"auto", "reference", "group_norm", "decomposed"}
    assert set(STEM_IMPLS) == {"conv3d", "conv2d"}


# ----------------------------------------------------------------------------- optimiser and EMA

import main_desd  # noqa: E402
import utils  # noqa: E402
from common import speed  # noqa: E402

# a changing schedule, as the trainer's warm-up and cosines give it
LRS = [0.0, 0.1, 0.3, 0.2, 0.05, 0.4, 0.25]
WDS = [0.04, 0.1, 0.2, 0.3, 0.35, 0.4, 0.4]
MOMENTA = [0.996, 0.9965, 0.997, 0.998, 0.999, 0.9995, 1.0]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(37, 5, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(2, 3, 3, 3, 3, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(11, generator=g, dtype=dtype).requires_grad_()]


def _optimise(kind: str, dtype, route: str) -> list[torch.Tensor]:
    """Weights after len(LRS) steps on fixed gradients. route: 'float' (today: floats set on
    the groups), 'fused' (the same with fused=True), 'tensor' (DeviceHyperparameters: the
    learning rate and weight decay as 0-dim tensors, what a captured graph reads)."""
    params = _params(dtype)
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    opt_cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    if route == "float":
        opt = opt_cls(groups, lr=0.0, **extra)
    else:
        lr = torch.zeros((), dtype=dtype) if route == "tensor" else 0.0
        opt = opt_cls(groups, lr=lr, fused=True, **extra)
    hyper = speed.DeviceHyperparameters(torch.device("cpu"), dtype) if route == "tensor" else None
    g = torch.Generator().manual_seed(1)
    for lr, wd in zip(LRS, WDS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        if hyper is None:
            for j, group in enumerate(opt.param_groups):
                group["lr"] = lr
                if j == 0:
                    group["weight_decay"] = wd
        else:
            hyper.set(opt, lr, wd, 0.996)
            hyper.decay_(opt)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_fused_and_device_tensor_optimisers_give_todays_weights(kind, dtype, bound):
    """Bound: the routes differ only in rounding (a fused kernel contracts a multiply and
    an add); after 7 steps each weight is within `bound` x the largest weight of today's."""
    want = _optimise(kind, dtype, "float")
    for route in ("fused", "tensor"):
        got = _optimise(kind, dtype, route)
        for a, b in zip(got, want):
            assert _rel(a, b) <= bound, (kind, route, _rel(a, b))
    moved = _params(dtype)
    assert all(_rel(a, b) > 1e-3 for a, b in zip(want, moved))  # the steps did move the weights


def test_fused_sgd_takes_a_parameter_whose_first_gradient_comes_late():
    """The heads' last layer has no gradient while --freeze_last_layer lasts; torch's fused
    SGD then fails on its first gradient. With zero buffers filled in, fused and today's
    SGD give the same weights."""
    results = []
    for fused in (None, True):
        params = _params(torch.float32)
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=fused)
        g = torch.Generator().manual_seed(2)
        for k in range(4):
            for j, p in enumerate(params):
                p.grad = None if (j == 1 and k < 2) else torch.randn(p.shape, generator=g)
            speed.fill_momentum_buffers_(opt)
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        assert _rel(a, b) <= 1e-6
    plain = torch.optim.SGD(_params(torch.float32), lr=0.1, momentum=0.9)
    speed.fill_momentum_buffers_(plain)  # not fused: left alone
    assert not plain.state


def test_device_hyperparameters_survive_a_resume():
    """After load_state_dict (whose groups hold a float learning rate) `set` puts the
    device tensors back on the groups, so a graph captured later reads them."""
    params = _params(torch.float32)
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                          lr=torch.zeros(()), momentum=0.9, fused=True)
    hyper = speed.DeviceHyperparameters(torch.device("cpu"))
    saved = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.5,
                            momentum=0.9).state_dict()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.5
    hyper.set(opt, 0.25, 0.1, 0.99)
    assert all(g["lr"] is hyper.lr and g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert float(hyper.lr) == 0.25 and float(hyper.wd) == pytest.approx(0.1)
    assert float(hyper.momentum) == 0.99 and hyper.momentum.dtype == torch.float64
    with pytest.raises(ValueError, match="sgd or adamw"):
        hyper.set(utils.LARS(params), 0.1, 0.1, 0.99)


def test_ema_with_a_device_weight_equals_the_float_update_bitwise():
    """The teacher's EMA is one `_foreach_lerp_`; with the momentum in a float64 device
    tensor (what a captured graph reads) it is bit for bit today's update."""
    torch.manual_seed(0)
    student = build_backbone("res3d10")
    teachers = [build_backbone("res3d10"), build_backbone("res3d10")]
    for t in teachers:
        t.load_state_dict(teachers[0].state_dict())
    emas = [utils.TeacherEMA(student, t) for t in teachers]
    momentum = torch.zeros((), dtype=torch.float64)
    for m in MOMENTA:
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        emas[0].update(m)
        momentum.fill_(m)
        emas[1].update(momentum)
    a, b = (t.state_dict() for t in teachers)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], build_backbone("res3d10").state_dict()["conv1.weight"])


# ----------------------------------------------------------------------------- the trainer's flags

SMALL = ["--arch", "res3d10", "--out_dim", "64", "--head_hidden_dim", "32",
         "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "2", "--global_crop_size", "16",
         "48", "48", "--epochs", "2", "--warmup_epochs", "1", "--print_freq", "1000",
         "--augment_on", "device", "--seed", "3", "--freeze_last_layer", "0"]


def _train(extra, iters=2, epochs=1):
    args = main_desd.parse_args([*SMALL, *extra])
    cpu = torch.device("cpu")
    nets = main_desd.build_models(args, cpu)
    init = {net: {k: v.clone() for k, v in getattr(nets, net).state_dict().items()}
            for net in ("student", "teacher")}
    loss_fn = main_desd.build_loss(args)
    optimizer = main_desd.build_optimizer(args, nets.student)
    schedules = main_desd.build_schedules(args, iters, world=1)
    step = main_desd.build_step(args, cpu, rank=0)
    g = torch.Generator().manual_seed(4)
    batches = [[(torch.randn((2, 1, 16, 48, 48), generator=g) * 0.3).clamp(-1, 1) for _ in range(2)]
               for _ in range(iters)]
    for epoch in range(epochs):
        main_desd.train_one_epoch(epoch, nets, schedules, batches, optimizer, loss_fn, step)
    return nets, optimizer, init


def test_speed_flags_default_to_todays_routes():
    args = main_desd.parse_args(SMALL)
    assert (args.stem, args.norm_impl, args.fused_optimizer, args.cuda_graph) == \
        ("conv3d", "auto", False, False)
    nets = main_desd.build_models(args, torch.device("cpu"))
    assert nets.student.backbone.conv1.impl == "conv3d"
    assert {m.impl for m in nets.teacher.modules() if isinstance(m, InstanceNorm3d)} == {"auto"}
    assert main_desd.build_optimizer(args, nets.student).defaults["fused"] is None


@pytest.mark.slow
def test_trainer_with_every_route_trains_like_todays_run():
    """The folded stem, the decomposed norm and the fused optimiser through the trainer
    (each exact in the tests above): after two SGD steps student and teacher differ from
    today's run by less than 1% of how far the weights moved. Float32 rounding differences
    grow while training (the reference route gives about 2e-5 here, the decomposed norm
    about 1e-3 after 6 steps); a wrong route would differ by the order of the move itself."""
    # one step per epoch; the heads' last layer frozen in the first (its first gradient
    # comes in the second, which torch's fused SGD alone would refuse)
    common = ["--optimizer", "sgd", "--lr", "0.1", "--warmup_epochs", "0", "--freeze_last_layer", "1"]
    plain, _, init = _train(common, iters=1, epochs=2)
    fast, opt, _ = _train(common + ["--stem", "conv2d", "--norm_impl", "decomposed",
                                    "--fused_optimizer", "True"], iters=1, epochs=2)
    assert opt.defaults["fused"] is True
    assert fast.student.backbone.conv1.impl == "conv2d"
    for net in ("student", "teacher"):
        a, b, w0 = getattr(fast, net).state_dict(), getattr(plain, net).state_dict(), init[net]
        assert a.keys() == b.keys()
        keys = [k for k in a if a[k].is_floating_point()]
        diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in keys) ** 0.5
        moved = sum(float((b[k] - w0[k]).double().pow(2).sum()) for k in keys) ** 0.5
        assert moved > 0 and diff < 1e-2 * moved, (net, diff, moved)


def test_fast_flags_refuse_what_they_cannot_do(capsys):
    for extra, message in (
            (["--fused_optimizer", "True", "--optimizer", "lars"], "--fused_optimizer"),
            (["--cuda_graph", "True", "--optimizer", "lars"], "--cuda_graph"),
            (["--cuda_graph", "True", "--precision", "fp16"], "--cuda_graph"),
            (["--stem", "fft"], "--stem")):
        with pytest.raises(SystemExit):
            main_desd.parse_args([*SMALL, *extra])
        assert message in capsys.readouterr().err
    args = main_desd.parse_args([*SMALL, "--cuda_graph", "True"])
    with pytest.raises(ValueError, match="CUDA"):
        main_desd.build_step(args, torch.device("cpu"), rank=0)


def test_precision_auto_is_fp32_on_a_cpu_without_measuring(monkeypatch):
    monkeypatch.setattr(speed, "time_precisions",
                        lambda *a, **k: pytest.fail("auto measured on a CPU"))
    args = main_desd.parse_args([*SMALL, "--precision", "auto"])
    assert main_desd.resolve_precision(args, torch.device("cpu")) == "fp32"
    args = main_desd.parse_args([*SMALL, "--precision", "bf16"])
    assert main_desd.resolve_precision(args, torch.device("cpu")) == "bf16"


def test_precision_measurement_times_each_candidate_and_leaves_no_trace():
    """The measurement behind --precision auto on a GPU, run on the CPU with fp32 alone:
    positive times, the fastest picked, the global RNG and autocast untouched."""
    args = main_desd.parse_args(SMALL)
    state = torch.get_rng_state()
    times = speed.time_precisions(lambda: main_desd.build_network(args, [1, 2, 3]),
                                  [(1, 1, 16, 48, 48)] * 2, torch.device("cpu"), ["fp32"], steps=1)
    assert list(times) == ["fp32"] and times["fp32"] > 0
    assert torch.equal(state, torch.get_rng_state())
    assert speed.fastest(times | {"bf16": times["fp32"] / 2}) == "bf16"
