"""Two processes on localhost through the real CLI (jax.distributed, gloo CPU collectives): the
same `kdjax distill` command as a one-device run, with FSDP across both processes, gives the same
losses, accuracy and parameters; its checkpoint restores onto one process; the SLURM launch path
(srun's environment, no flags) is detected and trains the same way."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import _multidevice as md
from kdjax import checkpoint, cli, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "fashion_mnist")
TINY = ["--config.train.steps=12", "--config.train.batch_size=32", "--config.eval.every_steps=6",
        "--config.train.log_every_steps=3", "--config.checkpoint.every_steps=6",
        "--config.eval.batch_size=64", "--no-progress"]
# One command for every machine: FSDP over however many devices there are (1 here, 2 x 2 in the
# two-process run), student and teacher both split, however small their arrays.
SHARDED = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.sharding=fsdp",
           "--config.teacher.sharding=fsdp", "--config.mesh.fsdp_min_bytes=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_for, env_for, n=2, timeout=400):
    """Start `n` kdjax processes (2 CPU devices each), wait for all, return their outputs."""
    procs = []
    for i in range(n):
        env = {**os.environ, "PYTHONPATH": ROOT, **md.simulated_devices_env(2), **env_for(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "kdjax", *args_for(i)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"stdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    return [out for out, _ in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    src = data.make_synthetic_idx_dir(str(root / "src"), 256, 64, seed=1)
    data_dir = str(root / "tfds")
    data.prepare("fashion_mnist", src, data_dir=data_dir, verify_checksums=False)
    common = [f"--config.data.data_dir={data_dir}", *TINY]
    teacher = str(root / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     "--config.model.name=mlp_tiny", *common]) == 0
    distill = ["distill", "--config", f"{EXP}/kd.py", f"--config.teacher.workdir={teacher}",
               *common, *SHARDED]
    single, two = str(root / "single"), str(root / "two")
    assert cli.main([*distill, "--workdir", single]) == 0
    port = _free_port()
    outs = _launch(lambda i: [*distill, "--workdir", two, "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", "2", "--process-id", str(i)], lambda i: {})
    return {"single": single, "two": two, "data_dir": data_dir, "distill": distill, "outs": outs}


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_two_processes_join_one_mesh(runs):
    assert "process 0 of 2 (flags), 4 devices" in runs["outs"][0]
    assert "process 1 of 2 (flags), 4 devices" in runs["outs"][1]
    s1, s2 = _summary(runs["single"]), _summary(runs["two"])
    assert (s1["num_processes"], s1["num_devices"], s1["mesh"]) == (1, 1, {"data": 1, "fsdp": 1})
    assert (s2["num_processes"], s2["num_devices"], s2["mesh"]) == (2, 4, {"data": 1, "fsdp": 4})
    # FSDP over 4 devices: each holds about a quarter of the student, its momentum and the teacher
    for key in ("param_bytes_per_device", "opt_state_bytes_per_device",
                "teacher_bytes_per_device"):
        assert s2[key] < s1[key] / 3, key
    # only process 0 wrote the run's files: one record per logged step
    assert sorted(_train_losses(runs["two"])) == [3, 6, 9, 12]


def test_two_process_run_matches_the_single_process_run(runs):
    single, two = _train_losses(runs["single"]), _train_losses(runs["two"])
    assert single.keys() == two.keys()
    np.testing.assert_allclose([two[k] for k in sorted(two)],
                               [single[k] for k in sorted(single)], rtol=1e-4)
    s1, s2 = _summary(runs["single"]), _summary(runs["two"])
    for key in ("eval/accuracy", "eval/loss", "eval/teacher_agreement"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4), key


def _latest_model(workdir):
    reader = checkpoint.RunReader(workdir)
    try:
        step = reader.resolve_step("latest")
        return reader.load_model(step, reader.model_spec(step))
    finally:
        reader.close()


def test_two_process_checkpoint_restores_onto_one_process(runs):
    models = [_latest_model(w) for w in (runs["single"], runs["two"])]
    a, b = (jax.tree.leaves(nnx.state(m)) for m in models)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    # and `kdjax eval` on one process reproduces the two-process run's final accuracy
    assert cli.main(["eval", "--workdir", runs["two"]]) == 0
    with open(os.path.join(runs["two"], "eval.json")) as f:
        result = json.load(f)
    assert result["eval/accuracy"] == pytest.approx(_summary(runs["two"])["eval/accuracy"])


def test_slurm_launch_without_flags_matches_too(runs, tmp_path):
    """docs/scaling.md's sbatch script runs `srun kdjax distill ...` with no multi-host flags:
    fake the variables srun sets for a 2-task step on this host and let JAX read them."""
    port, workdir = _free_port(), str(tmp_path / "slurm")
    outs = _launch(lambda i: [*runs["distill"], "--workdir", workdir], lambda i: {
        "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": str(port)})
    assert "process 0 of 2 (slurm), 4 devices" in outs[0]
    assert "process 1 of 2 (slurm), 4 devices" in outs[1]
    single, slurm = _train_losses(runs["single"]), _train_losses(workdir)
    np.testing.assert_allclose([slurm[k] for k in sorted(slurm)],
                               [single[k] for k in sorted(single)], rtol=1e-4)
