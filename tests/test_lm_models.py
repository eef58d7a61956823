"""Llama-style LMs (kdjax.lm.models): document masks, taps, sizes, specs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import models
from kdjax.lm import models as lm_models

pytestmark = pytest.mark.usefixtures("quick_compiles")
V = 64


@pytest.fixture(scope="module")
def model():
    return lm_models.create_lm("lm_tiny", vocab_size=V, rngs=nnx.Rngs(0))


def test_a_packed_row_computes_each_document_as_if_alone(model):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, V, 5), rng.integers(0, V, 6)
    row = np.concatenate([a, b, np.zeros(5, int)])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [0] * 5])
    features = jax.jit(lambda t, s: model.features(t, segment_ids=s))
    packed = features(row, seg)
    alone = features(np.pad(b, (0, 10))[None], np.array([[1] * 6 + [0] * 10]))
    np.testing.assert_allclose(packed["logits"][0, 5:11], alone["logits"][0, :6], atol=1e-5)
    # another first document changes nothing in the second, not even the last bit
    other = row.copy()
    other[0, :5] = rng.integers(0, V, 5)
    np.testing.assert_array_equal(features(other, seg)["logits"][0, 5:11],
                                  packed["logits"][0, 5:11])
    # and no query of the second document puts any weight on a key outside it
    for i in range(model.num_layers):
        probs = np.asarray(packed[f"attention_{i}"])[0, :, 5:11]  # [heads, 6 queries, 16 keys]
        assert (probs[..., :5] == 0).all() and (probs[..., 11:] == 0).all()
        assert (np.triu(probs[..., 5:11], k=1) == 0).all()  # causal within the document
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_positions_restart_at_each_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(lm_models.positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])


def test_taps_and_shapes(model):
    out = jax.jit(model.features)(np.zeros((2, 7), int))
    assert set(out) == set(model.feature_names)
    assert out["layer_1"].shape == (2, 7, 32) and out["hidden"].shape == (2, 7, 32)
    assert out["attention_0"].shape == (2, 4, 7, 7)
    assert out["logits"].shape == (2, 7, V) and out["logits"].dtype == jnp.float32
    np.testing.assert_allclose(out["logits"], out["hidden"] @ model.head(), rtol=1e-5, atol=1e-6)
    # grouped-query attention: 2 key/value heads for 4 query heads
    assert model.layers[0].attention.k.kernel.shape == (32, 2 * 8)


def test_tied_embeddings_share_the_input_embedding():
    tied = lm_models.create_lm("lm_tiny", vocab_size=V, tie_embeddings=True, rngs=nnx.Rngs(0))
    untied = lm_models.create_lm("lm_tiny", vocab_size=V, rngs=nnx.Rngs(0))
    assert tied.lm_head is None
    np.testing.assert_array_equal(tied.head(), tied.embed.embedding[...].T)
    assert models.count_params(untied) - models.count_params(tied) == 32 * V


def test_bfloat16_activations_float32_parameters_and_logits():
    m = lm_models.create_lm("lm_tiny", vocab_size=V, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = jax.jit(m.features)(np.zeros((1, 4), int))
    assert out["layer_0"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype("float32")}


def test_registry_and_spec_round_trip():
    spec = models.ModelSpec(name="lm_tiny", num_classes=V, input_shape=(16,),
                            kwargs={"num_layers": 1})
    again = models.ModelSpec.from_json(spec.to_json())
    assert again == spec and again.build().vocab_size == V
    a, b = nnx.state(spec.build(3)), nnx.state(again.build(3))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert len(again.build().layers) == 1
    assert lm_models.is_lm("lm_small") and not lm_models.is_lm("mlp")
    with pytest.raises(ValueError, match="unknown language model 'lm_huge'"):
        lm_models.create_lm("lm_huge", vocab_size=V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['depth'\]"):
        models.create_model("lm_tiny", num_classes=V, depth=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        lm_models.create_lm("lm_tiny", vocab_size=V, num_kv_heads=3, rngs=nnx.Rngs(0))


def test_llama_shapes_have_their_published_sizes():
    """The registry's 1B/3B entries have Llama 3.2's parameter counts (abstract: no memory)."""
    for name, want in (("llama3_1b", 1_235_814_400), ("llama3_3b", 3_212_749_824)):
        spec = models.ModelSpec(name, 128_256, (2048,), compute_dtype="float32")
        assert models.count_params(spec.abstract()) == want, name
