"""Pruning masks kept in the optimizer state and applied inside the fused step (jaxpruner's design).

`wrap(tx, plan)` returns an optax GradientTransformation around the run's optimizer whose state
holds the masks and its own update count. At each update it

1. recomputes the masks on the schedule's steps (`lax.cond`: inside the compiled step, no host
   work) from the parameters as they are before the update;
2. zeroes the pruned entries' gradients before the wrapped optimizer sees them (so Adam's moments
   and SGD's momentum do not accumulate for weights that no longer exist);
3. replaces the pruned entries' updates by -param, so that `optax.apply_updates` lands them on
   exactly 0.0 (p + (-p) == 0 in IEEE arithmetic) whatever momentum or weight decay would have
   done, while the kept entries get the wrapped optimizer's update unchanged, bit for bit.

Because the masks are part of `TrainState.opt_state`, checkpoints carry them and a resumed run
continues with the same masks and schedule position.

Methods (prune.method):
- "magnitude": prune the entries of smallest |w|; "random": entries ranked by a fixed random score
  (a baseline); both per layer (each layer to its own target) or global (one threshold over all
  pruned layers, so layers end with different sparsities).
- "nm": N:M sparsity, at most n non-zeros in every m consecutive weights along the input axis
  (2:4 is what sparse tensor cores run); by magnitude.
- "structured": whole coupled channel groups (every parameter slice of a channel, across
  residual sums: kdjax.compress.coupling), scored by BatchNorm scale, filter L1 or DepGraph's
  group L2 norm, masked while training and physically removed on export
  (kdjax.compress.structured).

Which parameters: unstructured and N:M prune the kernels (>= 2-D) of the student's Linear and Conv
layers; prune.exclude removes some by path pattern and prune.targets gives some their own target
sparsity. By default (prune.dense_first_last) the first layer, which reads the input, and the
last, the classifier, stay dense: the first has few weights (a 3x3 convolution of the image) and
every later feature is computed from its outputs, and the classifier's weights are each class's
template, so pruning either costs accuracy out of proportion to the bytes saved (Gale et al. 2019,
"The State of Sparsity in Deep Neural Networks", keep the first layer dense for this reason).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import plan as plan_lib
from kdjax.compress import coupling, structured
from kdjax.compress.schedule import SCHEDULES, Schedule
from kdjax.compress.structured import CRITERIA, ChannelGroup, Path, layer_name

METHODS = ("none", "magnitude", "random", "nm", "structured", "minitron")
SCOPES = ("per_layer", "global")
# prune.schedule "init": structured pruning of the initial weights (init.workdir's) once, before
# training, physically (kdjax.compress.initial); the run trains the smaller model, with no masks.
CONFIG_SCHEDULES = SCHEDULES + ("init",)


@dataclasses.dataclass(frozen=True)
class Target:
    """One pruned set of entries: a kernel (unstructured, N:M) or a channel group (structured).

    `schedule` is the run's, with this target's final sparsity (prune.targets may override it).
    """

    name: str
    schedule: Schedule
    kernel: Path | None = None  # unstructured / N:M
    group: ChannelGroup | None = None  # structured


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the step needs to compute masks: static, decided on the host before training."""

    method: str
    scope: str
    targets: tuple[Target, ...]
    schedule: Schedule  # the run's (prune.sparsity); targets may have their own final sparsity
    n: int = 2
    m: int = 4
    criterion: str = "bn_scale"
    seed: int = 0
    round_to: int = 1  # structured: kept channels per group a multiple of this

    @property
    def masked(self) -> tuple[tuple[Path, int | None], ...]:
        """The masked parameters, in the order of the masks in PruneState: (path, channel axis;
        None when the mask is per entry)."""
        if self.method != "structured":
            return tuple((t.kernel, None) for t in self.targets)
        # A parameter in several groups (a kernel's input and output channels) has one mask per
        # group; the wrapper applies each, so a weight is kept only where all keep it.
        return tuple((m.path, m.axis) for t in self.targets for m in t.group.masked)

    def is_update(self, step) -> jax.Array:
        return jnp.any(jnp.stack([t.schedule.is_update(step) for t in self.targets]))

    def masks(self, params: Mapping[Path, jax.Array], step) -> tuple[jax.Array, ...]:
        """Boolean masks (True = kept) for `masked`, at `step`'s target sparsities."""
        if self.method == "structured":
            keep = self._channel_masks(params, step)
            return tuple(t.group.mask(k, m, params[m.path].shape)
                         for k, t in zip(keep, self.targets) for m in t.group.masked)
        if self.method == "nm":
            return tuple(nm_mask(params[t.kernel], n=self.n, m=self.m) for t in self.targets)
        scores = [jnp.abs(params[t.kernel]) if self.method == "magnitude" else
                  jax.random.uniform(jax.random.fold_in(jax.random.key(self.seed), i),
                                     params[t.kernel].shape)
                  for i, t in enumerate(self.targets)]
        sparsities = [t.schedule.sparsity(step) for t in self.targets]
        return _rank_masks(scores, sparsities, self._pooled(), keep_one=False)

    def _channel_masks(self, params, step) -> list[jax.Array]:
        scores = [t.group.score(params, self.criterion) for t in self.targets]
        sparsities = [t.schedule.sparsity(step) for t in self.targets]
        return _rank_masks(scores, sparsities, self._pooled(), keep_one=True,
                           round_to=self.round_to)

    def _pooled(self) -> list[bool]:
        # Global scope pools the targets on the run's schedule; those with their own target
        # (prune.targets) are pruned per layer to it.
        return [self.scope == "global" and t.schedule == self.schedule for t in self.targets]


