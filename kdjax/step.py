"""The fused distillation step: teacher forward, student forward/backward and optimizer update in
ONE jit-compiled XLA program.

Why one program: the teacher's activations never leave the device, XLA schedules the teacher and
the student together, and the host dispatches one executable per step (or per `steps_per_call`
steps), instead of a teacher call, a student call and an optimizer call as eager PyTorch loops do.

The step is a pure function of pytrees. Models are Flax NNX modules split once into a static
GraphDef and array State; inside the step they are re-assembled with `nnx.merge`. The teacher's
variables are a separate, non-donated input: they are never differentiated (the teacher runs
outside the function given to `jax.value_and_grad`), never in the optimizer state, never updated.
Supervised training (a teacher, a baseline student) is the same step with no teachers.

What trains is a `Distillee` (kdjax.distillee): the student plus the parts its method trains
with it. One optimizer updates all of it; only the student is exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import augment, calibration, sharding
from kdjax import taps as taps_lib
from kdjax.distillee import Distillee

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (student features, per-teacher features, labels, step) -> (scalar loss, metrics)
Objective = Callable[[dict, tuple[dict, ...], jax.Array, jax.Array], tuple[jax.Array, Metrics]]


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; all leaves are arrays (checkpointable, donatable).

    `rng` is the run's base key as raw uint32 key data (plain arrays checkpoint everywhere); step
    keys are `fold_in(rng, step)`, so a resumed run draws the same augmentations as an
    uninterrupted one. `perm` is the current epoch's example order for device-resident data
    (a one-element placeholder when batches are streamed in: Orbax cannot
    save zero-size arrays): with `step` it is the data iterator's whole state.

    The health fields are kept on the device so that no step waits for the host to look at them:
    `bad_step` is the number (1-based, as logs and checkpoints count) of the first step whose loss
    terms, gradients or updated variables were not finite, 0 while none was; `bad_terms` is the
    bitmask of which ones (decode it with `nonfinite_terms`); `skipped_steps` counts the steps
    whose update nan_policy="skip" dropped.
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    perm: jax.Array
    skipped_steps: jax.Array
    bad_step: jax.Array
    bad_terms: jax.Array


class FrozenModel(NamedTuple):
    """A teacher: its static structure, its (never updated) variables, the sub-modules to tap
    (attribute paths, kdjax.taps) and its own input normalisation.

    `normalization` is the (mean, std) the teacher was trained with, when it differs from the
    student's (an imported torchvision teacher on ImageNet statistics, say): the step gives the
    teacher the same augmented view as the student, normalised its own way. None = the student's.
    `input_shape` is the (H, W, C) it takes when the student's images differ (a 3-channel
    teacher of grayscale data, another resolution): `augment.teacher_view` adapts the view.
    """

    graphdef: nnx.GraphDef
    variables: nnx.State
    taps: tuple[str, ...] = ()
    normalization: augment.Normalization | None = None
    input_shape: tuple[int, ...] | None = None


def freeze(model: nnx.Module, *, taps: Sequence[str] = (),
           normalization: augment.Normalization | None = None,
           input_shape: Sequence[int] | None = None) -> FrozenModel:
    graphdef, variables = nnx.split(model)
    return FrozenModel(graphdef, variables, tuple(taps), normalization,
                       None if input_shape is None else tuple(input_shape))


def compute_dtype(name: str = "auto") -> jnp.dtype:
    """The precision policy: parameters stay float32; activations use this dtype.

    "auto" is bfloat16 on GPU/TPU (tensor cores, half the activation bytes) and float32 on CPU,
    where XLA emulates bfloat16 arithmetic and it is slower, not faster.
    """
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"compute dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int,
                     num_examples: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` into its GraphDef and a fresh TrainState (step 0, optimizer initialised).

    `model` is a Distillee, or a plain model, which is wrapped in one (no connectors or peers).
    """
    if not isinstance(model, Distillee):
        model = Distillee(model)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    rng = jax.random.key_data(jax.random.key(seed))
    perm = (jax.random.permutation(epoch_key(rng, 0), num_examples).astype(jnp.int32)
            if num_examples else jnp.zeros((1,), jnp.int32))
    # Distinct buffers: the step donates the state, and one buffer cannot be donated twice.
    counters = {k: jnp.zeros((), jnp.int32) for k in ("step", "skipped_steps", "bad_step",
                                                       "bad_terms")}
    return graphdef, TrainState(params=params, model_state=model_state,
                                opt_state=tx.init(params), rng=rng, perm=perm, **counters)


