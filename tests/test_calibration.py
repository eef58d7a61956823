"""kdjax.calibration against independent numpy (float64) formulas, and torchmetrics when present."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _float32 as f32
from kdjax import calibration as cal

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

RNG = np.random.default_rng(0)


def _softmax64(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_bins(confidence, correct, weight, num_bins=15):
    """Bins by explicit comparisons: [e_b, e_{b+1}) for b < num_bins, and {1.0} apart."""
    edges = (np.arange(num_bins + 1) / num_bins).astype(np.float32)
    count, conf, acc = (np.zeros(num_bins + 1) for _ in range(3))
    for c, k, w in zip(np.asarray(confidence, np.float32), correct, weight):
        b = num_bins if c == np.float32(1.0) else next(
            i for i in range(num_bins) if edges[i] <= c < edges[i + 1])
        count[b] += w
        conf[b] += w * float(c)
        acc[b] += w * float(k)
    return count, conf, acc


def _reference_ece_mce(count, conf, acc):
    nonempty = count > 0
    gap = np.abs(acc[nonempty] / count[nonempty] - conf[nonempty] / count[nonempty])
    return float(np.sum(count[nonempty] / count.sum() * gap)), float(gap.max())


def _top_label64(logits, labels):
    p = _softmax64(logits)
    # the module computes softmax in float32: compare bins on the confidences it sees
    conf32 = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1).max(-1))
    return conf32, (p.argmax(-1) == labels).astype(np.float64), p


def test_ece_mce_brier_nll_match_numpy_with_a_mask():
    logits = RNG.normal(size=(500, 10)) * 3.0
    labels = RNG.integers(0, 10, 500)
    mask = (RNG.random(500) < 0.8).astype(np.float32)
    conf, correct, p = _top_label64(logits, labels)
    count, csum, asum = _reference_bins(conf, correct, mask)
    ece, mce = _reference_ece_mce(count, csum, asum)

    bins = cal.calibration_bins(logits, labels, mask=mask)
    np.testing.assert_allclose(bins.count, count)
    np.testing.assert_allclose(bins.confidence, csum, rtol=1e-5)
    np.testing.assert_allclose(bins.correct, asum)
    np.testing.assert_allclose(cal.expected_calibration_error(logits, labels, mask=mask), ece,
                               rtol=1e-5)
    np.testing.assert_allclose(cal.maximum_calibration_error(logits, labels, mask=mask), mce,
                               rtol=1e-5)
    onehot = np.eye(10)[labels]
    np.testing.assert_allclose(cal.brier_score(logits, labels), ((p - onehot) ** 2).sum(-1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cal.negative_log_likelihood(logits, labels),
                               -np.log(p[np.arange(500), labels]), rtol=1e-5, atol=1e-6)
    assert cal.brier_score(logits, labels).shape == (500,)


def test_empty_bins_and_confidences_on_edges():
    # Uniform logits give confidences exactly on edges: 1/5 = e_3, 1/3 = e_5 and 1/15 = e_1
    # (float32 division is correctly rounded, like the float32 edges); [100, 0, ...] gives 1.0.
    logits = np.full((6, 15), -1e4, np.float32)
    logits[0, :5] = 0.0   # 1/5, top label 0
    logits[1, :3] = 0.0   # 1/3
    logits[2, :] = 0.0    # 1/15
    logits[3, 0] = 100.0  # confidence 1.0: the extra bin
    logits[4, 2] = 100.0  # 1.0, wrong
    logits[5, :5] = 0.0   # 1/5, wrong
    labels = np.array([0, 0, 0, 0, 0, 1])
    conf, correct = (np.asarray(x) for x in cal.top_label(logits, labels))
    assert conf[0] == np.float32(3 / 15) and conf[1] == np.float32(5 / 15)
    assert conf[2] == np.float32(1 / 15) and conf[3] == conf[4] == 1.0
    bins = cal.calibration_bins(logits, labels)
    # an edge e_b counts in the bin above it (left-closed bins, torchmetrics' right=True)
    expected_count = np.zeros(16)
    expected_count[[1, 3, 5, 15]] = [1, 2, 1, 2]
    np.testing.assert_array_equal(bins.count, expected_count)
    count, csum, asum = _reference_bins(conf, correct, np.ones(6))
    np.testing.assert_array_equal(bins.count, count)
    ece, mce = _reference_ece_mce(count, csum, asum)
    # by hand: bin 1: |1 - 1/15|, bin 3: |1/2 - 1/5|, bin 5: |1 - 1/3|, bin 15: |1/2 - 1|
    by_hand = (14 / 15 + 2 * 0.3 + 2 / 3 + 2 * 0.5) / 6
    np.testing.assert_allclose(ece, by_hand, rtol=1e-6)
    np.testing.assert_allclose(cal.ece_from_bins(bins), ece, rtol=1e-6)
    np.testing.assert_allclose(cal.mce_from_bins(bins), mce, rtol=1e-6)
    np.testing.assert_allclose(mce, 14 / 15, rtol=1e-6)
    accuracy, confidence, fraction = (np.asarray(x) for x in cal.bin_statistics(bins))
    empty = expected_count == 0
    assert (accuracy[empty] == 0).all() and (confidence[empty] == 0).all()
    assert (fraction[empty] == 0).all() and np.isclose(fraction.sum(), 1.0)


def test_bins_of_batches_add_up_and_padding_is_ignored():
    logits = RNG.normal(size=(300, 7)) * 2.0
    labels = RNG.integers(0, 7, 300)
    whole = cal.calibration_bins(logits, labels)
    parts = [cal.calibration_bins(logits[i:i + 128], labels[i:i + 128])
             for i in range(0, 300, 128)]
    total = jax.tree.map(lambda *x: sum(x), *parts)
    for a, b in zip(total, whole):  # sums in another order: float32 reassociation (_float32.py)
        f32.assert_close(a, b, n=300)
    # a last batch padded with garbage rows (zeros and huge logits) and masked out
    pad = np.concatenate([logits[256:], np.zeros((50, 7)), np.full((50, 7), 1e9)])
    padded_labels = np.concatenate([labels[256:], np.zeros(100, int)])
    mask = np.arange(len(pad)) < 44
    masked = cal.calibration_bins(pad, padded_labels, mask=mask)
    for a, b in zip(masked, parts[-1]):
        f32.assert_close(a, b, n=len(pad))


def test_bins_from_confidence_on_every_edge():
    edges = cal.bin_edges(15)
    assert edges[0] == 0 and edges[-1] == 1 and len(edges) == 16
    conf = edges[1:]  # every inner edge and 1.0
    bins = cal.bins_from_confidence(conf, np.ones_like(conf))
    np.testing.assert_array_equal(bins.count, np.r_[0, np.ones(15)])


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(temperature):
    # Labels drawn from softmax(z): the calibrated model is z itself. A model reporting
    # temperature * z is miscalibrated by exactly that temperature.
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20000, 10)) * 2.0
    p = _softmax64(z)
    labels = (p.cumsum(-1) > rng.random((20000, 1))).argmax(-1)
    t = float(cal.fit_temperature(z * temperature, labels))
    np.testing.assert_allclose(t, temperature, rtol=0.03)
    # the minimiser of the NLL itself, by an independent numpy grid search
    grid = np.exp(np.linspace(np.log(t) - 0.05, np.log(t) + 0.05, 201))
    nll = [np.mean(-np.log(_softmax64(z * temperature / g)[np.arange(20000), labels]))
           for g in grid]
    np.testing.assert_allclose(t, grid[int(np.argmin(nll))], rtol=2e-3)
    assert (cal.expected_calibration_error(z * temperature / t, labels)
            < cal.expected_calibration_error(z * temperature, labels))


def test_temperature_ignores_masked_examples():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4000, 5)) * 2.0
    labels = (_softmax64(z).cumsum(-1) > rng.random((4000, 1))).argmax(-1)
    padded = np.concatenate([z / 2.0, rng.normal(size=(1000, 5)) * 50])
    padded_labels = np.concatenate([labels, np.zeros(1000, int)])
    mask = np.arange(5000) < 4000
    np.testing.assert_allclose(cal.fit_temperature(padded, padded_labels, mask=mask),
                               cal.fit_temperature(z / 2.0, labels), rtol=1e-5)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="labels must have the shape"):
        cal.calibration_bins(np.zeros((4, 3)), np.zeros(5, int))
    with pytest.raises(ValueError, match="mask must have the shape"):
        cal.calibration_bins(np.zeros((4, 3)), np.zeros(4, int), mask=np.ones(3))
    with pytest.raises(ValueError, match="num_bins must be a positive"):
        cal.calibration_bins(np.zeros((4, 3)), np.zeros(4, int), num_bins=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cal.brier_score(np.zeros((4, 1)), np.zeros(4, int))


def test_matches_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.classification")
    logits = RNG.normal(size=(2000, 10)).astype(np.float32) * 3
    logits[:40] = 0.0  # confidences exactly 1/10 (= e_1.5: not an edge) and
    logits[40:80, :5] = 0.0  # 1/5 on edge e_3 (the rest -inf-like)
    logits[40:80, 5:] = -1e4
    logits[80:100, 0] = 100.0  # confidence 1.0
    labels = RNG.integers(0, 10, 2000)
    probs = torch.softmax(torch.from_numpy(logits), -1)
    for norm, ours in (("l1", cal.expected_calibration_error),
                       ("max", cal.maximum_calibration_error)):
        ref = tm.multiclass_calibration_error(probs, torch.from_numpy(labels), num_classes=10,
                                              n_bins=15, norm=norm)
        np.testing.assert_allclose(ours(logits, labels), ref.item(), rtol=1e-5, atol=1e-6)


def test_calibration_imports_alone():
    """`import kdjax.calibration` pulls in neither Flax, Orbax nor TFDS."""
    code = ("import sys, kdjax.calibration; print(sorted(m for m in "
            "('flax', 'orbax', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
