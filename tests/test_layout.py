"""The import graph: floors that import one way, no circle, stage scripts never imported by
the floor below them, and preprocessing that does not pay for torch."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"DL_save_nifti", "re_spacing_ITK", "splitting_to_patches", "main_desd",
          "finetune_example", "demo"}
LOWER = ["volume_io.py", "utils.py", "data_loader_ssl.py", "synthetic_ct.py",
         *(p.relative_to(REPO).as_posix() for p in sorted((REPO / "common").glob("*.py"))),
         *(p.relative_to(REPO).as_posix() for p in sorted((REPO / "models").glob("*.py")))]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    mods = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", "benchmarks", "tools", ".git"}:
            continue
        mods[_module_name(path)] = path
    return mods


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports, anywhere in the file (function-level too)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*pkg, base] if base else pkg)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                out.add(name)
    return out


def test_no_import_circle():
    modules = _project_modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own modules
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, m, n]))
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "common.cases" in graph and "volume_io" in graph["common.cases"]


def test_lower_floors_never_import_a_stage_script():
    modules = _project_modules()
    for rel in LOWER:
        found = _imports(REPO / rel, modules) & STAGES
        assert not found, f"{rel} imports the stage script(s) {sorted(found)}"


def test_preprocessing_imports_no_torch():
    code = ("import sys; sys.path.insert(0, '.');"
            "import DL_save_nifti, re_spacing_ITK, splitting_to_patches, volume_io, synthetic_ct;"
            "import common.stages, common.cases, common.listfile, models.contract;"
            "from models.contract import HU_MIN, HU_SCALE; assert HU_MIN == -1024 and HU_SCALE == 1024.0;"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_models_package_exports_lazily():
    code = ("import sys; sys.path.insert(0, '.'); import models;"
            "assert 'torch' not in sys.modules;"
            "from models import res3d10, ResUNet3D, load_pretrained_encoder, hu_to_input;"
            "import torch; x = torch.tensor([-3000.0, 0.0, 512.0, 4000.0]);"
            "print(hu_to_input(x).tolist(), res3d10.__module__, sorted(models.__all__)[:2])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[-1.0, 0.0, 0.5, 1.0] models.res3d ['ARCHS', 'DINOHead']"


def test_no_file_outside_tests_and_benchmarks_grows_past_600_lines():
    long = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", "benchmarks", ".git"}:
            continue
        n = len(path.read_text().splitlines())
        if n > 600:
            long[rel.as_posix()] = n
    assert not long, f"split these by concern: {long}"
