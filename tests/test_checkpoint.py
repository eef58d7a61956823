"""Checkpoints, resume and failure behaviour: one test per promise of the checkpoint issue.

In-process runs use a tiny MLP on the shared 320-example dataset. The preemption tests run real
`kdjax` processes, signal or kill them once a checkpoint is on disk, resume them, and compare the
result bit for bit with an uninterrupted run.
"""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import _float32 as f32
from conftest import EXP, ROOT
from kdjax import checkpoint, cli, config as config_lib, data, models, optim, sharding
from kdjax.errors import CheckpointError, CheckpointMismatchError
from kdjax.step import init_train_state

TINY = ["--config.train.steps=24", "--config.train.batch_size=32", "--config.eval.every_steps=12",
        "--config.train.log_every_steps=6", "--config.checkpoint.every_steps=12",
        "--config.eval.batch_size=150", "--no-progress"]


def _train(workdir, data_dir, *extra, command="train", experiment="teacher.py"):
    """A 24-step run; the teacher experiment with a 784-64-10 MLP, kd.py's student is 784-32-10."""
    tiny = ["--config.model.name=mlp_tiny"] if experiment == "teacher.py" else []
    return cli.main([command, "--config", f"{EXP}/{experiment}", "--workdir", str(workdir),
                     f"--config.data.data_dir={data_dir}", *TINY, *tiny, *extra])


def _console(monkeypatch, workdir, data_dir, *extra):
    """`kdjax train` of the teacher experiment through the console entry point: its exit code."""
    monkeypatch.setattr(sys, "argv", [
        "kdjax", "train", "--config", f"{EXP}/teacher.py", "--workdir", str(workdir),
        f"--config.data.data_dir={data_dir}", *TINY, "--config.model.name=mlp_tiny", *extra])
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    return exit_.value.code


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
                for line in f]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ckpt") / "teacher"
    assert _train(workdir, data_dir, "--fresh") == 0  # --fresh is fine on a new workdir
    return str(workdir)


