"""Rényi-DP accounting of PATE's noisy aggregation (Papernot et al., "Scalable Private Learning
with PATE", ICLR 2018; Mironov, "Rényi Differential Privacy", CSF 2017).

Neighbouring datasets differ in one training example. The teachers are trained on disjoint
partitions, so such a change alters at most one teacher, hence one vote per query: the vote
histogram n(x) moves by -1 in one class and +1 in another (L2 distance √2), and max_j n_j(x)
by at most 1.

Two analyses of the same release, both computed here:

- **data-independent** (Prop. 8 of the paper): GNMax with noise σ is (λ, λ/σ²)-RDP at every
  order λ > 1, whatever the votes; the threshold check of Confident-GNMax, a Gaussian mechanism
  of sensitivity 1 with noise σ₁, is (λ, λ/(2σ₁²))-RDP. Composed over Q queries, each charged
  both (a query with a strong consensus is answered with probability ~1, so no smaller
  per-query bound holds for every dataset): Q·(λ/(2σ₁²) + λ/σ²), or Q·λ/σ² for plain GNMax.
  This holds for every dataset and every outcome of the checks, so the ε it gives is a
  differential-privacy guarantee that may be published as is. kdjax reports it as the run's ε.
  (Charging GNMax to the answered queries alone is valid only as a Rényi filter whose budget
  is fixed before querying, Feldman & Zrnic 2021, which kdjax does not run.)
- **data-dependent** (Theorem 6 with Prop. 7 and 10 of the paper): when the teachers agree, the
  noisy argmax equals the plurality with probability 1 - q̃, and the RDP at *this* dataset is
  much smaller. Composed as the paper's analysis does (TF Privacy's
  research/pate_2018/ICLR2018/smooth_sensitivity_table.py): per query, the check's
  data-dependent cost plus Pr[answered]·GNMax's (the expected cost over the check's noise).
  The bound is a function of the private votes, so the ε it gives is not itself private: the
  paper publishes it only after sanitising it with smooth sensitivity (its Section 4 and
  Appendix C). kdjax computes it for analysis and comparison with the paper, labelled as
  such, and does not implement the smooth-sensitivity release.

(ε, δ) from an RDP curve: ε = min_λ RDP(λ) + log(1/δ)/(λ - 1) (Mironov 2017, Prop. 3), the
conversion the paper and TF Privacy's PATE analysis use, over a fixed grid of orders.
All functions are numpy (float64) and vectorised over queries: `counts` is int [Q, C] (votes
per query and class), `orders` float [L]; RDP arrays are [Q, L] per query or [L] in total.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import special

#: The orders λ the curves are evaluated at (as TF Privacy's PATE analysis: 2..100 by 0.5, then
#: 100 log-spaced up to 500): the optimal order for PATE's budgets lies well inside.
ORDERS = np.concatenate([np.arange(2.0, 100.5, 0.5),
                         np.logspace(np.log10(100.0), np.log10(500.0), 100)])


def _orders(orders) -> np.ndarray:
    orders = np.atleast_1d(np.asarray(orders, np.float64))
    if np.any(orders <= 1):
        raise ValueError(f"Rényi orders must be > 1, got {orders[orders <= 1].tolist()}")
    return orders


def _check_sigma(sigma: float, name: str) -> None:
    if not sigma > 0:
        raise ValueError(f"{name} must be > 0 (the standard deviation of the Gaussian noise), "
                         f"got {sigma}")


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - e^x) for x <= 0, accurate near both ends."""
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(x < -math.log(2), np.log1p(-np.exp(np.minimum(x, 0.0))),
                        np.log(-np.expm1(np.minimum(x, 0.0))))


def log_sf_gaussian(x, sigma: float) -> np.ndarray:
    """log Pr[N(0, σ²) >= x], stable far in the tail."""
    return special.log_ndtr(-np.asarray(x, np.float64) / sigma)


# ---------------------------------------------------------------------------------------------
# GNMax: argmax_j (n_j + N(0, σ²))
# ---------------------------------------------------------------------------------------------

