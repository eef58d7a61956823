"""kdjax.trainer: how many train steps one dispatch runs (train.steps_per_call), by rule and end
to end on a tiny MLP run that is resumed with explicit values."""

import json
import os
import re

import pytest

from conftest import EXP
from kdjax import cli, config as config_lib
from kdjax.trainer import resolve_steps_per_call

# Compile speed only: these tests check steps and messages, not numerics.
pytestmark = pytest.mark.usefixtures("quick_compiles")


def _config(steps=1000, steps_per_call=0, log=100, eval_every=500, ckpt=1000):
    c = config_lib.base_config()
    c.train.update(steps=steps, steps_per_call=steps_per_call, log_every_steps=log)
    c.eval.every_steps = eval_every
    c.checkpoint.every_steps = ckpt
    return c


# -- the rule ----------------------------------------------------------------------------------

def test_auto_is_one_on_the_cpu_and_says_nothing(capsys):
    assert resolve_steps_per_call(_config(), "cpu") == 1
    assert resolve_steps_per_call(_config(steps=940), "cpu", resume_step=40) == 1
    assert capsys.readouterr().out == ""


def test_auto_is_twenty_on_an_accelerator_when_every_step_count_allows(capsys):
    # the defaults: 1000 steps, logs every 100, evals every 500, checkpoints every 1000
    assert resolve_steps_per_call(_config(), "gpu") == 20
    assert capsys.readouterr().out == (
        "kdjax: train steps per dispatch: 20 (train.steps_per_call=0: auto on gpu)\n")
    # 2340 = 20 * 117, and every cadence is a multiple of 20: no note
    assert resolve_steps_per_call(_config(steps=2340), "tpu", resume_step=1200) == 20
    assert "note" not in capsys.readouterr().out


def test_auto_falls_to_one_for_a_prime_step_count_and_says_how_to_get_twenty(capsys):
    assert resolve_steps_per_call(_config(steps=937), "gpu") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "kdjax: train steps per dispatch: 1 (train.steps_per_call=0: auto on gpu)"
    assert out[1].startswith("kdjax: note: steps per dispatch 1, not 20, because "
                             "train.steps=937 is not a multiple of 20; make train.steps a "
                             "multiple of 20 (e.g. 940) to get 20")
    assert len(out) == 2


def test_auto_takes_the_largest_divisor_below_twenty(capsys):
    # 1170 = 2 * 3^2 * 5 * 13: its divisors up to 20 are 1 2 3 5 6 9 10 13 15 18
    assert resolve_steps_per_call(_config(steps=1170), "gpu") == 18
    note = capsys.readouterr().out.splitlines()[1]
    assert "train.steps=1170 is not a multiple of 20" in note and "(e.g. 1180)" in note
    # none of 100, 500, 1000 is a multiple of 18: all three are named
    assert ("train.log_every_steps=100, eval.every_steps=500, checkpoint.every_steps=1000 are "
            "not a multiple of the 18 steps per dispatch, so each fires at the first call "
            "boundary after its step") in note


def test_auto_keeps_twenty_when_only_a_cadence_is_off_and_names_it(capsys):
    # gcd(2340, 30) = 30 allows 10 with exact logs; 2340 itself allows 20, which auto prefers
    assert resolve_steps_per_call(_config(steps=2340, log=30), "gpu") == 20
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("kdjax: note: train.log_every_steps=30 is not a multiple of the 20 steps per "
                      "dispatch, so each fires at the first call boundary after its step; make it "
                      "a multiple of 20 to land on it exactly")
    # a cadence of 0 (off) is never a reason
    assert resolve_steps_per_call(_config(eval_every=0, ckpt=0), "gpu") == 20
    assert "note" not in capsys.readouterr().out


def test_auto_divides_the_step_a_run_resumes_from(capsys):
    # gcd(1000, 130) = 10
    assert resolve_steps_per_call(_config(), "gpu", resume_step=130) == 10
    note = capsys.readouterr().out.splitlines()[1]
    assert ("steps per dispatch 10, not 20, because the step this run resumes from, 130, is not "
            "a multiple of 20") in note
    assert "train.steps=1000" not in note
    # gcd(1000, 1004 - past the end after train.steps was lowered) = 4
    assert resolve_steps_per_call(_config(), "gpu", resume_step=1004) == 4


