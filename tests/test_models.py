import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import ARCHS, DINOHead, build_backbone, load_pretrained_encoder, res3d10, res3d50

REPO = Path(__file__).resolve().parents[1]

STAGES = {  # blocks per stage and block type, docs/method.md §5
    "res3d10": ((1, 1, 1, 1), 1), "res3d18": ((2, 2, 2, 2), 1), "res3d34": ((3, 4, 6, 3), 1),
    "res3d50": ((3, 4, 6, 3), 4), "res3d101": ((3, 4, 23, 3), 4), "res3d152": ((3, 8, 36, 3), 4),
    "res3d200": ((3, 24, 36, 3), 4),
}


def expected_state_dict(arch):
    """Names and shapes written out from docs/method.md §5, independently of the model
    code."""
    layers, e = STAGES[arch]
    sd = {"conv1.weight": (64, 1, 7, 7, 7), "norm1.weight": (64,), "norm1.bias": (64,)}
    cin = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(n):
            p = f"layer{i}.{j}."
            if e == 1:
                convs = [(planes, cin if j == 0 else planes, 3), (planes, planes, 3)]
            else:
                inp = cin if j == 0 else planes * 4
                convs = [(planes, inp, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for k, (co, ci, ks) in enumerate(convs, start=1):
                sd[p + f"conv{k}.weight"] = (co, ci, ks, ks, ks)
                sd[p + f"norm{k}.weight"] = (co,)
                sd[p + f"norm{k}.bias"] = (co,)
            if j == 0:  # projection shortcut on every stage's first block (quirk)
                sd[p + "downsample.0.weight"] = (planes * e, cin, 1, 1, 1)
                sd[p + "downsample.1.weight"] = (planes * e,)
                sd[p + "downsample.1.bias"] = (planes * e,)
        cin = planes * e
    return sd


@pytest.mark.parametrize("arch", list(STAGES))
def test_state_dict_names_and_shapes(arch):
    model = build_backbone(arch)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_state_dict(arch)
    assert model.stage_channels == [c * STAGES[arch][1] for c in (64, 128, 256, 512)]


@pytest.mark.parametrize("arch", ["res3d10", "res3d18", pytest.param("res3d34", marks=pytest.mark.slow),
                                  pytest.param("res3d50", marks=pytest.mark.slow)])
def test_pooled_and_unpooled_shapes(arch):
    model = build_backbone(arch).eval()
    x = torch.randn(2, 1, 16, 32, 40)
    with torch.no_grad():
        pooled = model(x)
        maps = model.forward_features(x, include_stem=True)
    widths = model.stage_channels
    assert [tuple(p.shape) for p in pooled] == [(2, c) for c in widths]
    assert tuple(maps[0].shape) == (2, 64, 16, 16, 20)       # stem: stride (1, 2, 2)
    assert [tuple(m.shape) for m in maps[1:]] == [
        (2, widths[0], 8, 8, 10), (2, widths[1], 4, 4, 5), (2, widths[2], 2, 2, 3), (2, widths[3], 1, 1, 2)]
    for p, m in zip(pooled, maps[1:]):
        torch.testing.assert_close(p, m.mean(dim=(2, 3, 4)))


def test_published_norm_act_and_no_bias():
    model = res3d10()
    assert isinstance(model.norm1, torch.nn.InstanceNorm3d) and model.norm1.affine
    assert not model.norm1.track_running_stats
    assert isinstance(model.act, torch.nn.LeakyReLU) and model.act.negative_slope == 0.01
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert model.conv1.stride == (1, 2, 2) and model.conv1.padding == (3, 3, 3)


@pytest.mark.parametrize("impl", ["auto", "reference", "group_norm", "decomposed"])
def test_instance_norm_routes_compute_pytorchs_instance_norm(impl):
    """Every route of models.res3d.InstanceNorm3d is nn.InstanceNorm3d(affine=True): the
    output and all three gradients, in float64 and float32, with the same state dict."""
    from models.res3d import InstanceNorm3d
    ref = torch.nn.InstanceNorm3d(5, affine=True)
    ours = InstanceNorm3d(5, affine=True, impl=impl)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 2e-5)):
        x = (torch.randn((3, 5, 4, 6, 7), generator=g) * 4 + 3).to(dtype)
        gy = torch.randn(x.shape, generator=g).to(dtype)
        w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
        results = []
        for m in (ref, ours):
            m.to(dtype)
            with torch.no_grad():
                m.weight.copy_(w)
                m.bias.copy_(b)
            m.zero_grad()
            xg = x.clone().requires_grad_()
            y = m(xg)
            y.backward(gy)
            results.append((y.detach(), xg.grad, m.weight.grad, m.bias.grad))
        for a, want in zip(*results[::-1]):
            assert a.dtype == want.dtype and a.shape == want.shape
            assert float((a - want).abs().max()) <= tol * float(want.abs().max()), (dtype, impl)


def test_instance_norm_auto_route_follows_autocast(monkeypatch):
    """auto: group norm in plain float32, PyTorch's own route under autocast."""
    from models.res3d import InstanceNorm3d
    import torch.nn.functional as F
    calls = []
    monkeypatch.setattr(F, "group_norm", lambda *a, **k: calls.append("group") or a[0])
    monkeypatch.setattr(F, "instance_norm", lambda *a, **k: calls.append("instance") or a[0])
    m = InstanceNorm3d(4, affine=True)
    x = torch.randn(2, 4, 3, 4, 5)
    m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    assert calls == ["group", "instance"]


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="res3d10, res3d18"):
        build_backbone("res3d11")
    assert set(ARCHS) == set(STAGES)


