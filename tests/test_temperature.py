"""Temperature schedules and CTKD (kdjax.temperature): the schedules against their formulas, one
compiled step for every step of a schedule, the gradient-reversal layer flipping the
temperature's gradient and nothing else, the curriculum, a resumed run with a learned
temperature bit-identical to an uninterrupted one, and the refusals."""

import json
import math
import os
import shutil

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import _float32 as f32
from conftest import EXP
from kdjax import checkpoint, cli, config as config_lib, models, objectives, sharding
from kdjax import plan
from kdjax import temperature as T
from kdjax.step import DeviceData, Distillee, freeze, init_train_state, make_distill_step

pytestmark = pytest.mark.usefixtures("quick_compiles")


def sched(name, total_steps=100, **kw):
    cfg = plan.as_plan({"loss": {"temperature_schedule": {"name": name, **kw}}})
    return T.schedule(cfg.loss.temperature_schedule, total_steps=total_steps)


STEPS = [0, 1, 10, 25, 37, 60, 99, 100, 150]


def test_schedules_match_their_formulas_at_chosen_steps():
    def u(s, begin, n):
        return min(max((s - begin) / n, 0.0), 1.0)

    cases = {
        "constant": (sched("constant", init_value=3.0), lambda s: 3.0),
        # linear from 1 to 5 over steps 10..60
        "linear": (sched("linear", init_value=1.0, end_value=5.0, begin_step=10, steps=50),
                   lambda s: 1.0 + 4.0 * u(s, 10, 50)),
        # cosine down from 8 to 2 over the whole run (steps 0 = until total_steps)
        "cosine": (sched("cosine", init_value=8.0, end_value=2.0),
                   lambda s: 2.0 + 6.0 * (1 + math.cos(math.pi * u(s, 0, 100))) / 2),
        # cosine up from 2 to 6, starting at step 25 for 50 steps
        "cosine_up": (sched("cosine", init_value=2.0, end_value=6.0, begin_step=25, steps=50),
                      lambda s: 6.0 - 4.0 * (1 + math.cos(math.pi * u(s, 25, 50))) / 2),
        # x0.5 from step 10 on, x3 from step 60 on (optax.piecewise_constant_schedule)
        "step": (sched("step", init_value=4.0, boundaries=(10, 60), factors=(0.5, 3.0)),
                 lambda s: 4.0 * (0.5 if s >= 10 else 1.0) * (3.0 if s >= 60 else 1.0)),
    }
    for name, (fn, formula) in cases.items():
        traced = jax.jit(fn)
        for s in STEPS:
            np.testing.assert_allclose(float(traced(jnp.int32(s))), formula(s), rtol=1e-6,
                                       err_msg=f"{name} at step {s}")


@pytest.mark.parametrize("kw,match", [
    ({"name": "exp"}, r"loss.temperature_schedule.name must be one of \['constant', 'linear', "
                      r"'cosine', 'step'\].*got 'exp'"),
    ({"name": "linear", "end_value": 0.0}, r"loss.temperature_schedule.end_value must be a "
                                           r"finite number > 0, got 0.0"),
    ({"name": "step", "boundaries": (5,), "factors": ()}, r"pair up one to one"),
    ({"name": "step", "boundaries": (9, 5), "factors": (1.0, 2.0)}, r"increasing step numbers"),
    ({"name": "cosine", "begin_step": 100}, r"must span at least one step"),
])
def test_schedule_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        sched(total_steps=100, **kw)
    with pytest.raises(ValueError, match=r"steps=0 runs the schedule until the end of training"):
        sched("linear", total_steps=None, end_value=2.0)


def test_curriculum_and_gradient_reversal():
    steps = np.array([0, 5, 10, 20, 40])
    lam = jax.vmap(lambda s: T.curriculum(s, max_strength=0.8, steps=20))(steps)
    np.testing.assert_allclose(lam, 0.8 * (1 - np.cos(np.pi * np.minimum(steps, 20) / 20)) / 2,
                               rtol=1e-6, atol=1e-7)
    x = jnp.array([0.3, -1.2, 2.0])
    f = lambda v: jnp.sum(jnp.sin(v) * v)
    for strength in (0.0, 0.25, 1.0):
        y, g = jax.value_and_grad(lambda v: f(T.gradient_reversal(v, strength)))(x)
        assert y == f(x)  # identity forward
        np.testing.assert_allclose(g, -strength * jax.grad(f)(x), rtol=1e-6)


# -- CTKD in the objective: the reversal flips the temperature's gradient, and only it --------

C = 5
X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 12)), jnp.float32)
TEACHER = jnp.asarray(np.random.default_rng(1).normal(size=(6, C)) * 2, jnp.float32)
Y = jnp.arange(6, dtype=jnp.int32) % C
CTKD = {"mode": "global", "t_min": 1.0, "t_range": 9.0, "max_strength": 1.0,
        "curriculum_steps": 10, "hidden": 8}