NAN_POLICIES = ("stop", "skip")
# Not a term of the loss: set when an update made a parameter or a batch statistic non-finite
# although the loss and the gradients were finite (an overflowing step size).
NEW_VARIABLES_TERM = "updated_variables"
COUNTERS = ("skipped_steps",)  # metrics that count since the start, not per-step values


def _term_names(metric_names) -> list[str]:
    # The bit order of TrainState.bad_terms; the host rebuilds it from the metrics' names.
    return sorted(set(metric_names) - set(COUNTERS)) + [NEW_VARIABLES_TERM]


def nonfinite_terms(bad_terms: int, metric_names) -> list[str]:
    """Decode `TrainState.bad_terms` with the names of the step's metrics."""
    return [n for i, n in enumerate(_term_names(metric_names)) if int(bad_terms) >> i & 1]


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def epoch_key(rng: jax.Array, epoch) -> jax.Array:
    """The key of epoch `epoch`'s example order: a data stream apart from the augmentation
    stream (which folds in the step). Streamed input (kdjax.input) draws the same orders."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 0x5EED), epoch)


class DeviceData(flax.struct.PyTreeNode):
    """A training set resident on the devices, sampled inside the step: named arrays that share
    their leading (row) axis, e.g. {"image": uint8 [N, H, W, C], "label": int32 [N]} or a
    language model's {"tokens", "segments": int32 [N, seq_len + 1]}."""

    arrays: dict[str, jax.Array]
    batch_size: int = flax.struct.field(pytree_node=False)

    @property
    def num_rows(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size  # the last partial batch is dropped


def sample(state: TrainState, data: DeviceData, mesh: Mesh) -> tuple[TrainState, Batch]:
    """Gather this step's rows of every array of `data` on device; reshuffle at each epoch.

    The permutation is stored in the state and recomputed only when an epoch starts (lax.cond
    runs one branch), because a 60k-element permutation per step costs ~40 ms on CPU. The batch
    gains "index" (the rows' positions in the set), for per-example state such as CRD's memory.
    """
    spe = data.steps_per_epoch
    pos = state.step % spe
    perm = jax.lax.cond(
        pos == 0,
        lambda: jax.random.permutation(epoch_key(state.rng, state.step // spe),
                                       data.num_rows).astype(jnp.int32),
        lambda: state.perm)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * data.batch_size, data.batch_size)
    batch = {**{k: v[idx] for k, v in data.arrays.items()}, "index": idx}
    if mesh.size > 1:  # the data is replicated: each device computes on its rows of the batch
        batch = jax.lax.with_sharding_constraint(batch, sharding.batch_sharded(mesh))
    return state.replace(perm=perm), batch


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What a task puts into the fused step (`make_step`); the rest of the step is shared.

    Attributes:
      inputs: `(batch, key) -> inputs`, the models' inputs for this step's batch (augmented
        views, packed positions); `key` is the step's key.
      teach: `(teachers, inputs) -> outputs` of the frozen teachers (NNX modules, inference mode).
      loss: `(model, inputs, teachers, teacher_outputs, step, key) -> (loss, metrics)` of the
        trainable model (a Distillee); the only part that is differentiated.
      weight: `inputs -> scalar`, what the loss is a mean over (a language model's target
        tokens), so that micro-batches (train.grad_accum) weigh by their share of the whole
        batch's; None: rows, equal in every micro-batch.
      summed: the metrics that are sums over the batch (added over micro-batches; the others
        are means, averaged).
      rollout: `(model, teachers, inputs, key) -> inputs`, the inputs rewritten by the models
        before the loss, with the trainable model's parameters of this step (on-policy
        distillation: continuations sampled by the student); not differentiated. None: the
        inputs as they are.
    """

    inputs: Callable[[Batch, jax.Array], Any]
    teach: Callable[[tuple[nnx.Module, ...], Any], Any]
    loss: Callable[..., tuple[jax.Array, Metrics]]
    weight: Callable[[Any], jax.Array] | None = None
    summed: tuple[str, ...] = ()
    rollout: Callable[[nnx.Module, tuple[nnx.Module, ...], Any, jax.Array], Any] | None = None


def place_teachers(teachers: Sequence[FrozenModel], teacher_sharding: Sequence[Any] | None,
                   mesh: Mesh) -> tuple[tuple, tuple]:
    """(shardings, variables) of the teachers on the mesh, placed once for every call.

    On one device they stay as they are: on XLA:CPU a step compiled for NamedSharding-placed
    teacher variables ran 2.7x slower (0.76 vs 0.28 CPU-s per lm_mini step with an lm_mini
    teacher) for nothing to partition (benchmarks/results/perf_notes.md).
    """
    if mesh.size == 1:
        return (None,) * len(teachers), tuple(t.variables for t in teachers)
    shardings = tuple(teacher_sharding or (sharding.replicated(mesh),) * len(teachers))
    return shardings, tuple(sharding.put(t.variables, s) for t, s in zip(teachers, shardings))


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, parts: StepParts, *,
              teachers: Sequence[FrozenModel] = (), mesh: Mesh | None = None,
              data: DeviceData | None = None, steps_per_call: int = 1, nan_policy: str = "stop",
              state_sharding: TrainState | None = None,
              teacher_sharding: Sequence[Any] | None = None, grad_accum: int = 1) -> Step:
    """Build the fused train step of any task: the teachers' forward, the trainable model's
    forward and backward and the optimizer update in one compiled program.

    Args:
      graphdef: the Distillee's static structure (from `init_train_state`).
      tx: the optax optimizer; its state lives in TrainState.opt_state.
      parts: the task's inputs, teacher outputs and loss (`StepParts`).
      teachers: frozen teachers, evaluated in inference mode inside the step.
      mesh: device mesh (default: all devices); the batch is split over its data and fsdp axes.
      data: a device-resident training set to sample from inside the step (replicated: every
        device gathers its own rows of the global batch, no communication); None: batches are
        passed to each call (streamed).
      steps_per_call: run this many steps per dispatch with `lax.scan` (worth it on accelerators
        for small models; on the CPU the scan is unrolled, and 1 is as fast).
      nan_policy: "stop" records the first non-finite step in the state (`bad_step`,
        `bad_terms`) for the caller to stop at its next look; "skip" also leaves the parameters,
        statistics and optimizer state of such a step unchanged (its batch is consumed) and
        counts it in `skipped_steps`, returned as a metric. Both check on the device: no sync.
      state_sharding: a TrainState of NamedShardings, the state's placement in and out of the
        step (`kdjax.sharding.state_shardings`); default: as placed.
      teacher_sharding: per teacher, its variables' shardings (`kdjax.sharding.tree_shardings`);
        default: replicated (`place_teachers`).
      grad_accum: micro-batches per step (train.grad_accum): the batch's rows are split into
        this many, run one after the other (teachers included) in a `lax.scan`, and their
        gradients added, each weighted by its share of the batch's `parts.weight` (target
        tokens), so the update is the whole batch's mean gradient whatever the split.
    """
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1 (micro-batches per step), got "
                         f"{grad_accum}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got steps_per_call={steps_per_call}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy (config train.nan_policy) must be one of {NAN_POLICIES}, "
                         f"got {nan_policy!r}")
    mesh = mesh or sharding.make_mesh()
    teacher_sharding, teacher_vars = place_teachers(teachers, teacher_sharding, mesh)
    teacher_defs = tuple(t.graphdef for t in teachers)

    def one_step(state: TrainState, teacher_vars, data, batch):
        if data is not None:
            state, batch = sample(state, data, mesh)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs = parts.inputs(batch, key)
        frozen = tuple(nnx.merge(g, v) for g, v in zip(teacher_defs, teacher_vars))
        if parts.rollout is not None:
            # this step's parameters, before the update: sampling is on-policy, never stale
            current = nnx.merge(graphdef, state.params, state.model_state)
            inputs = jax.lax.stop_gradient(parts.rollout(current, frozen, inputs, key))

        def grad_of(model_state, inputs):
            # Teachers: inference mode, outside the differentiated function, so no gradient and
            # no optimizer state ever touch them; stop_gradient documents it.
            teacher_out = jax.lax.stop_gradient(parts.teach(frozen, inputs))

            def loss_fn(params):
                # copy=True: fresh Variables owned by this trace, so BatchNorm may update its
                # stats.
                model = nnx.merge(graphdef, params, model_state, copy=True)
                loss, metrics = parts.loss(model, inputs, frozen, teacher_out, state.step, key)
                return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

            (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params)
            return loss, metrics, model_state, grads

        if grad_accum == 1:
            loss, metrics, model_state, grads = grad_of(state.model_state, inputs)
        else:
            loss, metrics, model_state, grads = accumulate(
                grad_of, state.params, state.model_state, inputs, parts, grad_accum)
        return apply_update(state, grads, loss, metrics, model_state, tx=tx,
                            nan_policy=nan_policy, mesh=mesh, state_sharding=state_sharding)

    return compile_step(one_step, teacher_vars, data, mesh=mesh, steps_per_call=steps_per_call,
                        state_sharding=state_sharding, teacher_sharding=teacher_sharding)


def accumulate(grad_of: Callable, params: nnx.State, model_state: nnx.State, inputs: Any,
               parts: StepParts, micro: int) -> tuple[jax.Array, Metrics, nnx.State, nnx.State]:
    """`grad_of(model_state, inputs) -> (loss, metrics, model_state, grads)` over `micro`
    micro-batches of `inputs` (every leaf's leading axis is the batch's rows), one after the
    other: the loss and gradients of the whole batch's mean.

    Each micro-batch's loss is a mean over its `parts.weight` (target tokens); weighted by its
    share ``w_i / sum w`` the terms add up to the mean over the whole batch, so padding that
    falls unevenly on the micro-batches changes nothing (a mean of micro-batch means would
    weigh a token of a sparse micro-batch more). Micro-batch i holds rows i, i + micro, ...:
    a batch split over devices stays evenly split.
    """
    rows = jax.tree.leaves(inputs)[0].shape[0]
    if rows % micro:
        raise ValueError(f"train.batch_size={rows} must be a multiple of train.grad_accum="
                         f"{micro} (rows per micro-batch); set train.grad_accum to a divisor "
                         f"of {rows}")
    split = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(rows // micro, micro, *x.shape[1:]), 0, 1), inputs)
    weights = (jax.vmap(parts.weight)(split).astype(jnp.float32) if parts.weight is not None
               else jnp.ones((micro,), jnp.float32))
    shares = weights / jnp.maximum(weights.sum(), 1.0)

    def body(carry, xs):
        model_state, loss_sum, grad_sum = carry
        micro_inputs, share = xs
        loss, metrics, model_state, grads = grad_of(model_state, micro_inputs)
        grad_sum = jax.tree.map(lambda a, g: a + share * g, grad_sum, grads)
        return (model_state, loss_sum + share * loss, grad_sum), metrics

    (model_state, loss, grads), metrics = jax.lax.scan(
        body, (model_state, jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params)),
        (split, shares))
    metrics = {k: v.sum() if k in parts.summed else v.mean() for k, v in metrics.items()}
    return loss, metrics, model_state, grads


def image_parts(objective: Objective, teachers: Sequence[FrozenModel],
                preprocess: augment.Preprocess) -> StepParts:
    """The image-classification task's `StepParts`: on-device augmentation of the batch
    ({"image", "label", optional "index"}), each teacher's taps on the same view in its own
    normalisation, and `objective` on the Distillee's features."""

    def inputs(batch: Batch, key: jax.Array):
        # float32 images: each model's first layer casts them to its own compute dtype. Labels are
        # int [B], or augment.MixedLabels with mixup/CutMix.
        return augment.train_views(batch, preprocess, key=key, dtype=jnp.float32), batch.get("index")

    def teach(models, inputs):
        views, _ = inputs
        return tuple(_teacher_features(m, t, views.teacher, preprocess)
                     for m, t in zip(models, teachers))

    def loss(model, inputs, frozen, teacher_out, step, key):
        views, index = inputs
        # The connectors' key is apart from the augmentation stream.
        out = model.features(views.student, train=True, teachers=teacher_out, index=index,
                             key=jax.random.fold_in(key, 0xC0))
        return objective(out, teacher_out, views.labels, step)

    return StepParts(inputs=inputs, teach=teach, loss=loss)


