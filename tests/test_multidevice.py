"""8 simulated devices: data parallel, FSDP and a (data, fsdp) mesh give the same distillation as
one device; FSDP really splits the arrays; checkpoints move between 1 and 8 devices.

The 8-device runs happen in one subprocess (tests/_multidevice.py); this process, with one CPU
device, restores the 8-device checkpoint."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import _multidevice as md
from kdjax import sharding
from kdjax.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multidevice")
    env = {**os.environ, "PYTHONPATH": ROOT, **md.simulated_devices_env(8)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_multidevice.py"), str(tmp)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp / "result.json") as f:
        result = json.load(f)
    return {"dir": tmp, "result": result}


def _npz(run8, name):
    with np.load(run8["dir"] / f"{name}.npz") as z:
        return dict(z)


@pytest.mark.parametrize("name", ["dp", "fsdp", "hybrid"])
def test_same_losses_and_params_as_one_device(run8, name):
    """50 steps with a BatchNorm student and random crops/flips: equal to float tolerance, so the
    BatchNorm statistics and the augmentation are those of the global batch on every mesh."""
    single, other = run8["result"]["single"], run8["result"][name]
    assert len(single["losses"]) == md.STEPS == 50
    assert single["losses"][-1] < 0.6 * single["losses"][0]  # it trained
    np.testing.assert_allclose(other["losses"], single["losses"], rtol=2e-5)
    a, b = _npz(run8, "single"), _npz(run8, name)
    assert a.keys() == b.keys() and any("mean" in k for k in a)  # BatchNorm statistics included
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_fsdp_splits_params_optimizer_state_and_teacher_over_8_devices(run8):
    fsdp = run8["result"]["fsdp"]
    for tree in ("params_split", "opt_split", "teacher_split"):
        for path, info in fsdp[tree].items():
            shape, (shard,) = info["shape"], info["shard_shapes"]
            assert info["num_shards"] == 8, path
            if any(d % 8 == 0 for d in shape):  # split: each device holds 1/8 of it
                assert info["distinct_shards"] == 8 and np.prod(shard) * 8 == np.prod(shape), path
            else:  # e.g. the 4-class output bias: replicated
                assert info["distinct_shards"] == 1 and shard == shape, path
    split = fsdp["params_split"]
    # largest axis, 64 / 8
    assert split["['student']['fc']['kernel'].value"]["shard_shapes"] == [[8, 32]]
    assert split["['student']['conv2']['conv']['kernel'].value"]["shard_shapes"] == [[3, 3, 8, 2]]
    assert split["['student']['out']['bias'].value"]["shard_shapes"] == [[4]]
    # per-device bytes: 1/8 of everything but the replicated 4-float bias
    single = run8["result"]["single"]
    for key in ("param_bytes", "opt_bytes", "teacher_bytes"):
        assert fsdp[key] < single[key] / 7, key
    assert fsdp["param_bytes"] == (single["param_bytes"] - 16) // 8 + 16


def test_hybrid_mesh_shards_the_teacher_over_fsdp_and_replicates_the_student(run8):
    hybrid, single = run8["result"]["hybrid"], run8["result"]["single"]
    assert hybrid["param_bytes"] == single["param_bytes"]
    kernel = hybrid["teacher_split"]["[0]['hidden'][0]['kernel'].value"]
    # (data=2, fsdp=4): 4 distinct quarters, each on the 2 devices of a data row
    assert kernel["shard_shapes"] == [[64, 16]] and kernel["distinct_shards"] == 4


def test_checkpoint_from_1_device_restores_onto_8_fsdp_devices(run8):
    info = run8["result"]["restored_from_1dev"]
    assert info["step"] == md.STEPS
    assert info["params_split"]["['student']['fc']['kernel'].value"]["shard_shapes"] == [[8, 32]]
    restored, written = _npz(run8, "restored_from_1dev"), _npz(run8, "written_on_1")
    assert restored.keys() == written.keys() and any(".trace[" in k for k in written)  # momentum too
    for k, v in written.items():
        np.testing.assert_array_equal(restored[k], v, err_msg=k)


def test_checkpoint_from_8_fsdp_devices_restores_onto_1_device(run8):
    abstract = jax.eval_shape(lambda: md.init()[1])  # shapes only: nothing to compute
    state_sharding = sharding.state_shardings(abstract, sharding.make_mesh())  # one device here
    with Checkpointer(str(run8["dir"] / "run8"), max_to_keep=1) as ckpt:
        restored, _ = ckpt.restore(sharding.abstract(abstract, state_sharding))
    assert int(restored.step) == md.STEPS
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(restored)} == {1}
    expected = _npz(run8, "fsdp")
    got = md.flat({"params": restored.params, "model_state": restored.model_state})
    assert got.keys() == expected.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_process_local_batches_assemble_the_global_batch(run8):
    local = run8["result"]["local_batch"]
    assert local["equal"] and local["shard_shapes"] == [[md.B // 8, 8, 8, 1]]


def test_several_cpu_devices_in_one_process_dispatch_serially(run8):
    """XLA:CPU can deadlock overlapping multi-device steps (kdjax.sharding.serial_dispatch)."""
    assert run8["result"]["serial_dispatch"] is True
    assert sharding.serial_dispatch(sharding.make_mesh()) is False  # one device: asynchronous


def test_lm_distillation_step_is_the_same_with_fsdp_student_and_teacher_over_8_devices(run8):
    """The fused LM step (teacher forward, chunked token loss) with the student and the teacher
    FSDP-sharded over 8 devices computes what it computes on one."""
    lm = run8["result"]["lm"]
    np.testing.assert_allclose(lm["fsdp"]["losses"], lm["single"]["losses"], rtol=1e-4)
    split = [i for i in lm["fsdp"]["teacher_split"].values() if i["num_shards"] == 8 and
             list(i["shard_shapes"][0]) != i["shape"]]
    assert len(split) >= 10  # the teacher's kernels and embedding are split, not replicated