def gnmax_log_q(counts, sigma: float) -> np.ndarray:
    """float [Q]: an upper bound on log q̃, q̃ = Pr[GNMax's answer != the plurality class].

    Prop. 7 (a union bound): the answer leaves the plurality i* only if some j != i* gets more
    noise than the gap, Pr[N(0, σ²) - N(0, σ²) >= n_i* - n_j] = Pr[N(0, 2σ²) >= n_i* - n_j].
    Capped at log(1 - 1/C): no more likely than a uniform guess to miss.
    """
    _check_sigma(sigma, "sigma")
    counts = np.atleast_2d(np.asarray(counts, np.float64))
    num_classes = counts.shape[1]
    top = counts.argmax(1)
    gaps = counts[np.arange(len(counts)), top][:, None] - counts  # [Q, C], 0 at the top class
    logs = log_sf_gaussian(gaps, math.sqrt(2.0) * sigma)
    logs[np.arange(len(counts)), top] = -np.inf  # the plurality does not compete with itself
    return np.minimum(special.logsumexp(logs, axis=1), math.log1p(-1.0 / num_classes))


def gnmax_rdp_data_independent(sigma: float, orders=ORDERS) -> np.ndarray:
    """float [L]: λ/σ², GNMax's RDP at order λ for any votes (Prop. 8)."""
    _check_sigma(sigma, "sigma")
    return _orders(orders) / sigma ** 2


def rdp_from_log_q(log_q, sigma: float, orders=ORDERS) -> np.ndarray:
    """float [Q, L]: the data-dependent RDP of a Gaussian noisy max at a dataset where its likely
    outcome has probability >= 1 - q̃ (Theorem 6 of the paper, orders μ₁, μ₂ chosen as Prop. 10).

    The mechanism is (μ, μ/σ²)-RDP for every μ. With μ₂ = σ·sqrt(log(1/q̃)), μ₁ = μ₂ + 1 and
    ε_i = μ_i/σ², Theorem 6 gives, for λ < μ₁,
        RDP(λ) <= log((1 - q̃)·A^(λ-1) + q̃·B^(λ-1)) / (λ - 1),
        A = (1 - q̃) / (1 - (q̃·e^ε₂)^((μ₂-1)/μ₂)),   B = e^ε₁ / q̃^(1/(μ₁-1)),
    valid when μ₂ > 1, q̃·e^ε₂ < 1 and q̃ <= e^((μ₂-1)ε₂) / (μ₁/(μ₁-1) · μ₂/(μ₂-1))^μ₂.
    Elsewhere, and wherever it is larger, the data-independent λ/σ² is kept. q̃ = 0 (an outcome
    that cannot change) costs 0.
    """
    _check_sigma(sigma, "sigma")
    orders = _orders(orders)
    log_q = np.atleast_1d(np.asarray(log_q, np.float64))[:, None]  # [Q, 1]
    if np.any(log_q > 0):
        raise ValueError(f"log_q is the log of a probability, <= 0; got {log_q.max()}")
    var = sigma ** 2
    independent = np.broadcast_to(orders / var, (len(log_q), len(orders))).copy()
    finite = np.isfinite(log_q)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lq = np.where(finite, log_q, -1.0)  # placeholder where q̃ = 0, masked out below
        mu2 = np.sqrt(var * -lq)
        mu1 = mu2 + 1.0
        eps1, eps2 = mu1 / var, mu2 / var
        applies = ((mu2 > 1) & (-lq > eps2)
                   & (lq <= (mu2 - 1) * eps2 - mu2 * (np.log1p(1 / (mu1 - 1))
                                                      + np.log1p(1 / (mu2 - 1))))
                   & (orders[None, :] < mu1))
        log_1mq = _log1mexp(lq)
        log_a = log_1mq - _log1mexp((lq + eps2) * (1 - 1 / mu2))
        log_b = eps1 - lq / (mu1 - 1)
        dependent = np.logaddexp(log_1mq + (orders - 1) * log_a,
                                 lq + (orders - 1) * log_b) / (orders - 1)
    out = np.where(applies & finite, np.minimum(independent, dependent), independent)
    return np.where(finite, out, 0.0)


def gnmax_rdp(counts, sigma: float, orders=ORDERS) -> np.ndarray:
    """float [Q, L]: GNMax's data-dependent RDP per query, from its votes."""
    return rdp_from_log_q(gnmax_log_q(counts, sigma), sigma, orders)


