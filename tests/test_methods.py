"""The method zoo inside the fused step: every method trains on tiny models in one program,
connectors train while teachers stay bit-identical, the exported student has no connectors,
CRD's memory, mutual learning's peers, several teachers, connector shapes and refusals."""

import functools
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import _float32 as f32
from kdjax import (checkpoint, config as config_lib, connectors, methods, models, objectives,
                   sharding)
from kdjax.distillee import Distillee, Peers, split_student
from kdjax.step import (DeviceData, freeze, init_train_state, make_distill_step, make_eval_step,
                        pad_batch)

pytestmark = pytest.mark.usefixtures("quick_compiles")
N, B, C, SHAPE = 32, 8, 4, (8, 8, 1)
LABELS = (np.arange(N) % C).astype(np.int32)
IMAGES = np.clip(LABELS[:, None, None, None] * 50 + np.random.default_rng(0).normal(
    40, 20, (N, *SHAPE)), 0, 255).astype(np.uint8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per method: the architecture family (MLPs compile fastest; maps need CNNs) and loss.kwargs.
CNN_METHODS = {"fitnet", "at", "sp", "nst", "vid", "byot"}
KWARGS = {"crd": {"num_negatives": 8, "embed_dim": 8}, "cc": {"embed_dim": 8},
          "rkd": {"embed_dim": 8}}


def model(name, seed, **kw):
    return models.create_model(name, num_classes=C, input_shape=SHAPE, rngs=nnx.Rngs(seed), **kw)


@functools.cache
def _pair(family, seed):
    """Initialised once per test session, student and teacher of the same shapes: eager
    initialisation compiles a kernel per parameter shape (which dominates on CPU) and later
    models of those shapes reuse them."""
    if family == "cnn":
        student, teacher = model("cnn_tiny", 0), model("cnn_tiny", seed)
    else:
        student, teacher = model("mlp", 0, hidden=(16,)), model("mlp", seed, hidden=(16, 16))
    return nnx.split(student), freeze(teacher)


def student_and_teacher(name, seed=100):
    """A fresh student (the step donates its buffers) and a frozen teacher for `name`."""
    (graphdef, state), teacher = _pair("cnn" if name in CNN_METHODS else "mlp", seed)
    return nnx.merge(graphdef, jax.device_put(host(state))), teacher


def loss_config(name, **overrides):
    c = config_lib.base_config().loss
    c.update(name=name, kwargs=KWARGS.get(name, {}), **overrides)
    return c


def build(name, *, n_teachers=1, **overrides):
    """(step, state, graphdef) for `name` on the tiny set, as the trainer assembles them."""
    cfg = loss_config(name, **overrides)
    student, teacher = student_and_teacher(name)
    teachers = () if not objectives.needs_teacher(name, cfg.kwargs) else (
        teacher, *[student_and_teacher(name, 100 + i)[1] for i in range(1, n_teachers)])
    bundle = Distillee(student,
                       peers=Peers([model("mlp", 1, hidden=(16,))] if name == "dml" else []),
                       connectors=objectives.build_connectors(
                           cfg, student, teachers, image_shape=SHAPE, rngs=nnx.Rngs(7),
                           dataset_labels=LABELS),
                       exits=objectives.build_exits(cfg, student, image_shape=SHAPE,
                                                    rngs=nnx.Rngs(8)))
    tx = optax.sgd(0.05, momentum=0.9)
    graphdef, state = init_train_state(bundle, tx, seed=0, num_examples=N)
    step = make_distill_step(graphdef, tx, objectives.from_config(cfg), teachers=teachers,
                             data=DeviceData({"image": jnp.asarray(IMAGES), "label": jnp.asarray(LABELS)}, B))
    mesh = sharding.make_mesh()
    return step, sharding.put(state, sharding.state_shardings(state, mesh)), graphdef


def host(tree):
    return jax.tree.map(np.array, tree)


@functools.cache
def trained(name):
    """`name` built and run for 3 steps, once per test session (compiles dominate on CPU):
    the step, the graphdef, the final state, host copies of the state before and after each
    step, and the metrics."""
    step, state, graphdef = build(name)
    states, history, teachers = [host(state)], [], host(step.teachers)
    for _ in range(3):
        state, m = step(state)
        states.append(host(state))
        history.append(jax.device_get(m))
    return SimpleNamespace(step=step, graphdef=graphdef, state=state, states=states,
                           history=history, teachers=teachers)


def changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", [m for m in methods.names() if m != "ce"])
def test_every_method_trains_in_one_fused_program(name):
    run = trained(name)
    assert run.step.fn._cache_size() == 1  # one compiled program served every step
    for m in run.history:
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    first, last = run.states[0].params, run.states[-1].params
    assert changed(first["student"], last["student"])
    for part in ("connectors", "exits"):  # what trains alongside learns with the student...
        if part in first:
            assert changed(first[part], last[part])
    if name in (*objectives.FEATURE_METHODS, "byot"):
        assert run.history[-1]["feature"] > 0
    if name == "dml":  # the peer learns in the same step
        assert changed(first["peers"], last["peers"]) and "peer1/accuracy" in run.history[-1]
    # ...while the teachers are inputs of the program, never updated
    jax.tree.map(np.testing.assert_array_equal, run.teachers, host(run.step.teachers))


def test_feature_step_is_one_module_with_its_connectors():
    run = trained("fitnet")
    hlo = run.step.lower(run.state).as_text()
    assert len(re.findall(r"^module @", hlo, flags=re.M)) == 1
    assert "tensor<1x1x16x16xf32>" in hlo  # the regressor (stage2, 16 -> 16 channels)


def test_crd_memory_banks_update_at_the_batch_only():
    run = trained("crd")
    crd = [s.model_state["connectors"][0][0] for s in run.states]
    perm = run.states[0].perm  # the first epoch's order: step k reads perm[kB:(k+1)B]
    seen, rest = perm[:3 * B], perm[3 * B:]
    for bank in ("student_memory", "teacher_memory"):
        old, new = crd[0][bank].get_value(), crd[-1][bank].get_value()
        np.testing.assert_array_equal(old[rest], new[rest])
        assert not np.any(np.all(np.isclose(old[seen], new[seen]), axis=1))
        np.testing.assert_allclose(np.linalg.norm(new[seen], axis=1), 1.0, rtol=1e-5)
    z = [c["normalizers"].get_value() for c in crd]
    assert np.all(z[0] < 0) and np.all(z[1] > 0)
    np.testing.assert_array_equal(z[1], z[-1])  # estimated on the first batch, then fixed


@pytest.mark.parametrize("replacement,k", [(False, 22), (True, 200)])
def test_crd_negatives_are_other_classes(replacement, k):
    labels = np.repeat(np.arange(C), [5, 9, 8, 10])  # unequal classes: every branch of the draw
    memory = connectors.ContrastMemory("embedding", "embedding", (2, 16), (2, 16),
                                       rngs=nnx.Rngs(0), dataset_labels=labels, num_negatives=k,
                                       embed_dim=4, replacement=replacement)
    index = jnp.arange(len(labels))
    idx = np.asarray(memory._contrast_idx(jax.random.key(3), index))
    assert idx.shape == (len(labels), 1 + k)
    np.testing.assert_array_equal(idx[:, 0], index)
    for row, y in zip(idx, labels):
        assert np.all(labels[row[1:]] != y)
        # without replacement: 22 distinct of the 22 outside class 3 (the largest, 10 examples);
        # with: 200 draws reach every example of the other classes
        assert len(set(row[1:])) == np.sum(labels != y) if replacement else len(set(row[1:])) == k
    with pytest.raises(ValueError, match=r"num_negatives=23 .* only 22 outside the largest class"):
        connectors.ContrastMemory("embedding", "embedding", (2, 16), (2, 16), rngs=nnx.Rngs(0),
                                  dataset_labels=labels, num_negatives=23)


def test_checkpoint_exports_the_student_alone_and_resumes_everything(tmp_path):
    run = trained("crd")
    state, graphdef = run.state, run.graphdef
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
    ckpt.save(state, {"test": True})
    ckpt.wait()
    # what a reader of the run (teacher loading, kdjax eval, export) reads is the bare student...
    reader = checkpoint.RunReader(str(tmp_path))
    saved = reader.manager.item_metadata(reader.resolve_step("latest"))["model"].tree
    reader.close()
    student_params, _ = split_student(state.params)
    student_state, _ = split_student(state.model_state)
    expected = {"params": student_params, "model_state": student_state}
    assert (set(ocp.tree.to_flat_dict(saved, sep="/"))
            == set(ocp.tree.to_flat_dict(host(expected), sep="/")))
    plain = nnx.merge(graphdef, state.params, state.model_state).student
    assert not isinstance(plain, Distillee)
    # ...and resuming restores connectors and memory banks too
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, host(restored), host(state))
    # evaluating the bundle is evaluating that student
    eval_bundle = make_eval_step(graphdef)
    eval_plain = make_eval_step(nnx.graphdef(plain))
    batch = pad_batch({"image": IMAGES[:12], "label": LABELS[:12]}, 16)
    a = eval_bundle(state.params, state.model_state, batch)
    _, p, s = nnx.split(plain, nnx.Param, ...)
    b = eval_plain(p, s, batch)
    assert set(a) == set(b)
    # two programs (the bundle's graph and the bare student's): float32 reassociation
    # (_float32.py) along 64 inputs, 16 hidden units, C classes and a batch of 16
    f32.assert_trees_close(a, b, n=64 + 16 + C + 16)