def _teacher_features(model: nnx.Module, teacher: FrozenModel, images: jax.Array,
                      preprocess: augment.Preprocess) -> dict:
    return taps_lib.features(
        model, augment.teacher_view(images, preprocess, teacher.normalization,
                                    teacher.input_shape),
        train=False, taps=teacher.taps, what="loss.teacher_taps")


@dataclasses.dataclass(frozen=True)
class Step:
    """A compiled step. Call it as `state, metrics = step(state, batch)`.

    With device-resident data pass `batch=None` (the step samples its own); with streamed data
    pass the task's batch (images: {"image": uint8 [B, H, W, C], "label": int32 [B]} and, for
    methods with per-example state (CRD), "index": int32 [B]; a leading [steps_per_call] axis
    when steps_per_call > 1). `lower(state, batch)` gives the lowered program for inspection.
    """

    fn: Callable
    teachers: tuple[nnx.State, ...]
    data: DeviceData | None
    serial: bool = False  # wait for each call to finish (kdjax.sharding.serial_dispatch)

    def __call__(self, state: TrainState, batch: Batch | None = None) -> tuple[TrainState, Metrics]:
        out = self.fn(state, self.teachers, self.data, batch)
        return jax.block_until_ready(out) if self.serial else out

    def lower(self, state: TrainState, batch: Batch | None = None):
        return self.fn.lower(state, self.teachers, self.data, batch)


