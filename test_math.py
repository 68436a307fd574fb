"""Spec tests for the math core of ddpm_score: schedules, forward process, posterior and ELBO,
parameterizations (eps / score / x0) and losses.

Every test names the formula it pins (ids from FORMULAS.md) and checks the module against an
independent computation written here from the slide formula: a product loop for alpha_bar,
repeated one-step transitions for F3, completing the square for F7, autograd of a log-density for a
score, closed-form Gaussian expectations for the losses and the ELBO, torch.distributions for KLs.
Identities are float64 at ~1e-10 relative; statistical checks allow 5 Monte Carlo standard errors,
each computed in the test from the same samples.

Hypothesis profiles (env var HYPOTHESIS_PROFILE): 'ci' (default, few derandomized examples, the
file runs in well under a minute) and 'thorough' (many random examples):
    HYPOTHESIS_PROFILE=thorough python -m pytest -q test_math.py
"""
import functools
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

import ddpm_score as ds

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

F64 = torch.float64
RTOL = 1e-10  # float64 identities: relative tolerance ...
ATOL = 1e-12  # ... and an absolute floor for entries that are O(1) quantities close to 0
N_SE = 5      # statistical checks: allowed deviation in Monte Carlo standard errors
LN2 = math.log(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests use small tensors, where a second intra-op thread only adds overhead (and on a
    loaded 2-core machine it made this file 6x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --- independent references (notation and helpers) ----------------------------------------------


def assert_close64(actual, expected, rtol=RTOL, atol=ATOL):
    """float64 identity: same dtype, |actual - expected| <= atol + rtol |expected|."""
    expected = torch.as_tensor(expected, dtype=F64)
    assert actual.dtype == F64, actual.dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def col(values, x):
    """Per-example numbers (length B, or one) as a (B, 1, ..., 1) column in x's dtype."""
    return torch.as_tensor(values, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def flat_mean(x):
    """Per-example mean over all non-batch dimensions (the losses are per-dimension means)."""
    return x.reshape(x.shape[0], -1).mean(1)


def flat_sum(x):
    return x.reshape(x.shape[0], -1).sum(1)


def randn(seed, *shapes):
    """Standard normal float64 tensors of the given shapes from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g, dtype=F64) for shape in shapes]
    return out[0] if len(out) == 1 else out


def ref_linear_betas(T, beta_1, beta_T):
    """beta_t = beta_1 + (t - 1) / (T - 1) (beta_T - beta_1), t = 1..T; T = 1 gives [beta_1]."""
    if T == 1:
        return [beta_1]
    return [beta_1 + (t - 1) / (T - 1) * (beta_T - beta_1) for t in range(1, T + 1)]


def ref_cosine_f(t, T, s):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def ref_cosine_betas_unclipped(T, s):
    f = [ref_cosine_f(t, T, s) for t in range(T + 1)]
    return [1 - f[t] / f[t - 1] for t in range(1, T + 1)]


def ref_alpha_bar(betas):
    """[alpha_bar_0 = 1, alpha_bar_1, ..., alpha_bar_T] by an explicit product loop. [F2]"""
    alpha_bar = [1.0]
    for beta in betas:
        alpha_bar.append(alpha_bar[-1] * (1.0 - beta))
    return alpha_bar


def ref_marginal_by_recursion(betas, t):
    """(mean coefficient, variance) of x_t | x0 after t applications of F1. [F4]

    x_k = sqrt(alpha_k) x_{k-1} + sqrt(beta_k) z_k with independent z_k, so the coefficient of x0
    is multiplied by sqrt(alpha_k) and the variance goes v <- alpha_k v + beta_k.
    """
    m, v = 1.0, 0.0
    for beta in betas[:t]:
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
    return m, v


def ref_posterior(x0, xt, beta_t, alpha_bar_prev):
    """q(x_{t-1} | x_t, x0) by completing the square in y = x_{t-1} (t >= 2). [F7]

    log q(x_t | y) = -(x_t - sqrt(alpha_t) y)^2 / (2 beta_t) + c
        -> precision alpha_t / beta_t, linear term sqrt(alpha_t) x_t / beta_t
    log q(y | x0) = -(y - sqrt(ab) x0)^2 / (2 (1 - ab)) + c      (ab = alpha_bar_{t-1})
        -> precision 1 / (1 - ab), linear term sqrt(ab) x0 / (1 - ab)
    The product is Gaussian with precision the sum and mean (sum of linear terms) / precision.
    """
    alpha_t = 1 - beta_t
    precision = alpha_t / beta_t + 1 / (1 - alpha_bar_prev)
    linear = (math.sqrt(alpha_t) / beta_t * xt
              + math.sqrt(alpha_bar_prev) / (1 - alpha_bar_prev) * x0)
    return linear / precision, 1 / precision


def ref_beta_tilde(betas, t):
    """Posterior variance of step t >= 2 from completing the square (the variance part of F7)."""
    alpha_bar = ref_alpha_bar(betas)
    return ref_posterior(0.0, 0.0, betas[t - 1], alpha_bar[t - 1])[1]


def ref_model_mean(xt, eps_theta, beta_t, alpha_bar_t):
    """mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t). [F9]"""
    return (xt - beta_t / math.sqrt(1 - alpha_bar_t) * eps_theta) / math.sqrt(1 - beta_t)


def ref_bin_mass(x0, mean, std):
    """P(bin of x0) under N(mean, std^2): 8-bit grid 2k/255 - 1, half width 1/255, edge bins open.

    Written with erfc on the side of the tail the bin lies in, so small masses are accurate.
    """
    lo = torch.where(x0 < -1 + 1e-3, -math.inf, x0 - 1 / 255)
    hi = torch.where(x0 > 1 - 1e-3, math.inf, x0 + 1 / 255)
    z_lo, z_hi = (lo - mean) / std, (hi - mean) / std
    right_tail = 0.5 * (torch.erfc(z_lo / math.sqrt(2)) - torch.erfc(z_hi / math.sqrt(2)))
    left = 0.5 * (torch.erfc(-z_hi / math.sqrt(2)) - torch.erfc(-z_lo / math.sqrt(2)))
    return torch.where(z_lo > 0, right_tail, left)


def mean_rounding_tol(term, means):
    """Per-example tolerance of a float64 term formed from means that are themselves exact only to
    RTOL relative (what the F7/F8 tests pin): to first order RTOL sum |mean| |d term / d mean|.

    It matters where the term depends on a difference of means much smaller than the means: at
    small t (beta_t ~ 1e-5) mu_tilde - mu_theta ~ 1e-3 |mu|, so a KL computed from the means is
    ~1e3 times less accurate, relatively, than the means themselves.
    """
    grads = torch.autograd.grad(term, means)
    return RTOL * sum(flat_sum(m.abs() * g.abs()) for m, g in zip(means, grads)).detach()


def assert_within(actual, expected, tol):
    """|actual - expected| <= tol + RTOL |expected| + ATOL elementwise (float64)."""
    assert actual.dtype == F64, actual.dtype
    err = (actual - expected).abs()
    bound = tol + RTOL * expected.abs() + ATOL
    assert (err <= bound).all(), f"error {err.tolist()} exceeds {bound.tolist()}"


class Recorder:
    """Wraps a model function and records every (input, time, output) it is called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        out = self.fn(x, t)
        self.calls.append((x.detach().clone(), t.clone(), out.detach().clone()))
        return out


# Strategies. Schedules used outside the schedule tests are built from betas computed here.
seeds = st.integers(0, 2 ** 31 - 1)
trailing_shapes = st.sampled_from([(), (3,), (2, 3), (1, 4, 4)])


@st.composite
def linear_params(draw, min_T=1, max_T=1000):
    T = draw(st.integers(min_T, max_T))
    beta_1 = draw(st.floats(1e-5, 0.05))
    beta_T = draw(st.floats(beta_1, 0.3))
    return T, beta_1, beta_T


@st.composite
def betas_lists(draw, min_T=1, max_T=300):
    """beta_1..beta_T: linear, cosine (clipped at 0.999) or sorted random, as Python floats."""
    kind = draw(st.sampled_from(["linear", "cosine", "random"]))
    if kind == "linear":
        return ref_linear_betas(*draw(linear_params(min_T, max_T)))
    if kind == "cosine":
        T = draw(st.integers(min_T, max_T))
        return [min(b, 0.999) for b in ref_cosine_betas_unclipped(T, 0.008)]
    n = draw(st.integers(min_T, max(min_T, min(max_T, 40))))
    return sorted(draw(st.lists(st.floats(1e-5, 0.5), min_size=n, max_size=n)))


@st.composite
def cases(draw, min_t=1, max_T=300):
    """(betas, t as a list of B steps in min_t..T, data shape (B, ...), seed)."""
    betas = draw(betas_lists(min_T=min_t, max_T=max_T))
    B = draw(st.integers(1, 4))
    t = draw(st.lists(st.integers(min_t, len(betas)), min_size=B, max_size=B))
    return betas, t, (B, *draw(trailing_shapes)), draw(seeds)


def long(t):
    return torch.tensor(t, dtype=torch.long)


# --- exact-score references shared by many sections (Gaussian and mixture targets) ----------------

# Every sampler runs with the exact score of a density we know: a 3-D Gaussian N(MU, SIGMA) with a
# non-diagonal covariance, and a 2-D mixture of four Gaussians with unequal weights and widths.
# The references (prefix ref_) are written here from FORMULAS.md, never with the module's helpers.
# For Gaussian data every sampler is affine in its start and its noise, so its exact output law
# is read off the module (ref_affine_law) and compared with (a) the same sampler's update written
# here and propagated step by step -- agreement to rounding, which is what sees an off-by-one --
# and (b) the target, within a measured and stated discretization bound. The mixture checks are
# statistical, each at 5 Monte Carlo standard errors (two-sided p ~ 6e-7 per check).

MU = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
SIGMA = torch.tensor([[1.0, 0.5, 0.2], [0.5, 0.8, -0.2], [0.2, -0.2, 0.5]], dtype=F64)
# eigenvalues of SIGMA: 0.158, 0.731, 1.411
MIX_W = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
MIX_MU = torch.tensor([[-1.5, -1.5], [1.5, -1.5], [-1.5, 1.5], [1.5, 1.5]], dtype=F64)
MIX_STD = torch.tensor([0.3, 0.2, 0.15, 0.1], dtype=F64)
MIX = (MIX_W, MIX_MU, MIX_STD)
VP, VE = dict(beta_min=0.1, beta_max=20.0), dict(sigma_min=0.01, sigma_max=50.0)
SDES = {"vp": lambda: ds.VPSDE(**VP), "subvp": lambda: ds.SubVPSDE(**VP),
        "ve": lambda: ds.VESDE(**VE)}
N_MIX = 10_000   # mixture samples per statistical test: SE of a weight 0.1 is 0.003


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# Exact scores, schedules and SDE marginals --------------------------------------------------------

def ref_gauss_score(x, m, v, mu=MU, cov=SIGMA):
    """grad log N(x; m mu, m^2 cov + v I) over the last dimension of x: N(mu, cov) pushed through
    x = m x0 + sqrt(v) eps; m and v numbers or per-example (B,)."""
    lam, Q = torch.linalg.eigh(cov.to(x.dtype))
    m, v = col(m, x), col(v, x)
    y = (x - m * mu.to(x.dtype)) @ Q
    return -(y / (m ** 2 * lam + v)) @ Q.T


def ref_gauss_affine(m, v, mu=MU, cov=SIGMA):
    """(S, c) with ref_gauss_score(x) = S x + c for one (m, v): S = -C^{-1}, c = C^{-1} m mu."""
    C_inv = torch.linalg.inv(m ** 2 * cov + v * torch.eye(len(mu), dtype=F64))
    return -C_inv, C_inv @ (m * mu)


def ref_mix_terms(x, m, v, mix=MIX):
    """(K, B) log(w_k N(x; m mu_k, var_k I)), var_k = m^2 std_k^2 + v, for the 2-D mixture
    (w, mu, std) noised through x = m x0 + sqrt(v) eps; also var and the offsets x - m mu_k.
    Laid out (K, B) with the two coordinates written out: fast for B = 10^4."""
    w, mu, std = (c.to(x.dtype) for c in mix)
    m, v = col(m, x).reshape(1, -1), col(v, x).reshape(1, -1)               # (1, B)
    if (m == m[0, 0]).all() and (v == v[0, 0]).all():   # samplers share one time per batch
        m, v = m[:, :1], v[:, :1]
    var = m ** 2 * std[:, None] ** 2 + v                                       # (K, B)
    dx, dy = x[:, 0] - m * mu[:, :1], x[:, 1] - m * mu[:, 1:]                  # (K, B) each
    logp = w.log()[:, None] - (dx ** 2 + dy ** 2) / (2 * var) - torch.log(2 * math.pi * var)
    return logp, var, (dx, dy)


def ref_mix_score(x, m, v, mix=MIX):
    """grad log sum_k w_k N_k = -sum_k r_k (x - m mu_k) / var_k, r_k the responsibilities."""
    logp, var, (dx, dy) = ref_mix_terms(x, m, v, mix)
    r = torch.softmax(logp, 0) / var
    return -torch.stack([(r * dx).sum(0), (r * dy).sum(0)], 1)


def ref_mix_sample(n, generator):
    """n points of the mixture."""
    k = torch.multinomial(MIX_W, n, replacement=True, generator=generator)
    return MIX_MU[k] + MIX_STD[k, None] * torch.randn(n, 2, generator=generator, dtype=F64)


def ref_eps_model(score, alpha_bar, calls=None):
    """eps(x_t, t) = -sqrt(1 - alpha_bar_t) score_t(x_t), score_t that of x_t = sqrt(alpha_bar_t)
    x0 + sqrt(1 - alpha_bar_t) eps [F3, F21]. With a list ``calls``, each call appends
    (x, t, eps)."""
    def eps_model(x, t):
        assert t.dtype == torch.long and t.shape == x.shape[:1]
        ab = alpha_bar[t].to(x.dtype)
        eps = -col((1 - ab).sqrt(), x) * score(x, ab.sqrt(), 1 - ab)
        if calls is not None:
            calls.append((x.clone(), t.clone(), eps.clone()))
        return eps
    return eps_model


def ref_sde_coefs(name, s, beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0):
    """(m, var, a, g2) at time s (float or tensor) from F22/F23: mean coefficient, variance, drift
    a(s) with f = a(s) x, and g(s)^2; int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2."""
    s = torch.as_tensor(s, dtype=F64)
    if name == "ve":
        sig2 = sigma_min ** 2 * (sigma_max / sigma_min) ** (2 * s)
        return (torch.ones_like(s), sig2 - sigma_min ** 2, torch.zeros_like(s),
                sig2 * 2 * math.log(sigma_max / sigma_min))
    B = beta_min * s + (beta_max - beta_min) * s ** 2 / 2
    beta = beta_min + s * (beta_max - beta_min)
    if name == "vp":
        return torch.exp(-B / 2), 1 - torch.exp(-B), -beta / 2, beta
    return torch.exp(-B / 2), (1 - torch.exp(-B)) ** 2, -beta / 2, beta * (1 - torch.exp(-2 * B))


def ref_sde_score(score, name):
    """score_fn(x, s) of the marginal p_s for data whose noised score is score(x, m, v)."""
    def score_fn(x, s):
        m, var, _, _ = ref_sde_coefs(name, s)
        return score(x, m, var)
    return score_fn


def ref_prior_std(name):
    """Std of the prior the SDE samplers start from: 1, or sqrt(sigma_max^2 - sigma_min^2) (VE)."""
    return math.sqrt(VE["sigma_max"] ** 2 - VE["sigma_min"] ** 2) if name == "ve" else 1.0


def ref_sde_target(name, s, mu=MU, cov=SIGMA):
    """p_s for data N(mu, cov): N(m mu, m^2 cov + v I) (F23). The samplers stop at s = eps_s."""
    m, v, _, _ = (c.item() for c in ref_sde_coefs(name, s))
    return m * mu, m ** 2 * cov + v * torch.eye(len(mu), dtype=F64)


def ref_flow_loglik(name, x, eps_s, mu=MU, cov=SIGMA):
    """What F27 with the exact flow returns for data N(mu, cov) and the N(0, prior_std^2 I) prior:
    log p_{eps_s}(x) + log prior(x_1) - log p_1(x_1). For Gaussian data the flow is
    x_s = m_s mu + C_s^{1/2} C_{eps_s}^{-1/2} (x - m_{eps_s} mu), C_s = m_s^2 cov + v_s I (the C_s
    commute; it solves F26 since dC/ds = 2 a C + g^2 I, F23). The last two terms are the price of
    starting from the prior instead of p_1: up to 0.005 (VP) and 0.016 (VE) nats per dimension."""
    lam, Q = torch.linalg.eigh(cov)
    (m0, v0, _, _), (m1, v1, _, _) = ref_sde_coefs(name, eps_s), ref_sde_coefs(name, 1.0)
    x1 = m1 * mu + ((x - m0 * mu) @ Q * ((m1 ** 2 * lam + v1) / (m0 ** 2 * lam + v0)).sqrt()) @ Q.T
    eye = torch.eye(len(mu), dtype=F64)
    law = lambda m, v: torch.distributions.MultivariateNormal(m * mu, m ** 2 * cov + v * eye)
    prior = torch.distributions.Normal(torch.zeros((), dtype=F64), ref_prior_std(name))
    return law(m0, v0).log_prob(x) + prior.log_prob(x1).sum(1) - law(m1, v1).log_prob(x1)


# Exact output laws of samplers on Gaussian data ------------------------------------------------

def ref_affine_law(run, shape, start_std=1.0):
    """Exact law N(mean, cov) (flattened) of run(x), x ~ N(0, start_std^2 I) of shape (B, *shape)
    (an int shape is (d,)), for a sampler affine in x and in its noise draws (any sampler on
    Gaussian data, without corrector). torch.randn (the module's noise source) is replaced: a
    counting run finds the K draws; one run on rows [0, start_std e_1.., noise rows], draw k being
    e_j in row 1 + d + k d + j and 0 elsewhere: row r - row 0 is a column of the linear map, row 0
    the mean. No Monte Carlo; the number of draws must not depend on the batch."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    d, draws = math.prod(shape), []

    def basis_randn(*size, generator=None, device=None, dtype=None, **kw):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        z, k = torch.zeros(size, dtype=dtype or F64), len(draws)
        draws.append(k)
        if z.shape[0] > 1:
            z.reshape(z.shape[0], d)[1 + d + k * d:1 + d + (k + 1) * d] = torch.eye(d, dtype=F64)
        return z

    with mock.patch.object(torch, "randn", basis_randn):
        once = run(torch.ones(1, *shape, dtype=F64))
        K, draws[:] = len(draws), []
        assert torch.equal(once, run(torch.ones(1, *shape, dtype=F64))), "noise not via randn"
        draws[:] = []
        x = torch.zeros(1 + d + K * d, *shape, dtype=F64)
        x.reshape(len(x), d)[1:1 + d] = start_std * torch.eye(d, dtype=F64)
        out = run(x).reshape(len(x), d)
    assert len(draws) == K, "the number of noise draws depends on the batch"
    cols = out[1:] - out[0]
    return out[0], cols.T @ cols


def ref_propagate(steps, mean, cov):
    """Push N(mean, cov) through x <- cx x + cs (S x + c) + sigma z for (cx, cs, (S, c), sigma)."""
    I = torch.eye(len(mean), dtype=F64)
    for cx, cs, (S, c), sigma in steps:
        A = cx * I + cs * S
        mean, cov = A @ mean + cs * c, A @ cov @ A.T + sigma ** 2 * I
    return mean, cov


def ref_w2(m1, P1, m2, P2):
    """2-Wasserstein distance between N(m1, P1) and N(m2, P2)."""
    def sqrtm(P):
        lam, Q = torch.linalg.eigh(P)
        return Q @ torch.diag(lam.clamp(min=0).sqrt()) @ Q.T
    r = sqrtm(P2)
    w2 = (m1 - m2).square().sum() + torch.trace(P1 + P2 - 2 * sqrtm(r @ P1 @ r))
    return w2.clamp(min=0).sqrt().item()


def ref_assert_same_law(law, ref, tol=1e-9):
    """The module's law equals the one propagated here, to rounding (float64)."""
    scale = max(1.0, ref[1].abs().max().item())
    assert torch.allclose(law[0], ref[0], rtol=0, atol=tol * scale ** 0.5)
    assert torch.allclose(law[1], ref[1], rtol=0, atol=tol * scale)


# The samplers' updates, written here as x <- cx x + cs score(x) + sigma z -----------------------

def ref_ddpm_steps(grid, ab, sigma2, mu=MU, cov=SIGMA):
    """Ancestral sampling (F6, F7, F9) on a grid T = tau_S > ... > tau_1: with eps = -sqrt(1 - ab)
    score, mu_theta = (x - beta' eps / sqrt(1 - ab)) / sqrt(alpha') = (x + beta' score)
    / sqrt(alpha'), beta' = 1 - ab[tau_i] / ab[tau_{i-1}] (tau_0 = 0); sigma^2 = beta' or
    beta_tilde'; no noise at the last step."""
    steps, taus = [], list(grid) + [0]
    for t, t_prev in zip(taus, taus[1:]):
        a, a_prev = ab[t].item(), ab[t_prev].item()
        beta = 1 - a / a_prev
        var = beta if sigma2 == "beta" else (1 - a_prev) / (1 - a) * beta
        steps.append((1 / math.sqrt(1 - beta), beta / math.sqrt(1 - beta),
                      ref_gauss_affine(math.sqrt(a), 1 - a, mu, cov),
                      math.sqrt(var) if t_prev > 0 else 0.0))
    return steps


def ref_ddim_steps(grid, ab, eta, mu=MU, cov=SIGMA):
    """DDIM (F29) on a grid T = tau_S > ... > tau_1, the previous point of tau_1 being 0 (ab = 1).
    With eps = -sqrt(1 - ab) score and x0_hat = (x + (1 - ab) score) / sqrt(ab):
    x' = sqrt(ab'/ab) x + (sqrt(ab'/ab) (1 - ab) - k sqrt(1 - ab)) score + sigma z,
    k = sqrt(1 - ab' - sigma^2), sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')."""
    steps, taus = [], list(grid) + [0]
    for t, t_prev in zip(taus, taus[1:]):
        a, a_prev = ab[t].item(), ab[t_prev].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        k, r = math.sqrt(1 - a_prev - sigma ** 2), math.sqrt(a_prev / a)
        steps.append((r, r * (1 - a) - k * math.sqrt(1 - a),
                      ref_gauss_affine(math.sqrt(a), 1 - a, mu, cov), sigma))
    return steps


def ref_langevin_steps(eps, n_steps, v=0.0, mu=MU, cov=SIGMA):
    """n_steps of F17, x' = x + (eps / 2) score(x) + sqrt(eps) z, score that of N(mu, cov + v I)."""
    return [(1.0, eps / 2, ref_gauss_affine(1.0, v, mu, cov), math.sqrt(eps))] * n_steps


def ref_annealed_steps(sigmas, eps, n_steps_each, mu=MU, cov=SIGMA):
    """F20: for each sigma_i, n_steps_each of F17 with alpha_i = eps sigma_i^2 / sigma_L^2 on the
    sigma_i-noised density; then the Tweedie step x + sigma_L^2 score(x, sigma_L) (F21)."""
    steps, lo = [], sigmas[-1]
    for sigma in sigmas:
        steps += ref_langevin_steps(eps * sigma ** 2 / lo ** 2, n_steps_each, sigma ** 2, mu, cov)
    return steps + [(1.0, lo ** 2, ref_gauss_affine(1.0, lo ** 2, mu, cov), 0.0)]


def ref_sde_steps(name, n_steps, eps_s, ode=False, mu=MU, cov=SIGMA):
    """Euler-Maruyama for the reverse SDE (F24), or Euler for the probability flow (F26), on the
    grid linspace(1, eps_s, n_steps + 1), ds < 0: x' = x + (a x - c g^2 score) ds + g sqrt(-ds) z,
    c = 1 (no noise at the last step) or c = 1/2 (ODE, no noise)."""
    grid, steps = torch.linspace(1, eps_s, n_steps + 1, dtype=F64).tolist(), []
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        m, v, a, g2 = (c.item() for c in ref_sde_coefs(name, s))
        ds_ = s_next - s
        noise = 0.0 if ode or i == n_steps - 1 else math.sqrt(-g2 * ds_)
        steps.append((1 + a * ds_, -(0.5 if ode else 1.0) * g2 * ds_,
                      ref_gauss_affine(m, v, mu, cov), noise))
    return steps


# Statistical checks on the mixture --------------------------------------------------------------

def ref_check_mixture(x, law=None, m=1.0, v=0.0, far=6.0, max_far=0):
    """Samples x (N, 2) against the mixture pushed through x = m x0 + sqrt(v) eps (F3, F23): at
    most ``max_far`` samples more than ``far`` of its mode's std from every mode (P(r > 6 std) =
    exp(-18) in 2-D: ~2e-4 expected in 10,000) and the mode weights within 5 SE (SE =
    sqrt(w (1 - w) / N)).
    With ``law`` = (means (K, 2), variances (K,)), the samples nearest mode k must also have that
    mean and per-coordinate variance within 5 SE (SE std / sqrt(n_k) for the mean; var
    sqrt(1 / n_k) for the pooled variance of 2 n_k values)."""
    x = x.to(F64)
    assert torch.isfinite(x).all()
    N, std = len(x), (m ** 2 * MIX_STD ** 2 + v).sqrt()
    dist = (x[:, None, :] - m * MIX_MU).norm(dim=-1)                   # (N, K)
    assert ((dist / std).min(1).values > far).sum() <= max_far, "samples far from every mode"
    k = dist.argmin(1)
    for j in range(len(MIX_W)):
        y, w = x[k == j], MIX_W[j].item()
        n = len(y)
        assert abs(n / N - w) < 5 * math.sqrt(w * (1 - w) / N), f"weight of mode {j}: {n / N}"
        if law is not None:
            mean, var = law[0][j], law[1][j]
            assert ((y.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), f"mean of mode {j}"
            rel = y.var(0).mean() / var - 1
            assert abs(rel) < 5 * math.sqrt(1 / n), f"variance of mode {j} off by {rel:.4f}"


def ref_mixture_component_laws(steps_of, start_std=1.0):
    """Per mode k, the exact law (mean, per-coordinate variance) that a sampler -- steps_of(mu, cov)
    gives its update written above -- produces for that component N(mu_k, std_k^2 I) alone.
    With modes 3 apart and widths <= 0.3, the samples that land in mode k have this law to within
    Monte Carlo error for the long samplers (full chains, 1000-step SDEs, annealed Langevin): it
    carries the sampler's own bias for that width (e.g. the full chain with beta_tilde leaves the
    0.1-wide mode's variance 3% low, 5 SE at N = 10,000, exactly as this law predicts)."""
    means, variances = [], []
    for mu, std in zip(MIX_MU, MIX_STD):
        cov = std ** 2 * torch.eye(2, dtype=F64)
        mean, P = ref_propagate(steps_of(mu, cov), torch.zeros(2, dtype=F64),
                                start_std ** 2 * torch.eye(2, dtype=F64))
        means.append(mean)
        variances.append(P.diagonal().mean())
    return torch.stack(means), torch.stack(variances)


def _linear_sched(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=F64)   # F1 linear schedule, Ho et al. defaults
    return ds.Schedule.from_betas(betas), torch.tensor(ref_alpha_bar(betas.tolist()), dtype=F64)


def _visited(calls):
    """The t of each recorded eps_model call, checking it is the same for the whole batch."""
    assert all((t == t[0]).all() for _, t, _ in calls)
    return [int(t[0]) for _, t, _ in calls]


def _grid_of(sampler, ab, d=3):
    """The steps t a chain sampler visits: sampler(eps_model, x) run once, recorded."""
    calls = []
    sampler(ref_eps_model(lambda x, m, v: torch.zeros_like(x), ab, calls), torch.zeros(1, d))
    return _visited(calls)


def _gauss_points(n, seed):
    """n points of N(MU, SIGMA), seeded."""
    z = torch.randn(n, 3, generator=_gen(seed), dtype=F64)
    return MU + z @ torch.linalg.cholesky(SIGMA).T


def test_F14_F21_ref_scores_are_gradients_of_log_densities():
    """The references themselves: autograd of the log-density (logsumexp for the mixture). [F14]"""
    x = torch.randn(64, 2, generator=_gen(0), dtype=F64).mul(2).requires_grad_(True)
    m, v = 0.7, 0.4
    var = m ** 2 * MIX_STD ** 2 + v
    logp = torch.logsumexp(MIX_W.log() - ((x[:, None] - m * MIX_MU) ** 2).sum(-1) / (2 * var)
                           - torch.log(2 * math.pi * var), 1)
    grad, = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(ref_mix_score(x.detach(), m, v), grad, rtol=1e-10, atol=1e-12)
    x3 = torch.randn(16, 3, generator=_gen(1), dtype=F64).requires_grad_(True)
    cov = m ** 2 * SIGMA + v * torch.eye(3, dtype=F64)
    log_p = torch.distributions.MultivariateNormal(m * MU, cov).log_prob(x3)
    grad, = torch.autograd.grad(log_p.sum(), x3)
    assert torch.allclose(ref_gauss_score(x3.detach(), m, v), grad, rtol=1e-10, atol=1e-12)
    S, c = ref_gauss_affine(m, v)
    assert torch.allclose(x3.detach() @ S.T + c, grad, rtol=1e-10, atol=1e-12)


# --- DDPM: schedules [F1, F2, Schedules] ----------------------------------------------------------

@given(linear_params())
def test_Schedules_linear_betas_follow_the_formula(params):
    """[Schedules, F1] beta_t = beta_1 + (t-1)/(T-1) (beta_T - beta_1), float64, shape (T,)."""
    betas = ds.linear_betas(*params)
    assert betas.shape == (params[0],)
    assert_close64(betas, ref_linear_betas(*params))


def test_Schedules_linear_defaults_are_ho_et_al():
    """[Schedules] defaults T = 1000, beta_1 = 1e-4, beta_T = 0.02 (Ho et al. 2020)."""
    assert_close64(ds.linear_betas(), ref_linear_betas(1000, 1e-4, 0.02))


@given(betas_lists(max_T=1000))
def test_F2_alpha_bar_is_the_product_of_the_alphas(betas):
    """[F2] alpha_t = 1 - beta_t, alpha_bar_t = prod_{i<=t} alpha_i (explicit loop), from a list."""
    for given_betas in (betas, torch.tensor(betas, dtype=F64)):
        sched = ds.Schedule.from_betas(given_betas)
        assert sched.T == len(betas)
        assert_close64(sched.beta, [0.0] + betas)
        assert_close64(sched.alpha, [1.0] + [1 - b for b in betas])
        assert_close64(sched.alpha_bar, ref_alpha_bar(betas))


@given(betas_lists(max_T=1000))
def test_F2_index_zero_convention(betas):
    """[F2, F7] arrays of length T+1, float64; alpha_bar[0] = alpha[0] = 1 and
    beta[0] = beta_tilde[0] = 0."""
    sched = ds.Schedule.from_betas(betas)
    for name in ("beta", "alpha", "alpha_bar", "beta_tilde"):
        arr = getattr(sched, name)
        assert arr.shape == (len(betas) + 1,) and arr.dtype == F64, name
    assert sched.alpha_bar[0] == 1 and sched.alpha[0] == 1
    assert sched.beta[0] == 0 and sched.beta_tilde[0] == 0


@given(kind=st.sampled_from(["linear", "cosine"]), params=linear_params(max_T=2000))
def test_F1_F2_betas_in_unit_interval_and_alpha_bar_strictly_decreasing(kind, params):
    """[F1, F2] every beta in (0, 1) and alpha_bar_0 = 1 > alpha_bar_1 > ... > alpha_bar_T > 0."""
    betas = ds.linear_betas(*params) if kind == "linear" else ds.cosine_betas(params[0])
    assert betas.dtype == F64
    assert ((betas > 0) & (betas < 1)).all()
    alpha_bar = ds.Schedule.from_betas(betas).alpha_bar
    assert (alpha_bar[1:] < alpha_bar[:-1]).all() and alpha_bar[-1] > 0


@given(T=st.integers(1, 3000))
@example(T=1)
@example(T=20)                         # 20 / T = 1: the cap at 0.999 keeps beta_T < 1
def test_F5_Schedules_linear_defaults_scale_with_T_and_end_near_pure_noise(T):
    """[F5, Schedules] defaults beta_1 = 1e-4 * 1000 / T and beta_T = 0.02 * 1000 / T (capped at
    0.999, which T <= 20 reaches), as improved DDPM scales them; for every T >= 20 the chain ends
    near N(0, I): sqrt(alpha_bar_T) < 0.01 (product loop here; it tends to 0.0065 as T grows)."""
    b1, bT = min(0.1 / T, 0.999), min(20 / T, 0.999)
    assert_close64(ds.linear_betas(T), ref_linear_betas(T, b1, bT))
    if T >= 20:
        assert math.sqrt(ref_alpha_bar(ref_linear_betas(T, b1, bT))[-1]) < 0.01
        assert ds.Schedule.from_betas(ds.linear_betas(T)).alpha_bar[-1].sqrt() < 0.01


def test_F2_schedule_is_read_only_and_compares_by_identity():
    """[F2] writing into sched.beta (or any array) leaves the schedule unchanged, and == is
    identity instead of raising on tensors."""
    sched = ds.Schedule.from_betas(ref_linear_betas(10, 1e-3, 0.2))
    for name in ("beta", "alpha", "alpha_bar", "beta_tilde"):
        before = getattr(sched, name).clone()
        getattr(sched, name)[1:] = 0.5
        assert torch.equal(getattr(sched, name), before), name
    assert sched == sched and sched != ds.Schedule.from_betas(ref_linear_betas(10, 1e-3, 0.2))


def test_F5_default_linear_schedule_ends_near_pure_noise():
    """[F5] for the default linear schedule alpha_bar_T < 1e-4, so q(x_T | x0) ~ N(0, I)."""
    sched = ds.Schedule.from_betas(ds.linear_betas())
    assert sched.T == 1000
    assert ref_alpha_bar(ref_linear_betas(1000, 1e-4, 0.02))[-1] < 1e-4  # the claim itself
    assert sched.alpha_bar[-1] < 1e-4


@given(T=st.integers(1, 2000), s=st.floats(1e-3, 0.1), max_beta=st.floats(0.5, 0.999))
def test_Schedules_cosine_alpha_bar_is_f_ratio_where_unclipped(T, s, max_beta):
    """[Schedules] cosine: beta_t = min(1 - f(t)/f(t-1), max_beta); alpha_bar_t = f(t)/f(0) up to
    the first clipped step (clipping changes every later alpha_bar)."""
    betas = ds.cosine_betas(T, s=s, max_beta=max_beta)
    raw = ref_cosine_betas_unclipped(T, s)
    # betas are 1 - (ratio): absolute rounding ~1e-16 even where beta_1 ~ 1e-6, hence atol.
    assert_close64(betas, [min(b, max_beta) for b in raw], atol=1e-13)
    n_unclipped = next((i for i, b in enumerate(raw) if b >= max_beta), T)
    assert n_unclipped < T  # f(T) = cos^2(pi/2) ~ 0: the last step is always clipped
    alpha_bar = ds.Schedule.from_betas(betas).alpha_bar
    f0 = ref_cosine_f(0, T, s)
    assert_close64(alpha_bar[:n_unclipped + 1],
                   [ref_cosine_f(t, T, s) / f0 for t in range(n_unclipped + 1)])


# --- DDPM: forward process [F1-F5] ----------------------------------------------------------------

@given(cases())
def test_F1_q_step_is_one_transition(case):
    """[F1] q_step = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z with the given z."""
    betas, t, shape, seed = case
    x, z = randn(seed, shape, shape)
    sched = ds.Schedule.from_betas(betas)
    beta = col([betas[k - 1] for k in t], x)
    assert_close64(ds.q_step(sched, x, long(t), z), (1 - beta).sqrt() * x + beta.sqrt() * z)


@given(cases())
def test_F3_F4_repeated_one_step_transitions_give_the_closed_form(case):
    """[F3, F4] t applications of F1 (mean coefficient and variance propagated in the test) give
    q_mean_var, q_sample and marginal_coefs."""
    betas, t, shape, seed = case
    x0, eps = randn(seed, shape, shape)
    sched = ds.Schedule.from_betas(betas)
    m, v = zip(*(ref_marginal_by_recursion(betas, k) for k in t))
    mean, var = ds.q_mean_var(sched, x0, long(t))
    assert var.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert_close64(mean, col(m, x0) * x0)
    assert_close64(var, col(v, x0))
    assert_close64(ds.q_sample(sched, x0, long(t), eps), col(m, x0) * x0 + col(v, x0).sqrt() * eps)
    scale, std = ds.marginal_coefs(sched, long(t))
    assert_close64(scale, m)
    assert_close64(std, [math.sqrt(vk) for vk in v])


def ref_check_gaussian_samples(x, mean, cov):
    """Sample mean and covariance of x (n, d) agree with N(mean, cov) within 5 SE each:
    SE(mean_i) = sqrt(cov_ii / n), SE(cov_ij) = sqrt((cov_ii cov_jj + cov_ij^2) / n) (Gaussian)."""
    n, diag = len(x), cov.diagonal()
    assert ((x.mean(0) - mean).abs() <= N_SE * (diag / n).sqrt()).all(), (x.mean(0), mean)
    se_cov = ((diag[:, None] * diag[None, :] + cov ** 2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= N_SE * se_cov).all(), (torch.cov(x.T), cov)


def test_F3_F4_sampled_chain_agrees_with_q_sample_in_distribution():
    """[F3, F4] t sampled q_step's and one q_sample both have the recursion's law N(m x0, v I):
    mean and covariance within 5 SE."""
    betas = ref_linear_betas(50, 1e-3, 0.1)
    sched, t, N = ds.Schedule.from_betas(betas), 30, 20000
    x0 = torch.tensor([2.0, -1.0, 0.5], dtype=F64).expand(N, 3)
    g_chain, g_direct = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    chain = x0
    for k in range(1, t + 1):
        chain = ds.q_step(sched, chain, torch.full((N,), k), generator=g_chain)
    m, v = ref_marginal_by_recursion(betas, t)
    for x in (chain, ds.q_sample(sched, x0, torch.full((N,), t), generator=g_direct)):
        ref_check_gaussian_samples(x, m * x0[0], v * torch.eye(3, dtype=F64))


# --- DDPM: posterior and ELBO [F6-F11, F13, F36] --------------------------------------------------

@given(cases(min_t=2))
def test_F7_posterior_is_gaussian_conditioning(case):
    """[F7] mu_tilde, beta_tilde equal q(x_t|x_{t-1}) q(x_{t-1}|x0) normalised (completing the
    square), for every t >= 2; sched.beta_tilde too."""
    betas, t, shape, seed = case
    x0, xt = randn(seed, shape, shape)
    sched = ds.Schedule.from_betas(betas)
    alpha_bar = ref_alpha_bar(betas)
    mu, var = ds.posterior_mean_var(sched, x0, xt, long(t))
    for i, k in enumerate(t):
        mu_ref, var_ref = ref_posterior(x0[i], xt[i], betas[k - 1], alpha_bar[k - 1])
        assert_close64(mu[i], mu_ref)
        assert_close64(var[i], torch.full(var[i].shape, var_ref, dtype=F64))
    assert_close64(sched.beta_tilde[2:], [ref_beta_tilde(betas, k)
                                          for k in range(2, len(betas) + 1)])


@given(cases())
def test_F7_t1_posterior_is_x0_and_reverse_var_clips_it(case):
    """[F7, F6] beta_tilde_1 = 0 and mu_tilde_1 = x0; reverse_var(.., 'beta_tilde') at t = 1 is
    finite and positive (beta_tilde_2, or beta_1 if T = 1); 'beta' gives beta_t."""
    betas, t, shape, seed = case
    x0, xt = randn(seed, shape, shape)
    sched = ds.Schedule.from_betas(betas)
    assert sched.beta_tilde[1] == 0
    ones = long([1] * shape[0])
    mu, var = ds.posterior_mean_var(sched, x0, xt, ones)
    assert_close64(mu, x0)
    assert (var == 0).all()
    clipped = ds.reverse_var(sched, ones, "beta_tilde")
    expected = ref_beta_tilde(betas, 2) if len(betas) > 1 else betas[0]
    assert torch.isfinite(clipped).all() and (clipped > 0).all()
    assert_close64(clipped, [expected] * shape[0])
    assert_close64(ds.reverse_var(sched, long(t), "beta"), [betas[k - 1] for k in t])
    later = [k for k in t if k >= 2]
    if later:
        assert_close64(ds.reverse_var(sched, long(later), "beta_tilde"),
                       [ref_beta_tilde(betas, k) for k in later])


@given(cases())
def test_F8_mu_from_eps_equals_the_posterior_mean(case):
    """[F8] with x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, mu_from_eps(x_t, t, eps) = mu_tilde
    (completing the square for t >= 2; x0 itself at t = 1)."""
    betas, t, shape, seed = case
    x0, eps = randn(seed, shape, shape)
    sched = ds.Schedule.from_betas(betas)
    alpha_bar = ref_alpha_bar(betas)
    ab = col([alpha_bar[k] for k in t], x0)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    mu = ds.mu_from_eps(sched, xt, long(t), eps)
    for i, k in enumerate(t):
        expected = x0[i] if k == 1 else ref_posterior(x0[i], xt[i], betas[k - 1],
                                                      alpha_bar[k - 1])[0]
        assert_close64(mu[i], expected)


@given(seed=seeds, shape=trailing_shapes, B=st.integers(1, 4))
def test_F13_gaussian_kl_matches_torch_distributions(seed, shape, B):
    """[F13] elementwise KL(N(m1, v1) || N(m2, v2)) = torch.distributions.kl_divergence; the
    variances broadcast as (B, 1, ..., 1) columns; KL(p || p) = 0."""
    x_shape, v_shape = (B, *shape), (B,) + (1,) * len(shape)
    m1, m2, log_v1, log_v2 = randn(seed, x_shape, x_shape, v_shape, v_shape)
    v1, v2 = (2 * log_v1).exp(), (2 * log_v2).exp()
    kl = ds.gaussian_kl(m1, v1, m2, v2)
    expected = kl_divergence(Normal(m1, v1.sqrt().expand(x_shape)),
                             Normal(m2, v2.sqrt().expand(x_shape)))
    assert_close64(kl, expected)
    assert (ds.gaussian_kl(m1, v1, m1, v1) == 0).all()
    # Python-number variances broadcast too, at full float64 precision
    expected = kl_divergence(Normal(m1, math.sqrt(0.3)), Normal(m2, math.sqrt(1.7)))
    assert_close64(ds.gaussian_kl(m1, 0.3, m2, 1.7), expected)


@given(cases(min_t=2))
def test_F11_kl_term_is_weighted_eps_error_plus_a_theta_free_constant(case):
    """[F11, F13] sum_dims KL(q(x_{t-1}|x_t,x0) || N(mu_theta, sigma^2 I))
    = beta^2 / (2 sigma^2 alpha (1 - ab)) ||eps - eps_theta||^2
      + d/2 [log(sigma^2 / beta_tilde) + beta_tilde / sigma^2 - 1]   (t >= 2)."""
    betas, t, shape, seed = case
    x0, eps, eps_theta, u = randn(seed, shape, shape, shape, (shape[0],))
    sched = ds.Schedule.from_betas(betas)
    alpha_bar = ref_alpha_bar(betas)
    ab = col([alpha_bar[k] for k in t], x0)
    beta = col([betas[k - 1] for k in t], x0)
    beta_tilde = col([ref_beta_tilde(betas, k) for k in t], x0)
    sigma2 = beta_tilde * col(u.exp(), x0)  # random sigma_t^2 around beta_tilde_t
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    mu_tilde, var_tilde = ds.posterior_mean_var(sched, x0, xt, long(t))
    kl = flat_sum(ds.gaussian_kl(mu_tilde, var_tilde,
                                 ds.mu_from_eps(sched, xt, long(t), eps_theta), sigma2))
    d = x0[0].numel()
    weight = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - ab))
    const = d / 2 * (torch.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)
    expected = flat_sum(weight * (eps - eps_theta) ** 2) + const.flatten()
    # The module forms the KL from the two means; tolerance propagated from their accuracy.
    alpha_bar = ref_alpha_bar(betas)
    mu_q = torch.stack([ref_posterior(x0[i], xt[i], betas[k - 1], alpha_bar[k - 1])[0]
                        for i, k in enumerate(t)]).requires_grad_(True)
    mu_p = torch.stack([ref_model_mean(xt[i], eps_theta[i], betas[k - 1], alpha_bar[k])
                        for i, k in enumerate(t)]).requires_grad_(True)
    tol = mean_rounding_tol(((mu_q - mu_p) ** 2 / (2 * sigma2)).sum(), (mu_q, mu_p))
    assert_within(kl, expected, tol)


def fake_eps_model(T):
    """A deterministic, t-dependent stand-in for a network."""
    return lambda xt, t: 0.3 * torch.tanh(xt) + 0.1 * col(t / T, xt)


@given(betas=betas_lists(max_T=30), shape=trailing_shapes, seed=seeds,
       sigma2=st.sampled_from(["beta", "beta_tilde"]),
       decoder=st.sampled_from(["gaussian", "discretized"]),
       decoder_var=st.sampled_from(["published", "sigma2"]))
def test_F10_vlb_terms_are_the_prior_kls_and_decoder(betas, shape, seed, sigma2, decoder,
                                                     decoder_var):
    """[F10, F5, F9, F11, F13] vlb_bpd of one example: the model is called once per t = 1..T and,
    from the x_t it saw, terms[t-1] = KL(posterior || N(mu_theta, sigma_t^2 I)) (t >= 2),
    terms[0] = -log p(x0 | x1), prior = KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, I)), all in bits
    per dimension; total = prior + sum of terms; everything finite, t = 1 included. The decoder's
    variance is beta_tilde_2 ('published', Ho et al.'s and improved DDPM's code) or sigma_1^2 of
    sigma2 ('sigma2': beta_1 for 'beta'); beta_1 when T = 1."""
    T, alpha_bar = len(betas), ref_alpha_bar(betas)
    x0 = randn(seed, (1, *shape))
    if decoder == "discretized":  # 8-bit data on the grid 2k/255 - 1
        x0 = 2 * torch.round((x0.clamp(-2, 2) + 2) / 4 * 255) / 255 - 1
    d = x0.numel()
    model = Recorder(fake_eps_model(T))
    out = ds.vlb_bpd(model, ds.Schedule.from_betas(betas), x0, sigma2=sigma2, decoder=decoder,
                     decoder_var=decoder_var, generator=torch.Generator().manual_seed(seed))
    assert sorted(int(tk) for _, tk, _ in model.calls) == list(range(1, T + 1))
    expected, tol = torch.zeros(1, T, dtype=F64), torch.zeros(1, T, dtype=F64)
    for xt, tk, eps_theta in model.calls:
        k = int(tk)
        assert xt.shape == x0.shape
        mu = ref_model_mean(xt, eps_theta, betas[k - 1], alpha_bar[k]).requires_grad_(True)
        if k >= 2:
            var = betas[k - 1] if sigma2 == "beta" else ref_beta_tilde(betas, k)
            mu_q, var_q = ref_posterior(x0, xt, betas[k - 1], alpha_bar[k - 1])
            mu_q.requires_grad_(True)
            nats = kl_divergence(Normal(mu_q, math.sqrt(var_q)), Normal(mu, math.sqrt(var))).sum()
            tol[0, k - 1] = mean_rounding_tol(nats, (mu_q, mu))
        else:
            small = sigma2 == "beta_tilde" or decoder_var == "published"
            var = ref_beta_tilde(betas, 2) if small and T > 1 else betas[0]
            if decoder == "gaussian":
                nats = -Normal(mu, math.sqrt(var)).log_prob(x0).sum()
                tol[0, 0] = mean_rounding_tol(nats, (mu,))
            else:
                mass = ref_bin_mass(x0, mu, math.sqrt(var))
                assume((mass > 1e-6).all())  # below that the module's erf-based CDF is inexact
                nats = -mass.log().sum()
                # + the erf-based CDF: log-mass error <~ 4.4e-16 / mass <= 4.4e-10 per element
                tol[0, 0] = mean_rounding_tol(nats, (mu,)) + d * 5e-10
        expected[0, k - 1] = nats.detach()
    expected, tol = expected / (d * LN2), tol / (d * LN2)  # nats -> bits per dimension
    ab_T = alpha_bar[T]
    prior = 0.5 * (-math.log(1 - ab_T) + (1 - ab_T) + ab_T * x0 ** 2 - 1).sum() / (d * LN2)
    for key in ("total", "prior", "terms"):
        assert torch.isfinite(out[key]).all(), key
    assert_within(out["terms"], expected, tol)
    assert_close64(out["prior"], prior.reshape(1))
    assert_within(out["total"], prior + expected.sum(1), tol.sum(1) + RTOL * expected.abs().sum())


def gaussian_elbo_closed_form(betas, m, c, sigma2, decoder_var):
    """E_{x0 ~ N(m, c^2 I), q}[-ELBO] in nats for the exact eps-model of that data (F10, F11).

    Per dimension x_t = r x0 + q e (r = sqrt(ab_t), q = sqrt(1 - ab_t)); the exact model mean is
    mu_theta = C x_t + D, with C = (1 - beta/V)/sqrt(alpha), D = beta r m / (V sqrt(alpha)),
    V = ab c^2 + 1 - ab. With mu_tilde = A x0 + B_t x_t (F7), mu_tilde - mu_theta
    = K x0 + (B_t - C) q e - D, K = A + (B_t - C) r, so
    E (mu_tilde - mu_theta)^2 = (K m - D)^2 + K^2 c^2 + (B_t - C)^2 q^2.
    The decoder term is the same with x0 - mu_theta; the prior term is F13 averaged over x0.
    """
    T, alpha_bar = len(betas), ref_alpha_bar(betas)
    total = 0.0
    for t in range(1, T + 1):
        beta, ab, ab_prev = betas[t - 1], alpha_bar[t], alpha_bar[t - 1]
        r, q, V, sa = math.sqrt(ab), math.sqrt(1 - ab), ab * c * c + 1 - ab, math.sqrt(1 - beta)
        C = (1 - beta / V) / sa
        if sigma2 == "beta" and (t > 1 or decoder_var == "sigma2"):
            s2 = beta
        else:
            s2 = ref_beta_tilde(betas, max(t, 2)) if T > 1 else betas[0]
        for mj in m:
            D = beta * r * mj / (V * sa)
            if t == 1:  # x0 - mu_theta = (1 - C r) x0 - C q e - D
                K = 1 - C * r
                sq = (K * mj - D) ** 2 + K * K * c * c + C * C * q * q
                total += 0.5 * math.log(2 * math.pi * s2) + sq / (2 * s2)
            else:
                A = math.sqrt(ab_prev) * beta / (1 - ab)
                Bt = sa * (1 - ab_prev) / (1 - ab)
                bt = (1 - ab_prev) / (1 - ab) * beta
                K = A + (Bt - C) * r
                sq = (K * mj - D) ** 2 + K * K * c * c + (Bt - C) ** 2 * q * q
                total += 0.5 * (math.log(s2 / bt) + bt / s2 - 1) + sq / (2 * s2)
    ab_T = alpha_bar[T]
    for mj in m:
        total += 0.5 * (-math.log(1 - ab_T) + (1 - ab_T) + ab_T * (c * c + mj * mj) - 1)
    return total


@pytest.mark.parametrize("sigma2,decoder_var", [("beta", "sigma2"), ("beta", "published"),
                                               ("beta_tilde", "published")])
def test_F10_gaussian_data_bound_is_above_the_entropy_and_matches_its_expectation(sigma2,
                                                                                  decoder_var):
    """[F10] Gaussian data N(m, c^2 I), d = 2, exact eps-model, T = 1000 linear, decoder='gaussian':
    E[-ELBO] >= H = d/2 log(2 pi e c^2) (up to 5 SE), equals its closed form (5 SE), and is within
    a stated margin of H; the prior term is the closed-form KL(q(x_T|x0) || N(0, I))."""
    betas, m, c, N = ref_linear_betas(1000, 1e-4, 0.02), [0.3, -0.2], 0.5, 2000
    alpha_bar = torch.tensor(ref_alpha_bar(betas), dtype=F64)
    m_t, d = torch.tensor(m, dtype=F64), len(m)

    def exact_eps(xt, t):
        """E[eps | x_t] = -sqrt(1 - ab) grad log N(x_t; sqrt(ab) m, (ab c^2 + 1 - ab) I)."""
        ab = col(alpha_bar[t], xt)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * m_t) / (ab * c * c + 1 - ab)

    g = torch.Generator().manual_seed(10)
    x0 = m_t + c * torch.randn(N, d, generator=g, dtype=F64)
    out = ds.vlb_bpd(exact_eps, ds.Schedule.from_betas(betas), x0, sigma2=sigma2,
                     decoder="gaussian", decoder_var=decoder_var, generator=g)
    for key in ("total", "prior", "terms"):
        assert torch.isfinite(out[key]).all(), key
    ab_T = alpha_bar[-1]
    prior = 0.5 * (-torch.log(1 - ab_T) + (1 - ab_T) + ab_T * x0 ** 2 - 1).sum(1) / (d * LN2)
    assert_close64(out["prior"], prior)

    # Control variate: gap_i = -ELBO_i - (-log q(x0_i)) has mean E[-ELBO] - H (E[-log q] = H)
    # and removes the x0-to-x0 spread of -log q; its SE is std / sqrt(N).
    nats = out["total"] * d * LN2
    gap = nats + Normal(m_t, c).log_prob(x0).sum(1)
    gap_mean, se = gap.mean().item(), gap.std().item() / math.sqrt(N)
    entropy = d / 2 * math.log(2 * math.pi * math.e * c * c)
    exact_gap = gaussian_elbo_closed_form(betas, m, c, sigma2, decoder_var) - entropy
    assert exact_gap > 0  # the closed form is itself a bound
    assert gap_mean > -N_SE * se  # bound >= entropy, up to Monte Carlo error
    assert abs(gap_mean - exact_gap) < N_SE * se
    # Measured (seed 10, N = 2000; H = 1.4516 nats = 1.0471 bits/dim), closed-form gap and
    # Monte Carlo: sigma2='beta' with decoder beta_1: 0.0022, -0.0045 +- 0.031 nats; with the
    # published decoder beta_tilde_2: 0.229, 0.218 +- 0.045; sigma2='beta_tilde': 1.140,
    # 1.121 +- 0.054 (beta_tilde_t below the true reverse variance costs ~0.9 nats more).
    # Stated margins, closed-form gap + 5 SE rounded up: 0.2, 0.5 and 1.5 nats.
    assert gap_mean < {"sigma2": 0.2, "published": 0.5 if sigma2 == "beta" else 1.5}[decoder_var]


@given(seed=seeds)
def test_F10_discretized_decoder_probabilities_sum_to_one(seed):
    """[F10] exp(discretized_gaussian_logp) over the 256 bins 2k/255 - 1 sums to 1 for random
    means (inside and outside [-1, 1]) and variances (1e-6..1)."""
    M = 8
    u, w = randn(seed, (M, 1), (M, 1))
    mean, var = 1.5 * torch.tanh(u), 10 ** (-3 * (1 + torch.tanh(w)))
    grid = (2 * torch.arange(256, dtype=F64) / 255 - 1).expand(M, 256)
    logp = ds.discretized_gaussian_logp(grid, mean.expand(M, 256), var)
    # Each bin's probability is floored at 1e-12 (documented), so the sum may exceed 1 by at most
    # 256e-12; the telescoping CDF differences otherwise cancel to float64 rounding.
    assert ((logp.exp().sum(1) - 1).abs() <= 256e-12 + 1e-13).all()


@given(seed=seeds)
def test_F10_discretized_logp_is_the_normal_mass_of_the_bin(seed):
    """[F10] discretized_gaussian_logp = log P(bin) under N(mean, var), edge bins to +-inf."""
    M = 8
    jitter, u, w = randn(seed, (M, 256), (M, 256), (M, 1))
    grid = 2 * torch.arange(256, dtype=F64) / 255 - 1
    x0 = grid[torch.randint(0, 256, (M, 256), generator=torch.Generator().manual_seed(seed))]
    x0[:, :2] = torch.tensor([-1.0, 1.0], dtype=F64)  # always include both edge bins
    mean = x0 + 0.05 * jitter + 0.5 * torch.tanh(u)
    var = 10 ** (-3 * (1 + torch.tanh(w)))
    logp = ds.discretized_gaussian_logp(x0, mean, var)
    mass = ref_bin_mass(x0, mean, var.sqrt())
    # Where the mass is > 1e-6 the module's 0.5 (1 + erf) CDF differences have absolute error
    # ~2.2e-16, i.e. <= 4.4e-10 in the log-mass.
    ok = mass > 1e-6
    assert ok.any()
    torch.testing.assert_close(logp[ok], mass[ok].log(), rtol=0, atol=1e-9)
    assert torch.isfinite(logp).all() and (logp <= 1e-15).all()


def ref_k_level_bin_masses(levels, mean, std):
    """(M, K) masses of N(mean, std^2) (mean, std: (M, 1)) over the K bins of F36, written out:
    edges halfway between the levels 2k/(K-1) - 1, i.e. at (2k + 1)/(K-1) - 1, k = 0..K-2,
    with -inf below the bottom bin and +inf above the top one; Normal CDF differences taken on
    the side of the bin's tail (upper-tail CDFs above the mean), so small masses keep their
    relative accuracy."""
    inner = torch.tensor([(2 * k + 1) / (levels - 1) - 1 for k in range(levels - 1)], dtype=F64)
    edges = torch.cat([torch.tensor([-math.inf], dtype=F64), inner,
                       torch.tensor([math.inf], dtype=F64)])
    lo, hi = (edges[:-1] - mean) / std, (edges[1:] - mean) / std
    unit = Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    return torch.where(lo > 0, unit.cdf(-lo) - unit.cdf(-hi), unit.cdf(hi) - unit.cdf(lo))


def simpson_normal_mass(lo, hi, mean, std, n=2000):
    """int_lo^hi N(y; mean, std^2) dy by Simpson's rule on n intervals, the limits clipped to
    mean +- 12 std (the rest weighs < 1e-32): the bin masses a third way, by integration."""
    lo, hi = torch.maximum(lo, mean - 12 * std), torch.minimum(hi, mean + 12 * std)
    hi = torch.maximum(hi, lo)
    u = torch.linspace(0, 1, n + 1, dtype=F64)
    y = lo[..., None] + (hi - lo)[..., None] * u
    f = torch.exp(-0.5 * ((y - mean[..., None]) / std[..., None]) ** 2) / (
        std[..., None] * math.sqrt(2 * math.pi))
    simpson = torch.ones(n + 1, dtype=F64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    return (f * simpson).sum(-1) * (hi - lo) / (3 * n)


@given(seed=seeds, levels=st.sampled_from([2, 3, 5, 17, 256]))
def test_F36_k_level_decoder_is_the_normal_mass_of_each_bin_and_the_masses_sum_to_one(seed,
                                                                                     levels):
    """[F36] exp(discretized_gaussian_logp(x0, mean, var, levels=K)) at each of the K levels
    2k/(K-1) - 1 is the mass of N(mean, var) over its bin, the outer bins open: against Normal
    CDF differences on edges written out here (atol 1e-9 in the log where the mass is > 1e-6:
    the module's 0.5 (1 + erf) CDFs have absolute error ~2e-16, 2e-10 in a log of 1e-6) and
    against Simpson integration of the density (a third, CDF-free computation: 2,000
    intervals, error < 1e-10 here; checked to 1e-8). The K masses sum to 1 (floors of 1e-12
    per bin allowed). Means within and outside [-1, 1], std 0.01..1."""
    M = 6
    u, w = randn(seed, (M, 1), (M, 1))
    mean, std = 1.3 * torch.tanh(u), 10 ** (-(1 + torch.tanh(w)))
    grid = (2 * torch.arange(levels, dtype=F64) / (levels - 1) - 1).expand(M, levels)
    logp = ds.discretized_gaussian_logp(grid, mean.expand(M, levels), std ** 2, levels=levels)
    mass = ref_k_level_bin_masses(levels, mean, std)
    ok = mass > 1e-6
    assert ok.any()
    torch.testing.assert_close(logp[ok], mass[ok].log(), rtol=0, atol=1e-9)
    assert ((logp.exp().sum(1) - 1).abs() <= levels * 1e-12 + 1e-13).all()
    h = 1 / (levels - 1)
    lo = torch.where(grid == -1, -math.inf, grid - h)
    hi = torch.where(grid == 1, math.inf, grid + h)
    integral = simpson_normal_mass(lo, hi, mean.expand(M, levels), std.expand(M, levels))
    torch.testing.assert_close(logp.exp(), integral, rtol=0, atol=1e-8)
    if levels == 2:  # two bins split at 0: P(x0 = -1) = Phi(-mean / std), floored at 1e-12
        torch.testing.assert_close(logp[:, 0].exp(), Normal(mean[:, 0], std[:, 0]).cdf(
            torch.zeros(M, dtype=F64)).clamp(min=1e-12), rtol=0, atol=1e-15)


def ho_et_al_decoder_logp(x, mean, log_scale):
    """Ho et al.'s discretized_gaussian_log_likelihood (diffusion_utils_2.py), written as in
    their code with the exact normal CDF in place of its tanh approximation: 8-bit data in
    [-1, 1], bins 1/255 either side, x < -0.999 the bottom bin, x > 0.999 the top bin."""
    centered_x, inv_stdv = x - mean, torch.exp(-log_scale)
    cdf = Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)).cdf
    cdf_plus = cdf(inv_stdv * (centered_x + 1 / 255))
    cdf_min = cdf(inv_stdv * (centered_x - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@given(seed=seeds)
def test_F36_F10_256_levels_is_ho_et_al_decoder_and_the_default(seed):
    """[F36, F10] K = 256 is the decoder as published: discretized_gaussian_logp(levels=256)
    equals Ho et al.'s code written out above (atol 1e-9 where the mass is > 1e-6, as in the
    F36 test above; exactly the 1e-12 floor where theirs is floored), and vlb_bpd with
    levels=256 is vlb_bpd without the argument, bit for bit (today's numbers)."""
    M = 8
    jitter, u, w = randn(seed, (M, 256), (M, 256), (M, 1))
    k = torch.randint(0, 256, (M, 256), generator=torch.Generator().manual_seed(seed))
    x0 = 2 * k.double() / 255 - 1
    x0[:, :2] = torch.tensor([-1.0, 1.0], dtype=F64)  # both edge bins in every row
    mean = x0 + 0.05 * jitter + 0.5 * torch.tanh(u)
    log_scale = -3 * (1 + torch.tanh(w)) * math.log(10) / 2
    logp = ds.discretized_gaussian_logp(x0, mean, torch.exp(2 * log_scale), levels=256)
    ref = ho_et_al_decoder_logp(x0, mean, log_scale)
    mass = ref_bin_mass(x0, mean, log_scale.exp())
    ok = mass > 1e-6
    torch.testing.assert_close(logp[ok], ref[ok], rtol=0, atol=1e-9)
    floored = ref == math.log(1e-12)
    assert (logp[floored] == math.log(1e-12)).all()
    sched = ds.Schedule.from_betas(ds.linear_betas(20))
    x8 = x0[:4].reshape(4, 4, 8, 8)
    runs = [ds.vlb_bpd(fake_eps_model(20), sched, x8, generator=torch.Generator().manual_seed(
        seed), **kw) for kw in ({}, {"levels": 256})]
    for key in ("total", "prior", "terms"):
        assert torch.equal(runs[0][key], runs[1][key]), key


# --- DDPM: the eps loss [F12] ---------------------------------------------------------------------

def test_F12_draw_t_is_uniform_on_1_to_T_including_T():
    """[F12] t ~ U{1..T}: with T = 5 and 20,000 draws every step 1..5 appears, T included, with
    frequency 1/T within 5 SE (SE = sqrt(p (1 - p) / n)), and nothing else does."""
    sched = ds.Schedule.from_betas(ref_linear_betas(5, 1e-3, 0.2))
    t = ds.draw_t(sched, torch.zeros(20000, 1), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and set(t.tolist()) == {1, 2, 3, 4, 5}
    freq = torch.bincount(t, minlength=6)[1:] / 20000
    assert ((freq - 0.2).abs() < N_SE * math.sqrt(0.2 * 0.8 / 20000)).all()


@given(cases())
def test_F12_eps_loss_is_the_mean_squared_noise_error(case):
    """[F12] eps_loss = mean_dims (eps - eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t))^2; with t
    not given, the model sees t ~ U{1..T} as a (B,) LongTensor."""
    betas, t, shape, seed = case
    x0, eps = randn(seed, shape, shape)
    sched, T, alpha_bar = ds.Schedule.from_betas(betas), len(betas), ref_alpha_bar(betas)
    model = Recorder(fake_eps_model(T))

    def expected(steps):
        ab = col([alpha_bar[k] for k in steps], x0)
        return flat_mean((eps - model.fn(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, long(steps))) ** 2)

    assert_close64(ds.eps_loss(model, sched, x0, t=long(t), noise=eps), expected(t))
    loss = ds.eps_loss(model, sched, x0, noise=eps, generator=torch.Generator().manual_seed(seed))
    drawn = model.calls[-1][1]
    assert drawn.dtype == torch.long and drawn.shape == (shape[0],)
    assert ((drawn >= 1) & (drawn <= T)).all()
    assert_close64(loss, expected(drawn.tolist()))


# --- DDPM: samplers, ancestral and DDIM [F6, F9, F29] ---------------------------------------------

# DDPM ancestral sampling [F6, F7, F9] -------------------------------------------------------------

@pytest.mark.parametrize("steps", [None, 100, [1000, 900, 500, 200, 50, 10, 3]])
@pytest.mark.parametrize("sigma2", ["beta", "beta_tilde"])
def test_F6_F7_F9_ddpm_exact_output_law(sigma2, steps):
    """The full chain (T..1, every step) and respaced chains with the exact eps of N(MU, SIGMA):
    the module's exact output law is the F9 update propagated here (to 1e-9), and near the target:
    W2 measured, full chain 9.8e-4 (beta), 7.4e-3 (beta_tilde: too small a variance for non-point
    data); 100 steps 0.011, 0.065. The 7-step grid only checks exactness. [F6, F7, F9]"""
    sched, ab = _linear_sched()
    sample = lambda eps_model, x: ds.ddpm_sample(eps_model, sched, x, steps=steps, sigma2=sigma2)
    grid = _grid_of(sample, ab)
    if steps == 100:   # evenly spaced from T down to 1, computed here
        assert grid == [round(1000 - 999 * i / 99) for i in range(100)]
    else:
        assert grid == (list(range(1000, 0, -1)) if steps is None else steps)
    law = ref_affine_law(lambda x: sample(ref_eps_model(ref_gauss_score, ab), x), 3)
    ref_assert_same_law(law, ref_propagate(ref_ddpm_steps(grid, ab, sigma2),
                                           torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)))
    bound = {(None, "beta"): 1.5e-3, (None, "beta_tilde"): 1.1e-2,
             (100, "beta"): 0.017, (100, "beta_tilde"): 0.1}
    if not isinstance(steps, list):
        assert ref_w2(*law, MU, SIGMA) < bound[steps, sigma2]


@pytest.mark.parametrize("sigma2", ["beta", "beta_tilde"])
def test_F6_F9_ddpm_full_chain_on_the_mixture(sigma2):
    """Ancestral sampling, T = 1000, exact eps of the mixture: weights, no stray samples, and each
    mode's mean and variance as the same chain gives that component alone. [F6, F9, F21]"""
    sched, ab = _linear_sched()
    x = torch.randn(N_MIX, 2, generator=_gen(20), dtype=F64)
    out = ds.ddpm_sample(ref_eps_model(ref_mix_score, ab), sched, x, sigma2=sigma2,
                         generator=_gen(21))
    ref_check_mixture(out, ref_mixture_component_laws(
        lambda mu, cov: ref_ddpm_steps(range(1000, 0, -1), ab, sigma2, mu, cov)))


# DDIM [F29] ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta,steps", [(0.0, 50), (0.0, 1000), (1.0, 50), (0.5, 20)])
def test_F29_ddim_exact_output_law(eta, steps):
    """DDIM with the exact eps of N(MU, SIGMA): the module's exact output law is the F29 update
    propagated here (to 1e-9), and near the target: W2 measured, eta 0: 0.059 (50 steps), 0.0067
    (1000 steps: the floor set by sqrt(alpha_bar_T) = 0.0064, x_T ~ N(0, I) instead of
    N(0.0064 MU, ...)); eta 1, 50 steps: 0.12. [F29]"""
    sched, ab = _linear_sched()
    sample = lambda eps_model, x: ds.ddim_sample(eps_model, sched, x, steps=steps, eta=eta)
    grid = _grid_of(sample, ab)
    assert grid == [round(1000 - 999 * i / (steps - 1)) for i in range(steps)]   # computed here
    law = ref_affine_law(lambda x: sample(ref_eps_model(ref_gauss_score, ab), x), 3)
    ref_assert_same_law(law, ref_propagate(ref_ddim_steps(grid, ab, eta),
                                           torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)))
    bound = {(0.0, 50): 0.09, (0.0, 1000): 0.01, (1.0, 50): 0.18}
    if (eta, steps) in bound:
        assert ref_w2(*law, MU, SIGMA) < bound[eta, steps]


def test_F29_F7_ddim_eta1_full_grid_is_ancestral_ddpm():
    """DDIM with eta = 1 and S = T has sigma_t^2 = beta_tilde_t: its exact output law is that of
    ancestral sampling with sigma2 = 'beta_tilde' (at t = 1 both add no noise; measured difference
    3e-14), and differs from the sigma2 = 'beta' chain's (W2 0.017 apart here). [F29, F7]"""
    sched, ab = _linear_sched(200)
    eps_model = ref_eps_model(ref_gauss_score, ab)
    ddim = ref_affine_law(lambda x: ds.ddim_sample(eps_model, sched, x, steps=200, eta=1.0), 3)
    ddpm = ref_affine_law(lambda x: ds.ddpm_sample(eps_model, sched, x, sigma2="beta_tilde"), 3)
    ref_assert_same_law(ddim, ddpm)
    beta = ref_affine_law(lambda x: ds.ddpm_sample(eps_model, sched, x, sigma2="beta"), 3)
    assert ref_w2(*ddim, *beta) > 5e-3


@pytest.mark.parametrize("steps", [1, 7, 50, 1000, [1000, 999, 500, 2, 1]])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_F29_ddim_grid_starts_at_T_and_ends_at_x0(steps, eta):
    """The eps model sees t = T first, then a strictly descending grid (every step T..1 when
    S = T), and the last update lands on x_0: the result is x0_hat of the last call. [F29]"""
    sched, ab = _linear_sched()
    calls = []
    x = torch.randn(16, 2, generator=_gen(3), dtype=F64)
    out = ds.ddim_sample(ref_eps_model(ref_mix_score, ab, calls), sched, x, steps=steps, eta=eta,
                         generator=_gen(4))
    grid = _visited(calls)
    if isinstance(steps, list):
        assert grid == steps
    else:
        assert len(grid) == steps and grid[0] == 1000 and grid[-1] >= 1
        assert all(a > b for a, b in zip(grid, grid[1:]))
    if steps == 1000:
        assert grid == list(range(1000, 0, -1))
    x_last, t_last, eps_last = calls[-1]
    a = ab[t_last[0]].item()
    assert torch.allclose(out, (x_last - math.sqrt(1 - a) * eps_last) / math.sqrt(a),
                          rtol=1e-10, atol=1e-10)


def test_F7_F29_F32_clip_x0_clips_x0_hat_in_every_discrete_sampler():
    """[F7, F29, F32, F21] clip_x0 = (lo, hi): DDIM (eta = 0) step by step from the recorded calls
    is sqrt(ab') clip(x0_hat) + sqrt(1 - ab') eps_c, eps_c = (x - sqrt(ab) clip(x0_hat)) /
    sqrt(1 - ab):
    DDIM with eta = 1 and S = T equals ancestral DDPM (beta_tilde) with the same clipping (F7 with
    the clipped x0_hat) on the same noise; both end inside [lo, hi]; a range wide enough to clip
    nothing gives the unclipped sample; clipping is off by default; a bad range raises.
    DPM-Solver++ with clip_x0 is the paper's update (ref_dpm_pp_2m) with x0_hat clipped."""
    sched, ab = _linear_sched(100)
    x = 3 * torch.randn(64, 2, generator=_gen(7), dtype=F64)
    lo, hi = -1.0, 0.5
    calls, outs = [], []
    out = ds.ddim_sample(ref_eps_model(ref_mix_score, ab, calls), sched, x, steps=10,
                         clip_x0=(lo, hi), callback=lambda i, y: outs.append(y.clone()))
    grid = _visited(calls) + [0]
    for (xt, t, eps), t_prev, after in zip(calls, grid[1:], outs):
        a, a_prev = ab[t[0]].item(), ab[t_prev].item()
        x0 = ((xt - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(lo, hi)
        eps_c = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
        assert torch.allclose(after, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps_c,
                              rtol=1e-10, atol=1e-10)
    assert out.min() >= lo and out.max() <= hi
    em = ref_eps_model(ref_mix_score, ab)
    ddim = ds.ddim_sample(em, sched, x, steps=100, eta=1.0, clip_x0=(lo, hi), generator=_gen(8))
    ddpm = ds.ddpm_sample(em, sched, x, sigma2="beta_tilde", clip_x0=(lo, hi), generator=_gen(8))
    assert torch.allclose(ddim, ddpm, rtol=1e-9, atol=1e-9)
    assert ddpm.min() >= lo and ddpm.max() <= hi
    taus = ref_logsnr_steps(ab, 10) + [0]
    a, sg = [ab[t].sqrt().item() for t in taus], [(1 - ab[t]).sqrt().item() for t in taus]
    x0_of = lambda y, i: ((y - sg[i] * em(y, torch.full((len(y),), taus[i]))) / a[i]).clamp(lo, hi)
    assert torch.allclose(ds.dpm_solver_sample(em, sched, x, steps=taus, order=2, clip_x0=(lo, hi)),
                          ref_dpm_pp_2m(x0_of, x, a, sg), rtol=1e-10, atol=1e-10)
    for sample in (lambda **kw: ds.ddpm_sample(em, sched, x, steps=20, generator=_gen(9), **kw),
                   lambda **kw: ds.ddim_sample(em, sched, x, steps=20, **kw)):
        plain = sample()
        assert plain.max() > hi                                       # off by default
        assert torch.allclose(sample(clip_x0=(-1e9, 1e9)), plain, rtol=1e-9, atol=1e-9)
    for bad in [(1.0, -1.0), (0.0,), "images", (0.0, 0.0)]:
        with pytest.raises(ValueError, match="clip_x0"):
            ds.ddpm_sample(em, sched, x, clip_x0=bad)


def test_F29_ddim_eta0_is_deterministic_and_eta_is_checked():
    """eta = 0 draws no noise: different generators give identical samples. eta outside [0, 1]
    raises ValueError (for eta <= 1, 1 - alpha_bar_prev - sigma^2 >= 0 always holds). [F29]"""
    sched, ab = _linear_sched()
    eps_model = ref_eps_model(ref_mix_score, ab)
    x = torch.randn(64, 2, generator=_gen(5), dtype=F64)
    a = ds.ddim_sample(eps_model, sched, x, steps=20, eta=0.0, generator=_gen(1))
    b = ds.ddim_sample(eps_model, sched, x, steps=20, eta=0.0, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, ds.ddim_sample(eps_model, sched, x, steps=20, eta=1.0,
                                                generator=_gen(1)))
    for eta in (-0.1, 1.5, 2.0):
        with pytest.raises(ValueError, match="eta"):
            ds.ddim_sample(eps_model, sched, x, steps=20, eta=eta)


def test_F29_F26_ddim_eta0_is_euler_for_the_probability_flow_ode():
    """DDIM (eta = 0) is a first-order discretization of the probability-flow ODE of the VP SDE
    with beta(s) = T beta_{sT} (F26): its exact output law approaches the ODE's (rk4, 200 steps),
    the W2 gap halving as S doubles. Measured gaps: 0.118, 0.059, 0.030, 0.015 (S = 25..200).
    [F29, F26]"""
    sched, ab = _linear_sched()
    eps_model = ref_eps_model(ref_gauss_score, ab)
    sde, score_fn = ds.VPSDE(**VP), ref_sde_score(ref_gauss_score, "vp")
    ode = ref_affine_law(lambda x: ds.ode_sample(score_fn, sde, x, steps=200), 3)
    gaps = [ref_w2(*ref_affine_law(lambda x: ds.ddim_sample(eps_model, sched, x, steps=S), 3),
                   *ode) for S in (25, 50, 100, 200)]
    assert gaps[0] < 0.15
    for g, g_half in zip(gaps, gaps[1:]):
        assert 2.2 > g / g_half > 1.8


def test_F29_F26_ddim_eta0_converges_on_the_mixture():
    """On the mixture (a nonlinear score) DDIM from the same x_T converges to its S = T = 1000
    limit at first order, and that limit is the VP probability-flow ODE's (rk4) map. The median
    distance is used: a few points near a boundary between modes switch mode. Measured medians:
    0.045, 0.023, 0.0113 for S = 25, 50, 100; DDIM(1000) to the ODE: 0.0021. [F29, F26]"""
    sched, ab = _linear_sched()
    eps_model = ref_eps_model(ref_mix_score, ab)
    x = torch.randn(2000, 2, generator=_gen(6), dtype=F64)
    limit = ds.ddim_sample(eps_model, sched, x, steps=1000)
    errs = [(ds.ddim_sample(eps_model, sched, x, steps=S) - limit).norm(dim=1).median().item()
            for S in (25, 50, 100)]
    for e, e_half in zip(errs, errs[1:]):
        assert 2.4 > e / e_half > 1.7
    ode = ds.ode_sample(ref_sde_score(ref_mix_score, "vp"), ds.VPSDE(**VP), x, steps=100)
    assert (ode - limit).norm(dim=1).median() < 0.005


@pytest.mark.parametrize("run", [
    lambda em, sched, x, g: ds.ddpm_sample(em, sched, x, steps=100, generator=g),
    lambda em, sched, x, g: ds.ddpm_sample(em, sched, x, steps=100, sigma2="beta_tilde",
                                           generator=g),
    lambda em, sched, x, g: ds.ddim_sample(em, sched, x, steps=50, generator=g),
    lambda em, sched, x, g: ds.ddim_sample(em, sched, x, steps=50, eta=1.0, generator=g)],
    ids=["ddpm100-beta", "ddpm100-beta_tilde", "ddim50-eta0", "ddim50-eta1"])
def test_F6_F29_few_step_samplers_keep_the_mode_weights(run):
    """Respaced DDPM (100 steps) and DDIM (50 steps) on the mixture: mode weights, and at most
    0.1% stray samples -- coarse steps leave a few points between modes (measured, DDIM 50 steps,
    4 seeds: 0 or 1 in 10,000 beyond 6 std, up to 9 std). Their within-mode law is biased for
    narrow modes (DDIM, 50 steps: the 0.1-wide mode's variance is 32% low) and is pinned exactly
    by the Gaussian exact-law tests. [F6, F29]"""
    sched, ab = _linear_sched()
    x = torch.randn(N_MIX, 2, generator=_gen(22), dtype=F64)
    ref_check_mixture(run(ref_eps_model(ref_mix_score, ab), sched, x, _gen(23)),
                      max_far=N_MIX // 1000)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_F6_F29_chain_samplers_finite_with_default_schedules(schedule):
    """T = 1000 default linear and cosine schedules (cosine's last beta clipped at 0.999: the first
    reverse step divides by sqrt(alpha_T) = 0.03), float32 data N(0, I) and its exact eps,
    eps(x_t, t) = sqrt(1 - alpha_bar_t) x_t (the marginal stays N(0, I)): every output is finite,
    float32, and has the variance propagated here -- 1 - beta_1 for sigma2 = 'beta' (the true
    reverse kernel, no noise at the last step), 0.991 / 0.995 for beta_tilde, 0.93 / 0.95 for
    DDIM with 50 steps -- within 5 SE (SE = var sqrt(2 / n), n = 8,000 values). [F6, F29]"""
    betas = ds.linear_betas() if schedule == "linear" else ds.cosine_betas()
    sched, g = ds.Schedule.from_betas(betas), _gen(40)
    ab = torch.tensor(ref_alpha_bar(betas.tolist()), dtype=F64)
    eps_model = lambda x, t: col((1 - ab[t]).sqrt(), x) * x
    zero, one = torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64)
    full = list(range(1000, 0, -1))
    grid = lambda sample: _grid_of(sample, ab, d=1)
    runs = [(lambda em, x: ds.ddpm_sample(em, sched, x, generator=g),
             lambda: ref_ddpm_steps(full, ab, "beta", zero, one)),
            (lambda em, x: ds.ddpm_sample(em, sched, x, sigma2="beta_tilde", generator=g),
             lambda: ref_ddpm_steps(full, ab, "beta_tilde", zero, one)),
            (lambda em, x: ds.ddpm_sample(em, sched, x, steps=50, generator=g),
             lambda: ref_ddpm_steps(grid(runs[2][0]), ab, "beta", zero, one)),
            (lambda em, x: ds.ddim_sample(em, sched, x, steps=50),
             lambda: ref_ddim_steps(grid(runs[3][0]), ab, 0.0, zero, one)),
            (lambda em, x: ds.ddim_sample(em, sched, x, steps=1000, eta=1.0, generator=g),
             lambda: ref_ddim_steps(full, ab, 1.0, zero, one))]
    for i, (sample, steps_of) in enumerate(runs):
        out = sample(eps_model, torch.randn(2000, 4, generator=g))
        var = ref_propagate(steps_of(), zero, one)[1].item()
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), i
        assert abs(out.double().var().item() - var) < 5 * var * math.sqrt(2 / out.numel()), i
        if i == 0:
            assert abs(var - (1 - betas[0].item())) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_F6_F9_F29_chain_samplers_finite_in_half_precision(schedule, dtype):
    """PITFALLS #11: in float16 / bfloat16, alpha_bar_t rounds to 1 for the first steps, so a
    coefficient 1 / sqrt(1 - alpha_bar_t) formed after the cast divides by zero. Schedules are
    float64 and cast at use: with the exact eps of N(0, I) data every sampler's output is
    finite. (Only finiteness: 1000 steps of 8-bit-mantissa arithmetic do move the variance.)
    [F6, F9, F29]"""
    betas = ds.linear_betas() if schedule == "linear" else ds.cosine_betas()
    sched, g = ds.Schedule.from_betas(betas), _gen(41)
    ab = torch.tensor(ref_alpha_bar(betas.tolist()), dtype=F64)
    eps_model = lambda x, t: col((1 - ab[t]).sqrt(), x) * x
    x = torch.randn(256, 4, generator=g).to(dtype)
    for out in [ds.ddpm_sample(eps_model, sched, x, generator=g),
                ds.ddpm_sample(eps_model, sched, x, sigma2="beta_tilde", generator=g),
                ds.ddpm_sample(eps_model, sched, x, steps=50, generator=g),
                ds.ddim_sample(eps_model, sched, x, steps=50),
                ds.ddim_sample(eps_model, sched, x, steps=1000, eta=1.0, generator=g)]:
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("T,S", [(1000, 7), (1000, 50), (100, 99), (10, 1), (10, 10)])
def test_F6_F29_integer_grid_is_evenly_spaced_from_T_to_1(T, S):
    """[F6, F29] an integer step count S makes ddpm_sample and ddim_sample visit
    round(T - (T - 1) i / (S - 1)), i = 0..S-1 (T alone for S = 1), computed here."""
    sched, ab = _linear_sched(T)
    expected = [T] if S == 1 else [round(T - (T - 1) * i / (S - 1)) for i in range(S)]
    for sample in (lambda em, x: ds.ddpm_sample(em, sched, x, steps=S),
                   lambda em, x: ds.ddim_sample(em, sched, x, steps=S)):
        assert _grid_of(sample, ab) == expected


# --- energy-based models and score matching [F14-F16] ---------------------------------------------

def g_energy_net(d, seed):
    """A random MLP energy E(x, s) -> (B,) in float64, softplus activations (smooth)."""
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, 32), torch.nn.Softplus(),
                              torch.nn.Linear(32, 32), torch.nn.Softplus(),
                              torch.nn.Linear(32, 1)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[-1]))
    return net, lambda x, s: net(torch.cat([x, s[:, None]], 1)).squeeze(1)


