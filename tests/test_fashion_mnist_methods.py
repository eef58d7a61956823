"""benchmarks/fashion_mnist_methods.py end to end on the tiny dataset: one seed, a logit and a
memory-bank method, an epoch of 2 steps, so the script cannot rot between the runs that fill
benchmarks/results."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fashion_mnist_methods as methods  # noqa: E402

pytestmark = pytest.mark.usefixtures("quick_compiles")


@pytest.fixture(scope="module")
def table(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    result = methods.main(["--data-dir", data_dir, "--seeds", "3", "--methods", "kd", "crd",
                           "--epochs", "1", "--teacher-epochs", "1", "--workdir",
                           str(out / "work"), "--out", str(out), "--no-chart"])
    return out, result


def test_methods_table_runs_and_reports_every_row(table):
    out, result = table
    entries = {e["name"]: e for e in result["table"]}
    assert list(entries) == ["teacher", "scratch", "kd", "crd"]  # scratch: kd's baseline
    assert result["meta"]["student_steps"] == 2  # 1 epoch of 320 examples at batch 128
    assert result["meta"]["seeds"] == [3] and result["meta"]["num_test"] == 150
    assert entries["scratch"]["num_params"] == 784 * 128 + 128 + 128 * 10 + 10
    assert entries["teacher"]["model"] == "mlp_1200" and "gain" not in entries["scratch"]
    for name in ("kd", "crd"):
        e = entries[name]
        assert e["gain"][0] == pytest.approx(e["accuracy"][0] - entries["scratch"]["accuracy"][0])
        assert e["gain"][1] == 0.0 and e["seeds_above"] in (0, 1)
    for name in ("scratch", "kd", "crd"):  # scratch's agreement comes from trainer.evaluate
        assert 0 <= entries[name]["teacher_agreement"][0] <= 100
    with open(out / "fashion_mnist_methods_cpu.json") as f:
        saved = json.load(f)
    assert [r["steps"] for r in saved["runs"]["crd"]] == [2]
    assert np.isfinite(saved["runs"]["crd"][0]["train/loss"])
    md = (out / "fashion_mnist_methods_cpu.md").read_text()
    assert "| crd | `crd.py` | mlp | 101,770 |" in md and "Reading notes" in md


def test_methods_chart(table, tmp_path):
    pytest.importorskip("matplotlib")
    methods.chart(table[1]["table"], str(tmp_path / "c.png"), "smoke")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_is_named():
    with pytest.raises(SystemExit, match=r"--methods \['kdd'\] are not rows"):
        methods.main(["--data-dir", "x", "--methods", "kdd"])
