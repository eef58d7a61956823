"""Runs written by kdjax before the one run skeleton (commit 47213cb: an image trainer and a
language-model trainer side by side) resume after it, and still serve as teachers.

tests/fixtures/pre_skeleton/ holds four workdirs that code wrote (a 2-step image teacher and a
2-step KD student distilled from it on conftest's synthetic Fashion-MNIST; the same for lm_tiny
language models on conftest's "tiny" text dataset), with their checkpoints at step 2.
"""

import json
import os
import shutil

import pytest

from kdjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "pre_skeleton")
# The configs the fixtures were made with (README.md there), but for 4 steps instead of 2.
COMMON = ["--config.optimizer.warmup_steps=0", "--no-progress", "--config.train.steps=4",
          "--config.checkpoint.every_steps=4", "--config.eval.every_steps=4",
          "--config.train.log_every_steps=1"]
IMAGE = [f"{ROOT}/experiments/fashion_mnist/kd.py", "--config.train.batch_size=32",
         "--config.eval.batch_size=150", "--config.model.name=mlp",
         "--config.model.kwargs={'hidden': (8,)}"]
LM = [f"{ROOT}/experiments/lm/distill.py", "--config.data.name=tiny",
      "--config.train.batch_size=4", "--config.eval.batch_size=8", "--config.lm.eval_rows=16",
      "--config.lm.chunk_size=8", "--config.lm.prompts=()", "--config.model.name=lm_tiny",
      "--config.model.kwargs={'d_model': 16, 'd_ff': 32}"]

pytestmark = pytest.mark.usefixtures("quick_compiles")


def _copy(name, tmp_path):
    return str(shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name))


def _resumes(capsys, workdir, config, *args):
    assert cli.main(["distill", "--workdir", workdir, "--config", *config, *args, *COMMON]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {workdir}/checkpoints/2 at step 2 of 4" in out
    assert "train.steps: 2 -> 4" in out  # the saved config, read back, compared
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    return summary


def test_an_image_distillation_resumes_from_its_teacher(data_dir, tmp_path, capsys):
    teacher, kd = _copy("image_teacher", tmp_path), _copy("image_kd", tmp_path)
    summary = _resumes(capsys, kd, IMAGE, f"--config.data.data_dir={data_dir}",
                       f"--config.teacher.workdir={teacher}")
    assert 0.0 <= summary["eval/accuracy"] <= 1.0
    assert 0.0 <= summary["eval/teacher_agreement"] <= 1.0


def test_a_language_model_distillation_resumes_from_its_teacher(text_dir, tmp_path, capsys):
    teacher, kd = _copy("lm_teacher", tmp_path), _copy("lm_kd", tmp_path)
    summary = _resumes(capsys, kd, LM, f"--config.data.data_dir={text_dir}",
                       f"--config.teacher.workdir={teacher}")
    assert summary["eval/perplexity"] > 1.0 and summary["loss"] == "forward_kl"
