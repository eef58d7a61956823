"""The benchmark suite's machinery on tiny sizes: what it writes and how it derives its columns.

Timings are never asserted; the PyTorch parts are skipped where torch is not installed.
"""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import pairs, suite  # noqa: E402

TINY = dict(rows=[("mlp_1200:mlp_128", 4)], windows=1, steps=1, warmup=1)


@pytest.fixture
def tiny_pair(monkeypatch):
    """A pair small enough to compile in a second (in-process only: the PyTorch child process
    does not see it)."""
    pair = pairs.Pair("mlp_tiny", "mlp_tiny", (4, 4, 1), 3)
    monkeypatch.setitem(pairs.PAIRS, pair.name, pair)
    return pair


def _kdjax_row(**kw):
    return {"pair": "p", "batch": 8, "steps_per_call": 1, "images_per_s": 100.0,
            "ms_per_step": 80.0, "window_ms_per_step": [80.0], "teacher_params": 10,
            "student_params": 5, **kw}


def _torch_row(mode, images_per_s, **kw):
    return {"pair": "p", "batch": 8, "mode": mode, "images_per_s": images_per_s,
            "ms_per_step": 8e3 / images_per_s, "window_ms_per_step": [], "peak_bytes": None,
            "teacher_params": 10, "student_params": 5, **kw}


def test_merge_takes_the_best_peer_mode_and_the_ratio_to_it():
    rows = suite._merge([_kdjax_row()], {"rows": [_torch_row("eager32", 40.0),
                                                  _torch_row("compile", 50.0)]})
    (r,) = rows
    assert r["torch_best_mode"] == "compile"
    assert r["torch_best_images_per_s"] == 50.0
    assert r["ratio_kdjax_over_torch"] == pytest.approx(2.0)
    assert set(r["torch"]) == {"eager32", "compile"}
    assert suite._merge([_kdjax_row()], None)[0]["ratio_kdjax_over_torch"] is None


def test_merge_refuses_architectures_that_differ():
    with pytest.raises(ValueError, match="student has 6 parameters"):
        suite._merge([_kdjax_row()], {"rows": [_torch_row("eager32", 40.0, student_params=6)]})


def test_rows_and_sections_are_checked():
    with pytest.raises(ValueError, match="not PAIR@BATCH"):
        pairs.parse_rows("resnet56:resnet20")
    with pytest.raises(ValueError, match="unknown pair"):
        pairs.parse_rows("resnet56:nope@64")
    with pytest.raises(ValueError, match="must include 'kdjax'"):
        suite.run(sections=["torch"], **TINY)


def test_missing_torch_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ValueError, match="pip install torch.*--sections kdjax"):
        suite.run(**TINY)


def _check_files(out, tag):
    with open(os.path.join(out, f"throughput_{tag}.json")) as f:
        result = json.load(f)
    meta = result["meta"]
    for key in ("device", "platform", "date", "load_before", "load_after", "software"):
        assert key in meta
    assert meta["software"]["jax"] and meta["software"]["flax"]
    md = open(os.path.join(out, f"throughput_{tag}.md")).read()
    assert meta["device"] in md and "kdjax / PyTorch" in md
    if importlib.util.find_spec("matplotlib"):
        assert os.path.getsize(os.path.join(out, f"throughput_{tag}.png")) > 0
    return result


def test_kdjax_section_alone(tmp_path, tiny_pair):
    suite.run(sections=["kdjax"], out_dir=str(tmp_path), tag="t",
              **{**TINY, "rows": [(tiny_pair.name, 4)]})
    (row,) = _check_files(tmp_path, "t")["rows"]
    assert row["pair"] == tiny_pair.name and row["batch"] == 4
    assert row["kdjax_images_per_s"] == pytest.approx(4 / (row["kdjax_ms_per_step"] / 1e3))
    assert row["flops_per_step"] > 0
    assert row["fusion_payoff"] == pytest.approx(row["kdjax_ms_per_step"] / (
        row["teacher_forward_ms"] + row["student_step_ms"]))
    assert row["teacher_forward_as_built_ms"] > 0
    assert row["ratio_kdjax_over_torch"] is None and row["torch"] == {}