# ---------------------------------------------------------------------------------------------
# The threshold check of Confident-GNMax: answer iff max_j n_j + N(0, σ₁²) >= T
# ---------------------------------------------------------------------------------------------

def log_pr_answered(counts, threshold: float, sigma1: float) -> np.ndarray:
    """float [Q]: log Pr[max_j n_j + N(0, σ₁²) >= T] per query."""
    _check_sigma(sigma1, "sigma1")
    counts = np.atleast_2d(np.asarray(counts, np.float64))
    return log_sf_gaussian(threshold - counts.max(1), sigma1)


def threshold_rdp_data_independent(sigma1: float, orders=ORDERS) -> np.ndarray:
    """float [L]: λ/(2σ₁²): a Gaussian mechanism on max_j n_j, whose sensitivity is 1 (half of
    GNMax's √2 squared), for any votes."""
    _check_sigma(sigma1, "sigma1")
    return _orders(orders) / (2.0 * sigma1 ** 2)


def threshold_rdp(counts, threshold: float, sigma1: float, orders=ORDERS) -> np.ndarray:
    """float [Q, L]: the threshold check's data-dependent RDP per query: Theorem 6 for a binary
    outcome whose less likely side has probability min(p, 1 - p), p = Pr[answered], and noise
    √2·σ₁ in GNMax's units (sensitivity 1 instead of √2)."""
    log_p = log_pr_answered(counts, threshold, sigma1)
    return rdp_from_log_q(np.minimum(log_p, _log1mexp(log_p)), math.sqrt(2.0) * sigma1, orders)


# ---------------------------------------------------------------------------------------------
# The whole release
# ---------------------------------------------------------------------------------------------

def epsilon(rdp, delta: float, orders=ORDERS) -> tuple[float, float]:
    """(ε, the optimal order λ) of an RDP curve at δ: min_λ RDP(λ) + log(1/δ)/(λ - 1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    orders = _orders(orders)
    eps = np.asarray(rdp, np.float64) + math.log(1.0 / delta) / (orders - 1)
    i = int(np.argmin(eps))
    return float(eps[i]), float(orders[i])


class PrivacyCost(NamedTuple):
    """The (ε, δ) of a PATE release, both analyses (see the module docstring)."""

    epsilon: float  # data-independent: a DP guarantee, publishable as is
    order: float  # the Rényi order that gives it
    epsilon_data_dependent: float  # from the private votes: NOT itself private
    order_data_dependent: float
    delta: float
    queries: int  # every query the student asked


def pate_cost(counts, *, sigma: float, delta: float, threshold: float | None = None,
              sigma1: float | None = None, orders=ORDERS) -> PrivacyCost:
    """The privacy cost of asking the queries `counts` of (Confident-)GNMax.

    Args:
      counts: int [Q, C], the teachers' votes on every query asked, answered or not (the
        data-dependent analysis reads them; the data-independent one only counts them).
      sigma: GNMax's noise σ (σ₂ of Confident-GNMax).
      delta: the δ of the reported (ε, δ).
      threshold, sigma1: Confident-GNMax's T and σ₁; None for plain GNMax.
      orders: the Rényi orders to optimise over.

    RDP adds up over queries, also adaptively: see the module docstring for what each analysis
    charges per query.
    """
    counts = np.atleast_2d(np.asarray(counts))
    if (threshold is None) != (sigma1 is None):
        raise ValueError(f"Confident-GNMax needs both threshold and sigma1 (got threshold="
                         f"{threshold}, sigma1={sigma1})")
    orders = _orders(orders)
    n_q = len(counts)
    indep = n_q * gnmax_rdp_data_independent(sigma, orders)
    dep = gnmax_rdp(counts, sigma, orders)  # [Q, L]
    if threshold is not None:
        indep = indep + n_q * threshold_rdp_data_independent(sigma1, orders)
        p_answered = np.exp(log_pr_answered(counts, threshold, sigma1))[:, None]
        dep = threshold_rdp(counts, threshold, sigma1, orders) + p_answered * dep
    eps, order = epsilon(indep, delta, orders)
    eps_dep, order_dep = epsilon(dep.sum(0), delta, orders)
    return PrivacyCost(eps, order, eps_dep, order_dep, delta, n_q)
