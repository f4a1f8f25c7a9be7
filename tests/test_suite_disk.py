"""The suite's own temporary folders: a passing test's folder and a passing module's shared
folders are removed as the run goes (pytest.ini, tests/conftest.py), a failing one's kept.
Each res3d10 checkpoint is about 0.2 GB; without this a full run held 26 GB at its end."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PASSING = '''
import pytest

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared_pass")
    (folder / "big.bin").write_bytes(bytes(1000))
    return folder

def test_one(shared, tmp_path):
    (tmp_path / "ckpt.bin").write_bytes(bytes(1000))
    print("PASS-FOLDERS", shared, tmp_path)
'''

FAILING = '''
import pytest

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared_fail")

def test_two(shared, tmp_path):
    (tmp_path / "ckpt.bin").write_bytes(bytes(1000))
    print("FAIL-FOLDERS", shared, tmp_path)
    assert False, "fails on purpose"

def test_three(shared, tmp_path):
    (tmp_path / "ckpt.bin").write_bytes(bytes(1000))
    print("PASS-BESIDE-FAIL", tmp_path)
'''


def test_passing_folders_go_and_failing_ones_stay(tmp_path):
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "pytest.ini", project / "pytest.ini")
    shutil.copy(ROOT / "tests" / "conftest.py", project / "tests" / "conftest.py")
    (project / "tests" / "test_a_pass.py").write_text(PASSING)
    (project / "tests" / "test_b_fail.py").write_text(FAILING)
    base = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           f"--basetemp={base}", "tests"], cwd=project, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "1 failed, 2 passed" in proc.stdout, proc.stdout + proc.stderr
    passed = next(ln for ln in proc.stdout.splitlines() if "PASS-FOLDERS" in ln).split()[-2:]
    failed = next(ln for ln in proc.stdout.splitlines() if "FAIL-FOLDERS" in ln).split()[-2:]
    passed.append(next(ln for ln in proc.stdout.splitlines()
                       if "PASS-BESIDE-FAIL" in ln).split()[-1])  # pytest.ini's policy
    assert all(str(base) in p for p in passed + failed)
    assert not any(Path(p).exists() for p in passed), passed  # removed as the run went
    assert all(Path(p).exists() for p in failed), failed      # kept to look at
