"""Mesh construction, sharding rules and multi-host start-up, in this (one-device) process; the
multi-device behaviour is in test_multidevice.py and test_multiprocess.py."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from kdjax import cli, distributed, plan, sharding

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_2x4 = AbstractMesh((2, 4), sharding.MESH_AXES)  # the rules only read the axis sizes


def test_default_mesh_is_the_trivial_mesh_on_one_device():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    assert dict(sharding.make_mesh(data=1, fsdp=-1).shape) == {"data": 1,
                                                               "fsdp": jax.device_count()}


@pytest.mark.parametrize("data,fsdp,match", [
    (2, 1, r"mesh.data=2 × mesh.fsdp=1 multiply to 2, but there are 1 devices"),
    (-1, -1, "at most one mesh axis may be -1"),
    (0, 1, "mesh.data=0 is not a mesh axis size"),
    (-1, 3, "3 does not divide 1"),
])
def test_mesh_errors_name_the_axes_and_the_fix(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(data, fsdp, devices=jax.devices()[:1])


def test_fsdp_rule_splits_the_largest_divisible_axis():
    spec = lambda shape, **kw: sharding.leaf_spec(shape, np.float32, MESH_2x4, "fsdp",
                                                  min_bytes=kw.get("min_bytes", 0))
    assert spec((784, 1200)) == P(None, "fsdp")  # largest axis
    assert spec((1200, 10)) == P("fsdp", None)
    assert spec((3, 3, 64, 64)) == P(None, None, None, "fsdp")  # tie: the later (output) axis
    assert spec((10, 6)) == P()  # nothing divisible by 4: replicated
    assert spec(()) == P()
    assert spec((1024, 1024), min_bytes=4 * 2**20 + 1) == P()  # 4 MiB: too small to split
    assert spec((1024, 1024), min_bytes=4 * 2**20) == P(None, "fsdp")
    assert sharding.leaf_spec((784, 1200), np.float32, MESH_2x4, "replicated") == P()
    with pytest.raises(ValueError, match="'zero3' is not one of"):
        sharding.leaf_spec((8,), np.float32, MESH_2x4, "zero3")


def test_state_shardings_keep_bookkeeping_replicated():
    mesh = sharding.make_mesh()
    from kdjax.step import TrainState

    scalar = np.zeros((), np.int32)
    state = TrainState(step=scalar, params={"w": np.zeros((8, 4), np.float32)},
                       model_state={}, opt_state=({"w": np.zeros((8, 4), np.float32)},),
                       rng=np.zeros((2,), np.uint32), perm=np.arange(8, dtype=np.int32),
                       skipped_steps=scalar, bad_step=scalar, bad_terms=scalar)
    sh = sharding.state_shardings(state, mesh, "fsdp", min_bytes=0)
    assert (sh.step.spec == sh.rng.spec == sh.perm.spec == sh.skipped_steps.spec
            == sh.bad_step.spec == sh.bad_terms.spec == P())
    # one device: fsdp=1, nothing to split
    assert sh.params["w"].spec == sh.opt_state[0]["w"].spec == P()
    placed = sharding.put(state, sh)
    assert sharding.bytes_per_device(placed.params) == 8 * 4 * 4
    assert sharding.bytes_per_device(placed) == (1 + 32 + 32 + 2 + 8 + 3) * 4


@pytest.mark.parametrize("rule", ["replicated", "fsdp"])
def test_per_example_memory_is_split_over_the_batch_axes_whatever_the_rule(rule):
    """CRD's memory banks (DataSharded) follow the data they index: rows over data x fsdp."""
    tree = {"bank": sharding.DataSharded(np.zeros((96, 16), np.float32)),
            "odd_bank": sharding.DataSharded(np.zeros((90, 16), np.float32)),  # 90 % 8 != 0
            "w": nnx.Param(np.zeros((96, 16), np.float32))}
    sh = sharding.tree_shardings(tree, MESH_2x4, rule, min_bytes=0)
    assert sh["bank"].get_value().spec == P(sharding.BATCH_AXES)
    fsdp = rule == "fsdp"
    # else the rule's largest axis divisible by fsdp=4: 16 for (90, 16), 96 for (96, 16)
    assert sh["odd_bank"].get_value().spec == (P(None, "fsdp") if fsdp else P())
    assert sh["w"].get_value().spec == (P("fsdp", None) if fsdp else P())


def test_rule_and_batch_size_errors():
    default = plan.as_plan({}).mesh  # data=-1, fsdp=1
    with pytest.raises(ValueError, match=r"teacher.sharding='fsdp'.*mesh.fsdp=1.*mesh.fsdp=-1"):
        sharding.check_rule("fsdp", default, "teacher.sharding")
    with pytest.raises(ValueError, match=r"model.sharding='zero' is not a sharding rule"):
        sharding.check_rule("zero", default, "model.sharding")
    sharding.check_rule("fsdp", dataclasses.replace(default, data=1, fsdp=-1), "model.sharding")
    with pytest.raises(ValueError, match=r"train.batch_size=100 is not divisible by the 8 "
                                         r"devices.*data=2 × fsdp=4.*train.batch_size=96"):
        sharding.check_batch_size(100, MESH_2x4)
    sharding.check_batch_size(96, MESH_2x4)


def test_cli_refuses_fsdp_rule_on_a_one_wide_fsdp_axis(tmp_path):
    with pytest.raises(ValueError, match="model.sharding='fsdp'"):
        cli.main(["train", "--config", f"{ROOT}/experiments/fashion_mnist/teacher.py", "--workdir",
                  str(tmp_path), "--config.model.sharding=fsdp"])


SLURM_2 = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_cluster_detection(monkeypatch):
    for k in [*SLURM_2, "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"]:
        monkeypatch.delenv(k, raising=False)
    assert distributed.detect_cluster() is None  # a laptop: no coordinator is started
    for k, v in SLURM_2.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # an interactive single-task allocation
    assert distributed.detect_cluster() is None
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.detect_cluster() == "ompi"


@pytest.mark.parametrize("flags,match", [
    (("127.0.0.1:1234", 2, None), "missing --process-id"),
    ((None, 2, 0), "missing --coordinator"),
    (("127.0.0.1", 2, 0), r"--coordinator='127.0.0.1' must be HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), r"--process-id=2 must be in \[0, 1\]"),
    (("127.0.0.1:1234", 0, 0), "--num-processes=0 must be >= 1"),
])
def test_multihost_flag_errors(flags, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*flags)
    assert not jax.distributed.is_initialized()