@pytest.mark.slow
def test_released_checkpoint_layout_loads_by_name(tmp_path, capsys):
    """A checkpoint written from docs/method.md §5's names and shapes (not from the model's
    own state dict): the released layout, `'teacher'` with `module.backbone.*` and a
    `module.head.*` DINO head, `args` an argparse.Namespace. Every backbone tensor loads."""
    g = torch.Generator().manual_seed(0)
    backbone = {k: torch.randn(s, generator=g) for k, s in expected_state_dict("res3d50").items()}
    head = {"mlp.0.weight": (2048, 2048), "mlp.0.bias": (2048,), "mlp.1.weight": (2048,),
            "mlp.1.bias": (2048,), "mlp.3.weight": (2048, 2048), "mlp.6.weight": (256, 2048),
            "last_layer.weight_g": (60000, 1), "last_layer.weight_v": (60000, 256)}
    teacher = {"module.backbone." + k: v for k, v in backbone.items()}
    teacher |= {"module.head." + k: torch.zeros(s) for k, s in head.items()}
    path = tmp_path / "DeSD_Res50.pth"
    torch.save({"teacher": teacher, "epoch": 300,
                "args": argparse.Namespace(arch="resnet3d50", out_dim=60000)}, path)
    encoder = res3d50()
    summary = load_pretrained_encoder(encoder, path)
    assert summary["n_loaded"] == summary["n_model"] == len(backbone)
    assert len(summary["unused"]) == len(head)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert f"[pre_{len(backbone) + len(head)}/mod_{len(backbone)}]: {len(backbone)} shared layers" \
        in capsys.readouterr().out


@pytest.mark.parametrize("use_bn", [False, True])
def test_dino_head(use_bn):
    head = DINOHead(64, 50, use_bn=use_bn, hidden_dim=32, bottleneck_dim=16)
    names = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.0.bias", "last_layer.weight_g", "last_layer.weight_v"} <= names
    last_linear = "mlp.6.weight" if use_bn else "mlp.4.weight"
    assert tuple(head.state_dict()[last_linear].shape) == (16, 32)
    assert bool((head.last_layer.weight_g == 1).all())
    assert not head.last_layer.weight_g.requires_grad        # norm_last_layer default True
    assert float(head.mlp[0].bias.detach().abs().max()) == 0.0
    assert abs(float(head.mlp[0].weight.detach().std()) - 0.02) < 0.003  # trunc-normal, std 0.02
    with torch.no_grad():
        out = head(torch.randn(6, 64))
    assert out.shape == (6, 50)
    # rows of the last layer have unit norm and its input is L2-normalised: |logit| <= 1
    assert float(out.abs().max()) <= 1.0 + 1e-5
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(50))


def test_head_norm_last_layer_false_trains_g():
    head = DINOHead(8, 5, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    assert head.last_layer.weight_g.requires_grad


def _imports_of(node: ast.AST) -> set[str]:
    """Top-level names of the modules an import statement imports (relative as '.')."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {"." if node.level else node.module.split(".")[0]}
    return set()


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (relative imports as '.')."""
    return set().union(*(_imports_of(node) for node in ast.walk(ast.parse(path.read_text()))))


def test_models_imports_only_torch_and_itself():
    """torch, the standard library and models/ itself; `safetensors` only inside the
    functions of pretrained.py that read or write the format (not on import)."""
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((REPO / "models").glob("*.py")):
        outside = {n for n in _imports(path) if n not in stdlib and n not in {"torch", "."}}
        if path.name == "pretrained.py":
            outside -= {"safetensors"}
        top = [node for node in ast.parse(path.read_text()).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not {n for node in top for n in _imports_of(node)} & {"safetensors"}, path.name
        assert not outside, f"{path.name} imports {outside}"


def test_nothing_imports_the_example_or_a_tool():
    forbidden = {"finetune_example", "tools", "eval_probe", "plot_log", "export_backbone", "nnunet"}
    for path in sorted(REPO.rglob("*.py")):
        if "tests" in path.parts or ".git" in path.parts:
            continue
        assert not (_imports(path) & forbidden), f"{path.relative_to(REPO)} imports " \
                                                 f"{_imports(path) & forbidden}"


@pytest.mark.slow
def test_models_copied_alone_runs_the_readme_snippet(tmp_path):
    """Copy models/ into an empty folder and run the README's snippet there (a fresh
    interpreter whose path holds nothing of this repository)."""
    import re
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- finetune-snippet:start -->")[1].split("<!-- finetune-snippet:end -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(REPO / "models", tmp_path / "models")
    torch.manual_seed(1)
    state = {k: v + 0.25 for k, v in build_backbone("res3d50").state_dict().items()}
    torch.save({"teacher": {"module.backbone." + k: v for k, v in state.items()}, "epoch": 1},
               tmp_path / "checkpoint.pth")
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run([sys.executable, "-E", "-s", "snippet.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = len(state)
    assert f"[pre_{n}/mod_{n}]: {n} shared layers" in proc.stdout
    assert "torch.Size([1, 4, 32, 64, 64])" in proc.stdout