@pytest.fixture(scope="module")
def kd(teacher, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ckpt") / "kd"
    assert _train(workdir, data_dir, f"--config.teacher.workdir={teacher}",
                  "--config.checkpoint.keep_best=1",
                  "--config.checkpoint.best_metric=eval/teacher_agreement",
                  command="distill", experiment="kd.py") == 0
    return str(workdir)


@pytest.fixture
def copy_of(tmp_path):
    def copy(workdir):
        dest = tmp_path / os.path.basename(workdir)
        shutil.copytree(workdir, dest)
        return str(dest)
    return copy


# -- what is saved ---------------------------------------------------------------------------

def test_checkpoint_holds_student_optimizer_rng_data_order_and_config(kd):
    step = _steps(kd)[-1]
    assert step == 24
    reader = checkpoint.RunReader(kd)
    saved = reader.manager.item_metadata(step)
    run = reader.run_meta(step)
    reader.close()
    shapes = {k: tuple(v.shape) for item in ("model", "train")
              for k, v in ocp.tree.to_flat_dict(saved[item].tree, sep="/").items()}
    assert shapes["params/hidden/0/kernel/value"] == (784, 128)  # the student...
    assert shapes["opt_state/1/0/trace/student/out/kernel/value"] == (128, 10)  # ...its SGD momentum
    assert shapes["rng"] == (2,) and shapes["perm"] == (320,) and shapes["step"] == ()
    # ...and no teacher: the 784-64-10 teacher is read from its own run, never copied
    assert (784, 64) not in shapes.values() and (64, 10) not in shapes.values()
    assert run["config"]["loss"]["name"] == "kd" and run["config"]["teacher"]["workdir"]
    assert run["model"] == {"name": "mlp", "num_classes": 10, "input_shape": [28, 28, 1],
                            "kwargs": {"hidden": [128]}, "compute_dtype": "auto"}
    assert run["preprocess"] == {"mean": [0.286], "std": [0.353]}
    # the final save follows a log line: no partial averaging window left to carry over
    assert run["pending_train_metrics"]["steps"] == []


def test_keeps_the_latest_k_and_the_best_n(tmp_path):
    model = models.ModelSpec("mlp", 3, (2, 2, 1), {"hidden": [4]}).build()
    _, state = init_train_state(model, optax.sgd(0.1), seed=0, num_examples=8)
    state = sharding.replicate(state, sharding.make_mesh())

    def at(step):
        return state.replace(step=jnp.asarray(step, jnp.int32))

    with checkpoint.Checkpointer(str(tmp_path / "max"), max_to_keep=1, keep_best=2) as ck:
        for step, accuracy in enumerate([0.9, 0.3, 0.8, 0.2], 1):
            ck.save(at(step), {}, metrics={"eval/accuracy": accuracy})
        ck.save(at(5), {})  # a periodic checkpoint without eval: kept only while the latest
        ck.wait()
        assert ck.steps() == [1, 3, 5] and ck.best_step() == 1
    assert _steps(tmp_path / "max") == [1, 3, 5]
    with checkpoint.Checkpointer(str(tmp_path / "min"), max_to_keep=1, keep_best=1,
                                 best_metric="eval/loss", best_mode="min") as ck:
        for step, loss in enumerate([0.5, 0.1, 0.3], 1):
            ck.save(at(step), {}, metrics={"eval/loss": loss})
    assert _steps(tmp_path / "min") == [2, 3]
    with pytest.raises(ValueError, match=r"checkpoint.best_mode must be one of \('max', 'min'\), "
                                         r"got 'best'"):
        checkpoint.Checkpointer(str(tmp_path / "x"), max_to_keep=1, best_mode="best")
    with pytest.raises(ValueError, match="checkpoint.max_to_keep must be >= 1.*got 0"):
        checkpoint.Checkpointer(str(tmp_path / "x"), max_to_keep=0)


def _add_commit_action(monkeypatch, action):
    """Make every following save's background commit run `action` (wait for a gate, or fail as
    a full disk does) after Orbax has written the arrays into its temporary directory."""
    original = ocp.StandardCheckpointHandler.async_save

    class Commit:
        def result(self, timeout=None):
            action()

    async def async_save(self, *args, **kwargs):
        return [*(await original(self, *args, **kwargs) or []), Commit()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_saves_are_asynchronous_and_atomic(tmp_path, monkeypatch):
    model = models.ModelSpec("mlp", 3, (2, 2, 1), {"hidden": [4]}).build()
    _, state = init_train_state(model, optax.sgd(0.1), seed=0, num_examples=8)
    gate = threading.Event()
    with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as ck:
        ck.save(state, {"n": 0})
        ck.wait()
        _add_commit_action(monkeypatch, lambda: gate.wait(timeout=60))
        ck.save(state.replace(step=jnp.asarray(7, jnp.int32)), {"n": 7})
        # save() returned while its files are still being committed: training goes on. Until
        # then only a temporary directory exists, and a reader still sees step 0 alone.
        names = os.listdir(ck.directory)
        assert "7" not in names and any(n.startswith("7.orbax-checkpoint-tmp") for n in names)
        reader = checkpoint.RunReader(str(tmp_path))
        assert reader.resolve_step("latest") == 0 and reader.run_meta(0) == {"n": 0}
        reader.close()
        gate.set()
        ck.wait()
        assert _steps(tmp_path) == [7]


# -- resume ----------------------------------------------------------------------------------

def test_fresh_refuses_a_workdir_with_checkpoints(teacher, data_dir):
    before = _steps(teacher)
    with pytest.raises(ValueError, match=r"--fresh: .* already has checkpoints \(steps \[12, 24\] "
                                         r"in .*checkpoints\).*pick a new --workdir, or delete"):
        _train(teacher, data_dir, "--fresh")
    assert _steps(teacher) == before


def test_resuming_another_model_lists_the_mismatched_arrays(teacher, data_dir, copy_of):
    workdir = copy_of(teacher)
    with pytest.raises(CheckpointMismatchError) as err:
        _train(workdir, data_dir, "--config.model.name=mlp", "--config.model.kwargs={'hidden': (32,)}")
    msg = str(err.value)
    assert f"the checkpoint {workdir}/checkpoints/24 does not match this run's model" in msg
    assert "model/params/hidden/0/kernel: checkpoint (784, 64) float32, expected (784, 32)" in msg
    assert "train/opt_state/1/0/trace/student/out/kernel: checkpoint (64, 10) float32, expected (32, 10)" in msg
    assert "another --workdir" in msg


# Orbax leaves the reads of the other arrays as never-awaited coroutines when one read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_checkpoint_is_named_and_resume_falls_back(teacher, data_dir, copy_of, capsys):
    workdir = copy_of(teacher)
    latest = os.path.join(workdir, "checkpoints", "24")
    files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.join(latest, "model"))
             for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    # As a teacher it is refused with its name (a teacher is never silently swapped)...
    with pytest.raises(CheckpointError, match=f"{latest} is unreadable"):
        _train(os.path.join(workdir, "..", "student"), data_dir,
               f"--config.teacher.workdir={workdir}", command="distill", experiment="kd.py")
    capsys.readouterr()
    # ...and resuming its run falls back to step 12, setting the bad one aside, not deleting it.
    assert _train(workdir, data_dir, "--config.train.steps=36") == 0
    out, err = capsys.readouterr()
    aside = os.path.join(workdir, "checkpoints_unreadable", "24")
    assert f"checkpoint {latest} is unreadable" in err and f"moved it to {aside}" in err
    assert f"resumed from {workdir}/checkpoints/12 at step 12 of 36" in out
    assert "config changed since that checkpoint: train.steps: 24 -> 36" in out
    assert os.path.isdir(aside) and _steps(workdir) == [24, 36]
    assert _summary(workdir)["steps_this_run"] == 24
    steps = [r["step"] for r in _records(workdir) if "train/loss" in r]
    assert steps == [6, 12, 18, 24, 30, 36]  # the records past step 12 were rewritten, once


# -- failures --------------------------------------------------------------------------------

def test_nan_stops_naming_the_step_and_terms_and_keeps_the_last_good_checkpoint(
        teacher, data_dir, copy_of, monkeypatch, capsys):
    workdir = copy_of(teacher)
    assert _console(monkeypatch, workdir, data_dir, "--config.train.steps=48",
                    "--config.optimizer.learning_rate=1e9",
                    "--config.train.log_every_steps=1") == 1
    err = capsys.readouterr().err
    match = re.search(r"kdjax: error: step (\d+) went non-finite in: ([\w, ]+) \(", err)
    assert match, err
    bad = int(match.group(1))
    assert bad > 25 and "loss" in match.group(2)
    assert (f"Stopped without saving a non-finite state (train.nan_policy='stop'); the last good "
            f"checkpoint, {workdir}/checkpoints/24, is kept") in err
    assert "train.nan_policy='skip'" in err and "Traceback" not in err
    assert _steps(workdir) == [12, 24]
    # every step before the bad one was logged (log_every_steps=1), finite; nothing after it
    assert [r["step"] for r in _records(workdir) if "train/loss" in r][-1] == bad - 1


def test_nan_skip_policy_skips_and_counts_bad_steps(teacher, data_dir, copy_of, capsys):
    workdir = copy_of(teacher)
    assert _train(workdir, data_dir, "--config.train.steps=48",
                  "--config.optimizer.learning_rate=1e9",
                  "--config.train.nan_policy=skip") == 0
    summary = _summary(workdir)
    assert summary["steps"] == 48 and 0 < summary["skipped_steps"] <= 24
    assert "step(s) skipped so far for non-finite values" in capsys.readouterr().err
    records = _records(workdir)  # valid JSON: a NaN eval loss of the blown-up model is null
    counts = [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r]
    assert counts[-1] == summary["skipped_steps"] and counts == sorted(counts)
    reader = checkpoint.RunReader(workdir)
    model = reader.load_model(48, reader.model_spec(48))
    reader.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model))


