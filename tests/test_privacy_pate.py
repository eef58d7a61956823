"""PATE end to end through the CLI on the tiny synthetic dataset: a teacher ensemble on disjoint
partitions, a student distilled through Confident-GNMax with its privacy cost in summary.json,
and every configuration that is refused."""

import json
import os

import numpy as np
import pytest

from conftest import EXP
from kdjax import cli, config as config_lib
from kdjax.privacy import partitions, pate, rdp

pytestmark = pytest.mark.usefixtures("quick_compiles")  # compile speed only

TINY = ["--config.model.kwargs={'hidden': (16,)}", "--config.train.batch_size=16",
        "--config.eval.batch_size=50", "--no-progress"]


@pytest.fixture(scope="module")
def ensemble(data_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pate") / "teachers")
    assert cli.main(["train", "--config", os.path.join(EXP, "pate_teachers.py"), "--workdir", root,
                     f"--config.data.data_dir={data_dir}", "--config.pate.teachers=4",
                     "--config.train.steps=30", "--config.eval.every_steps=30", *TINY]) == 0
    return root


def _student_args(data_dir, ensemble, workdir, *extra):
    return ["distill", "--config", os.path.join(EXP, "pate_student.py"), "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", f"--config.teacher.workdir={ensemble}",
            "--config.pate.public_split=test[:100]", "--config.data.eval_split=test[100:]",
            "--config.pate.queries=80", "--config.train.steps=20", "--config.eval.every_steps=20",
            *TINY, *extra]


def test_teachers_train_on_disjoint_recorded_partitions(ensemble):
    manifest = partitions.read_manifest(ensemble)
    assert [t["range"] for t in manifest["teachers"]] == [[0, 80], [80, 160], [160, 240],
                                                           [240, 320]]
    for k, t in enumerate(manifest["teachers"]):
        with open(os.path.join(ensemble, f"teacher_{k}", "config.json")) as f:
            run = json.load(f)
        assert run["data"]["train_split"] == f"train[{80 * k}:{80 * (k + 1)}]"
        assert run["seed"] == k and run["pate"]["teachers"] == 0
        assert t["eval/accuracy"] > 0.5  # each learnt from its own 80 examples
    with open(os.path.join(ensemble, "summary.json")) as f:
        assert json.load(f)["pate/examples_per_teacher"] == [80] * 4


def test_student_learns_from_confident_gnmax_and_reports_its_privacy(data_dir, ensemble,
                                                                     tmp_path, capsys):
    workdir = str(tmp_path / "student")
    args = _student_args(data_dir, ensemble, workdir, "--config.pate.threshold=3.0",
                         "--config.pate.sigma1=1.0", "--config.pate.sigma=1.0")
    assert cli.main(args) == 0
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    released = np.load(os.path.join(workdir, "pate_labels.npz"))
    answered = int(released["answered"].sum())
    assert s["privacy/queries"] == 80 and s["privacy/answered"] == answered
    assert 0 < answered < 80  # 4 teachers, T = 3 of 4 votes: some queries are declined
    assert np.all(released["label"][~released["answered"]] == -1)
    # the data-independent epsilon, by hand: every query pays the check and GNMax
    curve = 80 * rdp.ORDERS / 1.0 ** 2 + 80 * rdp.ORDERS / (2 * 1.0 ** 2)
    assert s["privacy/epsilon"] == pytest.approx(rdp.epsilon(curve, 1e-5)[0], rel=1e-12)
    assert s["privacy/epsilon_data_dependent_unsanitized"] <= s["privacy/epsilon"]
    assert s["privacy/mechanism"] == "confident_gnmax" and s["privacy/private"] is True
    assert s["privacy/answered_label_accuracy"] > 0.8
    assert s["eval/accuracy"] > 0.5  # on test[100:], never queried
    # the student trained on the answered queries alone, not on the training split
    assert (f"kdjax: device-resident input ({answered} given examples; "
            f"data.train_split='train' not read)") in capsys.readouterr().out
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["teacher"]["aggregation"] == "gnmax"


def test_plurality_is_the_non_private_baseline_and_gnmax_answers_everything():
    counts = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 4]])
    c = _config(teacher__aggregation="plurality")
    answers = pate.release(c, counts)
    np.testing.assert_array_equal(answers.labels, [0, 1, 2])  # the exact vote (ties: first)
    s = pate.privacy_summary(c, counts, answers)
    assert s["privacy/private"] is False and s["privacy/epsilon"] == float("inf")
    assert (s["privacy/answered"], s["privacy/queries"]) == (3, 3)
    c = _config(pate__threshold=0.0, pate__sigma1=0.0, pate__sigma=0.5)
    answers = pate.release(c, counts)
    assert answers.answered.all()
    s = pate.privacy_summary(c, counts, answers)
    assert s["privacy/mechanism"] == "gnmax" and s["privacy/threshold"] is None
    assert s["privacy/epsilon"] == rdp.epsilon(3 * rdp.ORDERS / 0.25, 1e-5)[0]