def _ranks(score: jax.Array) -> jax.Array:
    # Each entry's position in ascending order, ties broken by index: exactly k entries have a
    # rank below k, so the pruned count is exact even when many scores tie (e.g. at 0).
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))


def _pruned_count(sparsity, size: int) -> jax.Array:
    return jnp.round(sparsity * size).astype(jnp.int32)


def _rank_masks(scores, sparsities, pooled, *, keep_one: bool, round_to: int = 1
                ) -> list[jax.Array]:
    """Per score array, the mask keeping all but the round(s * n) lowest-scoring entries; the
    pooled ones share one ranking (global scope). `keep_one`: never prune a whole array.
    `round_to`: each array keeps a multiple of this many entries (the nearest, or all when it
    has fewer), its best ones."""
    masks = [None] * len(scores)
    for i, (score, s) in enumerate(zip(scores, sparsities)):
        if not pooled[i]:
            k = _pruned_count(s, score.size)
            if keep_one:
                k = jnp.minimum(k, score.size - 1)
            masks[i] = _rounded(score, score.size - k, round_to)
    idx = [i for i, p in enumerate(pooled) if p]
    if idx:
        flat = jnp.concatenate([scores[i].reshape(-1) for i in idx])
        keep = _ranks(flat) >= _pruned_count(sparsities[idx[0]], flat.size)
        start = 0
        for i in idx:
            part = keep[start:start + scores[i].size].reshape(scores[i].shape)
            start += scores[i].size
            if keep_one:  # a layer left with no channel keeps its best one
                part = part | (~part.any() & (scores[i] == scores[i].max()))
            masks[i] = _rounded(scores[i], part.sum(), round_to) if round_to > 1 else part
    return masks


def _rounded(score: jax.Array, kept, round_to: int) -> jax.Array:
    # The `kept` best entries, `kept` first moved to the nearest multiple of round_to (at least
    # one multiple; all entries when there are fewer).
    if round_to > 1:
        kept = jnp.clip(jnp.round(kept / round_to) * round_to, round_to, score.size)
        kept = jnp.minimum(kept, score.size).astype(jnp.int32)
    return (_ranks(score) >= score.size - kept).reshape(score.shape)