@pytest.mark.parametrize("where", ["under_a_file", "checkpoints_is_a_file", "read_only_dir"])
def test_unwritable_workdir_is_refused_before_training(tmp_path, data_dir, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("")
        workdir = tmp_path / "file" / "run"
    elif where == "checkpoints_is_a_file":
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "checkpoints").write_text("")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through directory permissions")
        workdir = tmp_path / "ro"
        workdir.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"--workdir '.*' is not writable: cannot write into "
                                         r".*checkpoints \(.*\); pick a directory you can write"):
        _train(workdir, data_dir)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_too_little_disk_is_refused_before_training(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(2 ** 30, 2 ** 30 - 4096, 4096))
    with pytest.raises(ValueError, match=r"not enough disk space for the checkpoints in .*: 3 "
                                         r"copies of the 0\.4 MiB train state need 1\.2 MiB more, "
                                         r"0\.0 MiB are free; .*checkpoint.max_to_keep"):
        _train(tmp_path / "run", data_dir)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_space_check_skips_files_a_background_cleanup_deletes_during_the_walk(
        tmp_path, monkeypatch):
    # Orbax removes a failed save's temporary directory from a background thread; the walk
    # over the checkpoints may list a file that is gone by the time its size is read (CI saw
    # exactly this after the failing-save test below).
    directory = checkpoint.checkpoint_dir(str(tmp_path))
    os.makedirs(os.path.join(directory, "24.orbax-checkpoint-tmp"))
    with open(os.path.join(directory, "kept"), "wb") as f:
        f.write(b"x" * 4096)
    vanishing = os.path.join(directory, "24.orbax-checkpoint-tmp", "_METADATA")
    open(vanishing, "wb").close()
    getsize = os.path.getsize

    def deleted_meanwhile(path):
        if path == vanishing:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return getsize(path)

    monkeypatch.setattr(checkpoint.os.path, "getsize", deleted_meanwhile)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(2 ** 30, 2 ** 30, 0))
    state = {"params": np.zeros(1024, np.float32)}  # 4096 bytes: exactly what "kept" frees
    checkpoint.ensure_space(str(tmp_path), state, copies=1)
    with pytest.raises(ValueError, match=r"2 copies of the 0\.0 MiB train state need 0\.0 MiB"):
        checkpoint.ensure_space(str(tmp_path), state, copies=2)


