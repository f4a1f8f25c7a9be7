import os
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
