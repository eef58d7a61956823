"""`kdjax report` of language models (kdjax.report.lm): per-token metrics equal to the run's own
eval and to float64 numpy over the same logits, fidelity to the teacher, temperature scaling,
size, an export reported like its run, and the errors."""

import json
import os

import numpy as np
import pytest

import _float32 as f32
from conftest import ROOT
from kdjax import cli, report
from kdjax.lm import data as text_data, packing
from kdjax.models import count_params
from kdjax.report import lm as report_lm

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
COMMON = ["--config.data.name=tiny", "--config.train.batch_size=4", "--config.eval.batch_size=8",
          "--config.lm.eval_rows=0", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
          "--config.optimizer.warmup_steps=0", "--config.train.steps=8",
          "--config.eval.every_steps=8", "--config.checkpoint.every_steps=8", "--no-progress"]
FAST = dict(latency_calls=3, throughput_batch=4, throughput_windows=2, warmup_s=0.0,
            window_s=0.01)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_report")
    src = root / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text("".join(f"x{j} = {i} * {j}\n" for j in range(i % 4 + 3)))
    data = str(root / "data")
    assert cli.main(["prepare", "text", "--from", str(src), "--name", "tiny", "--seq-len", "16",
                     "--held-out", "0.25", "--data-dir", data]) == 0
    teacher, kd = str(root / "teacher"), str(root / "kd")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     f"--config.data.data_dir={data}", "--config.model.name=lm_tiny",
                     *COMMON]) == 0
    assert cli.main(["distill", "--config", f"{EXP}/distill.py", "--workdir", kd,
                     f"--config.data.data_dir={data}", f"--config.teacher.workdir={teacher}",
                     "--config.model.name=lm_tiny",
                     "--config.model.kwargs={'d_model': 16, 'd_ff': 32}", *COMMON]) == 0
    return {"data": data, "teacher": teacher, "kd": kd}


def _logits(model, tokens, segments):
    """float64 logits [N_targets, V], targets and the rows' mask, position by position."""
    inputs = packing.model_inputs(tokens, segments)
    z = np.asarray(model(inputs["tokens"], segment_ids=inputs["segment_ids"]), np.float64)
    keep = np.asarray(inputs["loss_mask"])
    return z[keep], np.asarray(inputs["targets"])[keep]


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ece(z, y, bins=15):
    p = np.exp(_log_softmax(z))
    conf, right = p.max(-1), p.argmax(-1) == y
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="right") - 1, 0, bins)
    return sum(abs(right[index == b].mean() - conf[index == b].mean()) * (index == b).mean()
               for b in range(bins + 1) if (index == b).any())