def make_distill_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: Objective,
    *,
    teachers: Sequence[FrozenModel] = (),
    preprocess: augment.Preprocess = augment.Preprocess(),
    mesh: Mesh | None = None,
    data: DeviceData | None = None,
    steps_per_call: int = 1,
    nan_policy: str = "stop",
    state_sharding: TrainState | None = None,
    teacher_sharding: Sequence[Any] | None = None,
    grad_accum: int = 1,
) -> Step:
    """The fused step of an image student (`make_step` with `image_parts`).

    `objective` maps (student features, teachers' features, labels, step) to (loss, metrics);
    see `kdjax.objectives`. Features are the models' `features()` dicts, so feature methods read
    named taps; unused taps are dead code to XLA and cost nothing. The student's dict also holds
    what its Distillee's parts add (connectors' outputs, peers' features, ...). `preprocess` is
    the on-device normalisation/augmentation recipe; `data` holds {"image", "label"} arrays.
    The other arguments are `make_step`'s.
    """
    return make_step(graphdef, tx, image_parts(objective, teachers, preprocess),
                     teachers=teachers, mesh=mesh, data=data, steps_per_call=steps_per_call,
                     nan_policy=nan_policy, state_sharding=state_sharding,
                     teacher_sharding=teacher_sharding, grad_accum=grad_accum)