def test_dml_eval_reports_every_student():
    state, graphdef = trained("dml").state, trained("dml").graphdef
    sums = jax.device_get(make_eval_step(graphdef)(
        state.params, state.model_state, pad_batch({"image": IMAGES, "label": LABELS}, N)))
    assert {"accuracy", "loss", "peer1/accuracy", "peer1/loss"} <= set(sums)
    bundle = nnx.merge(graphdef, state.params, state.model_state)
    x = (jnp.asarray(IMAGES, jnp.float32) / 255.0 - 0.5) / 0.5
    peer_logits = np.asarray(bundle.peers[0](x, train=False))
    assert sums["peer1/accuracy"] == (peer_logits.argmax(-1) == LABELS).sum()


def test_several_teachers_get_their_own_connectors():
    step, state, _ = build("cc", n_teachers=2, kd_weight=1.0)
    assert len(state.params["connectors"]) == 2 and len(step.teachers) == 2
    state, m = step(state)
    assert np.isfinite(m["feature"]) and np.isfinite(m["kd"])


def connect(cls, s_shape, t_shape, **kw):
    """The shapes a connector outputs, traced abstractly (nothing compiled or computed)."""
    def apply(s, t):
        return cls("s", "t", s.shape, t.shape, rngs=nnx.Rngs(0), **kw)({"s": s}, {"t": t},
                                                                        train=True)

    return jax.tree.map(lambda x: x.shape, jax.eval_shape(
        apply, jax.ShapeDtypeStruct(s_shape, jnp.float32),
        jax.ShapeDtypeStruct(t_shape, jnp.float32)))