def _config(**overrides):
    c = config_lib.load(os.path.join(EXP, "pate_student.py"))
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        c[section][leaf] = value
    return c


@pytest.mark.parametrize("overrides, match", [
    (dict(loss__name="kd"), r"teacher.aggregation='gnmax' with loss.name='kd': that loss trains "
                            r"the student on the teachers' soft outputs \(logits\), un-noised"),
    (dict(loss__name="fitnet"), r"loss.name='fitnet'.*outputs or features.*set loss.name='ce'"),
    (dict(pate__sigma=0.0), r"pate.sigma=0.0: without noise the released vote is the exact "
                            r"plurality and nothing is private"),
    (dict(pate__sigma1=0.0), r"pate.threshold=80.0 \(Confident-GNMax\) needs the noise of its "
                             r"check, pate.sigma1 > 0"),
    (dict(pate__threshold=0.0), r"pate.sigma1=40.0 is the noise of Confident-GNMax's threshold"),
    (dict(pate__delta=1.0), r"pate.delta=1.0 must be in \(0, 1\)"),
    (dict(teacher__aggregation="lnmax"), r"teacher.aggregation='lnmax': valid values are"),
    (dict(teacher__workdirs=("a", "b")), r"leave teacher.workdirs empty"),
    (dict(data__eval_split="test"), r"pate.public_split='test\[:5000\]' overlaps "
                                    r"data.eval_split='test'"),
    (dict(data__eval_split="test[4000:6000]"), r"overlaps data.eval_split"),
    (dict(pate__public_split="test[:50%]"), r"must be NAME or NAME\[a:b\]"),
])
def test_configurations_that_would_not_be_private_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        pate.check_config(_config(**overrides))


def test_disjoint_splits_and_plain_gnmax_pass():
    pate.check_config(_config(data__eval_split="test[5000:]"))
    pate.check_config(_config(data__eval_split="validation"))
    pate.check_config(_config(pate__threshold=0.0, pate__sigma1=0.0))
    pate.check_config(_config(teacher__aggregation="plurality", pate__sigma=0.0))


def test_ensemble_errors(data_dir, ensemble, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher.workdir='.*' has no pate.json"):
        pate.distill(_config(teacher__workdir=str(tmp_path)), str(tmp_path / "s"))
    bad = tmp_path / "overlap"
    bad.mkdir()
    (bad / "pate.json").write_text(json.dumps({"teachers": [{"range": [0, 10]},
                                                            {"range": [5, 20]}]}))
    with pytest.raises(ValueError, match=r"the teachers' training ranges \[\(0, 10\), \(5, 20\)\] "
                                         r"overlap"):
        partitions.read_manifest(str(bad))
    with pytest.raises(ValueError, match="does not combine with teacher.aggregation"):
        cli.main(_student_args(data_dir, ensemble, str(tmp_path / "g"), "--generations", "2"))
    with pytest.raises(ValueError, match="pate.queries=500 exceeds the 100 examples"):
        cli.main(_student_args(data_dir, ensemble, str(tmp_path / "q"),
                               "--config.pate.queries=500"))
    with pytest.raises(ValueError, match=r"pate.teachers=400 exceeds the 320 training examples"):
        partitions.partition(0, 320, 400)
    with pytest.raises(ValueError, match=r"data.train_split='train\[:10%\]': PATE partitions"):
        partitions.split_range("train[:10%]", 320)
    with pytest.raises(ValueError, match=r"teacher 0 trains on 80 examples, fewer than "
                                         r"train.batch_size=128"):
        cli.main(["train", "--config", os.path.join(EXP, "pate_teachers.py"), "--workdir",
                  str(tmp_path / "t"), f"--config.data.data_dir={data_dir}",
                  "--config.pate.teachers=4", "--config.train.batch_size=128"])
