"""`need(module)`: a test's optional package (sae_lens, sparsify, wandb: the dev extras). Skipped without it, except
under MCSAE_REQUIRE_DEV=1 (set by `make test`, so CI fails instead of quietly skipping)."""
import importlib
import os

import pytest


def need(module: str):
    "Import module; skip the test without it, or fail when MCSAE_REQUIRE_DEV is set."
    if not os.environ.get("MCSAE_REQUIRE_DEV"):
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is needed for this test and MCSAE_REQUIRE_DEV is set: pip install -e \".[dev]\" ({e})")
