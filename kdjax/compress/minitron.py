"""Minitron's width and depth pruning of a kdjax.lm Transformer (Muralidharan et al., 2024).

Importance is activation-based, estimated once on the unpruned model over a calibration batch of
training rows, each score the mean over its real (non-padding) tokens:

- hidden channel: mean |output| of every RMSNorm reading the residual stream (each block's input
  norms and the final norm), summed over those norms;
- attention head: mean L2 norm of the head's attention output (before the output projection); a
  KV group scores the sum of the query heads that read it, and groups are kept or removed whole;
- FFN neuron: mean |act(gate) * up|;
- block (depth): ShortGPT's Block Influence, 1 - cosine similarity of the block's input and
  output residual streams, mean over tokens: a block that barely turns the stream goes first.

Heads and FFN neurons are ranked within their block (every block keeps the same count, so the
pruned model is a smaller instance of the same class); hidden channels are ranked once, since
every block reads and writes the one residual stream. Blocks are ranked among themselves and the
kept ones stay in order. Each weight coupled to a removed channel is sliced: embedding columns,
every norm's scale, q/k/v columns and biases, o rows and columns, gate/up columns, down rows and
columns, the output projection's rows. The head width is unchanged (RoPE and q/k norms act
within a head), and the spec records ``head_dim`` so that a checkpoint rebuilds the pruned shape.

Pruning d_model changes what each RMSNorm averages over (the kept channels only), as Minitron's
does; distillation from the unpruned teacher recovers the difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.lm import attention
from kdjax.lm import models as lm_models

#: The target keys (prune.minitron): the Transformer's sizes they set; 0 keeps the model's.
TARGETS = ("d_model", "d_ff", "num_heads", "num_layers")


@dataclasses.dataclass(frozen=True)
class Importance:
    """Per-channel scores of one model on one calibration batch (module docstring)."""

    hidden: np.ndarray  # [d_model]
    heads: np.ndarray  # [num_layers, num_heads]
    neurons: np.ndarray  # [num_layers, d_ff]
    blocks: np.ndarray  # [num_layers], Block Influence

    def groups(self, num_kv_heads: int) -> np.ndarray:
        """[num_layers, num_kv_heads]: each KV group's score, the sum of its query heads'."""
        layers, heads = self.heads.shape
        return self.heads.reshape(layers, num_kv_heads, heads // num_kv_heads).sum(-1)


@dataclasses.dataclass(frozen=True)
class Kept:
    """What survives: sorted indices of the original model's channels, heads and blocks."""

    hidden: np.ndarray  # [d_model'] residual channels
    groups: np.ndarray  # [num_layers', num_kv_heads'] KV groups of each kept block
    neurons: np.ndarray  # [num_layers', d_ff'] FFN neurons of each kept block
    blocks: np.ndarray  # [num_layers'] blocks, in order


def _check_model(model: nnx.Module) -> None:
    if not isinstance(model, lm_models.Transformer):
        raise ValueError(f"prune.method='minitron' prunes a kdjax.lm Transformer, and the model is "
                         f"a {type(model).__name__}; use prune.method='structured' for other "
                         f"models")
    if model.scan_layers:
        raise ValueError("prune.method='minitron' reads each block's activations one block at a "
                         "time, and the model has scan_layers=True; train or import the model "
                         "with model.kwargs scan_layers=False")


