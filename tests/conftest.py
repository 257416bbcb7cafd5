"""Shared test helpers: parity fixtures from ../shared/parity (skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("FRAMECAST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def load_fixture(name: str) -> dict:
    """Load ../shared/parity/<name>; skip if it is absent, fail instead under FRAMECAST_REQUIRE_FIXTURES=1."""
    path = SHARED / "parity" / name
    if not path.exists():
        message = f"parity fixture {path} not found (the reference data lives in ../shared beside the repo)"
        if os.environ.get("FRAMECAST_REQUIRE_FIXTURES") == "1":
            pytest.fail(message + "; FRAMECAST_REQUIRE_FIXTURES=1 makes this a failure")
        pytest.skip(message)
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """This test process computes like one pipeline stage (1 torch thread): a 2-thread OpenMP pool on a busy 2-core
    machine stalls on every small op. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