def test_with_the_torch_peer(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from benchmarks import step_throughput

    # The kdjax side is the test above's; here a stand-in row, with the real parameter counts.
    def kdjax_row(pair, batch, **_):
        counts = {"teacher_params": 2_395_210, "student_params": 101_770}
        return [{**_kdjax_row(pair=pair.name, batch=batch, **counts), "flops_per_step": None,
                 "mfu": None, "program_bytes": None, "device_peak_bytes": None,
                 "fusion_payoff": None}]

    monkeypatch.setattr(step_throughput, "bench_pair", kdjax_row)
    suite.run(sections=["kdjax", "torch"], torch_modes=["eager32"], out_dir=str(tmp_path),
              tag="t", **TINY)
    (row,) = _check_files(tmp_path, "t")["rows"]
    assert row["torch_best_mode"] == "eager32"
    assert row["ratio_kdjax_over_torch"] == pytest.approx(
        row["kdjax_images_per_s"] / row["torch"]["eager32"]["images_per_s"])


def test_torch_models_match_kdjax_parameter_counts():
    pytest.importorskip("torch")
    from flax import nnx

    from benchmarks import torch_peer
    from kdjax import models

    for pair in pairs.PAIRS.values():
        for name in (pair.teacher, pair.student):
            base, kwargs = pairs.registry_entry(name)
            model = nnx.eval_shape(lambda: models.create_model(
                base, num_classes=pair.num_classes, input_shape=pair.input_shape,
                rngs=nnx.Rngs(0), **kwargs))
            assert torch_peer.count_params(torch_peer.build(
                name, pair.num_classes, pair.input_shape)) == models.count_params(model), name


def test_kdjax_bench_command_reaches_the_suite(capsys):
    from kdjax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "kdjax bench" in capsys.readouterr().out


def test_teacher_precision_measures_every_preparation_on_the_whole_eval_split(
        data_dir, tmp_path):
    from benchmarks import teacher_precision
    from kdjax import cli

    teacher = str(tmp_path / "teacher")
    assert cli.main(["train", "--config", os.path.join(ROOT, "experiments/fashion_mnist/teacher.py"),
                     "--workdir", teacher, f"--config.data.data_dir={data_dir}",
                     "--config.model.name=cnn_tiny", "--config.train.steps=6",
                     "--config.train.batch_size=32", "--config.eval.batch_size=64",
                     "--no-progress"]) == 0
    out = tmp_path / "results"
    out.mkdir()
    teacher_precision.main(["--teacher", teacher, "--data-dir", data_dir, "--out", str(out)])
    result = json.load(open(out / "teacher_precision_cpu.json"))
    assert [(r["dtype"], r["folded"], r["batchnorms"]) for r in result["rows"]] == [
        ("float32", 2, 2), ("bfloat16", 0, 2), ("bfloat16", 2, 2)]
    assert all(r["examples"] == 150 for r in result["rows"])  # all of the tiny test split
    assert result["rows"][0]["top1"] == 1.0 and result["rows"][0]["max_abs_logit_diff"] < 1e-3
    assert all(0 < r["max_abs_logit_diff"] < 1 for r in result["rows"][1:])
    md = open(out / "teacher_precision_cpu.md").read()
    assert "| float32 | 2 of 2 | 150 | 100.00% |" in md and result["device"] in md


def _counting_loops(prefix: str):
    """A side of `interleaved.alternate` (module level: the child process imports it)."""
    return {f"{prefix}{i}": ((lambda k: k), (lambda _: None)) for i in range(2)}


def test_alternate_times_every_loop_of_every_side_once_per_round():
    from benchmarks import interleaved

    windows, loads = interleaved.alternate(
        [(_counting_loops, ("a",)), (_counting_loops, ("b",))], rounds=2, steps=1)
    assert sorted(windows) == ["a0", "a1", "b0", "b1"]
    assert all(len(w) == 2 and min(w) >= 0 for w in windows.values()) and len(loads) == 2