def importance(model: lm_models.Transformer, tokens: jax.Array,
               segment_ids: jax.Array | None = None) -> Importance:
    """The activation importances of `model` on ``tokens [B, T]`` (``segment_ids`` as the
    model's: 0 marks padding, which no score counts)."""
    _check_model(model)
    tokens, segment_ids, positions = model._inputs(tokens, segment_ids, None)
    real = (segment_ids != 0).astype(jnp.float32)
    count = jnp.maximum(real.sum(), 1.0)

    def mean(x):  # over real tokens: x [B, T, ...]
        return jnp.einsum("bt,bt...->...", real, x.astype(jnp.float32)) / count

    hidden = jnp.zeros(model.d_model, jnp.float32)
    heads, neurons, blocks = [], [], []
    x = model._embed(tokens)
    for block in model.layers:
        normed = block.attention_norm(x)
        hidden += mean(jnp.abs(normed))
        att = block.attention
        q, k, v = att._qkv(normed, positions)
        per_head, _ = attention.attend(q, k, v, segment_ids, block=att.block,
                                       window=att.sliding_window, scale=att.scale,
                                       softcap=att.softcap)  # [B, T, heads, head_dim]
        heads.append(mean(jnp.linalg.norm(per_head.astype(jnp.float32), axis=-1)))
        a = att.o(per_head.reshape(*per_head.shape[:2], -1))
        mid = x + (block.post_attention_norm(a) if block.sandwich_norms else a)
        mlp_in = (block.pre_mlp_norm if block.sandwich_norms else block.mlp_norm)(mid)
        hidden += mean(jnp.abs(mlp_in))
        mlp = block.mlp
        neurons.append(mean(jnp.abs(lm_models.ACTIVATIONS[mlp.activation](mlp.gate(mlp_in))
                                    * mlp.up(mlp_in))))
        y, _ = block(x, positions, segment_ids)
        x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
        cos = jnp.sum(x32 * y32, -1) / jnp.maximum(
            jnp.linalg.norm(x32, axis=-1) * jnp.linalg.norm(y32, axis=-1), 1e-12)
        blocks.append(mean(1.0 - cos))
        x = y
    hidden += mean(jnp.abs(model.norm(x)))
    return Importance(hidden=np.asarray(hidden), heads=np.asarray(jnp.stack(heads)),
                      neurons=np.asarray(jnp.stack(neurons)), blocks=np.asarray(jnp.stack(blocks)))


def check_targets(model: lm_models.Transformer, targets: Mapping[str, int],
                  key: str = "prune.minitron") -> dict[str, int]:
    """`targets` resolved against `model` (0 = the model's size), or a ValueError naming the
    key, the value and the fix."""
    _check_model(model)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"{key} has no key(s) {unknown}; valid targets: {list(TARGETS)}")
    sizes = {"d_model": model.d_model, "num_heads": model.num_heads,
             "num_layers": model.num_layers, "d_ff": model.layers[0].mlp.gate.out_features}
    out = {}
    for name in TARGETS:
        value, size = targets.get(name, 0), sizes[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key}.{name}={value!r} must be an integer >= 0 (0 keeps the "
                             f"model's {size})")
        if value > size:
            raise ValueError(f"{key}.{name}={value} is larger than the model's {name}={size}: "
                             f"pruning only removes; set it to at most {size} (0 keeps {size})")
        out[name] = value or size
    group = model.num_heads // model.num_kv_heads
    if out["num_heads"] % group:
        whole = [g * group for g in range(1, model.num_kv_heads + 1)]
        raise ValueError(f"{key}.num_heads={out['num_heads']} cannot be kept in whole KV groups: "
                         f"the model's {model.num_heads} query heads share {model.num_kv_heads} "
                         f"key/value heads, {group} each, and a KV head goes with all of its "
                         f"query heads; set {key}.num_heads to one of {whole}")
    if out["d_model"] != model.d_model and model.embed_scale:
        raise ValueError(f"{key}.d_model={out['d_model']}: the model scales its embedding by "
                         f"sqrt(d_model) (Gemma), which a narrower residual stream would change "
                         f"for every kept channel; set {key}.d_model=0 (prune heads, FFN and "
                         f"blocks only)")
    return out


def choose(model: lm_models.Transformer, scores: Importance, targets: Mapping[str, int]
           ) -> Kept:
    """The highest-scoring channels, KV groups, neurons and blocks at `targets` (check_targets's
    keys), each set sorted back into the model's order."""
    sizes = check_targets(model, targets)

    def top(score: np.ndarray, n: int) -> np.ndarray:
        # a stable sort: equal scores keep the earlier index, so ties are deterministic
        return np.sort(np.argsort(-score, axis=-1, kind="stable")[..., :n], axis=-1)

    blocks = top(scores.blocks, sizes["num_layers"])
    kv = sizes["num_heads"] * model.num_kv_heads // model.num_heads
    return Kept(hidden=top(scores.hidden, sizes["d_model"]),
                groups=top(scores.groups(model.num_kv_heads)[blocks], kv),
                neurons=top(scores.neurons[blocks], sizes["d_ff"]), blocks=blocks)