def test_failing_save_is_a_clear_error_and_the_previous_checkpoint_stays(
        tmp_path, data_dir, monkeypatch, capsys):
    calls = []

    def disk_full_from_the_second_save():
        calls.append(1)
        if len(calls) > 2:  # two items (model, train) per save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _add_commit_action(monkeypatch, disk_full_from_the_second_save)
    workdir = str(tmp_path / "run")
    assert _console(monkeypatch, workdir, data_dir, "--config.checkpoint.max_to_keep=1") == 1
    err = capsys.readouterr().err
    assert err.startswith("kdjax: error: saving the checkpoint of step 24 to ")
    assert "failed: [Errno 28] No space left on device" in err
    assert f"the previous checkpoint, {workdir}/checkpoints/12, is intact" in err
    assert "Traceback" not in err  # Orbax's own traceback dumps are not shown
    assert _steps(workdir) == [12]  # max_to_keep=1, yet step 12 was not deleted for step 24
    monkeypatch.undo()
    assert _train(workdir, data_dir, "--config.checkpoint.max_to_keep=1") == 0
    assert f"resumed from {workdir}/checkpoints/12" in capsys.readouterr().out
    assert _steps(workdir) == [24]


def test_teacher_not_matching_its_configured_model_is_listed_before_training(
        teacher, data_dir, tmp_path):
    workdir = tmp_path / "kd"
    with pytest.raises(CheckpointMismatchError) as err:
        _train(workdir, data_dir, f"--config.teacher.workdir={teacher}",
               "--config.teacher.model.name=mlp",
               "--config.teacher.model.kwargs={'hidden': (128, 32)}",
               command="distill", experiment="kd.py")
    msg = str(err.value)
    assert (f"{teacher}/checkpoints/24 does not match the teacher model teacher.model.name='mlp' "
            f"(model 'mlp', kwargs {{'hidden': (128, 32)}}, 10 classes") in msg
    assert "5 mismatched parameter(s)" in msg
    for line in ("params/hidden/0/kernel: checkpoint (784, 64) float32, expected (784, 128)",
                 "params/hidden/0/bias: checkpoint (64,) float32, expected (128,)",
                 "params/hidden/1/kernel: (128, 32) expected, not in the checkpoint",
                 "params/hidden/1/bias: (32,) expected, not in the checkpoint",
                 "params/out/kernel: checkpoint (64, 10) float32, expected (32, 10)"):
        assert line in msg
    assert not os.path.exists(workdir / "metrics.jsonl")


def test_student_and_teacher_class_counts_must_agree(teacher, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the teacher in '.*teacher' has 10 classes but the "
                                         r"student has 12 \(model.num_classes=12"):
        _train(tmp_path / "kd", data_dir, f"--config.teacher.workdir={teacher}",
               "--config.model.num_classes=12", command="distill", experiment="kd.py")


def test_labels_must_fit_the_model(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the labels of fashion_mnist split 'train' range over "
                                         r"0\.\.9 but the model has 5 classes "
                                         r"\(model.num_classes=5\); set model.num_classes to at "
                                         r"least 10, or to 0 for the dataset's 10"):
        _train(tmp_path / "run", data_dir, "--config.model.num_classes=5")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