def test_an_explicit_value_is_kept_on_every_platform(capsys):
    for platform in ("cpu", "gpu"):
        assert resolve_steps_per_call(_config(steps_per_call=8), platform, resume_step=16) == 8
        assert resolve_steps_per_call(_config(steps=937, steps_per_call=1), platform) == 1
        # resumed past train.steps (lowered since): no step runs, so nothing can overshoot
        assert resolve_steps_per_call(_config(steps=24, steps_per_call=4), platform, 30) == 4
    assert capsys.readouterr().out == ""


def test_a_negative_value_is_refused():
    with pytest.raises(ValueError, match=r"train.steps_per_call=-1 must be >= 1 \(train steps per "
                                         r"dispatch\) or 0 for auto"):
        resolve_steps_per_call(_config(steps_per_call=-1), "cpu")


def test_an_explicit_value_must_divide_the_steps_and_the_resume_step():
    with pytest.raises(ValueError, match=r"train.steps=1000 must be a multiple of "
                                         r"train.steps_per_call=7; .* or to 0 for auto"):
        resolve_steps_per_call(_config(steps_per_call=7), "gpu")
    with pytest.raises(ValueError, match=r"resumes from the checkpoint of step 6, which is not a "
                                         r"multiple of train.steps_per_call=4: .* divisor of 2 "
                                         r"\(which divides both 6 and 1000\), or to 0 for auto"):
        resolve_steps_per_call(_config(steps_per_call=4), "cpu", resume_step=6)


# -- end to end ----------------------------------------------------------------------------------

TINY = ["--config.model.name=mlp_tiny", "--config.train.batch_size=32",
        "--config.train.log_every_steps=6", "--config.eval.every_steps=12",
        "--config.checkpoint.every_steps=12", "--config.eval.batch_size=150", "--no-progress"]


def _train(workdir, data_dir, *extra):
    return cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", str(workdir),
                     f"--config.data.data_dir={data_dir}", *TINY, *extra])


def _json(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def test_resuming_off_an_explicit_call_boundary_is_refused_before_training(
        data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, data_dir, "--config.train.steps=6") == 0
    assert _json(workdir, "summary.json")["steps_per_call"] == 1  # auto, on the CPU
    assert "train steps per dispatch" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"resumes from the checkpoint of step 6, which is not a "
                                         r"multiple of train.steps_per_call=4: its calls would "
                                         r"end past train.steps=24; set train.steps_per_call to "
                                         r"a divisor of 6"):
        _train(workdir, data_dir, "--config.train.steps=24", "--config.train.steps_per_call=4")
    assert os.listdir(workdir / "checkpoints") == ["6"]
    assert _json(workdir, "config.json")["train"]["steps"] == 6  # not rewritten by the refusal
    # On a boundary it resumes, and the logs of the 2-step calls land on their steps.
    assert _train(workdir, data_dir, "--config.train.steps=24",
                  "--config.train.steps_per_call=2") == 0
    summary = _json(workdir, "summary.json")
    assert summary["steps"] == 24 and summary["steps_this_run"] == 18
    assert summary["steps_per_call"] == 2
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "train/loss" in r] == [6, 12, 18, 24]


def test_tfkd_self_teacher_must_be_the_students_architecture(tmp_path):
    """Tf-KD's self-teacher is a trained copy of the student: its run's model is checked before
    anything is loaded (plain KD takes any teacher)."""
    from kdjax import classification, plan

    run = config_lib.load(f"{EXP}/student_scratch.py")
    for name, kwargs in (("mlp", {"hidden": (128,)}), ("mlp", {"hidden": (64,)})):
        workdir = tmp_path / f"{name}{kwargs['hidden'][0]}"
        workdir.mkdir()
        run.model.update(name=name, kwargs=kwargs)
        (workdir / "config.json").write_text(config_lib.to_json(run))
    config = config_lib.load(f"{EXP}/tfkd_self.py",
                             [f"--config.teacher.workdir={tmp_path / 'mlp128'}"])
    # the student's own architecture: accepted
    classification.check_self_teacher(plan.as_plan(config))
    config.teacher.workdir = str(tmp_path / "mlp64")
    with pytest.raises(ValueError, match=r"distils from a trained copy of the student \(mlp "
                                         r"\{'hidden': \(128,\)\}\), but teacher.workdir=.*mlp64"
                                         r"' trained mlp \{'hidden': \(64,\)\}; point "
                                         r"teacher.workdir at a run of the student's"):
        classification.check_self_teacher(plan.as_plan(config))
    config.loss.kwargs = {"variant": "virtual"}  # no teacher to check
    classification.check_self_teacher(plan.as_plan(config))


