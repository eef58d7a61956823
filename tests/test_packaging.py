"""What a new user's first commands install: the demos' charts, a packaging without warnings."""

import os
import shutil
import subprocess
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_license_is_an_spdx_string():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    # The table form ({text = ...}) makes setuptools warn on every install.
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"][0]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("target", ["demo", "demo-lm"])
def test_the_demos_install_what_their_report_draws_with(target, tmp_path):
    # -n: print the commands, run none; VENV elsewhere so that every rule is due.
    out = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "pip install -q -e '.[report]'" in out
    assert out.index(".[report]") < out.index("kdjax report")