def _loss_config(**learned):
    loss = config_lib.base_config().loss
    loss.update(name="kd", ce_weight=0.3, kd_weight=0.7, kwargs={"temperature": 3.0})
    loss.learned_temperature.update(**{**CTKD, **learned})
    return loss


def _grads(objective, model, step, batch=slice(None)):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    teacher_out = ({"logits": TEACHER[batch]},)

    def loss_fn(p):
        out = nnx.merge(graphdef, p, rest).features(X[batch], train=True, teachers=teacher_out)
        return objective(out, teacher_out, Y[batch], jnp.int32(step))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads


def np_loss(student_logits, temps):
    """0.3 CE + 0.7 T^2 KL(p_t || p_s) in float64 NumPy, per-example temperatures."""
    s, t = np.float64(student_logits), np.float64(TEACHER)
    temps = np.broadcast_to(np.float64(temps), (len(s),))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(len(s)), np.asarray(Y)].mean()
    kl = [tt**2 * np.sum(np.exp(log_softmax(t[i] / tt)) * (log_softmax(t[i] / tt)
                                                             - log_softmax(s[i] / tt)))
          for i, tt in enumerate(temps)]
    return 0.3 * ce + 0.7 * np.mean(kl)


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_reversal_flips_exactly_the_temperatures_gradient(mode):
    loss = _loss_config(mode=mode)
    student = models.create_model("mlp", hidden=(8,), in_features=12, num_classes=C,
                                  rngs=nnx.Rngs(0))
    module = objectives.build_temperature(loss, num_classes=C, rngs=nnx.Rngs(1))
    if mode == "instance":  # leave the zero init, so that examples get different temperatures
        module.out.kernel[...] = jnp.asarray(np.random.default_rng(2).normal(size=(8, 1)),
                                             jnp.float32)
    model = Distillee(student, temperature=module)
    step = 4  # strength 0.345 (the curriculum's cosine over 10 steps)
    strength = float(T.curriculum(jnp.int32(step), max_strength=1.0, steps=10))
    obj = objectives.from_config(loss)
    value, metrics, grads = _grads(obj, model, step)
    z = np.asarray(module(student(X), TEACHER))
    temps = 1.0 + 9.0 * jax.nn.sigmoid(z)
    assert metrics["temperature_strength"] == pytest.approx(strength, rel=1e-6)
    # the mean of 6 temperatures in 1..10, computed inside the objective vs here: float32
    # reassociation (_float32.py) of 6 positive terms
    f32.assert_close(metrics["temperature"], np.mean(temps), n=len(X), magnitude=np.mean(temps))
    logits = np.asarray(student(X))
    np.testing.assert_allclose(value, np_loss(logits, temps), rtol=1e-5)
    # the student's gradient is that of KD at these temperatures held fixed: untouched. Two
    # programs (the temperature computed inside vs given), so equal up to float32 reassociation
    # along 12 inputs, 8 hidden units, 5 classes and 6 examples, the magnitude of the terms
    # from per-example gradients (a batch mean: each example's gradient / 6).
    def kd_at(t):
        return objectives.logit_distillation("kd", ce_weight=0.3, kd_weight=0.7,
                                             temperature=lambda out, s: (jnp.asarray(t), {}))

    _, _, plain = _grads(kd_at(temps), Distillee(student), step)
    each = np.broadcast_to(temps, (len(X),))
    per_example = [_grads(kd_at(each[i:i + 1]), Distillee(student), step, slice(i, i + 1))[2]
                   for i in range(len(X))]
    terms = jax.tree.map(lambda *g: np.stack(g) / len(X), *[g["student"] for g in per_example])
    f32.assert_trees_close(grads["student"], plain["student"], n=12 + 8 + C + len(X),
                           magnitudes=f32.abs_sum(terms))
    # the temperature's gradient is -strength times d loss / d (its parameters), by finite
    # differences of the float64 formula through z
    graphdef, tparams, trest = nnx.split(module, nnx.Param, ...)
    flat, unravel = ravel_pytree(tparams)

    def loss_of(vector):
        m = nnx.merge(graphdef, unravel(jnp.asarray(vector, jnp.float32)), trest)
        return np_loss(logits, 1.0 + 9.0 * np.asarray(jax.nn.sigmoid(m(student(X), TEACHER)),
                                                      np.float64))

    eps, base = 1e-3, np.asarray(flat, np.float64)
    numeric = np.array([(loss_of(base + eps * e) - loss_of(base - eps * e)) / (2 * eps)
                        for e in np.eye(len(base))])
    got, _ = ravel_pytree(grads["temperature"])
    np.testing.assert_allclose(got, -strength * numeric, rtol=2e-2, atol=2e-5)
    assert np.abs(numeric).max() > 1e-3  # a gradient worth flipping


