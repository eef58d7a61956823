"""The CLI end to end on a tiny prepared dataset: prepare, train a teacher, train a student from
scratch, distil it, evaluate, summarise; workdir contents; user errors as one clear line."""

import json
import os
import subprocess
import sys

import pytest

from kdjax import cli

from conftest import EXP, ROOT

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

TINY = ["--config.train.steps=24", "--config.train.batch_size=32", "--config.eval.every_steps=12",
        "--config.train.log_every_steps=6", "--config.checkpoint.every_steps=12",
        "--config.eval.batch_size=100"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """teacher -> student from scratch -> distilled student, as the demo runs them."""
    work = tmp_path_factory.mktemp("work")
    common = TINY + [f"--config.data.data_dir={data_dir}", "--no-progress"]
    teacher = str(work / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     "--config.model.name=mlp_tiny", *common]) == 0
    scratch = str(work / "scratch")
    assert cli.main(["train", "--config", f"{EXP}/student_scratch.py", "--workdir", scratch,
                     *common]) == 0
    kd = str(work / "kd")
    assert cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", kd,
                     f"--config.teacher.workdir={teacher}", *common]) == 0
    return {"teacher": teacher, "scratch": scratch, "kd": kd}


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_workdir_contents(runs):
    for name, workdir in runs.items():
        files = set(os.listdir(workdir))
        assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints",
                "tensorboard"} <= files, name
        assert os.listdir(os.path.join(workdir, "tensorboard"))
        s = _summary(workdir)
        for key in ("eval/accuracy", "eval/loss", "train/loss", "steps", "wall_time_s",
                    "images_per_s", "device_kind", "num_devices"):
            assert s[key] is not None, (name, key)
        assert s["steps"] == 24 and s["num_devices"] >= 1
        records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        train_steps = [r["step"] for r in records if "train/loss" in r]
        eval_steps = [r["step"] for r in records if "eval/accuracy" in r]
        assert train_steps == [6, 12, 18, 24] and eval_steps == [12, 24]
        assert 0.0 <= s["eval/accuracy"] <= 1.0


def test_models_learn_and_distillation_reports_agreement(runs):
    teacher, kd = _summary(runs["teacher"]), _summary(runs["kd"])
    assert teacher["eval/accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert "eval/teacher_agreement" in kd and kd["teacher"] == runs["teacher"]
    with open(os.path.join(runs["kd"], "config.json")) as f:
        assert json.load(f)["loss"]["name"] == "kd"


def test_eval_reproduces_final_metrics(runs):
    assert cli.main(["eval", "--workdir", runs["kd"]]) == 0
    with open(os.path.join(runs["kd"], "eval.json")) as f:
        result = json.load(f)
    assert result["eval/accuracy"] == pytest.approx(_summary(runs["kd"])["eval/accuracy"])
    assert result["eval/teacher_agreement"] == pytest.approx(
        _summary(runs["kd"])["eval/teacher_agreement"])


def test_summary_table(runs, capsys):
    assert cli.main(["summary", runs["teacher"], runs["scratch"], runs["kd"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "model", "params", "seed"]
    assert len(out) == 4 and "mlp_tiny" in out[1] and "%" in out[3]


def test_rerun_resumes_at_the_end(runs, data_dir, capsys):
    before = _summary(runs["scratch"])
    assert cli.main(["train", "--config", f"{EXP}/student_scratch.py", "--workdir",
                     runs["scratch"], f"--config.data.data_dir={data_dir}", "--no-progress",
                     *TINY]) == 0
    assert "resumed from" in capsys.readouterr().out
    after = _summary(runs["scratch"])
    assert after["steps_this_run"] == 0
    assert after["eval/accuracy"] == pytest.approx(before["eval/accuracy"])


def _console(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_console_errors_are_one_clear_line(tmp_path, data_dir):
    r = _console("train", "--config", f"{EXP}/teacher.py", "--workdir", str(tmp_path / "w"),
                 "--config.train.stepz=5")
    assert r.returncode == 2
    assert "unknown config key 'train.stepz'" in r.stderr and "'steps'" in r.stderr
    assert "Traceback" not in r.stderr
    r = _console("train", "--config", f"{EXP}/teacher.py", "--workdir", str(tmp_path / "w"),
                 f"--config.data.data_dir={tmp_path / 'empty'}")
    assert r.returncode == 2 and "kdjax prepare fashion_mnist --from" in r.stderr
    r = _console("distill", "--config", f"{EXP}/kd.py", "--workdir", str(tmp_path / "w2"),
                 f"--config.data.data_dir={data_dir}", f"--config.teacher.workdir={tmp_path}")
    assert r.returncode == 2 and "not a kdjax workdir" in r.stderr


def test_loss_and_command_must_agree(data_dir, tmp_path):
    with pytest.raises(ValueError, match="run it with `kdjax distill`"):
        cli.main(["train", "--config", f"{EXP}/kd.py", "--workdir", str(tmp_path / "a"),
                  f"--config.data.data_dir={data_dir}"])
    with pytest.raises(ValueError, match="needs a distillation loss"):
        cli.main(["distill", "--config", f"{EXP}/student_scratch.py", "--workdir",
                  str(tmp_path / "b"), f"--config.data.data_dir={data_dir}"])


# -- wrong paths end in a kdjax error naming the input, never a traceback ------------------------

def _wrong_inputs(root):
    """Per command that reads a path: a directory, an empty file, a file of another format and a
    missing path where it expects something else."""
    (root / "adir").mkdir()
    (root / "empty.pth").write_bytes(b"")
    (root / "notes.txt").write_text("hello\n")
    (root / "fake.safetensors").write_text("not a safetensors file\n")
    d, e, t, f, m = (str(root / n) for n in ("adir", "empty.pth", "notes.txt",
                                             "fake.safetensors", "missing"))
    out = str(root / "out")
    cases = []
    for bad in (d, e, t, m):
        cases += [["train", "--config", bad, "--workdir", out],
                  ["eval", "--workdir", bad],
                  ["export", "--workdir", bad, "--out", out],
                  ["report", bad],
                  ["summary", bad]]
    for bad in (d, e, t, f, m):
        cases.append(["import", "--from", bad, "--model", "resnet18", "--out", out])
    for bad in (d, e, m):
        cases.append(["prepare", "fashion_mnist", "--from", bad, "--data-dir", out])
    for bad in (d, m):
        cases.append(["prepare", "text", "--from", bad, "--name", "t", "--data-dir", out])
    return cases


def test_every_wrong_path_is_a_kdjax_error_naming_it(tmp_path, monkeypatch, capsys):
    for args in _wrong_inputs(tmp_path):
        monkeypatch.setattr("sys.argv", ["kdjax", *args])
        with pytest.raises(SystemExit) as exit_:
            cli.entry()
        err = capsys.readouterr().err
        bad = next(a for a in args if a.startswith(str(tmp_path)) and not a.endswith("out"))
        assert exit_.value.code == 2, (args, err)
        assert err.startswith("kdjax: error: ") and "Traceback" not in err, (args, err)
        assert os.path.basename(bad) in err, (args, err)
        assert not (tmp_path / "out").exists(), args  # nothing written for a refused input