def test_lm_report_equals_the_runs_eval_and_numpy(runs, tmp_path):
    out = tmp_path / "report"
    result = report.make_report([runs["teacher"], runs["kd"]], out=str(out), speed=True,
                                speed_settings=FAST)
    assert result["unit"] == "tokens" and result["split"] == "validation"
    teacher, kd = result["models"]
    assert teacher["fidelity"] is None and kd["fidelity"]["teacher"] == runs["teacher"]
    with open(os.path.join(runs["kd"], "summary.json")) as f:
        summary = json.load(f)
    m = kd["metrics"]
    ds = text_data.open_text("tiny", runs["data"])
    tokens, segments = ds.load("validation")
    z, y = _logits(report_lm.load(runs["kd"])["model"], tokens, segments)
    tz, _ = _logits(report_lm.load(runs["teacher"])["model"], tokens, segments)
    # The report, the run's eval step and numpy here are three programs: equal up to float32
    # reassociation (_float32.py) along 2 layers of 16 positions, d_model <= 32 and d_ff <= 64,
    # the V logits and the eval's tokens; accuracies but for rows whose top logits tie within it.
    n = 2 * (16 + 32 + 64) + z.shape[1] + len(y)
    # the same tokens and numbers as the run's own held-out eval (kdjax.lm.step's eval step)
    assert m["tokens"] == summary["eval/tokens"]
    np.testing.assert_allclose(m["perplexity"], summary["eval/perplexity"],
                               rtol=f32.atol(n, summary["eval/loss"]))  # d log ppl = d loss
    assert abs(m["accuracy"] - summary["eval/accuracy"]) <= f32.near_ties(z, n) + f32.EPS
    assert (abs(kd["fidelity"]["agreement"] - summary["eval/teacher_agreement"])
            <= f32.near_ties(z, n) + f32.near_ties(tz, n) + f32.EPS)
    np.testing.assert_allclose(teacher["metrics"]["perplexity"],
                               summary["eval/teacher_perplexity"],
                               rtol=f32.atol(n, np.log(summary["eval/teacher_perplexity"])))
    # and to float64 numpy over the models' logits
    log_p, log_t = _log_softmax(z), _log_softmax(tz)
    p = np.exp(log_p)
    f32.assert_close(m["loss"], -log_p[np.arange(len(y)), y].mean(), n=n)
    top5 = np.argsort(-z, axis=-1)[:, :5]
    assert (abs(m["top5_accuracy"] - (top5 == y[:, None]).any(-1).mean())
            <= f32.near_ties(z, n, rank=5) + f32.EPS)
    brier = ((p - np.eye(z.shape[1])[y]) ** 2).sum(-1).mean()
    f32.assert_close(m["brier"], brier, n=n)
    np.testing.assert_allclose(m["ece"], _ece(z, y), atol=1e-6)
    kl = (np.exp(log_t) * (log_t - log_p)).sum(-1).mean()
    np.testing.assert_allclose(kd["fidelity"]["kl"], kl, rtol=1e-4)
    # size and speed
    model = report_lm.load(runs["kd"])["model"]
    assert kd["size"]["parameters"] == count_params(model) < teacher["size"]["parameters"]
    assert kd["size"]["stored_bytes"] > 0 and kd["size"]["flops_per_token"] > 0
    assert set(kd["speed"]["throughput"]["tokens_per_s"]) >= {"median", "p25", "p75"}
    assert "skipped" in kd["temperature_scaling"]
    text = (out / "report.md").read_text()
    assert "| perplexity | next-token top-1 (%)" in text and "throughput (tokens/s)" in text
    assert f"{m['perplexity']:.3f}" in text and "FLOPs/token" in text
    assert json.loads((out / "report.json").read_text())["models"][1]["name"] == "kd"


def test_lm_temperature_scaling_and_an_export(runs, tmp_path):
    result = report.make_report([runs["kd"]], calibration_split="train", speed=False)
    ts = result["models"][0]["temperature_scaling"]
    ds = text_data.open_text("tiny", runs["data"])
    model = report_lm.load(runs["kd"])["model"]
    z, y = _logits(model, *ds.load("validation"))
    np.testing.assert_allclose(ts["after"]["ece"], _ece(z / ts["temperature"], y), atol=1e-6)
    zc, yc = _logits(model, *ds.load("train"))
    nll = lambda t: -_log_softmax(zc / t)[np.arange(len(yc)), yc].mean()  # noqa: E731
    t = ts["temperature"]
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03)) + 1e-9  # the NLL's minimum over T
    with pytest.raises(ValueError, match="--calibration-split 'validation' is the evaluated"):
        report.make_report([runs["kd"]], calibration_split="validation", speed=False)
    exported = str(tmp_path / "export")
    assert cli.main(["export", "--workdir", runs["kd"], "--out", exported]) == 0
    again = report.make_report([exported], speed=False)["models"][0]
    assert again["kind"] == "lm export" and again["fidelity"]["teacher"] == runs["teacher"]
    assert again["metrics"]["loss"] == pytest.approx(result["models"][0]["metrics"]["loss"],
                                                     rel=1e-6)


def test_lm_and_image_models_are_not_mixed(runs, tmp_path):
    image_run = tmp_path / "mlp_run"
    (image_run / "checkpoints").mkdir(parents=True)
    (image_run / "config.json").write_text(json.dumps({"model": {"name": "mlp"}}))
    with pytest.raises(ValueError, match=r"compares models of one kind: .*kd.* are language "
                                         r"models, .*mlp_run.* are not"):
        report.make_report([runs["kd"], str(image_run)], speed=False)