def test_regressor_follows_repdistiller_shapes_and_refuses_the_rest():
    for s_shape, t_shape in [((2, 8, 8, 3), (2, 4, 4, 5)), ((2, 4, 4, 3), (2, 8, 8, 5)),
                             ((2, 6, 5, 3), (2, 4, 4, 5)), ((2, 7), (2, 9))]:
        assert connect(connectors.Regressor, s_shape, t_shape) == (t_shape, t_shape)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3, 4\) to a teacher tap of shape "
                                         r"\(2, 8, 8, 4\).*exactly half"):
        connect(connectors.Regressor, (2, 3, 3, 4), (2, 8, 8, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\) to a teacher tap of shape \(2, 9\)"):
        connect(connectors.Regressor, (2, 4, 4, 3), (2, 9))
    # VID pools the larger map (here the student's) and predicts a per-channel variance
    assert connect(connectors.VIDRegressor, (2, 8, 8, 3), (2, 4, 4, 5)) == (
        (2, 4, 4, 5), (2, 4, 4, 5), (5,))
    assert connect(connectors.VIDRegressor, (2, 2, 2, 3), (2, 4, 4, 5))[:2] == (
        (2, 2, 2, 5), (2, 2, 2, 5))
    log_scale = jax.jit(lambda: connectors.VIDRegressor(
        "s", "t", (2, 7), (2, 5), rngs=nnx.Rngs(0), init_pred_var=3.0).log_scale[...])()
    np.testing.assert_allclose(jax.nn.softplus(log_scale) + 1e-5, 3.0, rtol=1e-5)


def test_default_taps_follow_repdistiller_and_errors_name_both_sides():
    cnn = ["stem", "stage1", "stage2", "stage3", "embedding", "logits"]
    vgg = ["stem", "stage1", "stage2", "stage3", "stage4", "embedding", "logits"]
    assert objectives.tap_pairs("fitnet", (), (), cnn, cnn) == [("stage2", "stage2")]
    assert objectives.tap_pairs("at", (), (), cnn, cnn) == [(f"stage{i}",) * 2 for i in (1, 2, 3)]
    assert objectives.tap_pairs("sp", (), (), cnn, vgg) == [("stage3", "stage4")]
    assert objectives.tap_pairs("crd", (), (), cnn, vgg) == [("embedding", "embedding")]
    assert objectives.tap_pairs("vid", ("stage1",), ("stage4",), cnn, vgg) == [
        ("stage1", "stage4")]
    with pytest.raises(ValueError, match=r"student has stages \['stage1', 'stage2', 'stage3'\] "
                                         r"and the teacher \['stage1', .*'stage4'\]"):
        objectives.tap_pairs("nst", (), (), cnn, vgg)
    with pytest.raises(ValueError, match=r"the teacher has no tap 'stage9'"):
        objectives.tap_pairs("at", ("stage1",), ("stage9",), cnn, vgg)
    with pytest.raises(ValueError, match=r"pair up one to one"):
        objectives.tap_pairs("at", ("stage1",), (), cnn, vgg)


def test_memory_banks_split_over_the_data_axis_on_two_devices():
    code = """
import jax, numpy as np, optax
from flax import nnx
from kdjax import models, objectives, config, sharding
from kdjax.step import *
labels = (np.arange(16) % 2).astype(np.int32)
m = lambda s, h: models.create_model("mlp", hidden=h, num_classes=2, in_features=16,
                                     rngs=nnx.Rngs(s))
student, teacher = m(0, (8,)), freeze(m(1, (12,)))
loss = config.base_config().loss
loss.update(name="crd", kwargs={"num_negatives": 4, "embed_dim": 4})
bundle = Distillee(student, connectors=objectives.build_connectors(
    loss, student, (teacher,), image_shape=(4, 4, 1), rngs=nnx.Rngs(2), dataset_labels=labels))
tx = optax.sgd(0.1)
g, state = init_train_state(bundle, tx, seed=0, num_examples=16)
mesh = sharding.make_mesh()
data = DeviceData(sharding.replicate({'image': np.zeros((16, 4, 4, 1), np.uint8), 'label': labels}, mesh), 4)
step = make_distill_step(g, tx, objectives.from_config(loss), teachers=(teacher,), data=data,
                         mesh=mesh)
state = sharding.put(state, sharding.state_shardings(state, mesh))
for _ in range(2):
    state, metrics = step(state)
bank = state.model_state["connectors"][0][0]["student_memory"].get_value()
print(mesh.size, bank.sharding.spec == sharding.batch_sharded(mesh).spec,
      float(metrics["loss"]) > 0, step.fn._cache_size())
# A streamed batch updates exactly its "index" rows, here in both devices' halves of the bank.
streamed = make_distill_step(g, tx, objectives.from_config(loss), teachers=(teacher,), mesh=mesh)
before = np.asarray(bank)
state, _ = streamed(state, sharding.shard_batch(
    {"image": np.ones((4, 4, 4, 1), np.uint8), "label": labels[6:10],
     "index": np.arange(6, 10, dtype=np.int32)}, mesh))
bank = state.model_state["connectors"][0][0]["student_memory"].get_value()
changed = np.nonzero((np.asarray(bank) != before).any(1))[0]
print(bank.sharding.spec == sharding.batch_sharded(mesh).spec, changed.tolist())
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # as quick_compiles
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["2", "True", "True", "1", "True", "[6,", "7,", "8,", "9]"]