def test_learned_temperature_refusals():
    with pytest.raises(ValueError, match=r"starts at the loss's temperature 3.0, which must lie "
                                         r"strictly between .*t_min=4.0"):
        objectives.build_temperature(_loss_config(t_min=4.0), num_classes=C, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mode must be one of \['global', 'instance'\]"):
        objectives.from_config(_loss_config(mode="local"))
    both = _loss_config()
    both.temperature_schedule.name = "constant"
    with pytest.raises(ValueError, match=r"both set the temperature; choose one"):
        objectives.from_config(both)
    virtual = _loss_config()
    virtual.update(name="tfkd", kwargs={"variant": "virtual"})
    with pytest.raises(ValueError, match=r"learns the temperature against a teacher"):
        objectives.from_config(virtual)
    scheduled = config_lib.base_config().loss
    scheduled.update(name="kd", kwargs={"temperature": 2.0})
    scheduled.temperature_schedule.name = "constant"
    with pytest.raises(ValueError, match=r"loss.kwargs.temperature=2.0 and "
                                         r"loss.temperature_schedule both set"):
        objectives.from_config(scheduled)
    with pytest.raises(ValueError, match=r"curriculum_steps=0 spreads the curriculum over the "
                                         r"whole run"):
        objectives.from_config(_loss_config(curriculum_steps=0))


# -- a schedule in the fused step: one program, the formula's value at every step -------------

@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet"])
def test_one_compiled_step_serves_every_step_of_a_schedule(name):
    n, b = 32, 8
    labels = (np.arange(n) % 4).astype(np.int32)
    images = np.random.default_rng(0).integers(0, 255, (n, 4, 4, 1)).astype(np.uint8)
    mk = lambda h, s: models.create_model("mlp", hidden=h, in_features=16, num_classes=4,  # noqa
                                          rngs=nnx.Rngs(s))
    student, teacher = mk((8,), 0), freeze(mk((8, 8), 1))
    loss = config_lib.base_config().loss
    loss.update(name=name, kwargs={}, kd_weight=0.5)
    loss.temperature_schedule.update(name="linear", init_value=6.0, end_value=1.0, steps=0)
    connectors = objectives.build_connectors(loss, student, (teacher,), image_shape=(4, 4, 1),
                                             rngs=nnx.Rngs(2))
    tx = optax.sgd(0.05)
    graphdef, state = init_train_state(Distillee(student, connectors=connectors), tx, seed=0,
                                       num_examples=n)
    step = make_distill_step(graphdef, tx, objectives.from_config(loss, total_steps=5),
                             teachers=(teacher,), data=DeviceData({"image": jnp.asarray(images),
                                                                   "label": jnp.asarray(labels)}, b))
    state = sharding.put(state, sharding.state_shardings(state, sharding.make_mesh()))
    for s in range(6):
        state, metrics = step(state)
        assert float(metrics["temperature"]) == pytest.approx(6.0 - 5.0 * min(s / 5, 1.0))
        assert np.isfinite(float(metrics["kd"]))
    assert step.fn._cache_size() == 1


# -- resume with a learned temperature --------------------------------------------------------

TINY = ["--config.train.steps=8", "--config.train.batch_size=32", "--config.eval.every_steps=8",
        "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=4",
        "--config.checkpoint.max_to_keep=2", "--config.eval.batch_size=150", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("temperature") / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", workdir,
                     f"--config.data.data_dir={data_dir}", "--config.model.name=mlp_tiny",
                     *TINY]) == 0
    return workdir


def _ctkd(workdir, teacher, data_dir):
    return cli.main(["distill", "--config", f"{EXP}/ctkd.py", "--workdir", workdir,
                     f"--config.teacher.workdir={teacher}", f"--config.data.data_dir={data_dir}",
                     "--config.model.kwargs={'hidden': (16,)}",
                     "--config.loss.learned_temperature.curriculum_steps=2",
                     "--config.optimizer.learning_rate=0.5", *TINY])


def test_resume_with_a_learned_temperature_is_bit_identical(teacher, data_dir, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert _ctkd(full, teacher, data_dir) == 0
    shutil.copytree(full, resumed)  # the same run, stopped after its step-4 checkpoint
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    os.remove(os.path.join(resumed, "summary.json"))
    assert _ctkd(resumed, teacher, data_dir) == 0

    def saved(workdir):
        reader = checkpoint.RunReader(workdir)
        items = reader.manager.restore(8, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
        reader.close()
        return {k: items[k] for k in ("model", "train")}

    a, b = saved(full), saved(resumed)
    z = a["train"]["extras"]["params"]["temperature"]["z"]
    z = np.asarray(z["value"] if isinstance(z, dict) else z)
    assert z != pytest.approx(T.logit_of(4.0, t_min=1.0, t_range=20.0))  # it learned
    assert "temperature" not in a["model"]["params"]  # the student's item: no module
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def records(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k != "train/images_per_s"}
                    for line in f]

    assert records(full) == records(resumed)
    temps = [r["train/temperature"] for r in records(full) if "train/temperature" in r]
    assert len(temps) == 4 and len(set(temps)) == 4  # logged at every log step, moving
