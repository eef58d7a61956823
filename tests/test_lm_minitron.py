"""Minitron's width and depth pruning of LM transformers (kdjax.compress.minitron)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _float32 import assert_close
from kdjax.compress import minitron
from kdjax.models import ModelSpec

VOCAB, T = 40, 12
TINY = dict(d_model=24, num_layers=3, num_heads=6, num_kv_heads=3, d_ff=40)


def _spec(**kwargs):
    return ModelSpec(name="lm_tiny", num_classes=VOCAB, input_shape=(T,),
                     kwargs={**TINY, **kwargs})


def _model(seed=0, **kwargs):
    model = _spec(**kwargs).build(seed)
    # random norm scales and biases so that a wrongly sliced one shows
    rng = np.random.default_rng(seed + 1)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("scale", "bias"):
            v.set_value(jnp.asarray(rng.uniform(0.5, 1.5, v.get_value().shape), jnp.float32))
    return model


def _tokens(seed=0, batch=3):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, T)))


def _np_importance(model, tokens):
    """An independent numpy forward of the plain (Llama) block computing the same scores."""
    p = {tuple(map(str, k)): np.asarray(v.get_value(), np.float64)
         for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    eps, nh, kvh, hd = 1e-5, model.num_heads, model.num_kv_heads, model.head_dim
    tok = np.asarray(tokens)
    b, t = tok.shape

    def norm(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * s

    def rope(x):  # [b, t, h, d]
        half = hd // 2
        freq = 10000.0 ** (-np.arange(half) / half)
        ang = np.arange(t)[None, :, None, None] * freq
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                               x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

    x = p[("embed", "embedding")][tok]
    hidden = np.zeros(model.d_model)
    heads, neurons, blocks = [], [], []
    for i in range(model.num_layers):
        w = {k[2:]: v for k, v in p.items() if k[:2] == ("layers", str(i))}
        h = norm(x, w[("attention_norm", "scale")])
        hidden += np.abs(h).mean((0, 1))
        q = rope((h @ w[("attention", "q", "kernel")]).reshape(b, t, nh, hd))
        k = rope((h @ w[("attention", "k", "kernel")]).reshape(b, t, kvh, hd))
        v = (h @ w[("attention", "v", "kernel")]).reshape(b, t, kvh, hd)
        k, v = np.repeat(k, nh // kvh, 2), np.repeat(v, nh // kvh, 2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", a, v)
        heads.append(np.linalg.norm(out, axis=-1).mean((0, 1)))
        mid = x + out.reshape(b, t, -1) @ w[("attention", "o", "kernel")]
        h2 = norm(mid, w[("mlp_norm", "scale")])
        hidden += np.abs(h2).mean((0, 1))
        g = h2 @ w[("mlp", "gate", "kernel")]
        act = g / (1 + np.exp(-g)) * (h2 @ w[("mlp", "up", "kernel")])
        neurons.append(np.abs(act).mean((0, 1)))
        y = mid + act @ w[("mlp", "down", "kernel")]
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        blocks.append((1 - cos).mean())
        x = y
    hidden += np.abs(norm(x, p[("norm", "scale")])).mean((0, 1))
    return hidden, np.stack(heads), np.stack(neurons), np.array(blocks)


def test_importance_matches_an_independent_numpy_forward():
    model, tokens = _model(), _tokens()
    got = minitron.importance(model, tokens)
    want = _np_importance(model, tokens)
    for name, g, w in zip(("hidden", "heads", "neurons", "blocks"),
                          (got.hidden, got.heads, got.neurons, got.blocks), want):
        assert g.shape == w.shape, name
        assert_close(g, w, n=4 * TINY["d_model"] * TINY["num_layers"], err_msg=name)
    # the scores discriminate: not a constant vector
    assert got.hidden.std() > 0.01 * got.hidden.mean() and got.blocks.std() > 0


def test_keep_everything_gives_identical_logits():
    model, tokens = _model(), _tokens()
    spec, small, _ = minitron.prune(model, _spec(), {}, tokens)
    np.testing.assert_array_equal(np.asarray(small(tokens)), np.asarray(model(tokens)))
    assert spec.kwargs["d_model"] == 24 and spec.kwargs["num_layers"] == 3


def _masked(model, kept, d_old):
    """`model` with every removed channel, head, neuron and block zeroed in place, and each
    residual norm rescaled to average over the kept channels only (module docstring)."""
    h = np.zeros(d_old, bool)
    h[kept.hidden] = True
    drop_h = ~h
    ratio = len(kept.hidden) / d_old
    group, hd = model.num_heads // model.num_kv_heads, model.head_dim
    model.embed.embedding[...] = model.embed.embedding[...] * h
    for i, block in enumerate(model.layers):
        if i not in kept.blocks:  # a block writing nothing into the stream is the identity
            block.attention.o.kernel[...] = jnp.zeros_like(block.attention.o.kernel[...])
            block.mlp.down.kernel[...] = jnp.zeros_like(block.mlp.down.kernel[...])
            continue
        j = list(kept.blocks).index(i)
        heads = np.zeros(model.num_heads, bool)
        for g in kept.groups[j]:
            heads[g * group:(g + 1) * group] = True
        cols = np.repeat(heads, hd)
        block.attention.o.kernel[...] = block.attention.o.kernel[...] * cols[:, None] * h
        ff = np.zeros(block.mlp.gate.out_features, bool)
        ff[kept.neurons[j]] = True
        block.mlp.up.kernel[...] = block.mlp.up.kernel[...] * ff
        block.mlp.down.kernel[...] = block.mlp.down.kernel[...] * h
        norms = [getattr(block, n) for n in ("attention_norm", "mlp_norm", "post_attention_norm",
                                             "pre_mlp_norm", "post_mlp_norm") if hasattr(block, n)]
        for norm in norms:
            norm.scale[...] = norm.scale[...] * np.sqrt(ratio)
            norm.eps = norm.eps * ratio
    model.norm.scale[...] = model.norm.scale[...] * np.sqrt(ratio)
    model.norm.eps = model.norm.eps * ratio
    assert not drop_h.all()
    return model


@pytest.mark.parametrize("extra", [
    {}, {"qk_norm": True, "qkv_bias": True},
    {"sandwich_norms": True, "activation": "gelu_tanh", "tie_embeddings": True}])
def test_pruned_model_equals_the_masked_original(extra):
    model, tokens = _model(**extra), _tokens()
    targets = {"d_model": 16, "d_ff": 24, "num_heads": 4, "num_layers": 2}
    spec, small, kept = minitron.prune(model, _spec(**extra), targets, _tokens(seed=5))
    assert (small.d_model, small.num_layers, small.num_heads, small.num_kv_heads) == (16, 2, 4, 2)
    assert small.layers[0].mlp.gate.out_features == 24 and small.head_dim == model.head_dim
    assert spec.abstract().d_model == 16 and spec.kwargs["head_dim"] == 4
    # the kept channels are the top-scoring ones
    scores = minitron.importance(model, _tokens(seed=5))
    assert scores.hidden[kept.hidden].min() >= np.delete(scores.hidden, kept.hidden).max()
    assert scores.blocks[kept.blocks].min() >= np.delete(scores.blocks, kept.blocks).max()
    masked = _masked(_model(**extra), kept, 24)
    want = np.asarray(masked(tokens))
    assert_close(small(tokens), want, n=4 * 24 * 3)
    # and removing something changed the function (the masked comparison is not vacuous)
    assert np.abs(want - np.asarray(model(tokens))).max() > 1e-3


def test_gqa_groups_are_removed_whole():
    model = _model()
    scores = minitron.importance(model, _tokens())
    kept = minitron.choose(model, scores, {"num_heads": 2})  # 3 KV groups of 2 -> 1 group
    assert kept.groups.shape == (3, 1)
    for i in range(3):
        best = int(np.argmax(scores.heads[i].reshape(3, 2).sum(-1)))
        assert kept.groups[i, 0] == best
    _, small = minitron.shrink(model, _spec(), kept)
    g = int(kept.groups[0, 0])
    q = model.layers[0].attention.q.kernel[...]
    np.testing.assert_array_equal(small.layers[0].attention.q.kernel[...],
                                  q[:, g * 2 * 4:(g + 1) * 2 * 4])
    np.testing.assert_array_equal(small.layers[0].attention.k.kernel[...],
                                  model.layers[0].attention.k.kernel[...][:, g * 4:(g + 1) * 4])


def test_pruned_shape_round_trips_through_the_spec():
    model, tokens = _model(), _tokens()
    spec, small, _ = minitron.prune(model, _spec(), {"d_model": 16, "num_heads": 4,
                                                     "num_layers": 2}, tokens)
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    rebuilt = again.abstract()
    assert jax.tree.map(jnp.shape, nnx.state(rebuilt)) == jax.tree.map(jnp.shape,
                                                                        nnx.state(small))
    nnx.update(rebuilt, nnx.state(small))
    np.testing.assert_array_equal(np.asarray(rebuilt(tokens)), np.asarray(small(tokens)))


def test_sliding_layers_are_renumbered():
    model = _model(sliding_window=4, sliding_layers=[0, 2])
    kept = dataclasses.replace(minitron.choose(model, minitron.importance(model, _tokens()), {}),
                               blocks=np.array([1, 2]))
    kept = dataclasses.replace(kept, groups=kept.groups[:2], neurons=kept.neurons[:2])
    spec, small = minitron.shrink(model, _spec(sliding_window=4, sliding_layers=[0, 2]), kept)
    assert spec.kwargs["sliding_layers"] == [1]
    assert small.layers[0].attention.sliding_window is None
    assert small.layers[1].attention.sliding_window == 4


@pytest.mark.parametrize("targets, message", [
    ({"num_heads": 3}, "prune.minitron.num_heads=3 cannot be kept in whole KV groups"),
    ({"d_ff": 41}, "prune.minitron.d_ff=41 is larger than the model's d_ff=40"),
    ({"num_layers": -1}, "prune.minitron.num_layers=-1 must be an integer >= 0"),
    ({"width": 3}, "prune.minitron has no key(s) ['width']"),
])
def test_bad_targets_are_refused(targets, message):
    with pytest.raises(ValueError) as e:
        minitron.check_targets(_model(), targets)
    assert message in str(e.value)


def test_gemma_hidden_pruning_and_scanned_models_are_refused():
    gemma = _spec(norm_offset=1.0, embed_scale=True).build(0)
    with pytest.raises(ValueError, match="sqrt\\(d_model\\).*prune.minitron.d_model=0"):
        minitron.check_targets(gemma, {"d_model": 16})
    minitron.check_targets(gemma, {"d_ff": 16})  # its other widths prune
    with pytest.raises(ValueError, match="scan_layers=True"):
        minitron.importance(_spec(scan_layers=True).build(0), _tokens())
