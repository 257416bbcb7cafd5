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
