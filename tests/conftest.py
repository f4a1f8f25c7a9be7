import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tools"))  # the tools are tested as modules: eval_probe, ...
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _few_threads():
    import torch
    torch.set_num_threads(2)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests of several seconds or more (training runs, "
                            "fault injection, the demo); CI runs them, -m 'not slow' leaves "
                            "them out")


@pytest.fixture(autouse=True, scope="module")
def _module_folders_removed(request, tmp_path_factory):
    """Remove the folders a module's fixtures made (``tmp_path_factory.mktemp``) when the
    module ends with no failure: pytest itself removes them only when the whole session ends,
    and a full run would otherwise hold every module's checkpoints at once. A module with a
    failure keeps its folders for inspection (pytest.ini keeps failed tests' folders too)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