def nm_mask(kernel: jax.Array, *, n: int, m: int) -> jax.Array:
    """Keep the n largest |w| of every m consecutive weights along the input axis (axis -2: a
    Linear kernel's [in, out], a Conv kernel's [kh, kw, in, out])."""
    w = jnp.moveaxis(jnp.abs(kernel), -2, -1)  # [..., out, in]
    groups = w.reshape(w.shape[:-1] + (w.shape[-1] // m, m))
    order = jnp.argsort(groups, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = (ranks >= m - n).reshape(w.shape)
    return jnp.moveaxis(keep, -1, -2)


# -- the optimizer wrapper ---------------------------------------------------------------------

class PruneState(NamedTuple):
    """The wrapped optimizer's state: `count` updates applied, the masks (Plan.masked order),
    and the inner optimizer's state."""

    count: jax.Array
    masks: tuple[jax.Array, ...]
    inner: optax.OptState


def wrap(tx: optax.GradientTransformation, plan: Plan, *,
         prefix: Path = ("student",)) -> optax.GradientTransformation:
    """`tx` with `plan`'s masks kept in its state and applied to every update (module docstring).

    `prefix` is where the student's parameters sit in the trained tree (a Distillee's "student").
    """

    def leaves_by_path(tree):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        index = {coupling.key_path(p): i for i, (p, _) in enumerate(flat)}
        positions = []
        for path, _ in plan.masked:
            full = prefix + tuple(path)
            if full not in index:
                raise ValueError(f"pruning: no parameter {layer_name(full)} in the trained model")
            positions.append(index[full])
        return [leaf for _, leaf in flat], treedef, positions

    def init(params):
        leaves, _, positions = leaves_by_path(params)
        masks = tuple(jnp.ones(leaves[i].shape, bool) for i in positions)
        return PruneState(jnp.zeros((), jnp.int32), masks, tx.init(params))

    def update(grads, state: PruneState, params=None):
        if params is None:
            raise ValueError("the pruning optimizer needs the parameters: tx.update(grads, "
                             "state, params)")
        p_leaves, treedef, positions = leaves_by_path(params)
        by_path = {path: p_leaves[i] for (path, _), i in zip(plan.masked, positions)}
        if plan.method == "structured":  # the scores also read the BatchNorm scales
            flat = jax.tree_util.tree_flatten_with_path(params)[0]
            by_path.update({coupling.key_path(p)[len(prefix):]: leaf for p, leaf in flat
                            if coupling.key_path(p)[:len(prefix)] == prefix})
        masks = jax.lax.cond(plan.is_update(state.count),
                             lambda: tuple(plan.masks(by_path, state.count)),
                             lambda: state.masks)
        g_leaves = list(jax.tree.leaves(grads))
        for i, mask in zip(positions, masks):
            g_leaves[i] = jnp.where(mask, g_leaves[i], 0)
        updates, inner = tx.update(jax.tree.unflatten(treedef, g_leaves), state.inner, params)
        u_leaves = list(jax.tree.leaves(updates))
        for i, mask in zip(positions, masks):
            u_leaves[i] = jnp.where(mask, u_leaves[i], -p_leaves[i])
        return (jax.tree.unflatten(treedef, u_leaves),
                PruneState(optax.safe_int32_increment(state.count), masks, inner))

    return optax.GradientTransformation(init, update)


# -- the plan from a config and a model ----------------------------------------------------------

def _matches(name: str, pattern: str) -> bool:
    # A pattern names a parameter ("fc/kernel") or a layer, whose parameters it then covers.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + "/*")


def forward_order(model: nnx.Module, input_shape: Sequence[int]) -> list[Path]:
    """The student's variable paths in the order its forward pass first reads them (the
    equations of its jaxpr), so "first" and "last" layers are the data flow's, not the
    attribute names' (nnx orders those alphabetically)."""
    closed, paths, _ = coupling.trace(model, input_shape)
    position = {v: i for i, v in enumerate(closed.jaxpr.invars[:len(paths)])}
    order, seen = [], set()
    for eqn in closed.jaxpr.eqns:
        for v in eqn.invars:
            i = position.get(v) if not isinstance(v, jax.extend.core.Literal) else None
            if i is not None and i not in seen:
                seen.add(i)
                order.append(paths[i])
    return order


def _kernels(model: nnx.Module, input_shape) -> list[Path]:
    order = forward_order(model, input_shape)
    if hasattr(model, "kernel_paths"):  # a PyTorch module's Linear/Conv "weight"s (torchbridge)
        kernels = set(model.kernel_paths())
        return [p for p in order if p in kernels]
    shapes = {tuple(k): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return [p for p in order if p[-1] == "kernel" and len(shapes[p]) >= 2]


def check_sparsity(value: Any, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r}: a target sparsity is the fraction of weights pruned, "
                         f"in [0, 1) (0.9 prunes 90%); a layer to keep dense goes in "
                         f"prune.exclude")
    return float(value)


def check_config(prune: plan_lib.Prune, total_steps: int) -> Schedule:
    """Validate the prune section's scalar keys; return the run's schedule."""
    def bad(key, value, fix):
        raise ValueError(f"prune.{key}={value!r}: {fix}")

    if prune.method not in METHODS:
        bad("method", prune.method, f"valid methods: {list(METHODS)}")
    if prune.scope not in SCOPES:
        bad("scope", prune.scope, f"valid scopes: {list(SCOPES)}")
    if prune.schedule not in CONFIG_SCHEDULES:
        bad("schedule", prune.schedule, f"valid schedules: {list(CONFIG_SCHEDULES)}")
    if prune.criterion not in CRITERIA:
        bad("criterion", prune.criterion, f"valid criteria: {list(CRITERIA)}")
    final = check_sparsity(prune.sparsity, "prune.sparsity")
    initial = check_sparsity(prune.initial_sparsity, "prune.initial_sparsity")
    for key, value in (("begin_step", prune.begin_step), ("end_step", prune.end_step)):
        if value < 0:
            bad(key, value, "steps are >= 0")
    if prune.every_steps < 1:
        bad("every_steps", prune.every_steps, "masks are recomputed every N >= 1 steps")
    if not isinstance(prune.round_to, int) or isinstance(prune.round_to, bool) \
            or prune.round_to < 1:
        bad("round_to", prune.round_to, "each structured group keeps a multiple of round_to "
                                        "channels: an integer >= 1 (8 for ONNX Runtime's CPU "
                                        "convolutions; 1 rounds nothing)")
    if prune.round_to > 1 and prune.method != "structured":
        bad("round_to", prune.round_to, "rounding counts channels of structured pruning; set "
                                        "prune.method='structured' or prune.round_to=1")
    method, begin, end = prune.method, prune.begin_step, prune.end_step
    if method == "nm":
        n, m = prune.n, prune.m
        if not 1 <= n < m:
            raise ValueError(f"prune.n={n}, prune.m={m}: N:M sparsity keeps n of every m weights, "
                             f"so it needs 1 <= n < m (e.g. n=2, m=4)")
        if final and abs(final - (1 - n / m)) > 1e-9:
            bad("sparsity", final, f"N:M with n={n}, m={m} is {1 - n / m:.4g} sparse by "
                                   f"definition; leave prune.sparsity at 0")
        final = 1 - n / m
    if method != "none" and prune.schedule != "init" and begin >= total_steps:
        bad("begin_step", begin, f"pruning must begin before train.steps={total_steps}")
    if prune.schedule == "cubic":
        if method == "nm":
            bad("schedule", "cubic", "N:M sparsity is n/m at once: use prune.schedule='one_shot'")
        if not begin < end <= total_steps:
            bad("end_step", end, f"the cubic schedule ramps from prune.begin_step={begin} to "
                                 f"prune.end_step, which must be in ({begin}, "
                                 f"train.steps={total_steps}]")
    if prune.schedule == "init" and method not in ("none", "structured", "minitron"):
        bad("schedule", "init", "pruning the initial weights before training is structured "
                                "pruning (prune.method='structured' or 'minitron'); unstructured "
                                "methods prune at prune.begin_step=0 with "
                                "prune.schedule='one_shot'")
    if method == "minitron" and prune.schedule != "init":
        bad("schedule", prune.schedule, "Minitron prunes init.workdir's transformer once, before "
                                        "training; set prune.schedule='init'")
    if prune.minitron.calibration_rows < 1:
        bad("minitron.calibration_rows", prune.minitron.calibration_rows,
            "the importance is estimated on this many training rows: an integer >= 1")
    return Schedule(kind=prune.schedule, final=final, initial=initial, begin=begin, end=end,
                    every=prune.every_steps)


def _unused(patterns: Sequence[str], names: Sequence[str], key: str) -> None:
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            raise ValueError(f"{key} pattern {pattern!r} matches no prunable parameter of the "
                             f"student; its prunable layers are: {', '.join(names)} (patterns are "
                             f"fnmatch globs over these paths, e.g. 'stages/0/*')")


def make_plan(prune: plan_lib.Prune, model: nnx.Module, input_shape: Sequence[int],
              total_steps: int, *, seed: int = 0) -> Plan | None:
    """The pruning plan of the run's `prune` section for the student `model`, or None when nothing
    is pruned during training. Every bad value raises ValueError naming the key and the fix."""
    schedule = check_config(prune, total_steps)
    method = prune.method
    if method == "none" or prune.schedule == "init":
        return None
    targets_cfg = dict(prune.targets)
    for pattern, value in targets_cfg.items():
        check_sparsity(value, f"prune.targets[{pattern!r}]")

    def target_sparsity(*names: str) -> float:
        # The last pattern naming any of the layers (a structured group's producers) wins.
        hits = [v for p, v in targets_cfg.items() if any(_matches(n, p) for n in names)]
        return hits[-1] if hits else schedule.final

    if method == "structured":
        st = structured.structure(model, input_shape)
        if st.unfollowed:
            print("kdjax: structured pruning leaves dense the channels of layers the channel "
                  "tracer cannot follow: " + "; ".join(f"{name} ({why})" for name, why
                                                      in st.unfollowed.items()), flush=True)
        # A pattern names a group by any of its producing layers (a residual group by the stem,
        # a block's last convolution or a shortcut projection): the group is pruned as a whole.
        layers = {g.name: [layer_name(p) for p in g.producers] for g in st.groups}
        names = [n for g in st.groups for n in layers[g.name]] + list(st.refused)
        _unused(prune.exclude, names, "prune.exclude")
        _unused(targets_cfg, names, "prune.targets")
        for pattern in targets_cfg:
            for name, why in st.refused.items():
                if _matches(name, pattern):
                    raise ValueError(
                        f"prune.targets pattern {pattern!r} names layer {name!r}, whose output "
                        f"channels structured pruning leaves dense: {why}. Prune the groups "
                        f"{', '.join(g.name for g in st.groups[:4])}... instead")
        chosen = [g for g in st.groups
                  if not any(_excluded(n, prune.exclude) for n in layers[g.name])]
        if prune.criterion == "bn_scale" and prune.scope == "global":
            # Per layer, a layer without BatchNorm is scored by L1; one global ranking cannot
            # compare |gamma| with L1 norms.
            for g in chosen:
                if not g.bn_scales:
                    raise ValueError(
                        f"prune.criterion='bn_scale' with prune.scope='global': layer {g.name!r} "
                        f"of the {type(model).__name__} has no BatchNorm after it, and its L1 "
                        f"scores cannot be ranked with BatchNorm scales; use "
                        f"prune.scope='per_layer', prune.criterion='l1', or add {g.name!r} to "
                        f"prune.exclude")
        targets = []
        for g in chosen:
            final = target_sparsity(*layers[g.name])
            # A global ranking (the run's sparsity pooled over groups) keeps each group's best
            # channel; a group pruned to its own target is refused here, before training.
            pooled = prune.scope == "global" and final == schedule.final
            if not pooled and round(final * g.size) >= g.size:
                raise ValueError(
                    f"structured sparsity {final:g} (prune.sparsity, or prune.targets) removes "
                    f"all {g.size} channels of group {g.name!r} "
                    f"(layers {', '.join(layers[g.name])}): a group keeps at least one; give it "
                    f"at most {(g.size - 1) / g.size:.4g} (prune.targets) or add it to "
                    f"prune.exclude")
            targets.append(Target(g.name, dataclasses.replace(schedule, final=final), group=g))
        targets = tuple(targets)
    else:
        kernels = _kernels(model, input_shape)
        names = [layer_name(k) for k in kernels]
        _unused(prune.exclude, names, "prune.exclude")
        _unused(targets_cfg, names, "prune.targets")
        dense = set(names[:1] + names[-1:]) if prune.dense_first_last else set()
        chosen = [k for k, name in zip(kernels, names)
                  if name not in dense and not _excluded(name, prune.exclude)]
        shapes = {tuple(k): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        if method == "nm" and hasattr(model, "kernel_paths"):
            raise ValueError("prune.method='nm' groups weights along NNX kernels' input axis "
                             "(-2); a PyTorch student's weights are [out, in, ...]: prune it with "
                             "prune.method='magnitude' or 'random'")
        if method == "nm":
            for k in chosen:
                if shapes[k][-2] % prune.m:
                    raise ValueError(
                        f"prune.m={prune.m}: the input dimension of {layer_name(k)} (shape "
                        f"{tuple(shapes[k])}, axis -2) is {shapes[k][-2]}, not a multiple of "
                        f"m; add {layer_name(k[:-1])!r} to prune.exclude or choose an m that "
                        f"divides it")
        targets = tuple(Target(layer_name(k), dataclasses.replace(
            schedule, final=target_sparsity(layer_name(k))), kernel=k) for k in chosen)
    if not targets:
        raise ValueError(f"prune.method={method!r}: every prunable layer of the student is "
                         f"excluded (prune.exclude={tuple(prune.exclude)}, "
                         f"prune.dense_first_last={prune.dense_first_last}); nothing to prune")
    return Plan(method=method, scope=prune.scope, targets=targets, schedule=schedule,
                n=prune.n, m=prune.m, criterion=prune.criterion, seed=seed,
                round_to=prune.round_to)


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(_matches(name, p) for p in patterns)


def apply_masks(model: nnx.Module, plan: Plan, step: int = 0) -> nnx.Module:
    """`model` (in place, and returned) with `plan`'s masks at `step` applied, as the training
    step leaves its weights: pruned entries exactly 0."""
    params = {tuple(k): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}
    masks = jax.jit(plan.masks)(params, step)  # one program, not an eager op per score and rank
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for (path, _), mask in zip(plan.masked, masks):
        flat[path].set_value(flat[path].get_value() * mask)
    nnx.update(model, state)
    return model


def sparsity_report(params: Mapping[Path, Any], plan: Plan) -> dict[str, dict[str, float]]:
    """Per pruned parameter: its size, non-zeros and sparsity (host numbers, for summaries)."""
    out = {}
    for path, _ in plan.masked:
        a = np.asarray(params[path])
        nz = int(np.count_nonzero(a))
        out[layer_name(path)] = {"size": int(a.size), "nonzeros": nz,
                                 "sparsity": 1.0 - nz / a.size}
    return out
