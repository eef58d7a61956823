"""`kdjax distill --config experiments/lm/minitron.py`: the teacher pruned into the student at
step 0 (kdjax.compress.minitron), distilled, checkpointed and exported at its pruned shape."""

import os

import numpy as np
import pytest

from conftest import ROOT
from kdjax import checkpoint, cli, export

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
TINY = ["--config.data.name=tiny", "--config.train.batch_size=4", "--config.eval.batch_size=8",
        "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
        "--config.optimizer.warmup_steps=0", "--no-progress"]
STEPS = 4


def _args(command, experiment, workdir, text_dir, *extra):
    return [command, "--config", f"{EXP}/{experiment}", "--workdir", str(workdir),
            f"--config.data.data_dir={text_dir}", f"--config.train.steps={STEPS}",
            f"--config.eval.every_steps={STEPS}", f"--config.checkpoint.every_steps={STEPS}",
            f"--config.train.log_every_steps={STEPS}", *TINY, *extra]


@pytest.fixture(scope="module")
def teacher(text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm") / "teacher"
    assert cli.main(_args("train", "teacher.py", workdir, text_dir,
                          "--config.model.name=lm_tiny")) == 0  # 2 blocks, d 32, 4 heads / 2 KV
    return str(workdir)


def _minitron(workdir, text_dir, teacher, *extra):
    return _args("distill", "minitron.py", workdir, text_dir, f"--config.init.workdir={teacher}",
                 f"--config.teacher.workdir={teacher}", "--config.model.name=lm_tiny",
                 "--config.prune.minitron.calibration_rows=8",
                 *(f"--config.prune.minitron.{k}=0" for k in ("d_model", "d_ff", "num_heads",
                                                                 "num_layers")), *extra)


def test_prune_the_teacher_then_distil(teacher, text_dir, tmp_path, capsys):
    work = tmp_path / "minitron"
    assert cli.main(_minitron(work, text_dir, teacher, "--config.prune.minitron.d_model=16",
                              "--config.prune.minitron.d_ff=32",
                              "--config.prune.minitron.num_heads=2",
                              "--config.prune.minitron.num_layers=1")) == 0
    assert "Minitron pruning of" in capsys.readouterr().out
    reader = checkpoint.RunReader(str(work))
    spec = reader.model_spec(STEPS)
    reader.close()
    assert {k: spec.kwargs[k] for k in ("d_model", "d_ff", "num_heads", "num_kv_heads",
                                        "num_layers", "head_dim")} == dict(
        d_model=16, d_ff=32, num_heads=2, num_kv_heads=1, num_layers=1, head_dim=8)
    model, _ = export.load(_export(work, tmp_path))
    assert (model.d_model, model.num_layers, model.num_heads) == (16, 1, 2)
    logits = np.asarray(model(np.arange(12)[None] % 200))
    assert logits.shape == (1, 12, 259) and np.isfinite(logits).all()


def _export(work, tmp_path):
    out = tmp_path / "export"
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("extra, message", [
    (["--config.prune.minitron.num_heads=3"],
     "prune.minitron.num_heads=3 cannot be kept in whole KV groups"),
    (["--config.prune.schedule=one_shot"], "prune.schedule='one_shot'"),
])
def test_bad_settings_are_refused(teacher, text_dir, tmp_path, extra, message):
    with pytest.raises(ValueError) as e:
        cli.main(_minitron(tmp_path / "bad", text_dir, teacher, *extra))
    assert message in str(e.value)