# -- failed runs leave nothing behind ------------------------------------------------------------

def _distill(workdir, data_dir, teacher, *extra):
    return cli.main(["distill", "--config", f"{EXP}/kd.py", "--workdir", str(workdir),
                     f"--config.data.data_dir={data_dir}", f"--config.teacher.workdir={teacher}",
                     *TINY, *extra])


@pytest.mark.parametrize("extra, message", [
    ((), r"no checkpoint in .*: teacher.workdir=.* is not a kdjax workdir with a saved run "
         r"\(train a model there first with `kdjax train`, or import a PyTorch checkpoint there "
         r"with `kdjax import`\)"),
    (("--config.loss.name=kdd",), r"unknown loss 'kdd'|loss.name='kdd'"),
    (("--config.model.name=_no_such_module:Net",), r"cannot import module '_no_such_module'"),
])
def test_a_run_refused_before_it_starts_makes_no_directory(data_dir, tmp_path, extra, message,
                                                           monkeypatch):
    # Nothing may be read before the refusal: not the data, not a teacher.
    from kdjax import classification, teacher as teacher_lib

    def never(*args, **kwargs):
        raise AssertionError("read before the config was checked")

    monkeypatch.setattr(classification.ImageTask, "open_data", never)
    monkeypatch.setattr(teacher_lib, "read", never)
    workdir = tmp_path / "kd"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _distill(workdir, data_dir, tmp_path / "no_teacher", *extra)
    assert not workdir.exists()


def test_a_run_that_fails_before_its_first_step_removes_the_workdir_it_made(data_dir, tmp_path):
    workdir = tmp_path / "t"
    with pytest.raises(ValueError, match=r"train.batch_size=100000 exceeds the 320 training"):
        _train(workdir, data_dir, "--config.train.batch_size=100000")
    assert not workdir.exists()
    # A workdir the user made stays, whatever happened in it.
    workdir.mkdir()
    with pytest.raises(ValueError, match=r"train.batch_size=100000 exceeds"):
        _train(workdir, data_dir, "--config.train.batch_size=100000")
    assert workdir.is_dir()


# -- progress where it runs ----------------------------------------------------------------------

def test_a_run_in_a_log_shows_a_line_per_log_period_and_per_phase(data_dir, tmp_path, capsys):
    """stdout is not a terminal here, as in a log file: no bar, lines with the step, the
    metrics, the throughput and the ETA, and a line before and after each slow phase."""
    assert _train(tmp_path / "t", data_dir, "--config.train.steps=12") == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("kdjax: ")]
    assert "\r" not in out.out + out.err  # no bar updates in a log
    assert lines[[i for i, x in enumerate(lines) if "compiling the train step" in x][0] + 1] \
        .startswith("kdjax: compiled; first call done (")
    logs = [x for x in lines if x.startswith("kdjax: step ")]
    assert [x.split()[2] for x in logs] == ["6/12", "12/12"]
    assert all(" loss " in x and " accuracy " in x and " images/s | " in x for x in logs)
    assert re.search(r"\| ETA \d+s$", logs[0]) and logs[1].endswith("| ETA 0s")
    assert any(x.startswith("kdjax: evaluating at step 12 ...") for x in lines)
    assert any(x.startswith("kdjax: eval at step 12: accuracy ") for x in lines)
    assert any(x.startswith("kdjax: saved ") for x in lines)


def test_durations_read_as_people_say_them():
    from kdjax.progress import duration

    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