def ref_g_jacobian(field, x):
    """J[b, i, j] = d field(x)_i / d x_j by autograd, one backward pass per output coordinate."""
    x = x.clone().requires_grad_(True)
    out = field(x)
    return torch.stack([torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0]
                        for i in range(x.shape[1])], 1)


def ref_trace_jacobian(field, x):
    """tr(d field / d x) per example, from ref_g_jacobian (autograd, one pass per coordinate)."""
    return ref_g_jacobian(field, x).diagonal(dim1=1, dim2=2).sum(1)


@settings(deadline=None)
@given(seed=seeds, d=st.integers(2, 5))
def test_F14_energy_score_is_minus_grad_e_a_conservative_field_and_ignores_z(seed, d):
    """[F14] for a random MLP energy E(x, s): energy_score(E) = -grad_x E (autograd here); its
    Jacobian is symmetric (a gradient field), while a non-conservative field (the network's
    first-layer output) is not, so the check has power; adding a constant and a function of s
    (a log-normalizer log Z(s)) leaves the score unchanged."""
    net, E = g_energy_net(d, seed)
    g = torch.Generator().manual_seed(seed)
    x, s = torch.randn(8, d, generator=g, dtype=F64), torch.rand(8, generator=g, dtype=F64)
    score = ds.energy_score(E)
    x_ = x.clone().requires_grad_(True)
    expected = -torch.autograd.grad(E(x_, s).sum(), x_)[0]
    assert_close64(score(x, s), expected, atol=1e-14)
    J = ref_g_jacobian(lambda x: score(x, s), x)
    tol = RTOL * J.abs().max().item()
    assert_close64(J, J.transpose(1, 2), atol=tol, rtol=0)
    J_rot = ref_g_jacobian(lambda x: net[0](torch.cat([x, s[:, None]], 1))[:, :d], x)
    assert (J_rot - J_rot.transpose(1, 2)).abs().max() > 1e3 * tol
    shifted = ds.energy_score(lambda x, s: E(x, s) + 3.7 + 5 * s ** 2 - s.exp())
    assert_close64(shifted(x, s), score(x, s), atol=1e-14)


