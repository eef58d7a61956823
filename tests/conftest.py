"""Shared test fixtures."""

import jax
import pytest


@pytest.fixture(scope="module")
def quick_compiles():
    """Compile without most of XLA's optimisation passes for a module's tests.

    On CPU those passes dominate the run time of tests that compile many small steps (about 3x),
    and they change nothing such tests check: what is computed, not how fast. Restored after.
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
