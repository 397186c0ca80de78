"""Shared fixtures: the ../shared/data folder, fresh random seeds, device selection."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GEMMA_EWC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real public text and benchmark samples); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (set GEMMA_EWC_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run (printed on failure) so random-input tests explore new inputs over time.

    Set GEMMA_EWC_SEED to replay a failure.
    """
    value = int(os.environ.get("GEMMA_EWC_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    return value


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"GEMMA_EWC_SEED={value} reproduces this failure")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