@settings(deadline=None)
@given(seed=seeds, d=st.integers(1, 5))
def test_F14_F16_quadratic_energy_gives_the_gaussian_score(seed, d):
    """[F14, F16] E(x) = 1/2 (x - mu)^T P (x - mu): energy_score(E)(x) = -P (x - mu) exactly, and
    through score_matching_loss (which differentiates the score in x, so the wrapper must keep
    the graph) it gives the closed form (1/2 ||P (x - mu)||^2 - tr P) / d."""
    g = torch.Generator().manual_seed(seed)
    A, mu, x = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((d, d), (d,), (6, d)))
    P = A @ A.T + 0.5 * torch.eye(d, dtype=F64)
    E = lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x - mu, P, x - mu)
    expected = -(x - mu) @ P
    scale = expected.abs().max().item()
    assert_close64(ds.energy_score(E)(x), expected, atol=RTOL * scale)
    loss = ds.score_matching_loss(ds.energy_score(E), x)
    assert_close64(loss, (0.5 * (expected ** 2).sum(1) - P.trace()) / d,
                   atol=RTOL * (scale ** 2 + P.trace().item()))


def test_F14_F19_energy_score_trains_through_dsm_loss():
    """[F14, F19] with gradients on, dsm_loss(energy_score(E_net), ...) backpropagates to the
    energy's parameters: the gradients are finite, non-zero and equal those of the same loss
    written here with -grad_x E (create_graph); the output bias (a constant added to E) gets
    none."""
    net, E = g_energy_net(3, 0)
    g = torch.Generator().manual_seed(0)
    x0, z = (torch.randn(64, 3, generator=g, dtype=F64) for _ in range(2))
    sigmas = [0.1, 0.5, 1.0, 2.0]
    sigma = torch.tensor(sigmas, dtype=F64).repeat(16)
    ds.dsm_loss(ds.energy_score(E), x0, sigmas, sigma=sigma, noise=z).mean().backward()
    *params, out_bias = net.parameters()
    assert out_bias.grad is None
    grads = [p.grad.clone() for p in params]
    net.zero_grad(set_to_none=True)
    x_tilde = (x0 + sigma[:, None] * z).requires_grad_(True)     # F18, F19 written here
    score = -torch.autograd.grad(E(x_tilde, sigma).sum(), x_tilde, create_graph=True)[0]
    (sigma[:, None] ** 2 * (score + z / sigma[:, None]) ** 2).mean(1).mean().backward()
    for got, p in zip(grads, params):
        assert torch.isfinite(got).all() and got.abs().max() > 0
        assert_close64(got, p.grad, atol=1e-12, rtol=1e-9)


