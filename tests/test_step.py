"""The fused step: one program, frozen teacher, donation, determinism, scan equivalence, eval."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _float32 as f32
from kdjax import augment, models, objectives, sharding
from kdjax.step import (DeviceData, compute_dtype, eval_sums, freeze, init_train_state,
                        make_distill_step, make_eval_step, nonfinite_terms, pad_batch)

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

N, B, C = 96, 16, 4


def _data(seed=0):
    """A learnable toy set: the class sets the mean brightness of an 8x8 image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N).astype(np.int32)
    images = np.clip(labels[:, None, None, None] * 60 + rng.normal(20, 15, (N, 8, 8, 1)), 0, 255)
    return images.astype(np.uint8), labels


def _setup(*, teacher=True, steps_per_call=1, seed=0, dtype=jnp.float32, lr=0.05,
           nan_policy="stop"):
    images, labels = _data()
    student = models.create_model("mlp", hidden=(16,), in_features=64, num_classes=C, rngs=nnx.Rngs(seed),
                                  dtype=dtype)
    tx = optax.sgd(lr, momentum=0.9)
    graphdef, state = init_train_state(student, tx, seed=seed, num_examples=N)
    teachers = ()
    if teacher:
        teachers = (freeze(models.create_model("mlp", hidden=(48,), in_features=64, num_classes=C,
                                               rngs=nnx.Rngs(100))),)
    objective = (objectives.logit_distillation("kd", ce_weight=0.5, kd_weight=0.5, temperature=2.0)
                 if teacher else objectives.supervised())
    data = DeviceData({"image": jnp.asarray(images), "label": jnp.asarray(labels)}, batch_size=B)
    step = make_distill_step(graphdef, tx, objective, teachers=teachers, data=data,
                             preprocess=augment.Preprocess(crop_padding=1, flip=True),
                             steps_per_call=steps_per_call, nan_policy=nan_policy)
    return graphdef, sharding.replicate(state, sharding.make_mesh()), step


def _run(step, state, n):
    history = []
    for _ in range(n):
        state, m = step(state)
        history.append(m)
    return state, jax.device_get(history)


def test_teacher_is_bit_identical_after_steps():
    _, state, step = _setup()
    before = jax.tree.map(np.array, step.teachers)
    state, _ = _run(step, state, 10)
    after = jax.tree.map(np.array, step.teachers)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    # and the optimizer state only mirrors the student: no teacher-shaped leaf in it
    teacher_shapes = {x.shape for x in jax.tree.leaves(step.teachers)}
    student_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
    assert opt_shapes <= student_shapes | {()}
    assert (8 * 8, 48) in teacher_shapes and not opt_shapes & {(8 * 8, 48), (48, C)}


def test_step_is_one_program_with_teacher_forward_and_update():
    _, state, step = _setup(lr=0.0123)  # a learning rate we can find as a constant
    lowered = step.lower(state)
    hlo = lowered.as_text()
    # one module, whose entry takes the teacher's kernels and multiplies by them (its forward)...
    assert len(re.findall(r"^module @", hlo, flags=re.M)) == 1
    assert re.search(r"tensor<64x48xf32>", hlo) and re.search(r"dot_general.*48xf32", hlo)
    # ...and applies the SGD update with the learning rate in the same program...
    assert re.search(r"1\.230000e-02", hlo)
    # ...whose outputs are the whole new state (params AND momentum) plus the metrics.
    state_out, metrics_out = lowered.out_info
    assert jax.tree.structure(state_out) == jax.tree.structure(state)
    assert {"loss", "ce", "kd", "grad_norm"} <= set(metrics_out)
    compiled = lowered.compile()
    assert len(re.findall(r"^ENTRY", compiled.as_text(), flags=re.M)) == 1
    state, _ = _run(step, state, 3)
    assert step.fn._cache_size() == 1  # every call reused the single executable


def test_state_is_donated():
    _, state, step = _setup()
    leaf = jax.tree.leaves(state.params)[0]
    new_state, _ = step(state)
    assert leaf.is_deleted()
    assert not jax.tree.leaves(new_state.params)[0].is_deleted()


def test_loss_decreases_and_accuracy_rises():
    _, state, step = _setup(teacher=False, lr=0.1)
    _, hist = _run(step, state, 60)
    first = np.mean([h["loss"] for h in hist[:6]])
    last = np.mean([h["loss"] for h in hist[-6:]])
    assert last < 0.5 * first
    assert np.mean([h["accuracy"] for h in hist[-6:]]) > 0.8