# -- export ----------------------------------------------------------------------------------

def _snippet(markdown):
    return re.search(r"```python\n(import numpy as np\nfrom kdjax import export\n.*?)```",
                     markdown, re.S).group(1)


def test_export_is_the_student_alone_and_the_documented_snippet_runs(kd, data_dir, tmp_path):
    out = str(tmp_path / "kd_export")
    assert cli.main(["export", "--workdir", kd, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "kdjax_model.json", "model"]
    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "model")).item_metadata.tree
    assert set(saved) == {"params", "model_state"}  # no optimizer, PRNG or data state
    assert models.count_params(saved["params"]) == _summary(kd)["num_params"]

    with open(os.path.join(ROOT, "README.md")) as f:
        documented = _snippet(f.read())
    assert len(documented.strip().splitlines()) == 5
    ns = {}
    exec(documented.replace("exports/kd", out), ns)
    assert ns["predictions"].shape == (8,)
    with open(os.path.join(out, "README.md")) as f:
        exec(_snippet(f.read()), {})  # the export's own copy runs as written

    # the exported model is the checkpoint's: same logits, the run's eval accuracy
    arrays = data.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    reader = checkpoint.RunReader(kd)
    reference = reader.load_model(24, reader.model_spec(24))
    reader.close()
    x = ns["preprocess"](arrays["image"])
    logits = np.asarray(ns["model"](x))
    np.testing.assert_array_equal(logits, np.asarray(reference(x)))
    # (eager here, jit in the run's eval: equal but for rows whose top two logits tie within
    # float32 reassociation (_float32.py) along the MLP's 784 inputs, 32 hidden, 10 classes)
    assert (abs((logits.argmax(-1) == arrays["label"]).mean() - _summary(kd)["eval/accuracy"])
            <= f32.near_ties(logits, 784 + 32 + 10) + f32.EPS)

    with pytest.raises(ValueError, match="already exists; pick a new path"):
        cli.main(["export", "--workdir", kd, "--out", out])
    best = str(tmp_path / "best")
    assert cli.main(["export", "--workdir", kd, "--out", best, "--step", "best"]) == 0
    agreement = {r["step"]: r["eval/teacher_agreement"] for r in _records(kd)
                 if "eval/teacher_agreement" in r}
    with open(os.path.join(best, "kdjax_model.json")) as f:  # ties go to the later step
        assert json.load(f)["source"]["step"] == max(agreement, key=lambda s: (agreement[s], s))
    with pytest.raises(ValueError, match=r"step='7' is not a saved checkpoint.*\[12, 24\]"):
        cli.main(["export", "--workdir", kd, "--out", str(tmp_path / "x"), "--step", "7"])


# -- other meshes ----------------------------------------------------------------------------

def _fresh_state(workdir):
    """A step-0 TrainState of the run in `workdir` (its model and optimizer): a restore target."""
    reader = checkpoint.RunReader(workdir)
    run = reader.run_meta(24)
    reader.close()
    config = config_lib.validate(run["config"])
    tx = optim.make_optimizer(config.optimizer, config.train.steps)
    model = models.ModelSpec.from_json(run["model"]).build()
    return init_train_state(model, tx, seed=0, num_examples=320)[1]


RESHARD = """
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from kdjax import checkpoint, sharding
from test_checkpoint import _fresh_state
workdir, expected = sys.argv[1:]
assert jax.device_count() == 2
mesh = sharding.make_mesh()
reader = checkpoint.RunReader(workdir)
spec = reader.model_spec(24)
state = _fresh_state(workdir)
def place(x):  # split whatever splits over the 2 devices, replicate the rest
    axes = P("data") if x.ndim and x.shape[0] % 2 == 0 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, axes))
abstract = jax.tree.map(place, state)
restored, run = checkpoint.Checkpointer(workdir, max_to_keep=2).restore(abstract)
want = np.load(expected)
for i, (got, target) in enumerate(zip(jax.tree.leaves(restored), jax.tree.leaves(abstract))):
    assert got.sharding == target.sharding, (i, got.sharding)
    np.testing.assert_array_equal(np.asarray(got), want[f"arr_{i}"])
teacher = reader.load_model(24, spec, mesh=mesh)
assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(teacher))
print("restored on", jax.device_count(), "devices")
"""