def apply_update(state: TrainState, grads: nnx.State, loss: jax.Array, metrics: Metrics,
                 model_state: nnx.State, *, tx: optax.GradientTransformation, nan_policy: str,
                 mesh: Mesh, state_sharding: TrainState | None) -> tuple[TrainState, Metrics]:
    """The end of every train step (image or language model): the optimizer update, the NaN/Inf
    health record and nan_policy, the next step's state on its shardings; metrics gain "loss"
    and "grad_norm"."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    names = _term_names(metrics)
    if len(names) > 31:
        raise ValueError(f"at most 30 metrics fit the int32 mask TrainState.bad_terms, the "
                         f"objective returns {len(metrics)}: {sorted(metrics)}")
    bad = [~jnp.isfinite(metrics[n]) for n in names[:-1]]
    bad.append(~_all_finite((params, model_state)))
    mask = sum(b.astype(jnp.int32) << i for i, b in enumerate(bad))
    ok = mask == 0
    first = ~ok & (state.bad_step == 0)
    health = dict(bad_step=jnp.where(first, state.step + 1, state.bad_step),
                  bad_terms=jnp.where(first, mask, state.bad_terms))
    if nan_policy == "skip":
        params, model_state, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), (params, model_state, opt_state),
            (state.params, state.model_state, state.opt_state))
        health["skipped_steps"] = state.skipped_steps + (~ok).astype(jnp.int32)
        metrics["skipped_steps"] = health["skipped_steps"]
    state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                          opt_state=opt_state, **health)
    # On one device there is nothing to constrain, and sharding annotations are not free on
    # XLA:CPU (see compile_step).
    if mesh.size > 1:
        state = jax.lax.with_sharding_constraint(state, sharding.state_shardings(state, mesh)
                                                 if state_sharding is None else state_sharding)
    return state, metrics


def compile_step(one_step: Callable, teacher_vars: tuple, data: Any, *, mesh: Mesh,
                 steps_per_call: int, state_sharding: TrainState | None,
                 teacher_sharding: Sequence[Any]) -> Step:
    """jit `one_step(state, teacher_vars, data, batch) -> (state, metrics)`, `steps_per_call`
    steps per dispatch (a scan whose metrics are the steps' means, counters their last value),
    the state donated."""
    # XLA:CPU gives convolutions inside a while loop neither its YNNPACK kernels nor its layout
    # rewrites, so a rolled scan of a conv step ran 2-3x slower per step than one step per call
    # (benchmarks/results/perf_notes.md). Unrolled, there is no loop; compile time grows with
    # steps_per_call instead.
    unroll = steps_per_call if mesh.devices.flat[0].platform == "cpu" else 1

    def multi_step(state, teacher_vars, data, batch):
        if steps_per_call == 1:
            return one_step(state, teacher_vars, data, batch)
        state, metrics = jax.lax.scan(
            lambda s, b: one_step(s, teacher_vars, data, b), state, batch,
            length=steps_per_call, unroll=unroll)
        return state, {k: v[-1] if k in COUNTERS else v.mean() for k, v in metrics.items()}

    if mesh.size == 1:
        # One device: every array is already where it must be. Sharding annotations would only
        # make XLA partition a program that has one part, and on XLA:CPU they cost: an LM step
        # (lm_mini, 32 x 128 tokens) took 0.68 CPU-s with them and 0.21 without.
        fn = jax.jit(multi_step, donate_argnums=0)
    else:
        rep = sharding.replicated(mesh)
        batch_sharding = sharding.batch_sharded(mesh, stacked=steps_per_call > 1)
        fn = jax.jit(multi_step, donate_argnums=0,
                     in_shardings=(state_sharding, tuple(teacher_sharding), rep, batch_sharding),
                     out_shardings=(state_sharding, rep))
    return Step(fn, teacher_vars, data, sharding.serial_dispatch(mesh))


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
              teacher_logits: jax.Array | None = None, calibration_bins: int = 0) -> Metrics:
    """The eval metrics of one padded batch as sums over its real examples (mask [B] = 1).

    logits [B, C] -> "loss" (NLL), "accuracy", "top5_accuracy"; with `teacher_logits` [B, C]
    also "teacher_agreement" (same argmax) and "teacher_kl" (KL(teacher || student) at T=1);
    with `calibration_bins` > 0 also "brier" and "calibration", the
    kdjax.calibration.CalibrationBins of that many bins (ECE, MCE: add the batches' bins, then
    kdjax.calibration.ece_from_bins). Divide the scalar sums by the summed mask.
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {"loss": (ce * mask).sum(),
            "accuracy": ((logits.argmax(-1) == labels) * mask).sum(),
            "top5_accuracy": ((top5 == labels[:, None]).any(-1) * mask).sum()}
    if teacher_logits is not None:
        teacher_logits = teacher_logits.astype(jnp.float32)
        sums["teacher_agreement"] = ((logits.argmax(-1) == teacher_logits.argmax(-1)) * mask).sum()
        log_t, log_s = jax.nn.log_softmax(teacher_logits), jax.nn.log_softmax(logits)
        sums["teacher_kl"] = ((jnp.exp(log_t) * (log_t - log_s)).sum(-1) * mask).sum()
    if calibration_bins:
        sums["brier"] = (calibration.brier_score(logits, labels) * mask).sum()
        sums["calibration"] = calibration.calibration_bins(logits, labels, mask=mask,
                                                           num_bins=calibration_bins)
    return sums


def compile_eval(eval_fn: Callable, teachers: Sequence[FrozenModel] = (), *,
                 mesh: Mesh | None = None, state_sharding: TrainState | None = None,
                 teacher_sharding: Sequence[Any] | None = None) -> Callable:
    """jit any task's `eval_fn(params, model_state, teachers, batch) -> sums` (`teachers` the
    frozen teachers as NNX modules) into `eval_step(params, model_state, batch) -> sums`, the
    teachers placed once (`place_teachers`). Without `state_sharding` the model's variables stay
    where they were placed."""
    mesh = mesh or sharding.make_mesh()
    teacher_sharding, teacher_vars = place_teachers(teachers, teacher_sharding, mesh)
    teacher_defs = tuple(t.graphdef for t in teachers)

    def fn(params, model_state, teacher_vars, batch):
        frozen = tuple(nnx.merge(g, v) for g, v in zip(teacher_defs, teacher_vars))
        return eval_fn(params, model_state, frozen, batch)

    if mesh.size == 1:  # (see compile_step)
        jitted = jax.jit(fn)
    else:
        jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh), in_shardings=(
            None if state_sharding is None else state_sharding.params,
            None if state_sharding is None else state_sharding.model_state,
            teacher_sharding, sharding.batch_sharded(mesh)))
    serial = sharding.serial_dispatch(mesh)

    def run(params, model_state, batch):
        sums = jitted(params, model_state, teacher_vars, batch)
        return jax.block_until_ready(sums) if serial else sums

    return run


