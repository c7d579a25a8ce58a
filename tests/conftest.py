"""Shared fixtures: ``x64`` turns on float64 for the duration of a test (exactness tests)."""

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


ALL_SCHEDULES = ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow"]
