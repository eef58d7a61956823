"""The issue's user story through the CLI, offline: `kdjax prepare cifar100 --from <tarball>`,
`kdjax datasets`, a teacher, then `kdjax distill` on it - device-resident and streamed (the same
run either way for one seed)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from kdjax import cli
from kdjax import prepare as prepare_lib

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "fashion_mnist")  # recipes; the data is overridden
TINY = ["--config.data.name=cifar100", "--config.model.name=mlp_tiny",
        "--config.train.steps=8", "--config.train.batch_size=32", "--config.eval.every_steps=8",
        "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=8",
        "--config.eval.batch_size=48", "--config.data.crop_padding=2", "--config.data.flip=True",
        "--config.data.num_workers=2", "--no-progress"]


def _console(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_cli")
    tarball = prepare_lib.make_synthetic_cifar(root / "cifar-100-python.tar.gz", "cifar100",
                                               n_train=200, n_test=50, seed=0)
    data_dir = str(root / "tfds")
    r = _console("prepare", "cifar100", "--from", tarball, "--data-dir", data_dir)
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and tarball in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(data_dir)
    r = _console("prepare", "cifar100", "--from", tarball, "--data-dir", data_dir,
                 "--skip-checksums")
    assert r.returncode == 0, r.stderr
    assert "prepared cifar100 3.0.2" in r.stdout and "train 200, test 50" in r.stdout
    return data_dir


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_datasets_lists_what_is_prepared(prepared, capsys):
    assert cli.main(["datasets", "--data-dir", prepared]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data dir: {prepared}"
    assert out[1].split()[:6] == ["name", "version", "splits", "image", "classes", "by"]
    row = out[2].split()
    assert row[:7] == ["cifar100", "3.0.2", "train=200", "test=50", "32x32x3", "100", "kdjax"]
    assert cli.main(["datasets", "--data-dir", os.path.join(prepared, "none")]) == 0
    assert "no prepared datasets" in capsys.readouterr().out


def test_teacher_then_distill_device_and_streamed(prepared, tmp_path, capsys):
    """One seed, one run: device-resident, and streamed with a restart in the middle, give the
    same model (same batches, same on-device augmentation, mixup/CutMix included)."""
    common = [*TINY, f"--config.data.data_dir={prepared}"]
    teacher = str(tmp_path / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     *common]) == 0
    assert "device-resident input" in capsys.readouterr().out
    distill = ["distill", "--config", f"{EXP}/kd.py", f"--config.teacher.workdir={teacher}",
               "--config.data.mixup_alpha=0.4", "--config.data.cutmix_alpha=1.0", *common]
    device, stream = str(tmp_path / "kd_device"), str(tmp_path / "kd_stream")
    assert cli.main([*distill, "--workdir", device, "--config.data.mode=device"]) == 0
    assert "device-resident input" in capsys.readouterr().out
    assert cli.main([*distill, "--workdir", stream, "--config.data.mode=stream",
                     "--config.checkpoint.every_steps=4"]) == 0
    assert "streamed input" in capsys.readouterr().out
    d, s = _summary(device), _summary(stream)
    assert s["steps"] == d["steps"] == 8
    for run in (d, s):
        assert 0.0 <= run["eval/accuracy"] <= 1.0 and "eval/teacher_agreement" in run

    def same_run(a, b):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4)
        assert a["eval/accuracy"] == pytest.approx(b["eval/accuracy"], abs=1e-6)

    same_run(s, d)
    # Interrupted after step 4: the stream restarts at step 4 from the checkpoint's step alone.
    shutil.rmtree(os.path.join(stream, "checkpoints", "8"))
    assert cli.main([*distill, "--workdir", stream, "--config.data.mode=stream"]) == 0
    assert "resumed from" in capsys.readouterr().out
    s = _summary(stream)
    assert s["steps_this_run"] == 4
    same_run(s, d)
    # kdjax eval on a streamed config evaluates the same model the same way.
    assert cli.main(["eval", "--workdir", stream]) == 0
    with open(os.path.join(stream, "eval.json")) as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(s["eval/accuracy"])