def gaussian_problem(seed, d=3):
    """A random Gaussian N(mu, Sigma) in d dims (Sigma well conditioned)."""
    W, mu = randn(seed, (d, d), (d,))
    Sigma = (0.5 * W + torch.eye(d, dtype=F64)) @ (0.5 * W + torch.eye(d, dtype=F64)).T
    return mu, Sigma + 0.1 * torch.eye(d, dtype=F64)


def linear_family(seed, P, mu, n=4, d=3):
    """(A, b) for s(x) = A x + b: first the true score -P (x - mu), then n perturbations of it."""
    family = [(-P, P @ mu)]
    for k in range(n):
        dA, db = randn(seed + k, (d, d), (d,))
        family.append((-P + 0.4 * dA, P @ mu + 0.5 * db))
    return family


def fisher(A, b, P, mu, cov):
    """E ||A x + b - s*(x)||^2 for x ~ N(mu, cov), s*(x) = -P (x - mu): with M = A + P,
    c = b - P mu, it is tr(M cov M^T) + ||M mu + c||^2."""
    M, c = A + P, b - P @ mu
    return (torch.trace(M @ cov @ M.T) + (M @ mu + c).square().sum()).item()


def test_F15_F18_dsm_is_the_noised_fisher_divergence_plus_a_constant():
    """[F18, F15] Gaussian data N(mu, Sigma), d = 3, linear s(x) = A x + b, one sigma: dsm_loss
    = sigma^2 / d E||s - grad log p_sigma||^2 + const, p_sigma = N(mu, Sigma + sigma^2 I); the
    constant is the loss of the true score,
    sigma^2 / d (tr(P Sigma P) + ||I / sigma - sigma P||_F^2), P = (Sigma + sigma^2 I)^-1."""
    d, N, sigma = 3, 20000, 0.7
    mu, Sigma = gaussian_problem(18)
    x_noise, z = randn(180, (N, d), (N, d))
    x = mu + x_noise @ torch.linalg.cholesky(Sigma).T
    cov = Sigma + sigma ** 2 * torch.eye(d, dtype=F64)
    P = torch.linalg.inv(cov)
    sig = torch.full((N,), sigma, dtype=F64)
    losses = [ds.dsm_loss(lambda y, _s, A=A, b=b: y @ A.T + b, x, [sigma], sigma=sig, noise=z)
              for A, b in linear_family(181, P, mu)]
    # With s the true score, y = -P (x - mu) + (I / sigma - sigma P) z, independent parts.
    I = torch.eye(d, dtype=F64)
    const = sigma ** 2 / d * (torch.trace(P @ Sigma @ P) + (I / sigma - sigma * P).square().sum())
    se = losses[0].std() / math.sqrt(N)
    assert abs(losses[0].mean() - const) < N_SE * se
    # Common random numbers: the difference of two losses on the same (x, z) has a small SE.
    for (A, b), loss in zip(linear_family(181, P, mu)[1:], losses[1:]):
        diff = loss - losses[0]
        se = diff.std().item() / math.sqrt(N)
        expected = sigma ** 2 / d * fisher(A, b, P, mu, cov)
        assert expected > 10 * se  # the check can tell the candidates apart
        assert abs(diff.mean().item() - expected) < N_SE * se


def test_F15_F16_implicit_score_matching_is_the_fisher_divergence_minus_a_constant():
    """[F16, F15] Gaussian data, linear s(x) = A x + b: score_matching_loss = (1/2 E||s - s*||^2
    - 1/2 E||s*||^2) / d with E||s*||^2 = tr(Sigma^-1); per example it is (1/2||s||^2 + tr A)/d."""
    d, N = 3, 20000
    mu, Sigma = gaussian_problem(16)
    x = mu + randn(160, (N, d)) @ torch.linalg.cholesky(Sigma).T
    P = torch.linalg.inv(Sigma)
    family = linear_family(161, P, mu)
    losses = [ds.score_matching_loss(lambda y, A=A, b=b: y @ A.T + b, x) for A, b in family]
    for (A, b), loss in zip(family, losses):  # exact per example: the Jacobian is A
        assert_close64(loss, (0.5 * (x @ A.T + b).square().sum(1) + torch.trace(A)) / d)
    se = losses[0].std() / math.sqrt(N)
    assert abs(losses[0].mean() + torch.trace(P) / (2 * d)) < N_SE * se
    for (A, b), loss in zip(family[1:], losses[1:]):  # common random numbers, as for F18
        diff = loss - losses[0]
        se = diff.std().item() / math.sqrt(N)
        expected = fisher(A, b, P, mu, Sigma) / (2 * d)
        assert expected > 10 * se
        assert abs(diff.mean().item() - expected) < N_SE * se


class MLPScore:
    """A small nonlinear score model with a non-symmetric, non-diagonal Jacobian (any shape)."""

    def __init__(self, seed, d):
        self.W1, self.W2, self.c = randn(seed, (8, d), (d, 8), (8,))

    def __call__(self, x):
        y = x.flatten(1)
        return (torch.tanh(y @ self.W1.T + self.c) @ self.W2.T - 0.5 * y).reshape(x.shape)


def exact_ism(model, x):
    """(1/2 ||s(x)||^2 + tr(ds/dx)) / d per example, the trace by autograd (ref_trace_jacobian)."""
    trace = ref_trace_jacobian(lambda y: model(y.reshape(x.shape)).flatten(1), x.flatten(1))
    return (0.5 * model(x).flatten(1).square().sum(1) + trace) / x[0].numel()


@given(seed=seeds, shape=st.sampled_from([(3,), (2, 2), (1, 2, 3)]), B=st.integers(1, 4))
def test_F16_score_matching_loss_is_norm_plus_the_exact_jacobian_trace(seed, shape, B):
    """[F16] score_matching_loss = (1/2 ||s(x)||^2 + tr(grad_x s(x))) / d, d = numel per example."""
    x = randn(seed, (B, *shape))
    model = MLPScore(seed + 1, math.prod(shape))
    assert_close64(ds.score_matching_loss(model, x), exact_ism(model, x))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_F16_sliced_score_matching_is_unbiased_for_the_exact_loss(probe):
    """[F16] E_v[(1/2 ||s||^2 + v^T J v) / d] = (1/2 ||s||^2 + tr J) / d for E[v v^T] = I: the mean
    of R independent calls (n_projections each) is within 5 SE of the exact loss, per example."""
    B, d, R, P = 4, 3, 400, 4
    x = randn(1616, (B, d))
    model = MLPScore(1617, d)
    g = torch.Generator().manual_seed(1618)
    calls = torch.stack([ds.sliced_score_matching_loss(model, x, n_projections=P, probe=probe,
                                                       generator=g).detach() for _ in range(R)])
    se = calls.std(0) / math.sqrt(R)  # the R calls are independent draws of the estimator
    assert (se > 0).all()
    assert ((calls.mean(0) - exact_ism(model, x)).abs() < N_SE * se).all()


@given(seed=seeds, B=st.integers(1, 4), d=st.integers(1, 5))
def test_F16_sliced_rademacher_is_exact_for_a_diagonal_jacobian(seed, B, d):
    """[F16] with an elementwise s(x) = w tanh(x) + b, J is diagonal and v_i^2 = 1 for Rademacher
    v, so v^T J v = tr J = sum w (1 - tanh(x)^2) for every probe."""
    x, w, b = randn(seed, (B, d), (d,), (d,))
    loss = ds.sliced_score_matching_loss(lambda y: w * torch.tanh(y) + b, x, n_projections=3,
                                         generator=torch.Generator().manual_seed(seed))
    s = w * torch.tanh(x) + b
    trace = (w * (1 - torch.tanh(x) ** 2)).sum(1)
    assert_close64(loss.detach(), (0.5 * s.square().sum(1) + trace) / d)


# --- Langevin dynamics [F17] ----------------------------------------------------------------------

def test_F17_langevin_exact_law_has_the_discretization_bias():
    """Unadjusted Langevin with the exact score of N(MU, SIGMA): the module's exact law after n
    steps is the update propagated here, and it converges to the chain's stationary law
    N(MU, (SIGMA^-1 - eps/4 SIGMA^-2)^-1) -- per eigenvalue c^2: c^2 / (1 - eps / (4 c^2)) --
    not to SIGMA: with eps = 0.1 the smallest variance is 19% too large. [F17]"""
    eps, n = 0.1, 400
    score = lambda x: ref_gauss_score(x, 1.0, 0.0)
    start = 2.0 * torch.ones(3, dtype=F64)                       # start away from the target
    law = ref_affine_law(lambda x: ds.langevin(score, x + start, step_size=eps, n_steps=n), 3)
    ref_assert_same_law(law, ref_propagate(ref_langevin_steps(eps, n), start,
                                           torch.eye(3, dtype=F64)))
    P_inv = torch.linalg.inv(SIGMA)
    stationary = torch.linalg.inv(P_inv - eps / 4 * P_inv @ P_inv)
    # contraction per step 1 - eps / (2 * 1.411): after 400 steps the start is forgotten (1e-6)
    assert torch.allclose(law[0], MU, atol=1e-5)
    assert torch.allclose(law[1], stationary, atol=1e-5)
    assert (law[1] - SIGMA).abs().max() > 0.02


def test_F17_langevin_samples_match_the_biased_stationary_variance():
    """Statistically, on 1-D N(0, c^2) with c = 0.5 and eps = 0.2: the sample variance of 20,000
    chains matches c^2 / (1 - eps / (4 c^2)) = 0.3125 within 5 SE (SE = var sqrt(2 / N)), and is
    more than 5 SE away from c^2 = 0.25: the test sees the bias it accounts for. [F17]"""
    c2, eps, N = 0.25, 0.2, 20000
    x = torch.randn(N, 1, generator=_gen(11), dtype=F64)
    x = ds.langevin(lambda y: -y / c2, x, step_size=eps, n_steps=100, generator=_gen(12))
    stationary = c2 / (1 - eps / (4 * c2))
    se = stationary * math.sqrt(2 / N)                           # 0.0031
    assert abs(x.var().item() - stationary) < 5 * se
    assert abs(x.var().item() - c2) > 5 * se
    assert abs(x.mean().item()) < 5 * math.sqrt(stationary / N)


# --- denoising score matching and NCSN [F18-F20] --------------------------------------------------

@given(sigma_min=st.floats(1e-3, 1.0), ratio=st.floats(1.01, 1e4), L=st.integers(2, 50))
def test_F19_geometric_sigmas_descend_geometrically_between_the_endpoints(sigma_min, ratio, L):
    """[F19] sigma_1 = sigma_max > ... > sigma_L = sigma_min with a constant ratio."""
    sigma_max = sigma_min * ratio
    sigmas = ds.geometric_sigmas(sigma_max, sigma_min, L)
    assert sigmas.shape == (L,) and sigmas.dtype == F64
    assert_close64(sigmas[[0, -1]], [sigma_max, sigma_min], atol=0)
    assert (sigmas[1:] < sigmas[:-1]).all()
    step = (sigma_min / sigma_max) ** (1 / (L - 1))
    assert_close64(sigmas[1:] / sigmas[:-1], [step] * (L - 1), atol=0)


def test_F19_geometric_sigmas_song_ermon_setting():
    """[F19] NCSN: sigma_1 = 1, sigma_L = 0.01, L = 10, i.e. sigma_i = 10^(-2 (i-1)/9)."""
    assert_close64(ds.geometric_sigmas(1.0, 0.01, 10), [10 ** (-2 * i / 9) for i in range(10)])


def fake_score_model(x, sigma):
    """A deterministic, sigma-dependent stand-in for a noise-conditional score network."""
    return torch.sin(x) / col(sigma, x) - 0.5 * x


@given(seed=seeds, shape=trailing_shapes, B=st.integers(1, 4))
def test_F18_F19_dsm_loss_is_the_sigma2_weighted_denoising_error(seed, shape, B):
    """[F18, F19] dsm_loss = sigma^2 mean_dims (s(x0 + sigma z, sigma) + z / sigma)^2, the target
    -(x~ - x0) / sigma^2 = -z / sigma; with sigma not given it is drawn from sigmas."""
    x_shape = (B, *shape)
    x0, z, u = randn(seed, x_shape, x_shape, (B,))
    sigmas = [10 ** (-2 * i / 9) for i in range(10)]  # Song & Ermon's geometric sigmas
    sigma = (-1.5 * (1 + torch.tanh(u))).exp()
    model = Recorder(fake_score_model)

    def expected(sg):
        s = col(sg, x0)
        return flat_mean(s ** 2 * (fake_score_model(x0 + s * z, sg) + z / s) ** 2)

    assert_close64(ds.dsm_loss(model, x0, sigmas, sigma=sigma, noise=z), expected(sigma))
    loss = ds.dsm_loss(model, x0, sigmas, noise=z, generator=torch.Generator().manual_seed(seed))
    drawn = model.calls[-1][1]
    assert drawn.shape == (B,) and all(any(abs(v - s) < 1e-15 for s in sigmas)
                                       for v in drawn.tolist())
    assert_close64(loss, expected(drawn))


def test_F20_F21_annealed_langevin_exact_law():
    """Annealed Langevin with the exact noised scores of N(MU, SIGMA), sigmas geometric 3 -> 0.01
    (L = 10), eps = 2e-5, 100 steps each, Tweedie denoising: the module's exact law is the update
    propagated here, and near the target (W2 measured 0.060: the steps alpha_i = eps sigma_i^2 /
    sigma_L^2 of the last levels are too short to finish mixing). [F20, F21]"""
    sigmas = torch.exp(torch.linspace(math.log(3.0), math.log(0.01), 10, dtype=F64)).tolist()
    score = lambda x, sigma: ref_gauss_score(x, 1.0, sigma ** 2)
    law = ref_affine_law(lambda x: ds.annealed_langevin(score, sigmas, 3.0 * x), 3)
    start = torch.zeros(3, dtype=F64), 9.0 * torch.eye(3, dtype=F64)      # x = 3 N(0, I)
    ref_assert_same_law(law, ref_propagate(ref_annealed_steps(sigmas, 2e-5, 100), *start))
    assert ref_w2(*law, MU, SIGMA) < 0.09


def test_F20_annealed_langevin_noise_levels_stay_float32_for_bfloat16_data():
    """[F20, F21] PITFALLS #11: with bfloat16 data the score sees every sigma as a float32 (B,)
    tensor holding the level's float32 value (bfloat16 would turn 0.3 into 0.30078), including the
    final Tweedie step; the output keeps the data's dtype."""
    seen = []

    def score_fn(y, sigma):
        seen.append(sigma)
        return -y
    out = ds.annealed_langevin(score_fn, [1.0, 0.3, 0.07], torch.zeros(4, 2, dtype=torch.bfloat16),
                               steps=1, generator=_gen(13))
    assert out.dtype == torch.bfloat16 and len(seen) == 4
    for sigma, level in zip(seen, [1.0, 0.3, 0.07, 0.07]):
        assert sigma.dtype == torch.float32 and sigma.shape == (4,)
        assert (sigma == torch.tensor(level, dtype=torch.float32)).all()