def _columns(units: np.ndarray, width: int) -> np.ndarray:
    """The flat columns of whole units (heads, groups) `width` wide each."""
    return (units[:, None] * width + np.arange(width)).reshape(-1)


def shrink(model: lm_models.Transformer, spec, kept: Kept):
    """(spec, model): `model` with only `kept`'s channels, heads and blocks, a smaller instance
    of the same Transformer; the spec's kwargs record its new sizes (and ``head_dim``, which a
    new d_model / num_heads would otherwise redefine)."""
    _check_model(model)
    group = model.num_heads // model.num_kv_heads
    kv = kept.groups.shape[1]
    kwargs = {**spec.kwargs, "d_model": len(kept.hidden), "num_layers": len(kept.blocks),
              "num_heads": kv * group, "num_kv_heads": kv, "d_ff": kept.neurons.shape[1],
              "head_dim": model.head_dim}
    sliding = spec.kwargs.get("sliding_layers")
    if sliding is not None:  # the local blocks' new indices
        kwargs["sliding_layers"] = [i for i, b in enumerate(kept.blocks) if b in set(sliding)]
    smaller = dataclasses.replace(spec, kwargs=kwargs)
    h = kept.hidden
    hd = model.head_dim

    def take(path: tuple, source: dict) -> jax.Array:
        if path[0] != "layers":
            x = source[path][...]
            if path == ("embed", "embedding"):
                return x[:, h]
            if path == ("norm", "scale"):
                return x[h]
            if path == ("lm_head", "kernel"):
                return x[h]
            raise ValueError(f"minitron: no rule slices the parameter {'/'.join(map(str, path))}")
        i, rest = path[1], path[2:]
        x = source[("layers", int(kept.blocks[i]), *rest)][...]
        q = _columns(_columns(kept.groups[i], group), hd)  # the query heads of the kept groups
        k = _columns(kept.groups[i], hd)
        f = kept.neurons[i]
        rules = {("attention", "q", "kernel"): lambda: x[h][:, q],
                 ("attention", "q", "bias"): lambda: x[q],
                 ("attention", "k", "kernel"): lambda: x[h][:, k],
                 ("attention", "k", "bias"): lambda: x[k],
                 ("attention", "v", "kernel"): lambda: x[h][:, k],
                 ("attention", "v", "bias"): lambda: x[k],
                 ("attention", "o", "kernel"): lambda: x[q][:, h],
                 ("attention", "q_norm", "scale"): lambda: x,  # within a head: unchanged
                 ("attention", "k_norm", "scale"): lambda: x,
                 ("mlp", "gate", "kernel"): lambda: x[h][:, f],
                 ("mlp", "up", "kernel"): lambda: x[h][:, f],
                 ("mlp", "down", "kernel"): lambda: x[f][:, h]}
        if rest in rules:
            return rules[rest]()
        if len(rest) == 2 and rest[0].endswith("_norm") and rest[1] == "scale":
            return x[h]  # the residual stream's norms
        raise ValueError(f"minitron: no rule slices the parameter {'/'.join(map(str, path))}")

    return smaller, lm_models.rebuilt(model, smaller, take)


def prune(model: lm_models.Transformer, spec, targets: Mapping[str, int], tokens: jax.Array,
          segment_ids: jax.Array | None = None) -> tuple[Any, lm_models.Transformer, Kept]:
    """Minitron in one call: importance on ``tokens``, the kept set at `targets`, and the
    (spec, model, kept) of the smaller model."""
    kept = choose(model, importance(model, tokens, segment_ids), targets)
    smaller, small = shrink(model, spec, kept)
    return smaller, small, kept
