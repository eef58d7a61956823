"""kdjax.privacy.rdp against independent implementations of the same formulas.

Reference values: TF Privacy's research/pate_2018/core.py (the paper's own analysis code;
github.com/tensorflow/privacy at commit 03035d5d4a271ac795dab80f5bc1cef82fc3d462), evaluated at
the points below with numpy 2.4 / scipy 1.17, where the data-dependent bounds are active. Over a
grid of 4 sigmas x 6 vote histograms x 3 thresholds (all orders of rdp.ORDERS) kdjax agreed with
it to 1e-15 relative. And Google's dp-accounting (an independent RDP accountant, optional: the
test is skipped without it) for the data-independent curves, which are Gaussian mechanisms.
The paper's own Table 2 needs its teachers' vote files, which are not public data here.
"""

import math

import numpy as np
import pytest

from kdjax.privacy import rdp

C10 = lambda *head: np.array([list(head) + [0] * (10 - len(head))], float)  # noqa: E731

# (sigma, votes, order, log q from core.compute_logq_gaussian, core.rdp_gaussian at that order)
GNMAX_REFERENCE = [
    (40.0, C10(200, 30, 20), 8.0, -5.659945978483009, 0.0010856417314935429),
    (40.0, C10(250), 20.0, -10.019228294289038, 5.3213177518040856e-05),
    (20.0, C10(26, 24), 5.0, -0.10536051565782628, 0.0125),  # no consensus: = 5/20^2
    (5.0, C10(90, 5, 5), 3.0, -74.96871164370725, 1.606325025863903e-30),
]
# (T, sigma1, votes, order, core.compute_logpr_answered, core.compute_rdp_threshold)
THRESHOLD_REFERENCE = [
    (200.0, 150.0, C10(200, 30, 20), 8.0, -0.6931471805599453, 0.00017777777777777779),
    (200.0, 150.0, C10(250), 20.0, -0.46114909092111317, 0.00044444444444444447),
    (40.0, 20.0, C10(26, 24), 5.0, -1.4189677615315315, 0.0062499999999999995),
]


@pytest.mark.parametrize("sigma, votes, order, log_q, expected", GNMAX_REFERENCE)
def test_gnmax_data_dependent_bound_matches_the_papers_code(sigma, votes, order, log_q, expected):
    assert rdp.gnmax_log_q(votes, sigma)[0] == pytest.approx(log_q, rel=1e-12)
    assert rdp.gnmax_rdp(votes, sigma, [order])[0, 0] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("t, sigma1, votes, order, log_p, expected", THRESHOLD_REFERENCE)
def test_threshold_bound_matches_the_papers_code(t, sigma1, votes, order, log_p, expected):
    assert rdp.log_pr_answered(votes, t, sigma1)[0] == pytest.approx(log_p, rel=1e-12)
    assert rdp.threshold_rdp(votes, t, sigma1, [order])[0, 0] == pytest.approx(expected,
                                                                               rel=1e-10)


def test_epsilon_conversion_matches_the_papers_code():
    # core.compute_eps_from_delta(ORDERS, 0.19 * ORDERS, 1e-5) = (3.1491156831212788, 9.0)
    eps, order = rdp.epsilon(0.19 * rdp.ORDERS, 1e-5)
    assert (eps, order) == (pytest.approx(3.1491156831212788, rel=1e-12), 9.0)
    # and the formula at its optimum, by hand
    assert eps == pytest.approx(0.19 * 9 + math.log(1e5) / 8, rel=1e-12)


def test_data_independent_curves_are_the_closed_forms():
    orders = np.array([1.5, 2.0, 32.0])
    np.testing.assert_allclose(rdp.gnmax_rdp_data_independent(40.0, orders), orders / 1600)
    np.testing.assert_allclose(rdp.threshold_rdp_data_independent(150.0, orders),
                               orders / (2 * 150.0 ** 2))


def test_data_dependent_never_exceeds_data_independent_and_wins_on_consensus():
    rng = np.random.default_rng(0)
    votes = rng.multinomial(250, rng.dirichlet(np.full(10, 0.3), size=200))
    for sigma in (5.0, 40.0, 100.0):
        dep = rdp.gnmax_rdp(votes, sigma)
        assert np.all(dep >= 0) and np.all(dep <= rdp.ORDERS / sigma ** 2 + 1e-15)
    unanimous = rdp.gnmax_rdp(C10(250), 40.0, [8.0])[0, 0]
    assert unanimous < 0.01 * 8 / 1600  # 2.1e-5 against 5e-3
    assert rdp.rdp_from_log_q(-np.inf, 40.0, [8.0])[0, 0] == 0.0  # an output that cannot move