def test_F20_annealed_langevin_on_the_mixture():
    """Annealed Langevin with sigma_1 = 3 (about the largest distance between modes, so the first
    level mixes them), sigma_L = 0.01, eps = 2e-5, 100 steps each, 5,000 points: mode weights, and
    each mode's law as the same schedule gives that component alone. Annealed Langevin has its own
    mode-weight bias, shrinking as the annealing gets finer (measured, weight-0.1 mode: 0.117 with
    L = 10, 0.105 with L = 10 and 1000 steps each, 0.106 with L = 20); with L = 20 it is ~1.5 SE
    here, so this check sees gross errors (a wrong sign or step size), not that bias. [F20]"""
    sigmas = torch.exp(torch.linspace(math.log(3.0), math.log(0.01), 20, dtype=F64)).tolist()
    x = 3.0 * torch.randn(N_MIX // 2, 2, generator=_gen(24), dtype=F64)
    out = ds.annealed_langevin(lambda y, sigma: ref_mix_score(y, 1.0, sigma ** 2), sigmas, x,
                               generator=_gen(25))
    ref_check_mixture(out, ref_mixture_component_laws(
        lambda mu, cov: ref_annealed_steps(sigmas, 2e-5, 100, mu, cov), start_std=3.0))


# --- parameterizations: eps, score, x0 [F21] ------------------------------------------------------

@given(cases())
def test_F21_eps_to_score_is_the_autograd_score_of_q(case):
    """[F21] eps_to_score(eps, sqrt(1 - ab)) = grad_{x_t} log N(x_t; sqrt(ab) x0, (1 - ab) I) by
    autograd, with eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab); score_to_eps inverts it."""
    betas, t, shape, seed = case
    x0, xt = randn(seed, shape, shape)
    alpha_bar = ref_alpha_bar(betas)
    ab = col([alpha_bar[k] for k in t], x0)
    xt.requires_grad_(True)
    log_q = (-(xt - ab.sqrt() * x0) ** 2 / (2 * (1 - ab)) - 0.5 * torch.log(2 * math.pi * (1 - ab)))
    (score,) = torch.autograd.grad(log_q.sum(), xt)
    xt = xt.detach()
    eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    std = torch.tensor([math.sqrt(1 - alpha_bar[k]) for k in t], dtype=F64)
    assert_close64(ds.eps_to_score(eps, std), score)
    assert_close64(ds.eps_to_score(eps, col(std, x0)), score)  # already broadcastable
    assert_close64(ds.score_to_eps(score, std), eps)
    assert_close64(ds.eps_to_score(eps, 0.7), -eps / 0.7)  # a Python number, full precision


@given(cases())
def test_F21_x0_from_eps_inverts_q_sample(case):
    """[F21, F3] x0_from_eps(q_sample(x0, t, eps), eps, sqrt(ab_t), sqrt(1 - ab_t)) = x0."""
    betas, t, shape, seed = case
    x0, eps = randn(seed, shape, shape)
    alpha_bar = ref_alpha_bar(betas)
    xt = ds.q_sample(ds.Schedule.from_betas(betas), x0, long(t), eps)
    scale = torch.tensor([math.sqrt(alpha_bar[k]) for k in t], dtype=F64)
    std = torch.tensor([math.sqrt(1 - alpha_bar[k]) for k in t], dtype=F64)
    # x0 = (x_t - std eps) / scale divides by scale >= sqrt(ab_T): the error grows like 1/scale.
    assert_close64(ds.x0_from_eps(xt, eps, scale, std), x0, atol=ATOL / scale.min().item())


@given(case=cases(), c=st.floats(0.1, 3.0))
def test_F21_tweedie_is_the_posterior_mean_for_gaussian_data(case, c):
    """[F21] x0 ~ N(m, c^2 I): with the score of the noised marginal N(sqrt(ab) m, ab c^2 + 1 - ab),
    tweedie gives E[x0 | x_t] = m + sqrt(ab) c^2 / (ab c^2 + 1 - ab) (x_t - sqrt(ab) m); and for
    NCSN's x~ = x0 + sigma z (scale 1, std sigma), E[x0 | x~] = m + c^2 / (c^2 + sigma^2) (x~ - m)
    (scale and std given as Python numbers)."""
    betas, t, shape, seed = case
    m, xt = randn(seed, shape, shape)
    alpha_bar = ref_alpha_bar(betas)
    ab = col([alpha_bar[k] for k in t], m)
    V = ab * c * c + 1 - ab
    score = -(xt - ab.sqrt() * m) / V
    posterior_mean = m + ab.sqrt() * c * c / V * (xt - ab.sqrt() * m)
    scale = torch.tensor([math.sqrt(alpha_bar[k]) for k in t], dtype=F64)
    std = torch.tensor([math.sqrt(1 - alpha_bar[k]) for k in t], dtype=F64)
    assert_close64(ds.tweedie(xt, score, scale, std), posterior_mean,
                   atol=ATOL / scale.min().item())
    sigma = 0.7
    score_ncsn = -(xt - m) / (c * c + sigma ** 2)
    assert_close64(ds.tweedie(xt, score_ncsn, 1.0, sigma),
                   m + c * c / (c * c + sigma ** 2) * (xt - m))


@given(cases())
def test_F21_F12_eps_loss_is_dsm_loss_in_the_scaled_variable(case):
    """[F21, F12, F19] eps_loss(eps_model, x0, t, eps) = dsm_loss(s, sqrt(ab) x0, sigma =
    sqrt(1 - ab), eps) with s(x, sigma) = -eps_model(x, t) / sigma: x~ is then exactly x_t."""
    betas, t, shape, seed = case
    x0, eps = randn(seed, shape, shape)
    sched, alpha_bar = ds.Schedule.from_betas(betas), ref_alpha_bar(betas)
    eps_model = fake_eps_model(len(betas))
    scale = torch.tensor([math.sqrt(alpha_bar[k]) for k in t], dtype=F64)
    std = torch.tensor([math.sqrt(1 - alpha_bar[k]) for k in t], dtype=F64)

    def score_model(x, sigma):
        return -eps_model(x, long(t)) / col(sigma, x)

    dsm = ds.dsm_loss(score_model, col(scale, x0) * x0, std, sigma=std, noise=eps)
    assert_close64(ds.eps_loss(eps_model, sched, x0, t=long(t), noise=eps), dsm)


# --- score SDEs and their loss [F22, F23, F25, F35] -----------------------------------------------

@settings(deadline=None)
@given(name=st.sampled_from(["vp", "subvp", "ve"]), lo=st.floats(0.01, 2.0),
       ratio=st.floats(1.5, 5000.0), s=st.floats(0.02, 0.98))
def test_F22_F23_sde_drift_diffusion_marginal_agree(name, lo, ratio, s):
    """drift = a(s) x and diffusion g(s) as in F22, marginal as in F23 (float64, 1e-12), and the
    module's marginal obeys dm/ds = a m, dv/ds = 2 a v + g^2 with the module's drift and diffusion
    (central differences, h = 1e-5, to 1e-6 of the size of the terms). [F22, F23]"""
    params = (dict(sigma_min=lo, sigma_max=lo * ratio) if name == "ve"
              else dict(beta_min=lo, beta_max=lo * min(ratio, 100.0)))
    sde = {"vp": ds.VPSDE, "subvp": ds.SubVPSDE, "ve": ds.VESDE}[name](**params)
    x0 = torch.randn(3, 2, generator=_gen(60), dtype=F64)
    full = lambda u, B=3: torch.full((B,), u, dtype=F64)
    m, v, a, g2 = (c.item() for c in ref_sde_coefs(name, s, **params))
    mean, std = sde.marginal(x0, full(s))
    assert std.shape == (3, 1)
    assert torch.allclose(mean, m * x0, rtol=1e-12, atol=0)
    assert torch.allclose(std ** 2, torch.full_like(std, v), rtol=1e-10, atol=0)
    assert torch.allclose(sde.drift(x0, full(s)), a * x0, rtol=1e-12, atol=0)
    assert torch.allclose(sde.diffusion(full(s)) ** 2, full(g2), rtol=1e-12, atol=0)
    h, one = 1e-5, torch.ones(1, 1, dtype=F64)
    coefs = lambda u: [c.item() for c in sde.marginal(one, full(u, 1))]
    (m_hi, std_hi), (m_lo, std_lo) = coefs(s + h), coefs(s - h)
    a_s, g2_s = sde.drift(one, full(s, 1)).item(), sde.diffusion(full(s, 1)).item() ** 2
    assert abs((m_hi - m_lo) / (2 * h) - a_s * m) <= 1e-6 * abs(a_s * m)
    dv = (std_hi ** 2 - std_lo ** 2) / (2 * h)      # a small difference when v is near 1
    assert abs(dv - (2 * a_s * v + g2_s)) < 1e-6 * (abs(2 * a_s * v) + g2_s)


@settings(deadline=None)
@given(betas=betas_lists(min_T=2, max_T=300), seed=seeds)
def test_F35_F3_F22_F23_discrete_vp_sde_is_the_schedule_in_continuous_time(betas, seed):
    """[F35, F3, F22, F23] DiscreteVPSDE(sched): at every s = t / T (float64 and float32) the
    marginal is q(x_t | x0) with alpha_bar_t from the product loop; between steps log alpha_bar is
    linear in t; beta(s) = -T log(1 - beta_t) on ((t-1)/T, t/T]; the marginal obeys F23's ODEs
    dm/ds = a m and dv/ds = 2 a v + g^2 with the module's drift and diffusion (central
    differences inside a step, h = 1e-5 / T, to 1e-5 of the terms); the prior is N(0, I)."""
    T, ab = len(betas), ref_alpha_bar(betas)
    sde = ds.DiscreteVPSDE(ds.Schedule.from_betas(betas))
    x0 = randn(seed, (T + 1, 2))
    s = torch.arange(T + 1, dtype=F64) / T
    mean, std = sde.marginal(x0, s)
    assert_close64(mean, col([math.sqrt(a) for a in ab], x0) * x0)
    assert_close64(std ** 2, col([1 - a for a in ab], x0), atol=1e-14)
    m32, std32 = sde.marginal_coefs(s.float())
    assert m32.dtype == torch.float32
    assert torch.allclose(m32.double() ** 2, torch.tensor(ab, dtype=F64), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, T + 1, (8,), generator=g)
    w = 0.05 + 0.9 * torch.rand(8, generator=g, dtype=F64)
    u = (k - 1 + w) / T                               # strictly inside step k's piece
    log_ab = torch.tensor(ab, dtype=F64).log()
    m_ref = ((1 - w) * log_ab[k - 1] + w * log_ab[k]).exp().sqrt()
    assert_close64(sde.marginal_coefs(u)[0], m_ref)
    beta_ref = -T * torch.log1p(-torch.tensor(betas, dtype=F64))[k - 1]
    assert_close64(sde.beta(u), beta_ref)
    assert_close64(sde.beta(k.double() / T), beta_ref)       # the right end belongs to step k
    assert_close64(sde.diffusion(u) ** 2, beta_ref)
    x8 = randn(seed + 1, (8, 2))
    assert_close64(sde.drift(x8, u), -0.5 * col(beta_ref, x8) * x8)
    h = 1e-5 / T
    (m_hi, s_hi), (m_lo, s_lo), (m, sd) = (sde.marginal_coefs(u + e) for e in (h, -h, 0))
    a = -0.5 * beta_ref
    assert ((m_hi - m_lo) / (2 * h) - a * m).abs().le(1e-5 * (a * m).abs() + 1e-9).all()
    dv, v = (s_hi ** 2 - s_lo ** 2) / (2 * h), sd ** 2
    assert (dv - (2 * a * v + beta_ref)).abs().le(1e-5 * (2 * a.abs() * v + beta_ref)).all()
    z = randn(seed, (4, 3))
    assert_close64(sde.prior_logp(z), Normal(0.0, 1.0).log_prob(z).sum(1))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F5_F22_sde_prior(name):
    """prior_logp is log N(z; 0, prior_std^2 I) summed per example (torch.distributions), for
    points and images; prior_sample has that std (5 SE, SE = std / sqrt(2 n)), shape and dtype,
    and is reproducible. [F22, F5]"""
    sde, std = SDES[name](), ref_prior_std(name)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(std, dtype=F64))
    for shape in [(5, 2), (5, 1, 4, 4)]:
        z = std * torch.randn(shape, generator=_gen(61), dtype=F64)
        assert torch.allclose(sde.prior_logp(z), normal.log_prob(z).flatten(1).sum(1), rtol=1e-12)
    z = sde.prior_sample((20000, 2), generator=_gen(62), dtype=F64)
    assert z.shape == (20000, 2) and z.dtype == F64
    assert abs(z.std().item() / std - 1) < 5 / math.sqrt(2 * z.numel())
    assert torch.equal(z, sde.prior_sample((20000, 2), generator=_gen(62), dtype=F64))


@pytest.mark.parametrize("make", [
    lambda: ds.VPSDE(beta_min=-0.1), lambda: ds.VPSDE(beta_min=0.0),
    lambda: ds.VPSDE(beta_max=-1.0), lambda: ds.VPSDE(beta_min=float("nan")),
    lambda: ds.SubVPSDE(beta_min=-0.1), lambda: ds.SubVPSDE(beta_max=float("inf")),
    lambda: ds.VESDE(sigma_min=0.0), lambda: ds.VESDE(sigma_min=-0.01),
    lambda: ds.VESDE(sigma_min=1.0, sigma_max=0.5), lambda: ds.VESDE(sigma_max=float("nan"))])
def test_F22_sde_invalid_parameters_raise(make):
    """beta(s) must be > 0 and finite; VE needs 0 < sigma_min < sigma_max for a real g(s). [F22]"""
    with pytest.raises(ValueError):
        make()


class FakeSDE:
    """Only what sde_loss may use: marginal(x0, s) -> (mean, std (B,1,..)) and diffusion(s)."""

    def marginal(self, x0, s):
        s = col(s, x0).to(x0.dtype)
        return torch.exp(-s) * x0 + 0.1 * s, (0.2 + s).sqrt()

    def diffusion(self, s):
        return 1 + s ** 2


@given(seed=seeds, shape=trailing_shapes, B=st.integers(1, 4), weighted=st.booleans())
def test_F25_sde_loss_is_lambda_weighted_conditional_score_error(seed, shape, B, weighted):
    """[F25] sde_loss = lambda(s) mean_dims (s_theta(x_s, s) + z / std(s))^2, x_s = mean + std z,
    lambda = std^2 or g(s)^2 (likelihood weighting); with s not given, s ~ U(eps_s, 1)."""
    x_shape = (B, *shape)
    x0, z, u = randn(seed, x_shape, x_shape, (B,))
    s_given = torch.sigmoid(u)
    model, sde = Recorder(fake_score_model), FakeSDE()

    def expected(s):
        scale, shift, std = torch.exp(-col(s, x0)), 0.1 * col(s, x0), (0.2 + col(s, x0)).sqrt()
        lam = col(1 + s ** 2, x0) ** 2 if weighted else std ** 2
        return flat_mean(lam * (fake_score_model(scale * x0 + shift + std * z, s) + z / std) ** 2)

    loss = ds.sde_loss(model, sde, x0, likelihood_weighting=weighted, s=s_given, noise=z)
    assert_close64(loss, expected(s_given))
    loss = ds.sde_loss(model, sde, x0, likelihood_weighting=weighted, noise=z, eps_s=0.3,
                       generator=torch.Generator().manual_seed(seed))
    drawn = model.calls[-1][1]
    assert drawn.shape == (B,) and ((drawn >= 0.3) & (drawn <= 1)).all()
    assert_close64(loss, expected(drawn))


# --- reverse SDE and predictor-corrector [F24, F28] -----------------------------------------------

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F24_reverse_sde_exact_law(name):
    """Euler-Maruyama on the reverse SDE, 1000 steps, exact score of N(MU, SIGMA), no corrector,
    started from the prior: the module's exact law is the update propagated here, and near
    p_{eps_s} (W2 measured: VP 1.1e-3, sub-VP 1.4e-3, VE 3.4e-4). [F24]"""
    sde, score_fn, std = SDES[name](), ref_sde_score(ref_gauss_score, name), ref_prior_std(name)
    law = ref_affine_law(lambda x: ds.reverse_sde_sample(score_fn, sde, x, steps=1000), 3,
                         start_std=std)
    ref_assert_same_law(law, ref_propagate(ref_sde_steps(name, 1000, 1e-3),
                                           torch.zeros(3, dtype=F64),
                                           std ** 2 * torch.eye(3, dtype=F64)))
    bound = {"vp": 1.7e-3, "subvp": 2.1e-3, "ve": 5e-4}[name]
    assert ref_w2(*law, *ref_sde_target(name, 1e-3)) < bound


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion"])
def test_F28_F24_pc_corrector_and_predictor_steps_by_hand(predictor):
    """One corrector step, then one predictor step, checked by hand: x <- x + delta score
    + sqrt(2 delta) z with delta = 2 alpha (snr ||z|| / ||score||)^2, the norms averaged over the
    batch (Song et al.'s code), alpha = 1 with Euler-Maruyama and alpha = A^2 with reverse
    diffusion (F28's alpha_i); then Euler-Maruyama x + (a x - g^2 score)(eps_s - 1) (F24) or
    reverse diffusion (x + G^2 score) / A with A = m(1) / m(eps_s), G^2 = v(1) - A^2 v(eps_s)
    (F23 written here). torch.randn is replaced by a fixed z (rows of very different norms, so
    per-example norms would differ); with steps = 1 the predictor step is the last and adds no
    noise. [F28, F24]"""
    sde, score = ds.VPSDE(**VP), ref_sde_score(ref_gauss_score, "vp")
    z = torch.randn(6, 3, generator=_gen(30), dtype=F64) * torch.tensor([[0.1], [1], [3]] * 2)
    x = torch.randn(6, 3, generator=_gen(31), dtype=F64) * torch.tensor([[5.0]] * 3 + [[0.2]] * 3)
    calls, snr, eps_s = [], 0.3, 1e-3

    def score_fn(y, s):
        calls.append((y.clone(), s.clone()))
        return score(y, s)

    def fixed_randn(*size, **kw):
        assert tuple(size[0] if len(size) == 1 else size) == tuple(z.shape)
        return z.clone()

    with mock.patch.object(torch, "randn", fixed_randn):
        out = ds.reverse_sde_sample(score_fn, sde, x, steps=1, corrector_steps=1, snr=snr,
                                    eps_s=eps_s, predictor=predictor)
    (m1, v1, a, g2), (m0, v0, _, _) = ref_sde_coefs("vp", 1.0), ref_sde_coefs("vp", eps_s)
    A = m1 / m0
    g = score(x, torch.ones(6, dtype=F64))
    alpha = A ** 2 if predictor == "reverse_diffusion" else 1.0
    delta = 2 * alpha * (snr * z.norm(dim=1).mean() / g.norm(dim=1).mean()) ** 2
    mid = x + delta * g + (2 * delta).sqrt() * z
    g = score(mid, torch.ones(6, dtype=F64))
    if predictor == "euler_maruyama":
        expected = mid + (a * mid - g2 * g) * (eps_s - 1)
    else:
        expected = (mid + (v1 - A ** 2 * v0) * g) / A
    assert len(calls) == 2 and (calls[1][1] == 1.0).all()
    assert torch.allclose(calls[1][0], mid, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("corrector_steps", [0, 1])
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F24_F28_reverse_sde_on_the_mixture(name, corrector_steps):
    """Predictor-corrector sampling, 1000 steps, exact score of the mixture, from the prior: mode
    weights and no stray samples; without corrector, each mode has the law the same EM chain gives
    that component alone; with one Langevin corrector step (snr 0.16; not affine, 5,000 points),
    the law of p_{eps_s} (measured |z| <= 2.9). [F24, F28]"""
    sde, score_fn = SDES[name](), ref_sde_score(ref_mix_score, name)
    n = N_MIX if corrector_steps == 0 else N_MIX // 2        # the corrector doubles the cost
    x = sde.prior_sample((n, 2), generator=_gen(26), dtype=F64)
    out = ds.reverse_sde_sample(score_fn, sde, x, steps=1000, corrector_steps=corrector_steps,
                                generator=_gen(27))
    m, v = (c.item() for c in ref_sde_coefs(name, 1e-3)[:2])
    if corrector_steps == 0:
        law = ref_mixture_component_laws(
            lambda mu, cov: ref_sde_steps(name, 1000, 1e-3, False, mu, cov), ref_prior_std(name))
    else:
        law = m * MIX_MU, m ** 2 * MIX_STD ** 2 + v
    ref_check_mixture(out, law, m, v)


def test_F28_reverse_diffusion_on_the_discretized_vp_is_ancestral_ddpm():
    """[F28, F6, F9] the reverse-diffusion predictor on DiscreteVPSDE(sched) with the grid t / T,
    t = T..0, and the score -eps / sqrt(1 - alpha_bar_t) (F21) is ancestral DDPM (sigma2 = 'beta')
    step for step: the same x after every step (1e-10), on the same noise."""
    T = 100
    sched, ab = _linear_sched(T)
    em = ref_eps_model(ref_mix_score, ab)

    def score_fn(x, s):
        t = (s.double() * T).round().long()
        return -em(x, t) / col((1 - ab[t]).sqrt(), x)

    x = torch.randn(256, 2, generator=_gen(40), dtype=F64)
    a, b = [], []
    out_a = ds.reverse_sde_sample(score_fn, ds.DiscreteVPSDE(sched), x,
                                  steps=[t / T for t in range(T, -1, -1)],
                                  predictor="reverse_diffusion", generator=_gen(41),
                                  callback=lambda i, y: a.append(y))
    out_b = ds.ddpm_sample(em, sched, x, generator=_gen(41), callback=lambda i, y: b.append(y))
    assert len(a) == len(b) == T
    for ya, yb in zip(a, b):
        assert torch.allclose(ya, yb, rtol=1e-10, atol=1e-10)
    assert torch.allclose(out_a, out_b, rtol=1e-10, atol=1e-10)


# --- probability-flow ODE and likelihood [F26, F27, F33] ------------------------------------------

# Probability-flow ODE [F26] ---------------------------------------------------------------------

@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F26_ode_sample_exact_law_and_order(name, method, order):
    """The probability-flow ODE with the exact score of N(MU, SIGMA), started from the exact p_1
    so that the exact flow lands on p_{eps_s}: the W2 error of the exact output law shrinks by
    2^order from 50 to 100 steps (measured ratios: Euler 1.95-2.03, Heun 3.9-4.1, RK4 on VE 17;
    RK4 on VP / sub-VP: 3.9e-8 / 5.9e-8 at 100 steps, already at the floor of the W2
    computation; VE 2.0e-6). Euler is also checked against the update written here. [F26]"""
    sde, score_fn = SDES[name](), ref_sde_score(ref_gauss_score, name)
    m1, P1 = ref_sde_target(name, 1.0)
    L1 = torch.linalg.cholesky(P1)
    errs = []
    for n in (50, 100):
        law = ref_affine_law(lambda x: ds.ode_sample(score_fn, sde, m1 + x @ L1.T, steps=n,
                                                     method=method), 3)
        errs.append(ref_w2(*law, *ref_sde_target(name, 1e-3)))
    if method == "euler":
        ref_assert_same_law(law, ref_propagate(ref_sde_steps(name, 100, 1e-3, ode=True), m1, P1))
    if method == "rk4":
        assert errs[1] < 1e-5 and (name != "ve" or errs[0] / errs[1] > 12)
    else:
        assert 0.9 * 2 ** order < errs[0] / errs[1] < 1.1 * 2 ** order


@pytest.mark.parametrize("name,method", [("vp", "heun"), ("vp", "rk4"), ("subvp", "rk4"),
                                         ("ve", "rk4")])
def test_F26_ode_sample_on_the_mixture(name, method):
    """The probability-flow ODE, 100 steps, exact score of the mixture, from the prior: mode
    weights, no stray samples, and each mode's mean and variance those of p_{eps_s}. (Euler with
    100 steps is too coarse for the 0.1-wide mode: its variance comes out 26% low on VP.) [F26]"""
    sde, score_fn = SDES[name](), ref_sde_score(ref_mix_score, name)
    x = sde.prior_sample((N_MIX, 2), generator=_gen(28), dtype=F64)
    out = ds.ode_sample(score_fn, sde, x, steps=100, method=method)
    m, v = (c.item() for c in ref_sde_coefs(name, 1e-3)[:2])
    ref_check_mixture(out, (m * MIX_MU, m ** 2 * MIX_STD ** 2 + v), m, v)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F26_ode_encode_then_sample_is_the_identity(name):
    """ode_encode then ode_sample (rk4, 100 steps each) gives back 2,000 mixture samples: measured
    round-trip error, median 3e-8 .. 3e-7, max 9e-4 .. 2.6e-3 (the max from points between modes,
    where the flow is steep). [F26]"""
    sde, score_fn = SDES[name](), ref_sde_score(ref_mix_score, name)
    x0 = ref_mix_sample(2000, _gen(32))
    err = (ds.ode_sample(score_fn, sde, ds.ode_encode(score_fn, sde, x0)) - x0).norm(dim=1)
    assert err.median() < 2e-6 and err.max() < 1e-2


# Likelihood [F27] ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F27_ode_likelihood_exact_trace(name):
    """F27 with the exact score of N(MU, SIGMA) and the exact divergence (rk4, 100 steps): 'nats'
    equals the closed form ref_flow_loglik, the rk4 error falling at 4th order (per dimension at
    50 / 100 / 200 steps, measured: VP 1.1e-6 / 6.9e-8 / 4.4e-9, VE 6.6e-5 / 4.4e-6 / 2.8e-7);
    so it equals log N(x; MU, SIGMA) within 1e-3 nats per dimension once the prior mismatch
    (up to 5e-3 VP, 1.6e-2 VE per dimension) is accounted for; 'bpd' = -nats / (d ln 2). [F27]"""
    sde, score_fn = SDES[name](), ref_sde_score(ref_gauss_score, name)
    x = _gauss_points(32, 33)
    out = ds.ode_likelihood(score_fn, sde, x, steps=100)
    expected = ref_flow_loglik(name, x, 1e-5)
    assert ((out["nats"] - expected) / 3).abs().max() < (2e-5 if name == "ve" else 1e-6)
    log_p0 = torch.distributions.MultivariateNormal(MU, SIGMA).log_prob(x)
    mismatch = expected - log_p0
    assert ((out["nats"] - mismatch - log_p0) / 3).abs().max() < 1e-3
    assert torch.allclose(out["bpd"], -out["nats"] / (3 * math.log(2)), rtol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_F27_ode_likelihood_hutchinson_is_unbiased(probe):
    """Hutchinson's v^T J v with one probe per example, on 4 points repeated 500 times: the mean
    of each point's 500 estimates is within 5 SE (SE = sample std / sqrt(500); measured std of
    one estimate 1.07 Rademacher, 1.4 Gaussian) of the exact-trace result and of the closed form
    (which differ by ~3e-6 nats at 50 steps, far below 5 SE ~ 0.25). [F27]"""
    sde, score_fn = ds.VPSDE(**VP), ref_sde_score(ref_gauss_score, "vp")
    x = _gauss_points(4, 34)
    est = ds.ode_likelihood(score_fn, sde, x.repeat(500, 1), steps=50, divergence="hutchinson",
                            probe=probe, generator=_gen(35))["nats"].reshape(500, 4)
    se = est.std(0) / math.sqrt(500)
    assert (se > 1e-3).all()                                     # the probe does matter
    exact = ds.ode_likelihood(score_fn, sde, x, steps=50)["nats"]
    assert ((est.mean(0) - exact).abs() < 5 * se).all()
    assert ((est.mean(0) - ref_flow_loglik("vp", x, 1e-5)).abs() < 5 * se).all()


def test_F27_dequantized_bits_per_dim_are_the_8bit_bin_masses():
    """[F27, PITFALLS #8] 8-bit data x = 2 k / 255 - 1 from a diagonal Gaussian N(m, diag c^2)
    (away from the edge bins), exact VP score: ode_likelihood(dequantize=True)'s 'bpd' is
    -log2 P(bin) / d, P the exact mass of x's bin (a product of normal CDF differences written
    here): per point within 0.05 bits/dim (the dequantization noise moves log p(y) by up to
    ~0.03 nats) and on average within 0.005 (a wrong sign of the offset d log(2 / 255) would move
    it by 14 bits/dim). The flow starts from y = x + (2/255)(u - 1/2), u uniform on (0, 1) (mean
    and variance within 5 standard errors): the whole of x's bin."""
    m, c = torch.tensor([0.1, -0.2, 0.3], dtype=F64), torch.tensor([0.2, 0.3, 0.25], dtype=F64)
    cov = torch.diag(c ** 2)
    x = m + c * torch.randn(64, 3, generator=_gen(42), dtype=F64)
    x = (torch.round((x.clamp(-0.9, 0.9) + 1) * 127.5) / 127.5 - 1)
    first = []

    def score_fn(y, s):
        if not first:
            first.append(y.clone())
        mm, v, _, _ = ref_sde_coefs("vp", s[0])
        return ref_gauss_score(y, mm, v, m, cov)
    out = ds.ode_likelihood(score_fn, ds.VPSDE(**VP), x, dequantize=True, generator=_gen(43))
    mass = (0.5 * (torch.erf((x + 1 / 255 - m) / (c * math.sqrt(2)))
                   - torch.erf((x - 1 / 255 - m) / (c * math.sqrt(2))))).prod(1)
    expected = -mass.log2() / 3
    assert ((out["bpd"] - expected).abs() < 0.05).all()
    assert abs((out["bpd"] - expected).mean()) < 0.005
    u = ((first[0] - x) * 255 / 2 + 0.5).flatten()     # y = x + (2 / 255)(u - 1/2): u ~ U(0, 1)
    n = len(u)                                         # mean 1/2, var 1/12 (the bin's full width):
    assert ((u > 0) & (u < 1)).all()                   # SE sqrt(1/12 / n) and sqrt(1/180 / n)
    assert abs(u.mean() - 0.5) < N_SE * math.sqrt(1 / 12 / n)
    assert abs(((u - 0.5) ** 2).mean() - 1 / 12) < N_SE * math.sqrt(1 / 180 / n)


# The adaptive solver, rk45 [F33] ------------------------------------------------------------------

def ref_flow_map(name, x, s_from, s_to, mu=MU, cov=SIGMA):
    """The exact probability flow (F26) of N(mu, cov) data from s_from to s_to: x -> m' mu +
    C'^{1/2} C^{-1/2} (x - m mu), C = m^2 cov + v I (the C's commute; see ref_flow_loglik)."""
    lam, Q = torch.linalg.eigh(cov)
    (m0, v0, _, _), (m1, v1, _, _) = ref_sde_coefs(name, s_from), ref_sde_coefs(name, s_to)
    ratio = ((m1 ** 2 * lam + v1) / (m0 ** 2 * lam + v0)).sqrt()
    return m1 * mu + ((x - m0 * mu) @ Q * ratio) @ Q.T


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_F33_F27_rk45_error_follows_the_tolerance_and_nfe_is_reported(name):
    """[F33, F27] method='rk45' with the exact score of N(MU, SIGMA): the likelihood error against
    the closed form stays within 10 rtol (1 + |log p|) for every point of the batch (the error
    norm is the max over examples, so no point is integrated more loosely; a far point with
    log p ~ -100 is in the batch); 'nfe' grows as rtol falls and is 2 + 6 per attempt; ode_sample
    and ode_encode land within 3e-4 (relative) of the exact flow's image (ref_flow_map) and report
    'nfe'. Measured max errors, VP: 4.7e-4, 7.9e-5, 1.6e-4 nats at rtol 1e-3, 1e-4, 1e-5 (26, 38,
    50 NFE); VE: 0.070, 8.1e-3, 6.3e-4 (50, 80, 122 NFE); maps 1.5e-5 .. 1.3e-4."""
    sde, score_fn = SDES[name](), ref_sde_score(ref_gauss_score, name)
    x = torch.cat([_gauss_points(15, 36), MU[None] + 4.0])
    exact, nfes = ref_flow_loglik(name, x, 1e-5), []
    for rtol in (1e-3, 1e-4, 1e-5):
        out = ds.ode_likelihood(score_fn, sde, x, method="rk45", rtol=rtol, atol=rtol)
        err = (out["nats"] - exact).abs()
        assert (err < 10 * rtol * (1 + exact.abs())).all(), (rtol, err.max())
        assert (out["nfe"] - 2) % 6 == 0
        nfes.append(out["nfe"])
    assert nfes[0] < nfes[1] < nfes[2]
    x1 = ref_prior_std(name) * torch.randn(16, 3, generator=_gen(37), dtype=F64)
    for run, start, s_from, s_to in ((ds.ode_sample, x1, 1.0, 1e-3), (ds.ode_encode, x, 1e-3, 1.0)):
        stats = {}
        y = run(score_fn, sde, start, method="rk45", rtol=1e-5, atol=1e-5, stats=stats)
        scale = 1 + ref_flow_map(name, start, s_from, s_to).abs()
        assert ((y - ref_flow_map(name, start, s_from, s_to)).abs() / scale).max() < 3e-4
        assert stats["nfe"] > 8
    stats = {}
    ds.ode_sample(score_fn, sde, x1, steps=10, method="rk4", stats=stats)
    assert stats == {"nfe": 40}
    with pytest.raises(RuntimeError, match="max_steps"):
        ds.ode_sample(score_fn, sde, x1, method="rk45", rtol=1e-9, atol=1e-9, max_steps=3)


def ref_dopri54(f, x, s0, s1, rtol, atol):
    """Dormand-Prince 5(4) written from F33 (Hairer, Norsett & Wanner I, II.4-5): the tableau, the
    error e = h sum (b - b*) k, per-example RMS of e / (atol + rtol max(|x|, |x_new|)), max over
    the batch; first h from Hairer's II.4 recipe; accept if err <= 1, h scaled by min(10, max(0.2,
    0.9 err^-1/5)), at most 1 after a rejection; the last step is cut to land on s1 while the
    nominal h is what gets scaled. Returns (x, the times of every accepted step, attempts)."""
    c = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
    a = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
    b5 = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]
    b4 = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]

    def norm(v, y, y_new):
        ratio = v / (atol + rtol * torch.maximum(y.abs(), y_new.abs()))
        return max(math.sqrt((row ** 2).mean().item()) for row in ratio)

    sign, f0 = math.copysign(1.0, s1 - s0), f(x, s0)
    d0, d1 = norm(x, x, x), norm(f0, x, x)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = norm(f(x + sign * h0 * f0, s0 + sign * h0) - f0, x, x) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h, s, times, attempts, rejected = min(100 * h0, h1), s0, [], 0, False
    while s != s1:
        attempts += 1
        step = sign * min(h, abs(s1 - s))
        k = [f0]
        for i in range(1, 7):
            y = x + step * sum(a[i][j] * k[j] for j in range(i))
            k.append(f(y, s + c[i] * step if i < 5 or abs(s1 - s) > h else s1))
        x5 = x + step * sum(b5[j] * k[j] for j in range(7))
        err = norm(step * sum((b5[j] - b4[j]) * k[j] for j in range(7)), x, x5)
        if err <= 1:
            s, x, f0 = (s1 if abs(s1 - s) <= h else s + step), x5, k[6]
            times.append(s)
            h *= min(10.0 if err == 0 else 0.9 * err ** -0.2, 1.0 if rejected else 10.0)
        else:
            h *= max(0.2, 0.9 * err ** -0.2)
        rejected = err > 1
    return x, times, attempts