def test_same_seed_same_metrics_and_other_seed_differs():
    losses = []
    for seed in (0, 0, 1):
        _, state, step = _setup(seed=seed)
        losses.append([h["loss"] for h in _run(step, state, 8)[1]])
    a, b, c = losses
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_scan_equals_single_steps():
    _, s1, step1 = _setup()
    _, s4, step4 = _setup(steps_per_call=4)
    s1, h1 = _run(step1, s1, 8)
    s4, h4 = _run(step4, s4, 2)
    assert int(s4.step) == int(s1.step) == 8
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 s1.params, s4.params)
    np.testing.assert_allclose(np.mean([h["loss"] for h in h1[4:]]), h4[1]["loss"], rtol=1e-5)


def test_epoch_reshuffles_and_covers_every_example():
    _, state, step = _setup(teacher=False)
    spe = N // B
    perms = []
    for _ in range(2):
        state, _ = _run(step, state, spe)
        perms.append(np.array(state.perm))
    for p in perms:
        assert sorted(p.tolist()) == list(range(N))
    assert not np.array_equal(perms[0], perms[1])


def test_bf16_compute_keeps_float32_params():
    _, state, step = _setup(dtype=jnp.bfloat16)
    state, hist = _run(step, state, 2)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(hist[-1]["loss"])
    assert compute_dtype("auto") == jnp.float32  # CPU policy
    assert compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="compute dtype.*'float16'"):
        compute_dtype("float16")


def test_steps_per_call_must_be_positive():
    graphdef, _, _ = _setup()
    with pytest.raises(ValueError, match="steps_per_call=0"):
        make_distill_step(graphdef, optax.sgd(0.1), objectives.supervised(), steps_per_call=0)


def test_eval_counts_every_example_once_with_padding():
    graphdef, state, _ = _setup()
    images, labels = _data()
    teacher = freeze(models.create_model("mlp", hidden=(48,), in_features=64, num_classes=C, rngs=nnx.Rngs(100)))
    eval_step = make_eval_step(graphdef, teachers=(teacher,))
    totals = None
    for start in range(0, 40, 16):  # 40 examples in batches of 16: the last is padded
        batch = pad_batch({"image": images[start:min(start + 16, 40)],
                           "label": labels[start:min(start + 16, 40)]}, 16)
        sums = jax.device_get(eval_step(state.params, state.model_state, batch))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    model = nnx.merge(graphdef, state.params, state.model_state)
    x = augment.preprocess(jnp.asarray(images[:40]), augment.Preprocess(), key=None,
                           dtype=jnp.float32)
    logits = np.asarray(model(x))
    t_logits = np.asarray(nnx.merge(teacher.graphdef, teacher.variables)(x))
    assert totals["count"] == 40
    np.testing.assert_allclose(totals["accuracy"], (logits.argmax(-1) == labels[:40]).sum())
    np.testing.assert_allclose(totals["teacher_agreement"],
                               (logits.argmax(-1) == t_logits.argmax(-1)).sum())
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(totals["loss"], -logp[np.arange(40), labels[:40]].sum(), rtol=1e-5)
    top4 = np.argsort(-logits, -1)[:, :4]  # C=4 classes: top-5 is top-4, always correct
    assert totals["top5_accuracy"] == 40 == (top4 == labels[:40, None]).any(-1).sum()


def test_eval_sums_kl_brier_and_calibration_bins_of_the_real_examples():
    rng = np.random.default_rng(3)
    logits, t_logits = rng.normal(size=(2, 12, 5)) * 2
    labels = rng.integers(0, 5, 12)
    mask = (np.arange(12) < 9).astype(np.float32)  # the last 3 rows are padding
    sums = jax.device_get(eval_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                                    teacher_logits=jnp.asarray(t_logits), calibration_bins=15))
    p, q = (np.exp(z) / np.exp(z).sum(-1, keepdims=True) for z in (logits[:9], t_logits[:9]))
    np.testing.assert_allclose(sums["teacher_kl"], (q * np.log(q / p)).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["brier"], ((p - np.eye(5)[labels[:9]]) ** 2).sum(),
                               rtol=1e-5)
    assert sums["calibration"].count.sum() == 9 and sums["calibration"].count.shape == (16,)
    np.testing.assert_allclose(sums["calibration"].correct.sum(), sums["accuracy"])
    assert "brier" not in eval_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))