def test_gnmax_log_q_is_the_union_bound_with_its_cap():
    from scipy.stats import norm

    votes = C10(60, 50, 40)
    sigma = 10.0
    by_hand = np.log(norm.sf(10, scale=sigma * 2 ** .5) + norm.sf(20, scale=sigma * 2 ** .5)
                     + 7 * norm.sf(60, scale=sigma * 2 ** .5))
    assert rdp.gnmax_log_q(votes, sigma)[0] == pytest.approx(by_hand, rel=1e-12)
    assert rdp.gnmax_log_q(C10(1, 1, 1, 1, 1, 1, 1, 1, 1, 1), sigma)[0] == pytest.approx(
        math.log(0.9))


VOTES = np.array([[250] + [0] * 9, [200, 30, 20] + [0] * 7, [120, 110, 20] + [0] * 7,
                  [240, 10] + [0] * 8, [90, 80, 80] + [0] * 7], float)


@pytest.mark.parametrize("threshold, sigma1, sigma, delta, expected, order", [
    # TF Privacy's expected data-dependent cost (smooth_sensitivity_table._compute_rdp's loop
    # over core.py's functions) on VOTES, and its optimal order
    (200.0, 150.0, 40.0, 1e-5, 0.24220184580691628, 67.5),
    (None, None, 40.0, 1e-5, 0.31359853220187617, 56.5),
    (60.0, 30.0, 10.0, 1e-6, 1.0465196670188521, 28.0),
])
def test_data_dependent_cost_of_a_release_matches_the_papers_analysis(threshold, sigma1, sigma,
                                                                      delta, expected, order):
    cost = rdp.pate_cost(VOTES, sigma=sigma, delta=delta, threshold=threshold, sigma1=sigma1)
    assert cost.epsilon_data_dependent == pytest.approx(expected, rel=1e-12)
    assert cost.order_data_dependent == order


def test_data_independent_cost_charges_every_query_the_check_and_gnmax():
    cost = rdp.pate_cost(VOTES, sigma=20.0, delta=1e-5, threshold=60.0, sigma1=30.0)
    curve = 5 * rdp.ORDERS / 400 + 5 * rdp.ORDERS / (2 * 900)
    eps, order = rdp.epsilon(curve, 1e-5)
    assert cost.epsilon == pytest.approx(eps, rel=1e-14) and cost.order == order
    assert cost.epsilon_data_dependent <= cost.epsilon and cost.queries == 5
    plain = rdp.pate_cost(VOTES, sigma=20.0, delta=1e-5)
    assert plain.epsilon == pytest.approx(rdp.epsilon(5 * rdp.ORDERS / 400, 1e-5)[0], rel=1e-14)
    assert plain.epsilon < cost.epsilon  # the check is paid for on top, whatever the data


@pytest.mark.parametrize("call, match", [
    (lambda: rdp.gnmax_rdp_data_independent(0.0), "sigma must be > 0"),
    (lambda: rdp.threshold_rdp_data_independent(-1.0), "sigma1 must be > 0"),
    (lambda: rdp.gnmax_rdp_data_independent(1.0, [1.0]), "orders must be > 1"),
    (lambda: rdp.epsilon(rdp.ORDERS, 0.0), "delta must be in"),
    (lambda: rdp.pate_cost([[1, 0]], sigma=1.0, delta=1e-5, threshold=1.0),
     "needs both threshold and sigma1"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_data_independent_curves_agree_with_dp_accounting():
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant as rpa

    orders = rdp.ORDERS
    sigma, sigma1, queries = 40.0, 150.0, 640
    # GNMax: a Gaussian mechanism on the vote histogram, L2 sensitivity sqrt(2): noise multiplier
    # sigma / sqrt(2). The threshold check: sensitivity 1, noise multiplier sigma1.
    accountant = rpa.RdpAccountant(list(orders))
    accountant.compose(dp.GaussianDpEvent(sigma / math.sqrt(2)), queries)
    accountant.compose(dp.GaussianDpEvent(sigma1), queries)
    ours = queries * (rdp.gnmax_rdp_data_independent(sigma, orders)
                      + rdp.threshold_rdp_data_independent(sigma1, orders))
    np.testing.assert_allclose(ours, accountant._rdp, rtol=1e-12)
    # dp-accounting converts with the tighter bound of Balle et al. 2020; on the same curve ours
    # (Mironov's, as the paper) is the larger, and theirs is what its formula gives on our curve.
    eps_theirs = accountant.get_epsilon(1e-5)
    assert eps_theirs == pytest.approx(rpa.compute_epsilon(orders, ours, 1e-5)[0], rel=1e-12)
    assert rdp.epsilon(ours, 1e-5)[0] > eps_theirs
    cost = rdp.pate_cost(np.tile(C10(250), (queries, 1)), sigma=sigma, delta=1e-5,
                         threshold=200.0, sigma1=sigma1)
    assert cost.epsilon == rdp.epsilon(ours, 1e-5)[0]