@pytest.mark.parametrize("s0,s1,start", [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 0.0)])
def test_F33_rk45_is_dormand_prince_with_the_f33_controller(s0, s1, start):
    """[F33, F26] _rk45 calls f at exactly the times, and returns exactly the x, of ref_dopri54
    (written here from F33) on a batch of three rows of very different stiffness with a sharp
    transition at s = 1/2 (so steps are rejected; the stiff row sets the steps, as the max over
    the batch must); its call count is the 'nfe' it reports; max_steps = the attempts made is
    enough, one fewer raises. A start at x = 0 takes Hairer's h0 = 1e-6 branch."""
    k = torch.tensor([[1.0], [40.0], [3.0]], dtype=F64)
    x = start * torch.tensor([[1.0, -2.0], [0.5, 0.0], [30.0, 1.0]], dtype=F64)
    calls, ref_calls, sign = [], [], math.copysign(1.0, s1 - s0)    # stable either way

    def field(log):
        def f(y, s):
            log.append(s)
            target = math.tanh(40 * (s - 0.5)) * torch.tensor([1.0, -0.5], dtype=F64)
            return -sign * k * (y - target)
        return f
    ref_x, times, attempts = ref_dopri54(field(ref_calls), x, s0, s1, 1e-6, 1e-6)
    out, nfe = ds._rk45(field(calls), x, s0, s1, 1e-6, 1e-6, attempts)
    assert len(times) < attempts and times[-1] == s1            # some steps were rejected
    assert nfe == len(calls) == len(ref_calls) == 2 + 6 * attempts
    assert torch.allclose(torch.tensor(calls), torch.tensor(ref_calls), rtol=1e-12, atol=1e-14)
    assert torch.allclose(out, ref_x, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="max_steps"):
        ds._rk45(field([]), x, s0, s1, 1e-6, 1e-6, attempts - 1)


# --- few-step solvers and time grids [F32, F34, F37, F38] -----------------------------------------

def ref_lambda(name, s):
    """lambda = log(m / std) of the marginal (F23), at s (float or tensor)."""
    m, v, _, _ = ref_sde_coefs(name, s)
    return torch.log(m / v.sqrt())


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_F34_s_grid_spacings_follow_their_formulas(name):
    """[F34, F26] each spacing runs from 1 to eps_s, strictly descending, with its defining property
    checked here: equal steps in s; (s - eps_s) / (1 - eps_s) = (1 - i/N)^2; equal steps in
    lambda = log(m / std) (F23 written here; also to 1e-10 down to eps_s = 1e-6, below the
    module's table); equal steps in sigma^(1/7), sigma = std / m. The
    default is quadratic for VP and sub-VP, uniform for VE; an explicit grid comes back as given,
    and the solvers follow it exactly as they follow a step count on the same spacing."""
    sde, N, eps = SDES[name](), 12, 1e-3
    u = torch.arange(N + 1, dtype=F64) / N
    const_steps = lambda v: torch.allclose(v.diff(), v.diff().mean().expand(N), rtol=1e-8)
    grids = {}
    for spacing in ("uniform", "quadratic", "logsnr", "edm"):
        s = grids[spacing] = torch.tensor(ds.s_grid(sde, N, eps, spacing), dtype=F64)
        assert len(s) == N + 1 and s[0] == 1 and abs(s[-1] - eps) < 1e-12
        assert (s[1:] < s[:-1]).all()
    assert torch.allclose(grids["uniform"], 1 - (1 - eps) * u, rtol=0, atol=1e-15)
    assert torch.allclose((grids["quadratic"] - eps) / (1 - eps), (1 - u) ** 2, rtol=0, atol=1e-14)
    assert const_steps(ref_lambda(name, grids["logsnr"]))
    m, v, _, _ = ref_sde_coefs(name, grids["edm"])
    assert const_steps((v.sqrt() / m) ** (1 / 7))
    lam = ref_lambda(name, torch.tensor(ds.s_grid(sde, N, 1e-6, "logsnr"), dtype=F64)).diff()
    assert torch.allclose(lam, lam.mean().expand(N), rtol=1e-10, atol=0)   # below the table
    default = torch.tensor(ds.s_grid(sde, N, eps), dtype=F64)
    assert torch.equal(default, grids["uniform" if name == "ve" else "quadratic"])
    assert ds.s_grid(sde, [1.0, 0.5, 0.0]) == [1.0, 0.5, 0.0]
    score_fn, x = ref_sde_score(ref_gauss_score, name), _gauss_points(4, 45)
    runs = (ds.ode_sample, ds.ode_encode, lambda *a, **kw: ds.reverse_sde_sample(
        *a, generator=_gen(1), **kw))
    for run in runs:                       # an explicit grid, or the count that makes it
        assert torch.equal(run(score_fn, sde, x, steps=5, spacing="logsnr"),
                           run(score_fn, sde, x, steps=ds.s_grid(sde, 5, spacing="logsnr")))
    for bad in ([1.0], [1.0, 0.5, 0.5], [1.0, 0.2, 0.4], [1.5, 0.5], [1.0, -0.1]):
        with pytest.raises(ValueError, match="steps"):
            ds.s_grid(sde, bad)
    with pytest.raises(ValueError, match="spacing"):
        ds.s_grid(sde, 5, spacing="cosine")


def ref_dpm_pp_2m(x0_of, x, alphas, sigmas):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, transcribed: lambda =
    log(alpha / sigma), h_i = lambda_i - lambda_{i-1}; x_1 = (sigma_1 / sigma_0) x_0 - alpha_1
    (e^{-h_1} - 1) x0(x_0, 0); after that D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},
    r_i = h_{i-1} / h_i. A last point with sigma = 0 returns the data prediction."""
    lam = [math.log(a / s) if s > 0 else None for a, s in zip(alphas, sigmas)]
    preds = []
    for i in range(len(alphas) - 1):
        preds.append(x0_of(x, i))
        if sigmas[i + 1] == 0:
            return preds[-1]
        h = lam[i + 1] - lam[i]
        D = preds[-1]
        if i > 0:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * preds[-1] - 1 / (2 * r) * preds[-2]
        x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * (math.exp(-h) - 1) * D
    return x


def ref_logsnr_steps(ab, S):
    """S integer steps uniform in lambda from t = T to 1, log alpha_bar linear between steps:
    lambda = log sqrt(ab / (1 - ab)) inverts to log ab = log sigmoid(2 lambda); repeats dropped."""
    L, T = ab.log(), len(ab) - 1
    lam = lambda t: 0.5 * (L[t] - torch.log1p(-ab[t])).item()
    steps = []
    for i in range(S):
        target = lam(T) + i / (S - 1) * (lam(1) - lam(T))
        l_target = -math.log1p(math.exp(-2 * target))
        k = max(k for k in range(T) if L[k] >= l_target)     # log ab decreases with t
        t = k + (l_target - L[k].item()) / (L[k + 1] - L[k]).item()
        steps.append(max(1, round(t)))
    return list(dict.fromkeys(steps))


@pytest.mark.parametrize("S", [10, 20])
def test_F32_dpm_solver_pp_2m_is_the_paper_update_and_near_the_data(S):
    """[F32, F21] dpm_solver_sample with order = 2 (eps model on the linear T = 1000 schedule) on
    the grid of S steps uniform in log-SNR then t = 0 (computed here; the default before issue 14)
    visits those steps, its output on mixture points equals the paper's update transcribed here
    (1e-10), and its exact law on N(MU, SIGMA) is near the data: W2 measured 0.055 (S = 10), 0.023
    (20), against DDIM's 0.30, 0.15. dpm_solver_sde_sample (order 2, spacing 'logsnr') on the VP
    SDE equals the transcription on the lambda-uniform grid (inverted here in closed form) with
    Tweedie's x0: W2 to p_{eps_s} 0.054, 0.021."""
    sched, ab = _linear_sched()
    calls = []
    x = torch.randn(64, 2, generator=_gen(38), dtype=F64)
    taus = ref_logsnr_steps(ab, S) + [0]
    out = ds.dpm_solver_sample(ref_eps_model(ref_mix_score, ab, calls), sched, x, steps=taus,
                               order=2)
    assert _visited(calls) == taus[:-1] and len(calls) == S
    em = ref_eps_model(ref_mix_score, ab)
    a, sg = [ab[t].sqrt().item() for t in taus], [(1 - ab[t]).sqrt().item() for t in taus]
    x0_of = lambda y, i: (y - sg[i] * em(y, torch.full((len(y),), taus[i]))) / a[i]
    assert torch.allclose(out, ref_dpm_pp_2m(x0_of, x, a, sg), rtol=1e-10, atol=1e-10)
    law = ref_affine_law(lambda y: ds.dpm_solver_sample(ref_eps_model(ref_gauss_score, ab), sched,
                                                        y, steps=taus, order=2), 3)
    eg = ref_eps_model(ref_gauss_score, ab)               # the transcription's exact law, too
    x0_gauss = lambda y, i: (y - sg[i] * eg(y, torch.full((len(y),), taus[i]))) / a[i]
    ref_assert_same_law(law, ref_affine_law(lambda y: ref_dpm_pp_2m(x0_gauss, y, a, sg), 3))
    assert ref_w2(*law, MU, SIGMA) < {10: 0.07, 20: 0.03}[S]
    # The VP SDE with a score: lambda(s) = -1/2 log(e^B - 1), B = log(1 + e^{-2 lambda}).
    lam = torch.linspace(ref_lambda("vp", 1.0).item(), ref_lambda("vp", 1e-3).item(), S + 1,
                         dtype=F64)
    B, (b0, b1) = torch.log1p(torch.exp(-2 * lam)), (VP["beta_min"], VP["beta_max"])
    s = ((b0 ** 2 + 2 * (b1 - b0) * B).sqrt() - b0) / (b1 - b0)
    m, v, _, _ = ref_sde_coefs("vp", s)
    score_fn = ref_sde_score(ref_mix_score, "vp")
    x0_of = lambda y, i: (y + v[i] * score_fn(y, s[i].expand(len(y)))) / m[i]
    out = ds.dpm_solver_sde_sample(score_fn, ds.VPSDE(**VP), x, steps=S, order=2, spacing="logsnr")
    ref = ref_dpm_pp_2m(x0_of, x, m.tolist(), v.sqrt().tolist())
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)
    law = ref_affine_law(lambda y: ds.dpm_solver_sde_sample(
        ref_sde_score(ref_gauss_score, "vp"), ds.VPSDE(**VP), y, steps=S, order=2,
        spacing="logsnr"), 3)
    assert ref_w2(*law, *ref_sde_target("vp", 1e-3)) < {10: 0.07, 20: 0.03}[S]


