"""The README's example runs as written."""

import os
import re

import pytest

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "README.md has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert int(scope["state"].step) == 1
    assert float(scope["metrics"]["loss"]) > 0
    assert scope["kl"].shape == (4,)


def test_readme_own_model_example_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
                  if "class MyNet" in b]
    assert len(blocks) == 1, "README.md's own-model example is missing"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert int(scope["state"].step) == 1
    assert {"ce", "kd", "feature", "loss"} <= set(scope["metrics"])
    assert float(scope["metrics"]["feature"]) > 0
