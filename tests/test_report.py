"""`kdjax report` end to end on tiny runs and exports: the JSON's keys and numbers against
independent computations, bytes counted as stored (a sparse export), charts, errors."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import calibration, cli, data, export, models, report
from kdjax.report import evaluate, measure
from kdjax.report.artifacts import stored_bytes

from conftest import EXP
import _float32 as f32

TINY = ["--config.train.steps=16", "--config.train.batch_size=32", "--config.eval.every_steps=16",
        "--config.train.log_every_steps=8", "--config.checkpoint.every_steps=16",
        "--config.eval.batch_size=100", "--no-progress"]
FAST_SPEED = {"latency_calls": 5, "throughput_windows": 2, "warmup_s": 0.0, "window_s": 0.01,
              "throughput_batch": 8}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory, quick_compiles):
    """A teacher and a distilled student trained on train[:256] (the rest held out), the
    student exported, and a copy of that export with 90% of its weights set to zero."""
    work = tmp_path_factory.mktemp("report")
    common = [*TINY, f"--config.data.data_dir={data_dir}",
              "--config.data.train_split=train[:256]"]
    teacher, kd = str(work / "teacher"), str(work / "kd")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     "--config.model.name=mlp_tiny", *common]) == 0
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", kd,
                     f"--config.teacher.workdir={teacher}", *common]) == 0
    exported = export.export(kd, str(work / "kd_export"))
    sparse = str(work / "kd_sparse")
    os.makedirs(sparse)
    with open(os.path.join(exported, export.META_FILE)) as f:
        meta = json.load(f)
    with open(os.path.join(sparse, export.META_FILE), "w") as f:
        json.dump(meta, f)
    rw = ocp.StandardCheckpointer()
    tree = rw.restore(os.path.join(exported, export.MODEL_DIR))
    rng = np.random.default_rng(0)
    tree["params"] = jax.tree.map(
        lambda a: np.where(rng.random(np.shape(a)) < 0.9, 0, a).astype(a.dtype), tree["params"])
    rw.save(os.path.join(sparse, export.MODEL_DIR), tree)
    rw.wait_until_finished()
    rw.close()
    return {"teacher": teacher, "kd": kd, "export": exported, "sparse": sparse,
            "data_dir": data_dir, "work": work}


@pytest.fixture(scope="module")
def made(runs):
    out = str(runs["work"] / "out")
    result = report.make_report([runs["teacher"], runs["kd"], runs["export"], runs["sparse"]],
                                out=out, speed_settings=FAST_SPEED, log=lambda *a, **k: None)
    return result, out


def _entry(result, name):
    return next(m for m in result["models"] if m["name"] == name)


def test_report_keys_and_files(made):
    result, out = made
    assert result["format"] == "kdjax.report/1" and result["split"] == "test"
    assert [m["name"] for m in result["models"]] == ["teacher", "kd", "kd_export", "kd_sparse"]
    for m in result["models"]:
        assert set(m["metrics"]) >= {"accuracy", "top5_accuracy", "loss", "brier", "ece", "mce",
                                     "bins"}
        assert len(m["metrics"]["bins"]["count"]) == calibration.NUM_BINS + 1
        assert sum(m["metrics"]["bins"]["count"]) == m["examples"] == 150
        ts = m["temperature_scaling"]
        assert ts["split"] == "train[256:]" and ts["examples"] == 64 and ts["temperature"] > 0
        assert set(ts["after"]) == {"loss", "brier", "ece", "mce", "bins"}
        assert set(m["size"]) >= {"parameters", "nonzero_parameters", "stored_bytes",
                                  "memory_bytes", "flops_per_example"}
        assert m["size"]["flops_per_example"] > 0
        lat, thr = m["speed"]["latency_batch1_ms"], m["speed"]["throughput"]["images_per_s"]
        assert lat["samples"] == 5 and lat["min"] <= lat["median"] <= lat["max"]
        assert thr["samples"] == 2 and thr["median"] > 0
    assert _entry(result, "teacher")["fidelity"] is None
    for name in ("kd", "kd_export"):  # the export finds its teacher through its source run
        f = _entry(result, name)["fidelity"]
        assert f["teacher_name"] == "teacher" and 0 <= f["agreement"] <= 1 and f["kl"] >= 0
    assert set(result["environment"]) >= {"platform", "device_kind", "jax", "jaxlib", "flax",
                                          "cpu_count", "load_average_1min"}
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["models"][1]["name"] == "kd"
    md = open(os.path.join(out, "report.md")).read()
    assert "| kd_sparse |" in md and "torchmetrics' CalibrationError(n_bins=15" in md


def test_report_numbers_match_the_run_and_an_independent_computation(made, runs):
    result, _ = made
    kd = _entry(result, "kd")
    with open(os.path.join(runs["kd"], "summary.json")) as f:
        summary = json.load(f)
    # the trainer's own eval (also eval_sums, on the same split, in batches of another size) and
    # the report agree up to float32 reassociation (_float32.py) along the MLP's 784 inputs, 32
    # hidden, 10 classes and 150 examples
    for ours, theirs in (("accuracy", "eval/accuracy"), ("loss", "eval/loss"), ("ece", "eval/ece"),
                         ("brier", "eval/brier")):
        assert kd["metrics"][ours] == pytest.approx(summary[theirs], rel=0, abs=1e-6 + float(
            f32.atol(784 + 32 + 10 + 150, abs(summary[theirs])))), ours
    assert kd["fidelity"]["agreement"] == pytest.approx(summary["eval/teacher_agreement"])
    # the export is the same model: the same numbers
    assert _entry(result, "kd_export")["metrics"]["ece"] == pytest.approx(kd["metrics"]["ece"])
    # from the exported model's logits, with numpy
    model, preprocess = export.load(runs["export"])
    test = data.load_arrays("fashion_mnist", "test", data_dir=runs["data_dir"])
    held = data.load_arrays("fashion_mnist", "train[256:]", data_dir=runs["data_dir"])
    z = np.asarray(model(preprocess(test["image"])), np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = test["label"]
    # (eager here, jit in the report: equal but for rows whose top two logits tie within float32
    # reassociation (_float32.py) along the MLP's 784 inputs, 32 hidden, 10 classes)
    assert (abs(kd["metrics"]["accuracy"] - np.mean(p.argmax(-1) == y))
            <= f32.near_ties(z, 784 + 32 + 10) + 1e-6)
    np.testing.assert_allclose(kd["metrics"]["loss"], -np.log(p[np.arange(len(y)), y]).mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(kd["metrics"]["brier"], ((p - np.eye(10)[y]) ** 2).sum(-1).mean(),
                               rtol=1e-4)
    t = float(calibration.fit_temperature(np.asarray(model(preprocess(held["image"]))),
                                          held["label"]))
    ts = kd["temperature_scaling"]
    assert ts["temperature"] == pytest.approx(t, rel=1e-5)
    np.testing.assert_allclose(ts["after"]["ece"], float(calibration.expected_calibration_error(
        jnp.asarray(z / t, jnp.float32), y)), rtol=1e-4, atol=1e-6)
    assert kd["metrics"]["accuracy"] >= 0.0


def test_bytes_are_counted_as_stored(made, runs):
    result, _ = made
    dense, sparse = _entry(result, "kd_export")["size"], _entry(result, "kd_sparse")["size"]
    walked = sum(os.path.getsize(os.path.join(r, n))
                 for r, _, names in os.walk(os.path.join(runs["sparse"], export.MODEL_DIR))
                 for n in names)
    assert sparse["stored_bytes"] == walked
    assert sparse["parameters"] == dense["parameters"] == _entry(result, "kd")["size"]["parameters"]
    assert dense["nonzero_parameters"] == dense["parameters"]
    # the zeros: counted out of the non-zero parameters, and compressed away on disk
    assert sparse["nonzero_parameters"] < 0.2 * sparse["parameters"]
    assert sparse["stored_bytes"] < 0.6 * dense["stored_bytes"]
    assert sparse["memory_bytes"] == dense["memory_bytes"]  # loaded dense, as float32
    assert stored_bytes((os.path.join(runs["sparse"], export.META_FILE),)) == os.path.getsize(
        os.path.join(runs["sparse"], export.META_FILE))


def test_charts(made):
    pytest.importorskip("matplotlib")
    result, out = made
    for name in ("accuracy_vs_size", "accuracy_vs_latency", "reliability_teacher",
                 "reliability_kd_sparse"):
        path = os.path.join(out, f"{name}.png")
        assert result["charts"][name] == path and os.path.getsize(path) > 1000


def test_without_matplotlib_the_report_is_still_written(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = str(tmp_path / "out")
    result = report.make_report([runs["export"]], out=out, speed=False, log=lambda *a, **k: None)
    assert "matplotlib is not installed" in result["charts"]["skipped"]
    md = open(os.path.join(out, "report.md")).read()
    assert "Charts skipped: matplotlib is not installed" in md
    assert not [f for f in os.listdir(out) if f.endswith(".png")]


def test_cli_and_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli.main(["report", runs["kd"], "--out", out, "--no-speed",
                     "--calibration-split", "train[200:]"]) == 0
    printed = capsys.readouterr().out
    assert "| kd |" in printed and "train[200:]" in printed
    with pytest.raises(ValueError, match="is the evaluated split"):
        report.make_report([runs["kd"]], split="test", calibration_split="test", speed=False,
                           log=lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.load_artifact(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="none of the formats"):
        report.load_artifact(str(tmp_path))


def test_held_out_split():
    splits = {"train": 60000, "test": 10000}
    assert evaluate.held_out_split("train[:54000]", splits, "test")[0] == "train[54000:]"
    assert evaluate.held_out_split("train[:90%]", splits, "test")[0] == "train[90%:]"
    none, why = evaluate.held_out_split("train", splits, "test")
    assert none is None and "--calibration-split" in why
    assert evaluate.held_out_split("train", {**splits, "validation": 5}, "test")[0] == "validation"
    none, why = evaluate.held_out_split(None, splits, "test")  # an export, an imported model
    assert none is None and why == ("it records no training split (an export or an imported "
                                    "model): pass --calibration-split with data it never saw")


def test_register_loader_plugs_in_a_format(runs, tmp_path):
    base = report.load_artifact(runs["export"])
    calls = []

    def load(path, *, step):
        calls.append(path)
        return base

    fake = tmp_path / "model.fancy"
    fake.write_text("x")
    report.register_loader("fancy", lambda p: p.endswith(".fancy"), load)
    try:
        assert report.load_artifact(str(fake)) is base and calls == [str(fake)]
        assert measure.size(base)["parameters"] == models.count_params(base.spec.abstract())
    finally:
        report.artifacts._LOADERS[:] = [e for e in report.artifacts._LOADERS if e.kind != "fancy"]


def test_safetensors_stablehlo_and_imported_models_report_the_same_model(runs, tmp_path):
    from kdjax.interop import importer

    paths = [export.export(runs["kd"], str(tmp_path / fmt), format=fmt)
             for fmt in ("safetensors", "stablehlo")]
    imported = str(tmp_path / "imported")  # a teacher brought in by `kdjax import`: a run
    importer.import_checkpoint(os.path.join(paths[0], "model.safetensors"), model="mlp",
                               out=imported)
    result = report.make_report([runs["export"], *paths, imported], speed=False,
                                calibration_split="train[256:]", data_dir=runs["data_dir"],
                                log=lambda *a, **k: None)
    ours, safetensors, stablehlo, run = result["models"]
    assert (safetensors["kind"], stablehlo["kind"], run["kind"]) == (
        "safetensors", "stablehlo", "run")
    for other in (safetensors, stablehlo, run):
        for key in ("accuracy", "loss", "ece", "brier"):
            assert other["metrics"][key] == pytest.approx(ours["metrics"][key], rel=1e-4,
                                                          abs=1e-6), (other["kind"], key)
        assert other["size"]["parameters"] == ours["size"]["parameters"]
    for other in (safetensors, stablehlo):
        file = other["size"]["stored_files"][0]
        assert other["size"]["stored_bytes"] == os.path.getsize(file)
    assert safetensors["size"]["nonzero_parameters"] == ours["size"]["nonzero_parameters"]
    assert stablehlo["size"]["nonzero_parameters"] is None  # its weights are compiled in