def test_F32_dpm_solver_pp_on_the_mixture():
    """[F32] 20 steps on the mixture, both entries: mode weights and at most 0.1% stray samples
    (few-step samplers squeeze narrow modes; the exact-law test above pins the update)."""
    sched, ab = _linear_sched()
    x = torch.randn(N_MIX, 2, generator=_gen(39), dtype=F64)
    ref_check_mixture(ds.dpm_solver_sample(ref_eps_model(ref_mix_score, ab), sched, x, steps=20),
                      max_far=N_MIX // 1000)
    out = ds.dpm_solver_sde_sample(ref_sde_score(ref_mix_score, "vp"), ds.VPSDE(**VP), x, steps=20)
    m, v = (c.item() for c in ref_sde_coefs("vp", 1e-3)[:2])
    ref_check_mixture(out, m=m, v=v, max_far=N_MIX // 1000)


def ref_exp_weights(h, nodes):
    """w_j with int_0^h e^(u - h) p(u) du = sum_j w_j p(u_j), p the polynomial through (u_j, p(u_j))
    (F37): Simpson's rule on 2,000 intervals of e^(u - h) times each Lagrange basis polynomial
    (error ~ h^5 / (180 * 2000^4) < 1e-13), no closed form shared with the module."""
    n = 2000
    u = torch.linspace(0, h, n + 1, dtype=F64)
    simpson = torch.ones(n + 1, dtype=F64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    weights = []
    for j, uj in enumerate(nodes):
        basis = torch.ones_like(u)
        for i, ui in enumerate(nodes):
            if i != j:
                basis = basis * (u - ui) / (uj - ui)
        weights.append((simpson * torch.exp(u - h) * basis).sum().item() * h / (3 * n))
    return weights


def ref_dpm_pp(x0_of, x, alphas, sigmas, order):
    """F37 transcribed: x' = (sigma' / sigma) x + alpha' sum_j w_j x0_j, w from ref_exp_weights.
    Order 2 is ref_dpm_pp_2m (F32). Order 1: the node 0. Order 3: predict with the nodes (0,
    -h_prev) (0 alone at the first step), call x0_of at the predicted point, then redo the step
    with (h, 0, -h_prev), the new prediction at h; the last step is not corrected (no call after
    it). A last point with sigma = 0 returns the latest prediction."""
    if order == 2:
        return ref_dpm_pp_2m(x0_of, x, alphas, sigmas)
    lam = [math.log(a / s) if s > 0 else None for a, s in zip(alphas, sigmas)]
    preds, n = [x0_of(x, 0)], len(alphas) - 1
    for i in range(n):
        if sigmas[i + 1] == 0:
            return preds[-1]
        h = lam[i + 1] - lam[i]
        nodes = [0.0] if order == 1 or i == 0 else [0.0, lam[i - 1] - lam[i]]
        move = lambda nodes: sigmas[i + 1] / sigmas[i] * x + alphas[i + 1] * sum(
            w * p for w, p in zip(ref_exp_weights(h, nodes), preds[::-1]))
        x_new = move(nodes)
        if i < n - 1:
            preds.append(x0_of(x_new, i + 1))
            if order == 3:
                x_new = move([h] + nodes)
        x = x_new
    return x


def ref_s_of_lambda_vp(lam):
    """F23 inverted for VP: lambda = -1/2 log(e^B - 1), so B = log(1 + e^(-2 lambda)) and s solves
    beta_min s + (beta_max - beta_min) s^2 / 2 = B."""
    B, (b0, b1) = torch.log1p(torch.exp(-2 * torch.as_tensor(lam, dtype=F64))), VP.values()
    return ((b0 ** 2 + 2 * (b1 - b0) * B).sqrt() - b0) / (b1 - b0)


def ref_t_of_lambda(ab, lam):
    """t (not rounded) where lambda = log sqrt(ab / (1 - ab)), log ab linear between steps."""
    L, l_target = ab.log(), -math.log1p(math.exp(-2 * lam))
    k = max(k for k in range(len(ab) - 1) if L[k] >= l_target)
    return k + (l_target - L[k].item()) / (L[k + 1] - L[k]).item()


@pytest.mark.parametrize("order", [1, 3])
def test_F37_dpm_solver_pp_orders_1_and_3_are_the_written_update(order):
    """[F37, F32] on a three-step grid (discrete: t = 1000, 600, 200, 30; VP SDE: s = 1, 0.5, 0.2,
    0.01) both samplers' outputs on mixture points equal F37 transcribed here with weights by
    quadrature (1e-10), calling the model once per step (three calls); on N(MU, SIGMA) the
    exact output law equals the transcription's (1e-9)."""
    sched, ab = _linear_sched()
    x = torch.randn(64, 2, generator=_gen(53), dtype=F64)
    taus = [1000, 600, 200, 30]
    a, sg = [ab[t].sqrt().item() for t in taus], [(1 - ab[t]).sqrt().item() for t in taus]
    for score, data_x, d in ((ref_mix_score, x, 2), (ref_gauss_score, None, 3)):
        em = ref_eps_model(score, ab)
        x0_of = lambda y, i: (y - sg[i] * em(y, torch.full((len(y),), taus[i]))) / a[i]
        calls = []
        run = lambda y: ds.dpm_solver_sample(ref_eps_model(score, ab, calls), sched, y,
                                             steps=taus, order=order)
        ref = lambda y: ref_dpm_pp(x0_of, y, a, sg, order)
        if data_x is not None:
            assert torch.allclose(run(x), ref(x), rtol=1e-10, atol=1e-10)
            assert _visited(calls) == taus[:-1]
        else:
            ref_assert_same_law(ref_affine_law(run, d), ref_affine_law(ref, d))
    s = [1.0, 0.5, 0.2, 0.01]
    m, v, _, _ = ref_sde_coefs("vp", torch.tensor(s, dtype=F64))
    for score, d in ((ref_mix_score, 2), (ref_gauss_score, 3)):
        score_fn, calls = ref_sde_score(score, "vp"), []
        counted = lambda y, u: (calls.append(u[0].item()), score_fn(y, u))[1]
        x0_of = lambda y, i: (y + v[i] * score_fn(y, torch.full((len(y),), s[i], dtype=F64))) / m[i]
        run = lambda y: ds.dpm_solver_sde_sample(counted, ds.VPSDE(**VP), y, steps=s, order=order)
        ref = lambda y: ref_dpm_pp(x0_of, y, m.tolist(), v.sqrt().tolist(), order)
        if d == 2:
            assert torch.allclose(run(x), ref(x), rtol=1e-10, atol=1e-10)
            assert calls == s[:-1]
        else:
            ref_assert_same_law(ref_affine_law(run, d), ref_affine_law(ref, d))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_F37_observed_order_of_convergence(order):
    """[F37, F32, F35] from an exact start (x drawn from the marginal at lambda = -1) to lambda =
    2.5 on grids uniform in lambda with K = 20 and 40 steps, the exact W2 error against the exact
    flow's output law (the marginal at the end: the flow carries marginals, F26) falls by 2^p per
    doubling, p within 0.3 of the order. VP SDE (exact score) and the linear T = 1000 schedule
    (exact eps; the 40-step grid is rounded to integers, the 20-step grid every other point).
    Measured p: 0.99, 1.90, 3.00 (VP); 0.98, 1.89, 3.01 (discrete)."""
    sched, ab = _linear_sched()
    law = lambda m, v: (m * MU, m ** 2 * SIGMA + v * torch.eye(3, dtype=F64))
    lams = torch.linspace(-1.0, 2.5, 81, dtype=F64)
    errors = {"vp": [], "discrete": []}
    for K in (20, 40):
        s = ref_s_of_lambda_vp(lams[::80 // K]).tolist()
        (m0, m1), (v0, v1) = (ref_sde_coefs("vp", torch.tensor([s[0], s[-1]], dtype=F64))[k]
                              for k in (0, 1))
        start, cov = law(m0, v0)
        chol = torch.linalg.cholesky(cov)
        out = ref_affine_law(lambda z: ds.dpm_solver_sde_sample(
            ref_sde_score(ref_gauss_score, "vp"), ds.VPSDE(**VP), start + z @ chol.T, steps=s,
            order=order), 3)
        errors["vp"].append(ref_w2(*out, *law(m1, v1)))
        taus = [round(ref_t_of_lambda(ab, lam)) for lam in lams[::40 // K].tolist()][::2]
        (a0, a1) = ab[taus[0]].item(), ab[taus[-1]].item()
        start, cov = law(math.sqrt(a0), 1 - a0)
        chol = torch.linalg.cholesky(cov)
        out = ref_affine_law(lambda z: ds.dpm_solver_sample(
            ref_eps_model(ref_gauss_score, ab), sched, start + z @ chol.T, steps=taus,
            order=order), 3)
        errors["discrete"].append(ref_w2(*out, *law(math.sqrt(a1), 1 - a1)))
    for name, (coarse, fine) in errors.items():
        assert abs(math.log2(coarse / fine) - order) < 0.3, (name, coarse, fine)


def ref_flow_floor(m0, v0, m1, v1, mu=MU, cov=SIGMA):
    """F: W2 to N(mu, cov) of the exact probability flow (F26) started from N(0, I) at the time of
    (m0, v0) and stopped at (m1, v1). For Gaussian data the flow is the monotone map between the
    marginals C_t = m_t^2 cov + v_t I (they commute): x -> m1 mu + R (x - m0 mu), R =
    C_1^{1/2} C_0^{-1/2}, so N(0, I) goes to N(m1 mu - R m0 mu, R R^T)."""
    lam, Q = torch.linalg.eigh(cov)
    R = Q @ torch.diag(((m1 ** 2 * lam + v1) / (m0 ** 2 * lam + v0)).sqrt()) @ Q.T
    return ref_w2(m1 * mu - R @ (m0 * mu), R @ R.T, mu, cov)


def ref_2m_first_corrected(x0_of, x, alphas, sigmas):
    """F38's K = 5 rule transcribed: the first step predicted by DDIM, x0_of called at the
    predicted point, the step redone with the line through (0, x0_0) and (h, x0_1) integrated
    exactly (k_0 = 1 - e^-h, k_1 = h - 1 + e^-h); then 2M (F32) with x0_1 the predicted point's."""
    lam = [math.log(a / s) for a, s in zip(alphas, sigmas)]
    h = lam[1] - lam[0]
    p0 = x0_of(x, 0)
    pred = sigmas[1] / sigmas[0] * x + alphas[1] * (1 - math.exp(-h)) * p0
    preds = [p0, x0_of(pred, 1)]
    x = sigmas[1] / sigmas[0] * x + alphas[1] * ((1 - math.exp(-h)) * p0 + (
        h - 1 + math.exp(-h)) / h * (preds[1] - p0))
    for i in range(1, len(alphas) - 1):
        if i > 1:
            preds.append(x0_of(x, i))
        h, r = lam[i + 1] - lam[i], (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
        D = (1 + 1 / (2 * r)) * preds[-1] - 1 / (2 * r) * preds[-2]
        x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * (math.exp(-h) - 1) * D
    return x


def test_F38_five_calls_correct_the_first_step():
    """[F38, F37] with steps = 5 and order 2 both samplers correct the first step (DDIM predictor,
    the nodes (h, 0)), then take 2M: equal to the transcription on mixture points (1e-10) with 5
    calls; an explicit grid of the same times (or order 1) is not corrected."""
    sched, ab = _linear_sched()
    x = torch.randn(64, 2, generator=_gen(59), dtype=F64)
    calls = []
    out = ds.dpm_solver_sample(ref_eps_model(ref_mix_score, ab, calls), sched, x, steps=5)
    taus = _visited(calls) + [round(ref_t_of_lambda(ab, 3.5))]
    a, sg = [ab[t].sqrt().item() for t in taus], [(1 - ab[t]).sqrt().item() for t in taus]
    em = ref_eps_model(ref_mix_score, ab)
    x0_of = lambda y, i: (y - sg[i] * em(y, torch.full((len(y),), taus[i]))) / a[i]
    assert len(taus) == 6 and torch.allclose(out, ref_2m_first_corrected(x0_of, x, a, sg),
                                             rtol=1e-10, atol=1e-10)
    plain = ds.dpm_solver_sample(em, sched, x, steps=taus)
    assert torch.allclose(plain, ref_dpm_pp_2m(x0_of, x, a, sg), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(plain, out, atol=1e-3)
    sde, n = ds.VPSDE(**VP), [0]
    m1, v1, _, _ = ref_sde_coefs("vp", 1.0)                # F38's K = 5 nodes, written out
    lam0 = max(math.log(m1 / math.sqrt(v1)), -5.03)
    fracs = (0.338, 0.505, 0.673, 0.819, 1.0)
    s = [1.0, *ref_s_of_lambda_vp([lam0 + (3.5 - lam0) * f for f in fracs]).tolist()]
    m, v, _, _ = ref_sde_coefs("vp", torch.tensor(s, dtype=F64))
    score_fn = ref_sde_score(ref_mix_score, "vp")
    counted = lambda y, u: (n.__setitem__(0, n[0] + 1), score_fn(y, u))[1]
    x0_of = lambda y, i: (y + v[i] * score_fn(y, torch.full((len(y),), s[i], dtype=F64))) / m[i]
    out = ds.dpm_solver_sde_sample(counted, sde, x, steps=5)
    assert n[0] == 5 and torch.allclose(
        out, ref_2m_first_corrected(x0_of, x, m.tolist(), v.sqrt().tolist()), rtol=1e-10,
        atol=1e-10)
    assert torch.allclose(ds.dpm_solver_sde_sample(score_fn, sde, x, steps=s),
                          ref_dpm_pp_2m(x0_of, x, m.tolist(), v.sqrt().tolist()), rtol=1e-10,
                          atol=1e-10)
    assert torch.allclose(ds.dpm_solver_sde_sample(score_fn, sde, x, steps=5, order=1),
                          ref_dpm_pp(x0_of, x, m.tolist(), v.sqrt().tolist(), 1), rtol=1e-10,
                          atol=1e-10)


@pytest.mark.parametrize("K", [5, 10, 20])
def test_F38_default_grids_reach_the_prior_floor(K):
    """[F38, F37, F32] at K model calls both samplers' defaults (eps on the linear T = 1000
    schedule; VP score) give an exact output law on N(MU, SIGMA) (not in the grid's fitting family)
    within W2 <= F + 0.75 / K^2 of the data, F the prior floor: the W2 to the data of the exact flow
    from N(0, I) at the start all the way to the data (m = 1, v = 0), the prior mismatch that no
    solver removes; the samplers stop short of the data (F38), and that costs them too."""
    sched, ab = _linear_sched()
    law = ref_affine_law(lambda y: ds.dpm_solver_sample(ref_eps_model(ref_gauss_score, ab), sched,
                                                        y, steps=K), 3)
    a0 = ab[-1].item()
    floor = ref_flow_floor(math.sqrt(a0), 1 - a0, 1.0, 0.0)
    assert ref_w2(*law, MU, SIGMA) <= floor + 0.75 / K ** 2
    law = ref_affine_law(lambda y: ds.dpm_solver_sde_sample(
        ref_sde_score(ref_gauss_score, "vp"), ds.VPSDE(**VP), y, steps=K), 3)
    m0, v0, _, _ = ref_sde_coefs("vp", 1.0)
    assert ref_w2(*law, MU, SIGMA) <= ref_flow_floor(m0, v0, 1.0, 0.0) + 0.75 / K ** 2


def test_F37_F38_steps_count_the_model_calls():
    """[F37, F38] steps = K means K calls of the model for every order, both samplers, K = 1..20
    (T = 1000, and short chains T = 25 and 20 where rounding must keep the integer steps distinct
    and K = T = 20 ends at t = 0); the discrete grid starts at T and descends strictly; a bad
    order raises."""
    for T in (1000, 25, 20):
        sched, ab = _linear_sched(T)
        for K in range(1, 21):
            for order in (1, 2, 3):
                calls = []
                ds.dpm_solver_sample(ref_eps_model(ref_mix_score, ab, calls), sched,
                                     torch.zeros(2, 2, dtype=F64), steps=K, order=order)
                grid = _visited(calls)
                assert len(grid) == K and grid[0] == T
                assert all(a > b >= 1 for a, b in zip(grid, grid[1:]))
                n = [0]
                ds.dpm_solver_sde_sample(lambda y, u: (n.__setitem__(0, n[0] + 1), -y)[1],
                                         ds.VPSDE(**VP), torch.zeros(2, 2), steps=K, order=order)
                assert n[0] == K
    for bad in (0, 4, 2.0, "3"):
        with pytest.raises(ValueError, match=f"order must be one of .*got {bad!r}"):
            ds.dpm_solver_sample(ref_eps_model(ref_mix_score, ab), sched, torch.zeros(2, 2),
                                 order=bad)
        with pytest.raises(ValueError, match="order"):
            ds.dpm_solver_sde_sample(lambda y, u: -y, ds.VPSDE(**VP), torch.zeros(2, 2),
                                     order=bad)


# --- controllable generation [F30, F31] -----------------------------------------------------------

# Guidance is checked where p_s(y | x) is known in closed form: a 2-D mixture of isotropic Gaussians
# under the VP SDE (F23) and the linear DDPM schedule (F3); inpainting and colorization on Gaussian
# data, where the exact conditional is a Schur complement and the replacement sampler's exact
# output law can be propagated step by step (it is affine in its noise). References (ref_g_) are
# written here from FORMULAS.md, never with the module's helpers.

G_MIX_W = torch.tensor([0.45, 0.35, 0.2], dtype=F64)
G_MIX_MU = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
G_MIX_C = torch.tensor([0.3, 0.25, 0.25], dtype=F64)   # isotropic std of each component
G_Y = 2               # the class we condition on: the lightest component, weight 0.2
G_N = 10_000          # samples per guided-sampling run
G_SCHED, G_AB = _linear_sched()                      # Ho et al.'s linear schedule, T = 1000
G_GRID = list(range(1000, 0, -5))   # a respaced 200-step grid 1000, 995, ..., 5
G_MIX = (G_MIX_W, G_MIX_MU, G_MIX_C)


def ref_g_vp(s):
    """VP marginal x_s = m x0 + sqrt(v) z as (m, v) (F23, via ref_sde_coefs)."""
    return ref_sde_coefs("vp", s)[:2]


def ref_g_ddpm(t):
    """DDPM marginal x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps as (m, v). [F3]"""
    return G_AB[t].sqrt(), 1 - G_AB[t]


def ref_g_component_score(x, m, v, y):
    """grad log N(x; m mu_y, var_y I) = -(x - m mu_y) / var_y: the exact p_s(x | y) score."""
    var = m ** 2 * G_MIX_C[y] ** 2 + v
    return -(x - m[:, None] * G_MIX_MU[y]) / var[:, None]


def ref_g_log_posterior(x, m, v, y):
    """log p_s(y | x) = log w_y N_y(x) - log sum_k w_k N_k(x), per example (B,). [F30]"""
    logp, *_ = ref_mix_terms(x, m, v, G_MIX)
    return logp[y] - torch.logsumexp(logp, 0)


def ref_g_mixture_fns(coefs, y):
    """(unconditional score, log p(y | x), conditional score) as functions of (x, time), the
    time mapped to (m, v) by ``coefs`` (ref_g_vp for s, ref_g_ddpm for t)."""
    return (lambda x, s: ref_mix_score(x, *coefs(s), G_MIX),
            lambda x, s: ref_g_log_posterior(x, *coefs(s), y),
            lambda x, s: ref_g_component_score(x, *coefs(s), y))


def ref_g_nearest(x):
    """Index of the mixture mean nearest to each point."""
    return ((x[:, None, :] - G_MIX_MU) ** 2).sum(-1).argmin(1)


def ref_g_p_nearest_y():
    """P(nearest mean is mu_y) for x ~ N(mu_y, c_y^2 I), the exact conditional p(x | y).
    mu_y = (0, 1) is closer than mu_0 = (-1, 0) iff (x - mu_y).u_0 < d/2 with u_0 = (-1, -1)/sqrt2,
    d = |mu_y - mu_0| = sqrt 2, and likewise for mu_1 with u_1 = (1, -1)/sqrt2. u_0 and u_1 are
    orthogonal, so the two projections are independent N(0, c_y^2): P = Phi(d / (2 c_y))^2."""
    z = math.sqrt(2) / 2 / G_MIX_C[G_Y].item()
    return (0.5 * (1 + math.erf(z / math.sqrt(2)))) ** 2


@settings(deadline=None)
@given(seed=seeds, y=st.integers(0, 2), w=st.floats(-2.0, 8.0))
def test_F30_guided_score_is_bayes_rule_for_scores(seed, y, w):
    """[F30] with the exact noised mixture score and log p_s(y | x) written here, guided_score at
    w = 1 is the score of component y's noised density, at random points and noise levels;
    w = 0 is the unconditional score; general w is uncond + w (cond - uncond); and p(y) drops out
    (log p(x | y) - log p(x) = log p(y | x) - log p(y) gives the same score)."""
    g = torch.Generator().manual_seed(seed)
    s = 1e-3 + (1 - 1e-3) * torch.rand(16, generator=g, dtype=F64)
    x = 2 * torch.randn(16, 2, generator=g, dtype=F64)   # near and far from every mode
    score, log_lik, cond = ref_g_mixture_fns(ref_g_vp, y)
    uncond_s, cond_s = score(x, s), cond(x, s)
    atol = RTOL * cond_s.abs().max().item()
    assert_close64(ds.guided_score(score, log_lik, 1)(x, s), cond_s, atol=atol)
    assert torch.equal(ds.guided_score(score, log_lik, 0)(x, s), uncond_s)
    scale = (1 + abs(w)) * (uncond_s.abs().max() + cond_s.abs().max()).item()
    assert_close64(ds.guided_score(score, log_lik, w)(x, s), uncond_s + w * (cond_s - uncond_s),
                   atol=RTOL * scale)

    def log_lik_over_p_y(x, s):   # log N_y(x) - log p(x): no w_y, i.e. log p(y | x) - log p(y)
        logp, *_ = ref_mix_terms(x, *ref_g_vp(s), G_MIX)
        return logp[y] - G_MIX_W[y].log() - torch.logsumexp(logp, 0)
    assert_close64(ds.guided_score(score, log_lik_over_p_y, 1)(x, s), cond_s, atol=atol)


@settings(deadline=None)
@given(seed=seeds, y=st.integers(0, 2), w=st.floats(-2.0, 8.0))
def test_F30_classifier_free_guidance_is_f30_with_weight_1_plus_w(seed, y, w):
    """[F30] classifier_free(cond, uncond, w) is the conditional score at w = 0 (bitwise), is
    (1 + w) cond - w uncond, and, with exact scores, equals uncond + (1 + w) grad log p_s(y | x),
    i.e. classifier guidance with weight 1 + w."""
    g = torch.Generator().manual_seed(seed)
    s = 1e-3 + (1 - 1e-3) * torch.rand(16, generator=g, dtype=F64)
    x = 2 * torch.randn(16, 2, generator=g, dtype=F64)
    score, log_lik, cond = ref_g_mixture_fns(ref_g_vp, y)
    assert torch.equal(ds.classifier_free(cond, score, 0)(x, s), cond(x, s))
    cfg = ds.classifier_free(cond, score, w)(x, s)
    scale = (1 + abs(w)) * (cond(x, s).abs().max() + score(x, s).abs().max()).item()
    assert_close64(cfg, (1 + w) * cond(x, s) - w * score(x, s), atol=RTOL * scale)
    with torch.enable_grad():   # the classifier gradient, by autograd of log p_s(y | x) here
        x_ = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(log_lik(x_, s).sum(), x_)[0]
    assert_close64(cfg, score(x, s) + (1 + w) * grad, atol=RTOL * scale)
    assert_close64(cfg, ds.guided_score(score, log_lik, 1 + w)(x, s), atol=RTOL * scale)


@functools.lru_cache(maxsize=None)
def ref_g_guided_samples(sampler, w):
    """G_N samples of the mixture guided towards G_Y with weight w (cached: tests share runs).
    DDPM gets eps = -sqrt(1 - alpha_bar_t) score (F21) on the 200-step grid; the reverse SDE
    500 Euler-Maruyama steps; the probability-flow ODE 50 RK4 steps; all from the same x_T."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(G_N, 2, generator=g, dtype=F64)
    if sampler == "ddpm":
        guided = ds.guided_score(*ref_g_mixture_fns(ref_g_ddpm, G_Y)[:2], w)
        eps = lambda x, t: -(1 - G_AB[t]).sqrt()[:, None] * guided(x, t)
        return ds.ddpm_sample(eps, G_SCHED, x, steps=G_GRID, generator=g)
    guided = ds.guided_score(*ref_g_mixture_fns(ref_g_vp, G_Y)[:2], w)
    if sampler == "reverse_sde":
        return ds.reverse_sde_sample(guided, ds.VPSDE(**VP), x, steps=500, generator=g)
    return ds.ode_sample(guided, ds.VPSDE(**VP), x, steps=50, method="rk4")


@pytest.mark.parametrize("sampler", ["reverse_sde", "ode", "ddpm"])
def test_F30_guided_sampling_with_w1_draws_the_class_conditional(sampler):
    """[F30, F24, F26, F9] sampling with the exact guided score (w = 1) draws p(x | y) = N(mu_y,
    c_y^2 I) (unconditionally only 20% of the mass is there): the fraction of samples nearest to
    mu_y is the exact P = Phi(sqrt2 / (2 c_y))^2 = 0.99533 within 5 binomial standard errors
    (SE = sqrt(P (1 - P) / n) = 0.00068, so the fraction lies in [0.9919, 0.9987], above 99%).
    Each sampler's own discretization moves P by at most 1.1 SE (the exact output law of the same
    sampler on N(mu_y, c_y^2 I) gives P = 0.99457 for DDPM on 200 steps, 0.99535 for the reverse
    SDE, 0.99522 for the ODE). Measured: 0.9969 (SDE), 0.9941 (ODE), 0.9944 (DDPM)."""
    x = ref_g_guided_samples(sampler, 1.0)
    frac = (ref_g_nearest(x) == G_Y).double().mean().item()
    p = ref_g_p_nearest_y()
    se = math.sqrt(p * (1 - p) / len(x))
    assert abs(frac - p) <= N_SE * se, (frac, p, se)


@pytest.mark.parametrize("sampler", ["ode", "ddpm"])
def test_F30_guidance_w4_concentrates_the_samples_further(sampler):
    """[F30] w = 4 (the tilt p_s(x) p_s(y | x)^4) versus w = 1, same sampler and same x_T:
    (a) fewer samples outside mode y: count out_1 - out_4 > 5 sqrt(out_1 + out_4), the Poisson SE
    of a difference of counts (measured: DDPM 56 -> 0, ODE 59 -> 0 of 10^4 samples);
    (b) a smaller spread: the mean of q = ||x - mean(x)||^2 (the covariance trace) drops by more
    than 5 SE, SE^2 = var(q_1) / n + var(q_4) / n (measured: DDPM 0.133 -> 0.108, ODE 0.128 ->
    0.036, SE of the difference ~0.0015). The mean also moves away from the other modes (DDPM:
    mu_y + (0.015, 0.176)). The runs share x_T, so they are positively correlated and these
    independent-sample SEs overstate the noise of the differences: the checks are conservative."""
    x1, x4 = ref_g_guided_samples(sampler, 1.0), ref_g_guided_samples(sampler, 4.0)
    out1, out4 = ((ref_g_nearest(x) != G_Y).sum().item() for x in (x1, x4))
    assert out1 - out4 > N_SE * math.sqrt(out1 + out4), (out1, out4)
    q1, q4 = (((x - x.mean(0)) ** 2).sum(1) for x in (x1, x4))
    se = math.sqrt((q1.var() / len(q1) + q4.var() / len(q4)).item())
    assert q1.mean().item() - q4.mean().item() > N_SE * se, (q1.mean(), q4.mean(), se)


# Inpainting and colorization: Gaussian data, exact laws -------------------------------------------

G_MU4 = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=F64)
G_SIGMA4 = torch.tensor([[1.0, 0.6, 0.3, 0.2], [0.6, 1.0, 0.5, 0.1],
                         [0.3, 0.5, 0.8, 0.4], [0.2, 0.1, 0.4, 0.6]], dtype=F64)
# eigenvalues of G_SIGMA4: 0.161, 0.488, 0.753, 1.997
G_KNOWN4, G_UNKNOWN4 = [1, 3], [0, 2]
G_XK4 = torch.tensor([1.2, -0.8], dtype=F64)            # the known values x_k
G_MU3 = torch.tensor([0.2, 0.0, -0.3], dtype=F64)        # a 3-channel pixel, correlated colours
G_SIGMA3 = torch.tensor([[0.5, 0.3, 0.1], [0.3, 0.4, 0.2], [0.1, 0.2, 0.3]], dtype=F64)
G_GREY = torch.tensor([0.4, -0.5], dtype=F64)   # the grey of the two pixels of a (3, 1, 2) image


def ref_g_condition(mu, cov, Q, xk):
    """N(mu, cov) conditioned on Q^T x = xk (Q orthonormal columns), by the Schur complement:
    mean mu + cov Q (Q^T cov Q)^{-1} (xk - Q^T mu), cov - cov Q (Q^T cov Q)^{-1} Q^T cov.
    For Q = the known coordinates' columns of I this is mu_u + S_uk S_kk^{-1} (x_k - mu_k),
    S_uu - S_uk S_kk^{-1} S_ku on the unknown block (and x_k, 0 on the known one)."""
    G = cov @ Q @ torch.linalg.inv(Q.T @ cov @ Q)
    return mu + G @ (xk - Q.T @ mu), cov - G @ Q.T @ cov


def ref_g_replace(mean, cov, Q, xk, scale, var):
    """F31 replacement in law: x := P x + Q (scale xk + sqrt(var) z), P = I - Q Q^T, z fresh."""
    P = torch.eye(len(mean), dtype=F64) - Q @ Q.T
    return P @ mean + scale * Q @ xk, P @ cov @ P + var * Q @ Q.T


def ref_g_ddpm_inpaint_law(mu, cov, Q, xk, grid):
    """Exact law of ancestral DDPM (sigma^2 = beta', ref_ddpm_steps) on a grid from T with the
    exact eps of N(mu, cov) and the F31 replacement at the start and after every step, with a
    sample of q(x_t' | xk) at the new step (exactly xk at the end)."""
    taus = list(grid) + [0]
    law = ref_g_replace(torch.zeros(len(mu), dtype=F64), torch.eye(len(mu), dtype=F64), Q, xk,
                        G_AB[taus[0]].sqrt(), 1 - G_AB[taus[0]])
    for step, t_prev in zip(ref_ddpm_steps(grid, G_AB, "beta", mu, cov), taus[1:]):
        law = ref_g_replace(*ref_propagate([step], *law), Q, xk, G_AB[t_prev].sqrt(),
                            1 - G_AB[t_prev])
    return law


def ref_g_sde_inpaint_law(mu, cov, Q, xk, steps, eps_s=1e-3):
    """Exact law of Euler-Maruyama on the VP reverse SDE (ref_sde_steps) from s = 1 to eps_s with
    the exact score of N(mu, cov) and the F31 replacement with p_{0s'}(x_s' | xk) at the start and
    after every step (exactly xk at the end)."""
    grid = torch.linspace(1.0, eps_s, steps + 1, dtype=F64).tolist()
    law = ref_g_replace(torch.zeros(len(mu), dtype=F64), torch.eye(len(mu), dtype=F64), Q, xk,
                        *ref_g_vp(1.0))
    for i, step in enumerate(ref_sde_steps("vp", steps, eps_s, False, mu, cov)):
        m_v = (1.0, 0.0) if i == steps - 1 else ref_g_vp(grid[i + 1])
        law = ref_g_replace(*ref_propagate([step], *law), Q, xk, *m_v)
    return law


def g_inpaint_run(sampler, x, generator=None):
    """ddpm_sample (exact eps, F21) or reverse_sde_sample (exact VP score) on N(G_MU4, G_SIGMA4)
    with G_XK4 known on G_KNOWN4; known and mask shaped like x."""
    known, mask = torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
    known[:, G_KNOWN4], mask[:, G_KNOWN4] = G_XK4, True
    if sampler == "ddpm":
        eps = ref_eps_model(lambda y, m, v: ref_gauss_score(y, m, v, G_MU4, G_SIGMA4), G_AB)
        return ds.ddpm_sample(eps, G_SCHED, x, steps=G_GRID, generator=generator, known=known,
                              mask=mask), known, mask
    score = lambda x, s: ref_gauss_score(x, *ref_g_vp(s[0]), G_MU4, G_SIGMA4)
    return ds.reverse_sde_sample(score, ds.VPSDE(**VP), x, steps=200, generator=generator,
                                 known=known, mask=mask), known, mask


# The replacement method's gap (exact, from the propagated law) on the unknown coordinates 0, 2:
# exact conditional mean (1.1746, 0.3864), covariance [[0.6068, -0.0831], [-0.0831, 0.3424]];
# DDPM, 200 steps:   mean (0.8883, 0.3703), covariance [[0.7123, 0.0043], [0.0043, 0.4445]];
# VP SDE, 200 EM steps: mean (0.8949, 0.3725), covariance [[0.7126, 0.0023], [0.0023, 0.4409]].
# Max |mean error| 0.286 (DDPM) / 0.280 (SDE): only 58% of coordinate 0's conditional shift
# 1.1746 - 0.5 is recovered; max |covariance error| 0.106 / 0.106 (variances too large by
# 0.10, the correlation -0.08 lost). KL(law || conditional) = 0.125 / 0.119 nats against 1.046
# for the prior N(mu_u, S_uu). With all 1000 steps the gaps are 0.283 / 0.102 (DDPM) and
# 0.282 / 0.102 (SDE): they are the method's, not the discretization's.
G_INPAINT_GAP = {"ddpm": (0.2863, 0.1055), "reverse_sde": (0.2797, 0.1058)}


@pytest.mark.parametrize("sampler", ["ddpm", "reverse_sde"])
def test_F31_inpainting_keeps_the_known_part_and_fills_in_near_the_conditional(sampler):
    """[F31, F9, F24] inpainting a correlated 4-D Gaussian with its exact score:
    (1) the module's exact output law (noise-basis trick) is the F31 replacement sampler's law
    propagated here, to rounding; (2) 10^4 samples keep the known coordinates bitwise equal to
    ``known`` and match that law within 5 SE; (3) the law's gap to the exact conditional (Schur
    complement) is the replacement method's, stated above (max |mean error| and max |covariance
    error| over the unknown block), and it is closer to the conditional than the prior is."""
    Q = torch.eye(4, dtype=F64)[:, G_KNOWN4]
    law = (ref_g_ddpm_inpaint_law(G_MU4, G_SIGMA4, Q, G_XK4, G_GRID) if sampler == "ddpm" else
           ref_g_sde_inpaint_law(G_MU4, G_SIGMA4, Q, G_XK4, 200))
    module_law = ref_affine_law(lambda x: g_inpaint_run(sampler, x)[0], (4,))
    assert_close64(module_law[0], law[0], atol=1e-9, rtol=0)
    assert_close64(module_law[1], law[1], atol=1e-9, rtol=0)

    g = torch.Generator().manual_seed(1)
    x, known, mask = g_inpaint_run(sampler, torch.randn(10_000, 4, generator=g, dtype=F64), g)
    assert torch.equal(x[mask], known[mask])
    u = G_UNKNOWN4
    ref_check_gaussian_samples(x[:, u], law[0][u], law[1][u][:, u])

    cond = ref_g_condition(G_MU4, G_SIGMA4, Q, G_XK4)
    mean_gap = (law[0] - cond[0])[u].abs().max().item()
    cov_gap = (law[1] - cond[1])[u][:, u].abs().max().item()
    assert mean_gap == pytest.approx(G_INPAINT_GAP[sampler][0], abs=5e-4)
    assert cov_gap == pytest.approx(G_INPAINT_GAP[sampler][1], abs=5e-4)
    kl = lambda a, b: torch.distributions.kl_divergence(
        *(torch.distributions.MultivariateNormal(m[u], C[u][:, u]) for m, C in (a, b)))
    assert kl(law, cond) < kl((G_MU4, G_SIGMA4), cond) / 4   # 0.125 (0.119) vs 1.046


# The exact eps of N(G_MU3, G_SIGMA3) per pixel (channel dimension 1), noised to step t (F3, F21).
g_colour_eps = ref_eps_model(lambda y, m, v: ref_gauss_score(
    y.movedim(1, -1), m, v, G_MU3, G_SIGMA3).movedim(-1, 1), G_AB)


def g_colorize(y, generator=None):
    """The module's recipe: DDPM in the colour basis with the grey channel known; returns x."""
    known, mask = ds.colorization_known(G_GREY.reshape(1, 1, 1, 2).expand(len(y), 1, 1, 2))
    out = ds.ddpm_sample(ds.in_colour_basis(g_colour_eps), G_SCHED, y, steps=G_GRID,
                         generator=generator, known=known, mask=mask)
    return ds.from_colour_basis(out)


# Colorization gap (exact, propagated law vs the exact conditional given the grey), per pixel:
# grey 0.4: conditional mean (0.6875, 0.4875, 0.0250), replacement (0.6652, 0.4776, 0.0571);
# grey -0.5: conditional (-0.3250, -0.5250, -0.6500), replacement (-0.3010, -0.5144, -0.6846);
# max |mean error| 0.035; covariance (the same for both pixels) too large by at most 0.0048
# (conditional covariance eigenvalues 0 along the grey axis, 0.093, 0.282).
G_COLOUR_GAP = (0.0346, 0.0048)


def test_F31_colorization_keeps_the_grey_and_fills_in_near_the_conditional():
    """[F31] colorizing a 3-channel Gaussian image (B, 3, 1, 2) with correlated channels:
    the result's channel mean is the given grey to float64 rounding (1e-12); the module's exact
    output law equals the replacement along the grey axis e = (1, 1, 1) / sqrt3 propagated here in
    x space (x := (I - e e^T) x + e (sqrt(ab) sqrt3 grey + sqrt(1 - ab) z), which needs no colour
    basis); 10^4 samples match it within 5 SE; its gap to the exact conditional given the grey
    (Schur complement on e^T x = sqrt3 grey) is the stated one."""
    e = torch.ones(3, 1, dtype=F64) / math.sqrt(3)
    laws = [ref_g_ddpm_inpaint_law(G_MU3, G_SIGMA3, e, math.sqrt(3) * g.reshape(1), G_GRID)
            for g in G_GREY]
    mean, cov = torch.zeros(6, dtype=F64), torch.zeros(6, 6, dtype=F64)
    for p, (m, C) in enumerate(laws):      # flattened (3, 1, 2): channel c of pixel p is 2 c + p
        idx = torch.tensor([p, 2 + p, 4 + p])
        mean[idx], cov[idx[:, None], idx] = m, C
    module_law = ref_affine_law(g_colorize, (3, 1, 2))
    assert_close64(module_law[0], mean, atol=1e-9, rtol=0)
    assert_close64(module_law[1], cov, atol=1e-9, rtol=0)

    g = torch.Generator().manual_seed(2)
    x = g_colorize(torch.randn(10_000, 3, 1, 2, generator=g, dtype=F64), g)
    assert_close64(x.mean(1), G_GREY.reshape(1, 1, 2).expand(len(x), 1, 2), atol=1e-12, rtol=0)
    for p, (m, C) in enumerate(laws):
        ref_check_gaussian_samples(x[:, :, 0, p], m, C)

    gaps = []
    for g_p, (m, C) in zip(G_GREY, laws):
        cm, cC = ref_g_condition(G_MU3, G_SIGMA3, e, math.sqrt(3) * g_p.reshape(1))
        gaps.append(((m - cm).abs().max().item(), (C - cC).abs().max().item()))
    assert max(a for a, _ in gaps) == pytest.approx(G_COLOUR_GAP[0], abs=5e-4)
    assert max(b for _, b in gaps) == pytest.approx(G_COLOUR_GAP[1], abs=5e-4)


# Score wrappers keep their graph; an energy inside a sampler [F14, F24, F27, F30, F31] ------------

def ref_laplacian(logp, x):
    """Laplacian of a log-density, the divergence its score must have, by double autograd."""
    return ref_trace_jacobian(lambda y: torch.autograd.grad(logp(y).sum(), y,
                                                            create_graph=True)[0], x)


def test_F27_F30_F14_F31_score_wrappers_have_the_divergence_of_their_log_density():
    """[F27, F30, F14, F31] ode_likelihood takes the divergence of a score by autograd, so a
    wrapper must keep its graph in x: the Jacobian trace of guided_score (w = 2), classifier_free,
    energy_score and in_colour_basis equals the Laplacian of the log-density each represents
    (autograd here). A guided score that detached x would miss w tr(Hessian of log p(y | x))."""
    x = torch.randn(8, 3, generator=_gen(44), dtype=F64)
    s = torch.full((8,), 0.5, dtype=F64)
    log_p = lambda y: -0.5 * (y ** 2).sum(1)
    log_lik = lambda y, _s: torch.sin(y).sum(1) + (y[:, 0] * y[:, 1]) ** 2
    score = lambda y, _s: -y
    guided = ds.guided_score(score, log_lik, 2.0)
    assert torch.allclose(ref_trace_jacobian(lambda y: guided(y, s), x),
                          ref_laplacian(lambda y: log_p(y) + 2.0 * log_lik(y, s), x), rtol=1e-10)
    log_c = lambda y: -0.5 * ((y - 1) ** 2 / 0.3).sum(1)
    cond = lambda y, _s: -(y - 1) / 0.3
    cfg = ds.classifier_free(cond, score, 1.5)
    assert torch.allclose(ref_trace_jacobian(lambda y: cfg(y, s), x),
                          ref_laplacian(lambda y: 2.5 * log_c(y) - 1.5 * log_p(y), x), rtol=1e-10)
    energy = lambda y, _s: (y ** 4).sum(1) / 4 + torch.cos(y[:, 0] * y[:, 2])
    es = ds.energy_score(energy)
    assert torch.allclose(ref_trace_jacobian(lambda y: es(y, s), x),
                          ref_laplacian(lambda y: -energy(y, s), x), rtol=1e-10)
    col_score = ds.in_colour_basis(lambda y, _s: es(y, _s))
    assert torch.allclose(ref_trace_jacobian(lambda y: col_score(y, s), x),
                          ref_laplacian(lambda y: -energy(ds.from_colour_basis(y), s), x),
                          rtol=1e-10)


def ref_g_noised_gauss_energy(x, s, mu=G_MU3, cov=G_SIGMA3):
    """-log N(x; m mu, C) + const = 1/2 (x - m mu)^T C^{-1} (x - m mu), C = m^2 cov + v I. [F23]"""
    (m, v), r = ref_g_vp(s[0]), x - ref_g_vp(s[0])[0] * mu
    C = m ** 2 * cov + v * torch.eye(len(mu), dtype=F64)
    return 0.5 * (r * torch.linalg.solve(C, r.T).T).sum(1)


def test_F14_F24_energy_score_works_inside_a_no_grad_sampler():
    """[F14, F24] under no_grad the wrapper returns a plain tensor (no graph, no parameter
    gradients), and reverse_sde_sample with the energy of the noised Gaussian gives the same
    samples as with its closed-form score (same generator seed)."""
    net, E = g_energy_net(3, 0)
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(8, 3, generator=g, dtype=F64), torch.rand(8, generator=g, dtype=F64)
    with torch.no_grad():
        out = ds.energy_score(E)(x, s)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in net.parameters())
    score = lambda x, s: ref_gauss_score(x, *ref_g_vp(s[0]), G_MU3, G_SIGMA3)
    runs = [ds.reverse_sde_sample(fn, ds.VPSDE(**VP), torch.ones(32, 3, dtype=F64), steps=20,
                                  generator=torch.Generator().manual_seed(3))
            for fn in (ds.energy_score(ref_g_noised_gauss_energy), score)]
    assert not runs[0].requires_grad
    assert_close64(runs[0], runs[1], atol=1e-12, rtol=1e-9)


# --- across sections: every sampler, reproducibility, shapes, argument checks ---------------------

@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: host synchronization is a GPU-stream question")
def test_F6_F24_F26_F29_F32_sampler_steps_never_synchronize_with_the_host():
    """[F6, F24, F26, F28, F29, F32] a few steps of every fixed-step sampler on CUDA under
    torch.cuda.set_sync_debug_mode('error'): validation and coefficients come before the loop,
    so no step waits for the device (rk45 is adaptive and syncs once per attempt by design)."""
    dev = torch.device("cuda")
    sched, ab = _linear_sched(50)
    ab_d = ab.to(dev)
    eps_model = lambda x, t: (1 - ab_d[t]).sqrt()[:, None] * x
    score_fn = lambda x, s: -x
    vp, dvp = ds.VPSDE(**VP), ds.DiscreteVPSDE(sched)
    x = torch.randn(64, 2, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    runs = [lambda: ds.ddpm_sample(eps_model, sched, x, steps=5, generator=g),
            lambda: ds.ddim_sample(eps_model, sched, x, steps=5, eta=0.5, generator=g),
            lambda: ds.dpm_solver_sample(eps_model, sched, x, steps=5),
            lambda: ds.dpm_solver_sde_sample(score_fn, vp, x, steps=5),
            lambda: ds.reverse_sde_sample(score_fn, vp, x, steps=5, corrector_steps=1,
                                          generator=g),
            lambda: ds.reverse_sde_sample(score_fn, dvp, x, steps=5,
                                          predictor="reverse_diffusion", generator=g),
            lambda: ds.ode_sample(score_fn, vp, x, steps=5),
            lambda: ds.annealed_langevin(lambda y, sg: -y, [1.0, 0.1], x, steps=2,
                                         generator=g)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for run in runs:
            assert run().shape == x.shape
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _all_samplers():
    """Every sampler as run(x, generator), with the exact score of N(0, I) data, few steps."""
    sched, ab = _linear_sched(50)
    eps_model = lambda x, t: col((1 - ab[t]).sqrt(), x) * x

    def sde_score(name):                     # data N(0, I): p_s = N(0, (m^2 + v) I)
        def score_fn(x, s):
            m, v, _, _ = ref_sde_coefs(name, s)
            return -x / col(m ** 2 + v, x)
        return score_fn

    vp, ve = ds.VPSDE(**VP), ds.VESDE(**VE)
    return {
        "ddpm": lambda x, g: ds.ddpm_sample(eps_model, sched, x, generator=g),
        "ddpm respaced": lambda x, g: ds.ddpm_sample(eps_model, sched, x, steps=10,
                                                     sigma2="beta_tilde", generator=g),
        "ddim": lambda x, g: ds.ddim_sample(eps_model, sched, x, steps=10, eta=0.5, generator=g),
        "langevin": lambda x, g: ds.langevin(lambda y: -y, x, step_size=0.1, n_steps=20,
                                             generator=g),
        "annealed": lambda x, g: ds.annealed_langevin(
            lambda y, sigma: -y / col(1 + sigma ** 2, y), [1.0, 0.3, 0.1], x, steps=10,
            generator=g),
        "pc vp": lambda x, g: ds.reverse_sde_sample(sde_score("vp"), vp, x, steps=20,
                                                    corrector_steps=1, generator=g),
        "pc ve": lambda x, g: ds.reverse_sde_sample(sde_score("ve"), ve, 50 * x, steps=20,
                                                    corrector_steps=1, generator=g),
        "ode": lambda x, g: ds.ode_sample(sde_score("vp"), vp, x, steps=10, method="heun"),
        "ode_encode": lambda x, g: ds.ode_encode(sde_score("vp"), vp, x, steps=10),
        "ode rk45": lambda x, g: ds.ode_sample(sde_score("vp"), vp, x, method="rk45"),
        "dpm": lambda x, g: ds.dpm_solver_sample(eps_model, sched, x, steps=8),
        "dpm sde": lambda x, g: ds.dpm_solver_sde_sample(sde_score("vp"), vp, x, steps=8),
        "pc rd": lambda x, g: ds.reverse_sde_sample(sde_score("vp"), vp, x, steps=20,
                                                    corrector_steps=1, generator=g,
                                                    predictor="reverse_diffusion"),
        "ode_likelihood": lambda x, g: ds.ode_likelihood(      # (Rademacher probes are exact
            sde_score("vp"), vp, x, steps=5, divergence="hutchinson", probe="gaussian",
            generator=g)["nats"]}                              # here: the Jacobian is c(s) I)


@pytest.mark.parametrize("name", list(_all_samplers()))
def test_F6_to_F32_samplers_are_reproducible_and_shape_agnostic(name):
    """The same generator seed gives bit-identical output and another seed another output;
    image-shaped input (B, 1, 4, 4) keeps its shape and gives the same numbers as the same data
    flattened to (B, 16): one broadcasting rule for points and images (ode_likelihood: (B,)).
    [F6, F17, F20, F24, F26, F27, F28, F29, F32]"""
    run = _all_samplers()[name]
    x = torch.randn(8, 1, 4, 4, generator=_gen(50), dtype=F64)
    a, b = run(x, _gen(51)), run(x, _gen(51))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.shape == ((8,) if name == "ode_likelihood" else x.shape)
    flat = run(x.reshape(8, 16), _gen(51))
    assert torch.allclose(flat.reshape(a.shape), a, rtol=1e-12, atol=1e-12)
    if name not in ("ode", "ode_encode", "ode rk45", "dpm", "dpm sde"):   # deterministic
        assert not torch.equal(run(x, _gen(52)), a)


def test_F6_F26_F27_F29_sampler_arguments_are_checked():
    """Unknown names, impossible step grids, counts, tolerances and times raise ValueError naming
    the argument. [F6, F10, F26, F27, F28, F29, F32]"""
    sched, ab = _linear_sched(50)
    eps_model, x = ref_eps_model(ref_mix_score, ab), torch.zeros(4, 2, dtype=F64)
    score_fn, vp = ref_sde_score(ref_mix_score, "vp"), ds.VPSDE(**VP)
    bad = [(lambda: ds.ode_sample(score_fn, vp, x, method="midpoint"), "method"),
           (lambda: ds.ode_likelihood(score_fn, vp, x, divergence="skilling"), "divergence"),
           (lambda: ds.ddpm_sample(eps_model, sched, x, sigma2="learned"), "sigma2"),
           (lambda: ds.ddpm_sample(eps_model, sched, x, steps=[40, 20, 1]), "steps"),
           (lambda: ds.ddim_sample(eps_model, sched, x, steps=51), "steps"),
           (lambda: ds.ddim_sample(eps_model, sched, x, steps=0), "steps"),
           (lambda: ds.ddim_sample(eps_model, sched, x, steps=[50, 30, 30, 1]), "steps"),
           (lambda: ds.reverse_sde_sample(score_fn, vp, x, steps=0), "steps"),
           (lambda: ds.reverse_sde_sample(score_fn, vp, x, steps=5, eps_s=1.5), "eps_s"),
           (lambda: ds.reverse_sde_sample(score_fn, vp, x, corrector_steps=-1), "corrector_steps"),
           (lambda: ds.ode_sample(score_fn, vp, x, eps_s=-1.0), "eps_s"),
           (lambda: ds.ode_encode(score_fn, vp, x, steps=2.5), "steps"),
           (lambda: ds.ode_likelihood(score_fn, vp, x, divergence="hutchinson", n_probes=0),
            "n_probes"),
           (lambda: ds.langevin(lambda y: -y, x, step_size=0.1, n_steps=2.5), "n_steps"),
           (lambda: ds.annealed_langevin(lambda y, sg: -y, [], x), "sigmas"),
           (lambda: ds.annealed_langevin(lambda y, sg: -y, [1.0, 0.0], x), "sigmas"),
           (lambda: ds.reverse_sde_sample(score_fn, vp, x, predictor="heun"), "predictor"),
           (lambda: ds.ode_sample(score_fn, vp, x, spacing="cosine"), "spacing"),
           (lambda: ds.ode_sample(score_fn, vp, x, method="rk45", rtol=0.0), "rtol"),
           (lambda: ds.ode_likelihood(score_fn, vp, x, method="rk45", max_steps=0), "max_steps"),
           (lambda: ds.dpm_solver_sample(eps_model, sched, x, steps=51), "steps"),
           (lambda: ds.dpm_solver_sample(eps_model, sched, x, clip_x0=(1, 0)), "clip_x0"),
           (lambda: ds.dpm_solver_sde_sample(score_fn, vp, x, steps=0), "steps"),
           (lambda: ds.vlb_bpd(eps_model, sched, x, decoder_var="beta_1"), "decoder_var")]
    for call, arg in bad:
        with pytest.raises(ValueError, match=arg):
            call()


# --- across sections: dtype and device (FORMULAS.md, pitfall 11) ----------------------------------

def test_F1_F2_F3_F7_F12_outputs_follow_the_data_dtype_and_schedules_are_float64():
    """[F1, F2, F3, F7, F8, F10, F12, F16, F18, F21, F25] float32 data in -> float32 out; schedules,
    marginal_coefs and reverse_var are float64."""
    sched = ds.Schedule.from_betas(ref_linear_betas(20, 1e-3, 0.2))
    t, x = long([1, 7, 20]), torch.randn(3, 2, 2)
    for arr in (ds.linear_betas(10), ds.cosine_betas(10), ds.geometric_sigmas(1.0, 0.1, 5),
                sched.beta, sched.alpha, sched.alpha_bar, sched.beta_tilde,
                *ds.marginal_coefs(sched, t), ds.reverse_var(sched, t, "beta_tilde")):
        assert arr.dtype == F64
    scale, std = ds.marginal_coefs(sched, t)
    x01 = (2 * torch.randint(0, 256, (3, 2, 2)) / 255 - 1).float()
    vlb = ds.vlb_bpd(lambda y, _t: 0.1 * y, sched, x01)
    outputs = [ds.q_step(sched, x, t), ds.q_sample(sched, x, t), *ds.q_mean_var(sched, x, t),
               *ds.posterior_mean_var(sched, x, x, t), ds.mu_from_eps(sched, x, t, x),
               ds.gaussian_kl(x, x.exp(), 0 * x, x.exp()),
               ds.discretized_gaussian_logp(x01, x, x.exp()), *vlb.values(),
               ds.eps_to_score(x, std), ds.score_to_eps(x, std), ds.x0_from_eps(x, x, scale, std),
               ds.tweedie(x, x, scale, std), ds.eps_loss(lambda y, _t: y, sched, x),
               ds.dsm_loss(lambda y, _s: y, x, [1.0, 0.1]),
               ds.sde_loss(lambda y, _s: y, FakeSDE(), x),
               ds.score_matching_loss(lambda y: y ** 2, x),
               ds.sliced_score_matching_loss(lambda y: y ** 2, x)]
    for i, out in enumerate(outputs):
        assert out.dtype == torch.float32, (i, out.dtype)


def test_F3_F7_F8_float32_coefficients_are_float32_accurate_near_t1():
    """[F3, F7, F8] (PITFALLS 11) float32 outputs equal the float64 formula on the same inputs to
    float32 accuracy, also at t = 1, 2 where 1 - alpha_bar_t ~ 1e-4 would lose 3 digits if it
    were formed after casting alpha_bar to float32."""
    betas = ref_linear_betas(1000, 1e-4, 0.02)
    sched, alpha_bar = ds.Schedule.from_betas(betas), ref_alpha_bar(betas)
    t = [1, 2, 10, 500, 1000]
    x0, xt, eps = (v.float() for v in randn(11, (5, 3), (5, 3), (5, 3)))
    X0, XT, EPS = x0.double(), xt.double(), eps.double()
    ab = col([alpha_bar[k] for k in t], X0)
    mu_ref = torch.stack([X0[0]] + [ref_posterior(X0[i], XT[i], betas[k - 1], alpha_bar[k - 1])[0]
                                    for i, k in enumerate(t) if k > 1])
    mean, var = ds.q_mean_var(sched, x0, long(t))
    checks = [(var, 1 - ab), (mean, ab.sqrt() * X0),
              (ds.posterior_mean_var(sched, x0, xt, long(t))[0], mu_ref),
              (ds.mu_from_eps(sched, xt, long(t), eps),
               torch.stack([ref_model_mean(XT[i], EPS[i], betas[k - 1], alpha_bar[k])
                            for i, k in enumerate(t)]))]
    # A float32 ulp is 6e-8 relative; 1e-6 (16 ulps) covers rounding each float64 coefficient
    # once and a few float32 operations on O(1) inputs.
    for i, (out, ref) in enumerate(checks):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref.expand_as(out), rtol=1e-6, atol=1e-6,
                                   msg=f"check {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_F3_F7_F8_half_precision_coefficients_stay_finite_at_small_t(dtype):
    """[F3, F7, F8] (PITFALLS 11) in float16/bfloat16, alpha_bar_1 = 0.9999 rounds to 1; the
    variance 1 - alpha_bar_t must still be > 0 and every mean finite (no division by zero)."""
    sched = ds.Schedule.from_betas(ref_linear_betas(1000, 1e-4, 0.02))
    t = long([1, 2, 3])
    x = torch.ones(3, 2, dtype=dtype)
    mean, var = ds.q_mean_var(sched, x, t)
    assert (var > 0).all() and torch.isfinite(mean).all()
    assert torch.isfinite(ds.posterior_mean_var(sched, x, x, t)[0]).all()
    assert torch.isfinite(ds.mu_from_eps(sched, x, t, x)).all()


# --- across sections: bad input, ValueError naming the argument -----------------------------------

SCHED = ds.Schedule.from_betas(ref_linear_betas(10, 1e-3, 0.2))
X = torch.zeros(2, 3)
T_OK = long([1, 10])
NAN, INF = float("nan"), float("inf")

BAD_INPUT = {
    "linear T=0": (lambda: ds.linear_betas(0), r"\bT\b"),
    "linear T=2.5": (lambda: ds.linear_betas(2.5), r"\bT\b"),
    "linear beta_1=0": (lambda: ds.linear_betas(10, 0.0, 0.02), "beta_1"),
    "linear beta_1<0": (lambda: ds.linear_betas(10, -1e-4, 0.02), "beta_1"),
    "linear beta_1=nan": (lambda: ds.linear_betas(10, NAN, 0.02), "beta_1"),
    "linear beta_T=1": (lambda: ds.linear_betas(10, 1e-4, 1.0), "beta_T"),
    "linear beta_T=inf": (lambda: ds.linear_betas(10, 1e-4, INF), "beta_T"),
    "linear beta_T<beta_1": (lambda: ds.linear_betas(10, 0.02, 1e-4), "beta_T"),
    "cosine T=0": (lambda: ds.cosine_betas(0), r"\bT\b"),
    "cosine s<0": (lambda: ds.cosine_betas(10, s=-0.1), r"\bs\b"),
    "cosine s=nan": (lambda: ds.cosine_betas(10, s=NAN), r"\bs\b"),
    "cosine max_beta=1": (lambda: ds.cosine_betas(10, max_beta=1.0), "max_beta"),
    "cosine max_beta=0": (lambda: ds.cosine_betas(10, max_beta=0.0), "max_beta"),
    "geometric max=min": (lambda: ds.geometric_sigmas(1.0, 1.0, 5), "sigma_max"),
    "geometric max<min": (lambda: ds.geometric_sigmas(0.5, 1.0, 5), "sigma_max"),
    "geometric min=0": (lambda: ds.geometric_sigmas(1.0, 0.0, 5), "sigma_min"),
    "geometric max=inf": (lambda: ds.geometric_sigmas(INF, 0.1, 5), "sigma_max"),
    "geometric L=0": (lambda: ds.geometric_sigmas(1.0, 0.1, 0), r"\bL\b"),
    "from_betas beta=1": (lambda: ds.Schedule.from_betas([0.1, 1.0]), "betas"),
    "from_betas beta=0": (lambda: ds.Schedule.from_betas([0.0, 0.1]), "betas"),
    "from_betas beta=nan": (lambda: ds.Schedule.from_betas([0.1, NAN]), "betas"),
    "from_betas empty": (lambda: ds.Schedule.from_betas([]), "betas"),
    "from_betas 2-D": (lambda: ds.Schedule.from_betas([[0.1, 0.2]]), "betas"),
    "q_step t=0": (lambda: ds.q_step(SCHED, X, long([0, 1])), r"\bt\b"),
    "q_step t=T+1": (lambda: ds.q_step(SCHED, X, long([1, 11])), r"\bt\b"),
    "q_step t float": (lambda: ds.q_step(SCHED, X, torch.tensor([1.0, 2.0])), r"\bt\b"),
    "q_step t shape": (lambda: ds.q_step(SCHED, X, long([1, 2, 3])), r"\bt\b"),
    "q_step noise shape": (lambda: ds.q_step(SCHED, X, T_OK, torch.zeros(2, 4)), "noise"),
    "q_sample t=0": (lambda: ds.q_sample(SCHED, X, long([0, 1])), r"\bt\b"),
    "q_sample t=T+1": (lambda: ds.q_sample(SCHED, X, long([11, 1])), r"\bt\b"),
    "q_sample noise shape": (lambda: ds.q_sample(SCHED, X, T_OK, torch.zeros(3, 3)), "noise"),
    "q_mean_var x0 0-dim": (lambda: ds.q_mean_var(SCHED, torch.tensor(1.0), T_OK), "x0"),
    "q_mean_var t=T+1": (lambda: ds.q_mean_var(SCHED, X, long([1, 11])), r"\bt\b"),
    "marginal_coefs t=0": (lambda: ds.marginal_coefs(SCHED, long([0, 1])), r"\bt\b"),
    "marginal_coefs t=T+1": (lambda: ds.marginal_coefs(SCHED, long([1, 11])), r"\bt\b"),
    "posterior xt shape": (lambda: ds.posterior_mean_var(SCHED, X, torch.zeros(2, 4), T_OK), "xt"),
    "posterior t=0": (lambda: ds.posterior_mean_var(SCHED, X, X, long([0, 1])), r"\bt\b"),
    "mu_from_eps eps shape": (lambda: ds.mu_from_eps(SCHED, X, T_OK, torch.zeros(2, 4)), "eps"),
    "mu_from_eps t=T+1": (lambda: ds.mu_from_eps(SCHED, X, long([1, 11]), X), r"\bt\b"),
    "gaussian_kl var1=0": (lambda: ds.gaussian_kl(X, 0 * X, X, X + 1), "var1"),
    "gaussian_kl var2<0": (lambda: ds.gaussian_kl(X, X + 1, X, X - 1), "var2"),
    "reverse_var kind": (lambda: ds.reverse_var(SCHED, T_OK, "sigma"), "kind"),
    "reverse_var t=0": (lambda: ds.reverse_var(SCHED, long([0, 1]), "beta"), r"\bt\b"),
    "reverse_var t=T+1": (lambda: ds.reverse_var(SCHED, long([1, 11]), "beta_tilde"), r"\bt\b"),
    "discretized mean shape": (lambda: ds.discretized_gaussian_logp(X, X[:, :2], 1.0), "mean"),
    "discretized var=0": (lambda: ds.discretized_gaussian_logp(X, X, 0 * X), "var"),
    "discretized var<0": (lambda: ds.discretized_gaussian_logp(X, X, X - 1), "var"),
    "vlb decoder": (lambda: ds.vlb_bpd(lambda y, _t: y, SCHED, X, decoder="normal"), "decoder"),
    "vlb sigma2": (lambda: ds.vlb_bpd(lambda y, _t: y, SCHED, X, sigma2="learned"), "sigma2"),
    "vlb x0 0-dim": (lambda: ds.vlb_bpd(lambda y, _t: y, SCHED, torch.tensor(0.0)), "x0"),
    "eps_to_score std=0": (lambda: ds.eps_to_score(X, torch.zeros(2)), "std"),
    "eps_to_score std<0": (lambda: ds.eps_to_score(X, -torch.ones(2)), "std"),
    "score_to_eps std=0": (lambda: ds.score_to_eps(X, torch.zeros(2)), "std"),
    "x0_from_eps scale=0": (lambda: ds.x0_from_eps(X, X, torch.zeros(2), torch.ones(2)), "scale"),
    "x0_from_eps eps shape": (lambda: ds.x0_from_eps(X, X[:, :1], 1.0, 1.0), "eps"),
    "tweedie std<0": (lambda: ds.tweedie(X, X, torch.ones(2), -torch.ones(2)), "std"),
    "tweedie score shape": (lambda: ds.tweedie(X, X[:1], 1.0, 1.0), "score"),
    "eps_loss t=T+1": (lambda: ds.eps_loss(lambda y, _t: y, SCHED, X, t=long([1, 11])), r"\bt\b"),
    "eps_loss noise shape": (lambda: ds.eps_loss(lambda y, _t: y, SCHED, X, noise=X[:1]), "noise"),
    "dsm sigma shape": (lambda: ds.dsm_loss(lambda y, _s: y, X, [1.0], sigma=torch.ones(3)),
                        "sigma"),
    "dsm sigma=0": (lambda: ds.dsm_loss(lambda y, _s: y, X, [1.0], sigma=torch.zeros(2)),
                    "sigma"),
    "dsm sigma<0": (lambda: ds.dsm_loss(lambda y, _s: y, X, [1.0], sigma=-torch.ones(2)),
                    "sigma"),
    "dsm sigmas empty": (lambda: ds.dsm_loss(lambda y, _s: y, X, []), "sigmas"),
    "dsm sigmas<=0": (lambda: ds.dsm_loss(lambda y, _s: y, X, [1.0, 0.0]), "sigmas"),
    "dsm noise shape": (lambda: ds.dsm_loss(lambda y, _s: y, X, [1.0], noise=X[:1]), "noise"),
    "sde_loss s shape": (lambda: ds.sde_loss(lambda y, _s: y, FakeSDE(), X, s=torch.ones(3)),
                         r"\bs\b"),
    "sde_loss s>1": (lambda: ds.sde_loss(lambda y, _s: y, FakeSDE(), X, s=torch.full((2,), 1.5)),
                     r"\bs\b"),
    "sde_loss s<0": (lambda: ds.sde_loss(lambda y, _s: y, FakeSDE(), X, s=-torch.ones(2)),
                     r"\bs\b"),
    "sde_loss eps_s=0": (lambda: ds.sde_loss(lambda y, _s: y, FakeSDE(), X, eps_s=0.0), "eps_s"),
    "sde_loss noise shape": (lambda: ds.sde_loss(lambda y, _s: y, FakeSDE(), X, noise=X[:1]),
                             "noise"),
    "score_matching x 0-dim": (lambda: ds.score_matching_loss(lambda y: y, torch.tensor(1.0)),
                               r"\bx\b"),
    "sliced probe": (lambda: ds.sliced_score_matching_loss(lambda y: y, X, probe="sphere"),
                     "probe"),
    "sliced n_projections=0": (lambda: ds.sliced_score_matching_loss(lambda y: y, X,
                                                                     n_projections=0),
                               "n_projections"),
    "q_step x_prev 0-dim": (lambda: ds.q_step(SCHED, torch.tensor(1.0), T_OK), "x_prev"),
    "mu_from_eps xt list": (lambda: ds.mu_from_eps(SCHED, [[0.0]], T_OK, X), r"\bxt\b"),
    "discretized levels=1": (lambda: ds.discretized_gaussian_logp(X, X, 1.0, levels=1), "levels"),
    "discretized levels=2.0": (lambda: ds.discretized_gaussian_logp(X, X, 1.0, levels=2.0),
                               "levels"),
    "langevin step_size=0": (lambda: ds.langevin(lambda y: -y, X, step_size=0.0, n_steps=1),
                             "step_size"),
    "annealed eps<0": (lambda: ds.annealed_langevin(lambda y, _s: -y, [1.0], X, eps=-1e-3),
                       r"\beps\b"),
    "ode rk45 atol=0": (lambda: ds.ode_sample(lambda y, _s: -y, ds.VPSDE(), X, method="rk45",
                                              atol=0.0), "atol"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_F1_to_F25_bad_input_raises_value_error_naming_the_argument(case):
    """[F1-F25 inputs] each public function of the math core rejects bad input with ValueError
    whose message names the offending argument."""
    fn, match = BAD_INPUT[case]
    with pytest.raises(ValueError, match=match):
        fn()


G_MASK = torch.ones(2, 3, dtype=torch.bool)
G_SAMPLERS = {"ddpm": lambda **kw: ds.ddpm_sample(lambda x, t: x, SCHED, X, **kw),
              "reverse_sde": lambda **kw: ds.reverse_sde_sample(lambda x, s: x, ds.VPSDE(), X,
                                                                steps=3, **kw)}
G_BAD_INPAINTING = {
    "known without mask": (dict(known=X), "mask"),
    "mask without known": (dict(mask=G_MASK), "known"),
    "mask shape": (dict(known=X, mask=G_MASK[:, :2]), "mask"),
    "mask float": (dict(known=X, mask=G_MASK.float()), "mask"),
    "known shape": (dict(known=X[:1], mask=G_MASK), "known"),
}


@pytest.mark.parametrize("sampler", list(G_SAMPLERS))
@pytest.mark.parametrize("case", list(G_BAD_INPAINTING))
def test_F31_bad_inpainting_input_raises_value_error_naming_the_argument(sampler, case):
    """[F31 inputs] known and mask go together, mask is bool of the data's shape, known too."""
    kwargs, match = G_BAD_INPAINTING[case]
    with pytest.raises(ValueError, match=match):
        G_SAMPLERS[sampler](**kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 4), (4,)])
def test_F31_colorization_known_rejects_a_non_grey_image(shape):
    """[F31 inputs] colorization_known wants a grey image (B, 1, ...)."""
    with pytest.raises(ValueError, match="grey"):
        ds.colorization_known(torch.zeros(shape))