def test_streamed_batches_match_device_resident_sampling():
    """The same step accepts host batches; with the same examples it computes the same update."""
    images, labels = _data()
    graphdef, state, step = _setup(teacher=False)
    student = models.create_model("mlp", hidden=(16,), in_features=64, num_classes=C, rngs=nnx.Rngs(0))
    _, state2 = init_train_state(student, optax.sgd(0.05, momentum=0.9), seed=0)
    streamed = make_distill_step(graphdef, optax.sgd(0.05, momentum=0.9), objectives.supervised(),
                                 preprocess=augment.Preprocess(crop_padding=1, flip=True))
    idx = np.array(state.perm[:B])
    before = jax.tree.map(np.array, state2.params)  # the same init as state's
    state, m1 = step(state)
    state2, m2 = streamed(state2, {"image": images[idx], "label": labels[idx]})
    # Two programs (gather on device vs a host batch): equal up to float32 reassociation
    # (_float32.py) along 64 inputs, 16 hidden units, C classes and B examples, in the loss and
    # in the update; the new parameters also round once (eps relative) when it is added.
    n = 64 + 16 + C + B
    f32.assert_close(m1["loss"], m2["loss"], n=n)
    jax.tree.map(lambda x, y, p: np.testing.assert_allclose(
        x, y, rtol=f32.EPS, atol=f32.atol(n, np.abs(np.asarray(y) - p).max())),
        state.params, state2.params, before)


def _finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_nan_stop_records_the_first_bad_step_and_its_terms():
    """A learning rate of 1e9 blows the toy MLP up within a few steps; the state names the first
    bad step and its terms exactly as a host check after every step finds them."""
    _, state, step = _setup(teacher=False, lr=1e9)
    oracle, history = None, []
    for i in range(1, 9):
        state, m = step(state)
        m = jax.device_get(m)
        history.append(m)
        bad = sorted(k for k, v in m.items() if not np.isfinite(v))
        if not _finite((state.params, state.model_state)):
            bad.append("updated_variables")
        if bad and oracle is None:
            oracle = (i, bad)
    assert oracle is not None and oracle[0] > 1  # the first step is finite, a later one is not
    assert int(state.bad_step) == oracle[0]
    assert nonfinite_terms(int(state.bad_terms), history[0].keys()) == oracle[1]
    assert int(state.skipped_steps) == 0  # "stop" applies every update; the loop stops the run


def test_nan_skip_drops_bad_updates_and_counts_them():
    _, state, step = _setup(teacher=False, lr=1e9, nan_policy="skip")
    skipped = 0
    for i in range(1, 9):
        before = jax.tree.map(np.array, (state.params, state.opt_state))
        state, m = step(state)
        m = jax.device_get(m)
        after = jax.tree.map(np.array, (state.params, state.opt_state))
        bad = not all(np.isfinite(v) for k, v in m.items() if k != "skipped_steps")
        skipped += bad
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after)))
        assert same == bad, i  # a skipped step leaves parameters and optimizer state unchanged
        assert int(m["skipped_steps"]) == skipped
    assert skipped > 0 and int(state.step) == 8 and _finite(state.params)
    with pytest.raises(ValueError, match=r"nan_policy \(config train.nan_policy\).*'ignore'"):
        make_distill_step(_setup()[0], optax.sgd(0.1), objectives.supervised(),
                          nan_policy="ignore")


def test_grad_accum_gives_the_whole_batchs_gradient_for_an_image_student():
    """4 micro-batches of 4 images: the KD objective's mean gradient over the 16 (the same
    augmented views, so the same terms), and the same metrics."""
    images, labels = _data()

    def student():  # a fresh one per step: a step donates the state's arrays
        return models.create_model("mlp", hidden=(16,), in_features=64, num_classes=C,
                                   rngs=nnx.Rngs(0))

    teacher = freeze(models.create_model("mlp", hidden=(48,), in_features=64, num_classes=C,
                                         rngs=nnx.Rngs(100)))
    # keeps the gradient as its state (an update would round it)
    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    objective = objectives.logit_distillation("kd", ce_weight=0.5, kd_weight=0.5, temperature=2.0)
    data = DeviceData({"image": jnp.asarray(images), "label": jnp.asarray(labels)}, batch_size=B)
    out = {}
    for accum in (1, 4):
        graphdef, state = init_train_state(student(), tx, seed=0, num_examples=N)
        step = make_distill_step(graphdef, tx, objective, teachers=(teacher,), data=data,
                                 preprocess=augment.Preprocess(crop_padding=1, flip=True),
                                 grad_accum=accum)
        state, metrics = step(state)
        out[accum] = jax.device_get((state.opt_state, metrics))
    (g1, m1), (g4, m4) = out[1], out[4]
    f32.assert_trees_close(g4, g1, n=B + 64)
    for name in m1:
        f32.assert_close(m4[name], m1[name], n=B + 64, err_msg=name)
    with pytest.raises(ValueError, match=r"train.batch_size=16 must be a multiple of "
                                         r"train.grad_accum=3"):
        make_distill_step(graphdef, tx, objective, teachers=(teacher,), data=data,
                          grad_accum=3)(init_train_state(student(), tx, seed=0,
                                                         num_examples=N)[1])
