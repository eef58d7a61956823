"""Pruning masks in the optimizer state (kdjax.compress.prune, kdjax.compress.schedule)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import models, optim, plan as plan_lib
from kdjax.compress import prune
from kdjax.compress.schedule import Schedule
from kdjax.step import init_train_state

SHAPE = (28, 28, 1)
pytestmark = pytest.mark.usefixtures("quick_compiles")


def prune_config(**kw) -> plan_lib.Prune:
    # unchecked: make_plan's own errors are tested
    return dataclasses.replace(plan_lib.as_plan({}).prune, **kw)


def mlp(hidden=(48, 40), seed=0):
    return models.create_model("mlp", hidden=hidden, num_classes=10, rngs=nnx.Rngs(seed),
                               input_shape=SHAPE)


def params_of(model):
    return {tuple(k): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}


def masks_at(plan, model, step):
    return [np.asarray(m) for m in jax.jit(plan.masks)(params_of(model), step)]


def test_cubic_schedule_is_zhu_and_gupta_formula():
    s = Schedule("cubic", final=0.9, initial=0.1, begin=10, end=110, every=7)
    for t in range(0, 140):
        frac = min(max((t - 10) / 100, 0.0), 1.0)
        expect = 0.9 + (0.1 - 0.9) * (1 - frac) ** 3  # float64 formula
        assert float(s.sparsity(t)) == pytest.approx(expect, abs=1e-6)
        assert bool(s.is_update(t)) == (10 <= t <= 110 and ((t - 10) % 7 == 0 or t == 110))
    one = Schedule("one_shot", final=0.5, begin=3)
    assert [int(one.is_update(t)) for t in range(6)] == [0, 0, 0, 1, 0, 0]
    assert float(one.sparsity(3)) == 0.5


def _step(tx):
    @jax.jit
    def step(params, opt_state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, p.size),
                                                         p.shape), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return step


def _kernel(params, *path):
    node = params["student"]
    for p in path:
        node = node[p]
    return np.asarray(node[...])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_pruned_weights_stay_exactly_zero_through_momentum_and_weight_decay(opt):
    model = mlp()
    plan = prune.make_plan(prune_config(method="magnitude", sparsity=0.7, schedule="cubic",
                                        begin_step=0, end_step=20, every_steps=4),
                           model, SHAPE, 200)
    base = optim.make_optimizer(plan_lib.as_plan({"optimizer": {
        "name": opt, "weight_decay": 5e-2, "learning_rate": 0.05}}).optimizer, 200)
    tx = prune.wrap(base, plan)
    _, state = init_train_state(model, tx, seed=0)
    step, params, opt_state = _step(tx), state.params, state.opt_state
    for t in range(100):
        params, opt_state = step(params, opt_state, jax.random.key(t))
        w = _kernel(params, "hidden", 1, "kernel")
        if t == 20:  # the schedule's end: the final sparsity
            zero_at_end = w == 0
            assert zero_at_end.mean() == pytest.approx(0.7, abs=1 / w.size)
        if t > 20:  # masks fixed: the same entries, exactly 0.0, through 80 more noisy steps
            np.testing.assert_array_equal(w == 0, zero_at_end)
    assert int(opt_state.count) == 100
    assert (np.asarray(opt_state.masks[0]) == ~zero_at_end).all()


def test_unpruned_entries_get_the_wrapped_update_bit_for_bit():
    model = mlp()
    plan = prune.make_plan(prune_config(method="magnitude", sparsity=0.5, begin_step=0),
                           model, SHAPE, 10)
    base = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    tx = prune.wrap(base, plan)
    _, state = init_train_state(model, tx, seed=0)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    plain, _ = base.update(grads, base.init(state.params), state.params)
    new = optax.apply_updates(state.params, updates)
    kept = _kernel(new, "hidden", 1, "kernel") != 0
    assert kept.mean() == 0.5
    np.testing.assert_array_equal(_kernel(updates, "hidden", 1, "kernel")[kept],
                                  _kernel(plain, "hidden", 1, "kernel")[kept])
    np.testing.assert_array_equal(_kernel(updates, "out", "kernel"), _kernel(plain, "out", "kernel"))


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_achieved_sparsity_equals_target_within_one_element(scope):
    # Both scopes with a per-layer target for hidden/2: pruned alone to it, the rest per layer
    # or pooled into one global ranking.
    model = mlp(hidden=(50, 37, 29))
    targets = {"hidden/2": 0.33}
    plan = prune.make_plan(prune_config(method="magnitude", sparsity=0.61, scope=scope,
                                        targets=targets, dense_first_last=False),
                           model, SHAPE, 10)
    assert [t.name for t in plan.targets] == ["hidden/0/kernel", "hidden/1/kernel",
                                              "hidden/2/kernel", "out/kernel"]
    params = params_of(model)
    masks = masks_at(plan, model, 0)
    if scope == "per_layer":
        for t, m in zip(plan.targets, masks):
            want = 0.33 if t.name == "hidden/2/kernel" else 0.61
            assert abs((~np.asarray(m)).sum() - want * m.size) <= 1, t.name
            # the pruned entries are the smallest |w|
            w = np.abs(np.asarray(params[t.kernel]))
            assert w[~np.asarray(m)].max() <= w[np.asarray(m)].min()
    else:
        alone = plan.targets[2], masks[2]
        assert abs((~alone[1]).sum() - 0.33 * alone[1].size) <= 1
        pooled = [(t, m) for i, (t, m) in enumerate(zip(plan.targets, masks)) if i != 2]
        total = sum(m.size for _, m in pooled)
        assert abs(sum((~m).sum() for _, m in pooled) - 0.61 * total) <= 1
        cut = max(np.abs(np.asarray(params[t.kernel]))[~m].max() for t, m in pooled)
        assert all(np.abs(np.asarray(params[t.kernel]))[m].min() >= cut for t, m in pooled)
        assert len({round(float((~m).mean()), 2) for _, m in pooled}) > 1  # layers differ


def test_random_pruning_is_nested_as_sparsity_grows():
    model = mlp()
    plan = prune.make_plan(prune_config(method="random", sparsity=0.8, schedule="cubic",
                                        begin_step=0, end_step=10, every_steps=1),
                           model, SHAPE, 20)
    a, b = (masks_at(plan, model, t)[0] for t in (3, 10))
    assert (~a).sum() < (~b).sum() and not (a < b).any()  # what was pruned stays pruned
    assert (~b).mean() == pytest.approx(0.8, abs=1 / b.size)


def test_two_four_sparsity_along_the_input_axis():
    model = models.create_model("cnn_tiny", num_classes=10, rngs=nnx.Rngs(0), input_shape=SHAPE)
    plan = prune.make_plan(prune_config(method="nm", n=2, m=4), model, SHAPE, 10)
    assert [t.name for t in plan.targets] == ["conv2/conv/kernel", "fc/kernel"]
    params = params_of(model)
    for t, mask in zip(plan.targets, masks_at(plan, model, 0)):
        w, m = np.asarray(params[t.kernel]), np.asarray(mask)
        groups = np.moveaxis(m, -2, -1).reshape(-1, 4)
        assert (groups.sum(-1) == 2).all()
        ws = np.abs(np.moveaxis(w, -2, -1).reshape(-1, 4))
        assert (np.sort(ws, -1)[:, 2:] == np.sort(np.where(groups, ws, -1), -1)[:, 2:]).all()


def test_first_and_last_layers_follow_the_data_flow_not_the_names():
    # nnx orders attributes alphabetically (fc < stages < stem); the forward pass reads stem first.
    model = nnx.eval_shape(lambda: models.create_model("resnet8", num_classes=10,
                                                       rngs=nnx.Rngs(0), input_shape=SHAPE))
    kernels = [k for k in prune.forward_order(model, SHAPE) if k[-1] == "kernel"]
    assert kernels[0] == ("stem", "conv", "kernel") and kernels[-1] == ("fc", "kernel")
    plan = prune.make_plan(prune_config(method="magnitude", sparsity=0.5), model, SHAPE, 10)
    names = [t.name for t in plan.targets]
    assert "stem/conv/kernel" not in names and "fc/kernel" not in names and len(names) == 8


@pytest.mark.parametrize("kw, message", [
    (dict(method="magnitude", sparsity=1.0), "prune.sparsity=1.0: a target sparsity is the "
                                             "fraction of weights pruned, in [0, 1)"),
    (dict(method="magnitude", sparsity=-0.1), "prune.sparsity=-0.1"),
    (dict(method="magnitude", sparsity=0.5, targets={"hidden/1": 1.5}),
     "prune.targets['hidden/1']=1.5"),
    (dict(method="nm", n=4, m=4), "prune.n=4, prune.m=4: N:M sparsity keeps n of every m "
                                  "weights, so it needs 1 <= n < m"),
    (dict(method="nm", n=2, m=5), "prune.m=5: the input dimension of hidden/1/kernel (shape "
                                  "(48, 40), axis -2) is 48"),
    (dict(method="magnitude", sparsity=0.5, exclude=("convs/*",)),
     "prune.exclude pattern 'convs/*' matches no prunable parameter of the student; its "
     "prunable layers are: hidden/0/kernel, hidden/1/kernel, out/kernel"),
    (dict(method="magnitude", sparsity=0.5, targets={"head": 0.5}),
     "prune.targets pattern 'head' matches no prunable parameter"),
    (dict(method="magnitude", sparsity=0.5, schedule="cubic", begin_step=5, end_step=5),
     "prune.end_step=5: the cubic schedule ramps from prune.begin_step=5 to prune.end_step, "
     "which must be in (5, train.steps=100]"),
    (dict(method="magnitude", sparsity=0.5, schedule="linear"), "prune.schedule='linear': "
                                                                "valid schedules"),
    (dict(method="magnitude", sparsity=0.5, exclude=("hidden/1",)),
     "every prunable layer of the student is excluded"),
    (dict(method="magnitude", sparsity=0.5, schedule="init"), "prune.schedule='init': pruning "
                                                              "the initial weights"),
    (dict(method="structured", sparsity=0.5, scope="global"),
     "prune.criterion='bn_scale' with prune.scope='global': layer 'hidden/0' of the MLP has no "
     "BatchNorm after it"),
])
def test_bad_prune_config_names_the_key_value_and_fix(kw, message):
    with pytest.raises(ValueError) as e:
        prune.make_plan(prune_config(**kw), mlp(), SHAPE, 100)
    assert message in str(e.value)