def sum_batches(eval_step: Callable, params: nnx.State, model_state: nnx.State,
                batches: Iterable[Batch]) -> dict[str, Any]:
    """The eval sums of every batch added up on the device, fetched once (fixed order; the last
    partial batch is padded and masked, never dropped)."""
    totals: dict[str, Any] = {}
    for batch in batches:
        sums = eval_step(params, model_state, batch)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)


def make_eval_step(graphdef: nnx.GraphDef, *, teachers: Sequence[FrozenModel] = (),
                   preprocess: augment.Preprocess = augment.Preprocess(),
                   mesh: Mesh | None = None, state_sharding: TrainState | None = None,
                   teacher_sharding: Sequence[Any] | None = None,
                   calibration_bins: int = 0,
                   input_shape: Sequence[int] | None = None) -> Callable:
    """Build `eval_step(params, model_state, batch) -> sums` for a fixed-order, padded batch of
    images.

    `batch` has "image", "label" and "mask" (1 for real examples, 0 for padding, so the last
    partial batch is evaluated, never dropped). Returns per-batch sums (`eval_sums`: count, loss,
    top-1, top-5, with a teacher agreement with the first teacher's argmax and KL from it, with
    `calibration_bins` the Brier score and calibration bins); the caller adds them up and
    divides by count. A Distillee is evaluated by its student and, each under its prefix, the
    classifiers its parts add (`Distillee.eval_logits`: peers "peer<i>/", exits "exit_<tap>/").
    `state_sharding` and `teacher_sharding` are make_distill_step's. `input_shape`: the
    evaluated model's (H, W, C) when the images differ (`augment.teacher_view` adapts them).
    """

    def eval_fn(params, model_state, frozen, batch):
        images = augment.preprocess(batch["image"], preprocess, key=None, dtype=jnp.float32)
        model = nnx.merge(graphdef, params, model_state)
        own = (images if input_shape is None else
               augment.teacher_view(images, preprocess, None, input_shape))
        heads = (model.eval_logits(own) if isinstance(model, Distillee)
                 else {"": taps_lib.call(model, own, train=False)})
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        sums = {"count": mask.sum()}
        for prefix, logits in heads.items():
            t_logits = None
            if frozen and not prefix:  # the student's agreement with the first teacher
                t_logits = taps_lib.call(frozen[0], augment.teacher_view(
                    images, preprocess, teachers[0].normalization, teachers[0].input_shape),
                    train=False)
            sums.update({prefix + k: v for k, v in eval_sums(
                logits, labels, mask, teacher_logits=t_logits,
                calibration_bins=calibration_bins).items()})
        return sums

    return compile_eval(eval_fn, teachers, mesh=mesh, state_sharding=state_sharding,
                        teacher_sharding=teacher_sharding)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad a host batch to `size` examples and add the "mask" that marks the real ones."""
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
           for k, v in batch.items()}
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out
