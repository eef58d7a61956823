"""kdjax.taps: logits and features of any NNX model, sub-modules tapped by attribute path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _float32 as f32
import _user_models as user
from kdjax import models, taps

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed


class Head(nnx.Linear):
    """Inherits __call__: nnx.capture would not see it; the tap must."""


class Shared(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)
        self.head = Head(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.fc(self.fc(x)))  # fc runs twice


def _x(n=3, d=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


def test_taps_are_the_submodules_outputs_inside_jit_and_grad():
    model = user.TinyNet(12, 5, hidden=6, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = _x()

    def tapped_loss(state):
        out = taps.features(nnx.merge(graphdef, state), x, train=True, taps=("blocks.1", "head"))
        return jnp.sum(out["blocks.1"] ** 2) + jnp.sum(out["head"]), out

    def manual_loss(state, x=x):
        m = nnx.merge(graphdef, state)
        h1 = m.blocks[1](nnx.relu(m.blocks[0](x)))  # the module's own output: before the ReLU
        return jnp.sum(h1 ** 2) + jnp.sum(m(x)), None

    (value, out), grads = jax.jit(jax.value_and_grad(tapped_loss, has_aux=True))(state)
    (expected, _), expected_grads = jax.value_and_grad(manual_loss, has_aux=True)(state)
    assert set(out) == {"logits", "blocks.1", "head"}
    np.testing.assert_array_equal(out["head"], out["logits"])  # one value, two names
    # jit against eager: two programs, equal up to float32 reassociation (_float32.py) along
    # 12 inputs, 6 and 6 hidden units and 3 examples; the magnitude of the gradients' terms
    # from per-example gradients.
    n = 12 + 6 + 6 + 3
    f32.assert_close(out["logits"], model(x), n=n)
    terms = np.abs(np.asarray(out["blocks.1"])) ** 2
    f32.assert_close(value, expected, n=n, magnitude=terms.sum() + np.abs(out["logits"]).sum())
    per_example = jax.vmap(lambda xi: jax.grad(lambda s: manual_loss(s, xi[None])[0])(state))(x)
    f32.assert_trees_close(grads, expected_grads, n=n, magnitudes=f32.abs_sum(per_example))
    assert type(model.blocks[1]) is nnx.Linear  # the class swap is undone


def test_inherited_call_is_tapped_and_the_class_restored():
    model = Shared(nnx.Rngs(0))
    out = taps.features(model, _x(d=4), train=False, taps=("head",))
    np.testing.assert_allclose(out["head"], model(_x(d=4)))
    assert type(model.head) is Head


def test_a_zoo_model_keeps_its_feature_names_and_adds_module_paths():
    model = models.create_model("mlp", hidden=(7, 6), in_features=12, num_classes=4,
                                rngs=nnx.Rngs(0))
    out = taps.features(model, _x(), train=False, taps=("hidden1", "hidden.1"))
    assert set(out) == set(model.feature_names) | {"hidden.1"}
    # "hidden.1" is the raw Linear output; the zoo's "hidden2" is after its ReLU.
    np.testing.assert_allclose(nnx.relu(out["hidden.1"]), out["hidden2"], rtol=1e-6)


def test_wildcards_pick_exactly_one_module():
    model = user.TinyNet(12, 5, rngs=nnx.Rngs(0))
    out = taps.features(model, _x(), train=False, taps=("h*",))
    np.testing.assert_allclose(out["h*"], out["logits"])
    with pytest.raises(ValueError, match=r"loss.student_taps 'blocks\.\*' matches 2 modules of "
                                         r"TinyNet: \['blocks.0', 'blocks.1'\]; name exactly one"):
        taps.features(model, _x(), train=False, taps=("blocks.*",), what="loss.student_taps")


def test_a_path_matching_nothing_lists_the_modules():
    model = user.TinyNet(12, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"loss.teacher_taps 'layer3' matches no module of "
                                         r"TinyNet; tap one of its module paths: 'blocks', "
                                         r"'head', 'blocks.0', 'blocks.1'$"):
        taps.features(model, _x(), train=False, taps=("layer3",), what="loss.teacher_taps")
    zoo = models.create_model("mlp", hidden=(7,), in_features=12, num_classes=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"its own feature names: \['hidden1', 'embedding', "
                                         r"'logits'\]"):
        taps.features(zoo, _x(), train=False, taps=("stage2",))


def test_a_module_that_runs_twice_is_refused():
    with pytest.raises(ValueError, match="tap 'fc': the module 'fc' of Shared ran 2 times in one "
                                         "forward pass; tap a module that runs exactly once"):
        taps.features(Shared(nnx.Rngs(0)), _x(d=4), train=False, taps=("fc",))


def test_train_and_eval_without_a_train_argument():
    model = user.NormNet(12, 3, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _x(n=8)

    @jax.jit
    def train_call(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        out = taps.call(m, x, train=True)
        return out, nnx.state(m, nnx.BatchStat)

    out, stats = train_call(params, rest)
    h = np.asarray(model.fc(x))
    # jit vs eager: float32 reassociation (_float32.py) along 12 inputs, 16 hidden (and BatchNorm
    # over the 8 examples) and 3 classes
    n = 12 + 16 + 8 + 3
    f32.assert_close(stats["bn"]["mean"][...], 0.5 * h.mean(0), n=n)
    # Dropout is on in training (some activations zeroed) and off in evaluation.
    e1, e2 = (np.asarray(taps.call(nnx.merge(graphdef, params, rest), x, train=False))
              for _ in range(2))
    np.testing.assert_array_equal(e1, e2)
    hidden = nnx.relu((h - 0.0) / np.sqrt(1.0 + 1e-5) * np.asarray(model.bn.scale[...])
                      + np.asarray(model.bn.bias[...]))
    f32.assert_close(e1, model.head(hidden), n=n)
    assert not np.allclose(out, e1)


def test_a_linen_model_through_the_nnx_bridge():
    model = models.create_model("_user_models:LinenMLP", num_classes=3, rngs=nnx.Rngs(0),
                                input_shape=(3, 4, 1))
    assert isinstance(model, nnx.bridge.ToNNX)
    x = _x(n=6).reshape(6, 3, 4, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    linen_vars = {"params": nnx.to_pure_dict(params),
                  "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}

    @jax.jit
    def train_call(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return taps.call(m, x, train=True), nnx.state(m, nnx.BatchStat)

    out, stats = train_call(params, rest)
    ref, updates = user.LinenMLP(3).apply(linen_vars, x, train=True, mutable=["batch_stats"])
    # through the bridge in jit vs Linen eagerly: float32 reassociation (_float32.py) along 12
    # inputs, 24 hidden, BatchNorm over 6 examples and 3 classes
    n = 12 + 24 + 6 + 3
    f32.assert_close(out, ref, n=n)
    f32.assert_close(nnx.to_pure_dict(stats)["BatchNorm_0"]["mean"],
                     updates["batch_stats"]["BatchNorm_0"]["mean"], n=n)
    f32.assert_close(taps.call(model, x, train=False),
                     user.LinenMLP(3).apply(linen_vars, x, train=False), n=n)


def test_check_logits_names_both_shapes():
    taps.check_logits((2, 10), 10, model="m", batch=2)
    with pytest.raises(ValueError, match=r"the model model.name='x' returns an output of shape "
                                         r"\(2, 5\) for a batch of 2 images, but kdjax needs "
                                         r"logits of shape \[batch, classes\] = \(2, 10\)"):
        taps.check_logits((2, 5), 10, model="model.name='x'", batch=2)