def test_restores_onto_another_mesh_and_device_count(teacher, copy_of, tmp_path):
    """Saved from one device, restored onto two (XLA's host-platform devices), sharded."""
    workdir = copy_of(teacher)
    state = _fresh_state(workdir)
    with checkpoint.Checkpointer(workdir, max_to_keep=2) as ck:
        restored, _ = ck.restore(sharding.abstract(state, sharding.replicated(sharding.make_mesh())))
    np.savez(tmp_path / "expected.npz", *[np.asarray(x) for x in jax.tree.leaves(restored)])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-c", RESHARD, workdir, str(tmp_path / "expected.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored on 2 devices" in r.stdout


# -- preemption: real processes --------------------------------------------------------------

# Paced by its 8 checkpoints, so that a signal sent when one appears lands well before the end.
LONG = ["--config.model.name=mlp", "--config.model.kwargs={'hidden': (128,)}",
        "--config.train.steps=480", "--config.train.batch_size=32",
        "--config.train.log_every_steps=20", "--config.eval.every_steps=160",
        "--config.checkpoint.every_steps=60", "--config.checkpoint.max_to_keep=3",
        "--config.eval.batch_size=150", "--no-progress"]


def _long_args(workdir, data_dir):
    return ["train", "--config", f"{EXP}/teacher.py", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", *LONG]


def _run_then_signal(workdir, data_dir, sig, *, after_step):
    """Start `kdjax train` in a process; send `sig` once a checkpoint past `after_step` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "kdjax", *_long_args(workdir, data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    ckpts = os.path.join(workdir, "checkpoints")
    while proc.poll() is None:
        if os.path.isdir(ckpts) and any(s > after_step for s in _steps(workdir)):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    return {"code": proc.returncode, "err": err, "step": _steps(workdir)[-1],
            "finished": os.path.exists(os.path.join(workdir, "summary.json")),
            "logged": [r["step"] for r in _records(workdir) if "train/loss" in r]}


@pytest.fixture(scope="module")
def preempted(data_dir, tmp_path_factory):
    """One uninterrupted run, and the same run stopped by SIGINT, resumed and stopped by SIGTERM,
    resumed and killed with SIGKILL, then resumed to its end."""
    root = tmp_path_factory.mktemp("preempt")
    baseline, work = str(root / "baseline"), str(root / "run")
    assert cli.main(_long_args(baseline, data_dir)) == 0
    stops, after = {}, 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        stops[sig] = _run_then_signal(work, data_dir, sig, after_step=after)
        after = stops[sig]["step"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(_long_args(work, data_dir)) == 0
    return {"baseline": baseline, "work": work, "stops": stops, "final_out": out.getvalue()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_at_the_next_step_and_exits_cleanly(preempted, sig):
    stop, work = preempted["stops"][sig], preempted["work"]
    step = stop["step"]
    assert stop["code"] == 128 + sig, stop["err"]
    assert (f"kdjax: {signal.Signals(sig).name} received: saved a checkpoint at step {step} of "
            f"480 in {work}/checkpoints/{step} and stopped; run the same command again to "
            f"resume") in stop["err"]
    assert 0 < step < 480 and not stop["finished"]
    assert "Traceback" not in stop["err"] and "KeyboardInterrupt" not in stop["err"]
    # metrics were flushed: every log line up to the stop is on disk, whole
    assert stop["logged"][-1] == step // 20 * 20


def test_sigkill_mid_run_then_resume_is_bit_identical_to_an_uninterrupted_run(preempted):
    stops, work, baseline = preempted["stops"], preempted["work"], preempted["baseline"]
    kill = stops[signal.SIGKILL]
    assert kill["code"] == -signal.SIGKILL and not kill["finished"]
    assert stops[signal.SIGTERM]["step"] < kill["step"] < 480
    assert f"resumed from {work}/checkpoints/{kill['step']} at step" in preempted["final_out"]

    def saved(workdir):
        reader = checkpoint.RunReader(workdir)
        items = reader.manager.restore(480, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
        reader.close()
        return jax.tree.leaves({k: items[k] for k in ("model", "train")})

    a, b = saved(baseline), saved(work)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # parameters, optimizer state, PRNG key, data order: bit for bit
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def records(workdir):
        return [{k: v for k, v in r.items() if k != "train/images_per_s"}
                for r in _records(workdir)]

    assert records(work) == records(baseline)  # every logged average and eval, exactly
    for key in ("eval/accuracy", "eval/loss", "train/loss", "train/accuracy"):
        assert _summary(work)[key] == _summary(baseline)[key], key
