"""Diffusion models (DDPM) and score-based generative models in one readable file.

Every formula carries its id from FORMULAS.md (``[F7]``); ``test_math.py`` pins each one against an
independent computation, and every sampler is tested against a distribution whose score is exact.

Notation (as on the slides)
    x0            data                     t in 1..T     discrete step (0 means "no noise")
    beta_t        variance of step t       alpha_t       1 - beta_t
    alpha_bar_t   prod_{i<=t} alpha_i      beta_tilde_t  posterior variance (F7)
    eps, z        standard normal noise    sigma         noise std of a perturbed density
    s in [0, 1]   continuous SDE time      score         grad_x log p(x)
    d             numbers per example (the product of the non-batch dimensions)

Index convention: per-step arrays have length T+1 and index 0 means "no noise"
(alpha_bar[0] = 1, beta[0] = 0), so alpha_bar[t - 1] is literally alpha_bar_{t-1}.
Schedules are float64 and cast to the data's dtype at use. Device and dtype come from the inputs;
every random function takes a keyword-only ``generator``.

References
    Ho, Jain, Abbeel 2020, Denoising Diffusion Probabilistic Models, arXiv:2006.11239
    Nichol, Dhariwal 2021, Improved DDPM, arXiv:2102.09672
    Song, Meng, Ermon 2021, DDIM, arXiv:2010.02502
    Hyvarinen 2005, score matching, JMLR 6; Vincent 2011, denoising score matching
    Song, Garg, Shi, Ermon 2019, sliced score matching, arXiv:1905.07088
    Song, Ermon 2019, NCSN, arXiv:1907.05600
    Song et al. 2021, Score-Based Generative Modeling through SDEs, arXiv:2011.13456

Three ways in
    import ddpm_score                 # the math, samplers and networks as functions
    python ddpm_score.py train        # train on built-in data (no download), then sample
    make test                         # the spec tests
"""
import math
from dataclasses import dataclass

import torch
from einops import reduce

# --- notation and helpers -----------------------------------------------------------------------


def bcast(v, x):
    """Reshape a per-example (B,) tensor to (B, 1, ..., 1) so it broadcasts against x (B, ...)."""
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_batch(x, name="x"):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, ...) with B >= 1, got {got}")


def _check_same_shape(a, b, name_a, name_b):
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")


def _check_per_example(v, x, name):
    """A per-example tensor must be (B,) for x of shape (B, ...)."""
    if not isinstance(v, torch.Tensor) or v.shape != x.shape[:1]:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape ({x.shape[0]},), got {got}")


def _check_positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _mean_flat(x):
    """Per-example mean over every non-batch dimension: (B, ...) -> (B,)."""
    return reduce(x, "b ... -> b", "mean")


def _sum_flat(x):
    return reduce(x, "b ... -> b", "sum")


# --- schedules [F1, F2, Schedules] ---------------------------------------------------------------


def _check_T(T):
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")


def _check_unit_open(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"{name} must be a finite number in (0, 1), got {value!r}")


def linear_betas(T=1000, beta_1=1e-4, beta_T=0.02):
    """beta_t = beta_1 + (t - 1) / (T - 1) (beta_T - beta_1), t = 1..T. [Schedules, F1]

    Ho et al. 2020 defaults. Returns a float64 tensor of shape (T,) (T = 1 gives [beta_1]).
    """
    _check_T(T)
    _check_unit_open("beta_1", beta_1)
    _check_unit_open("beta_T", beta_T)
    if beta_T < beta_1:
        raise ValueError(f"beta_T must be >= beta_1 = {beta_1}, got {beta_T}")
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T=1000, s=0.008, max_beta=0.999):
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) pi / 2). [Schedules]

    beta_t = min(1 - f(t) / f(t-1), max_beta) (Nichol & Dhariwal 2021). Only the last step or few
    are clipped at max_beta; PITFALLS.md #1 is why every sampler coefficient is tested for them.
    Returns a float64 tensor of shape (T,).
    """
    _check_T(T)
    _check_positive("s", s)
    _check_unit_open("max_beta", max_beta)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def geometric_sigmas(sigma_max, sigma_min, L):
    """sigma_1 > ... > sigma_L, a geometric sequence from sigma_max to sigma_min. [F19]

    Returns a float64 tensor of shape (L,), descending (NCSN order: largest noise first).
    """
    _check_positive("sigma_max", sigma_max)
    _check_positive("sigma_min", sigma_min)
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"L must be an integer >= 1, got {L!r}")
    if L > 1 and not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min = {sigma_min}, got {sigma_max}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), L,
                                    dtype=torch.float64))


@dataclass(frozen=True)
class Schedule:
    """A discrete schedule: float64 arrays of length T+1, index 0 meaning no noise. [F2, F7]

    beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{i=1..t} alpha_i, and the posterior variance
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (beta_tilde_1 = 0).
    Build it with ``Schedule.from_betas(linear_betas())``. It holds plain tensors, not module
    buffers, so an EMA of a network never averages it (PITFALLS.md #10).
    """
    T: int
    beta: torch.Tensor
    alpha: torch.Tensor
    alpha_bar: torch.Tensor
    beta_tilde: torch.Tensor

    @classmethod
    def from_betas(cls, betas):
        """Build the schedule from beta_1..beta_T, each in (0, 1). [F2]"""
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D sequence of length T >= 1, "
                             f"got shape {tuple(betas.shape)}")
        bad = ~(torch.isfinite(betas) & (betas > 0) & (betas < 1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"betas must lie in (0, 1), got beta_{i + 1} = {betas[i].item()}")
        beta = torch.cat([betas.new_zeros(1), betas])
        alpha = 1 - beta
        alpha_bar = torch.cumprod(alpha, 0)
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t; index 0 is set to 0.
        beta_tilde = torch.zeros_like(beta)
        beta_tilde[1:] = (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * beta[1:]
        return cls(len(betas), beta, alpha, alpha_bar, beta_tilde)


def _check_t(sched, t, x):
    """t must be a LongTensor of shape (B,) with values in 1..T."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.shape != x.shape[:1]:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a LongTensor of shape ({x.shape[0]},), got {got}")
    if t.numel() and (t.min() < 1 or t.max() > sched.T):
        raise ValueError(f"t must lie in 1..T = 1..{sched.T}, got values in "
                         f"{int(t.min())}..{int(t.max())}")


def _at(arr, t, x):
    """arr[t] from a float64 schedule array, shaped (B, 1, ..., 1) in x's dtype and device."""
    return bcast(arr[t.cpu()], x)


def _coefs(sched, t):
    """float64 (B,) beta_t, alpha_t, alpha_bar_t, alpha_bar_{t-1}: form coefficients, then cast."""
    t = t.cpu()
    return sched.beta[t], sched.alpha[t], sched.alpha_bar[t], sched.alpha_bar[t - 1]


def marginal_coefs(sched, t):
    """(scale, std) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each (B,) float64. [F3]"""
    _check_t(sched, t, t)
    alpha_bar = sched.alpha_bar[t.cpu()]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


# --- forward process [F1-F5] ---------------------------------------------------------------------


def _noise(x, noise, generator, name="noise"):
    if noise is None:
        return _randn_like(x, generator)
    _check_same_shape(x, noise, "x", name)
    return noise


def q_step(sched, x_prev, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, one step of q(x_t | x_{t-1}). [F1]"""
    _check_batch(x_prev, "x_prev")
    _check_t(sched, t, x_prev)
    z = _noise(x_prev, noise, generator)
    beta, alpha, _, _ = _coefs(sched, t)
    return bcast(alpha.sqrt(), x_prev) * x_prev + bcast(beta.sqrt(), x_prev) * z


def q_mean_var(sched, x0, t):
    """q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I); returns (mean, var). [F3]"""
    _check_batch(x0, "x0")
    _check_t(sched, t, x0)
    _, _, alpha_bar, _ = _coefs(sched, t)
    return bcast(alpha_bar.sqrt(), x0) * x0, bcast(1 - alpha_bar, x0)


def q_sample(sched, x0, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, the closed form. [F3, F4]"""
    mean, var = q_mean_var(sched, x0, t)
    return mean + var.sqrt() * _noise(x0, noise, generator)


# --- posterior and ELBO [F6-F13] -----------------------------------------------------------------


def posterior_mean_var(sched, x0, xt, t):
    """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I); returns (mu_tilde, beta_tilde). [F7]

    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t.
    """
    _check_batch(x0, "x0")
    _check_same_shape(x0, xt, "x0", "xt")
    _check_t(sched, t, x0)
    beta, alpha, alpha_bar, alpha_bar_prev = _coefs(sched, t)
    mu_tilde = (bcast(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar), x0) * x0
                + bcast(alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar), x0) * xt)
    return mu_tilde, _at(sched.beta_tilde, t, x0)


def mu_from_eps(sched, xt, t, eps):
    """mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t). [F8, F9]

    With the true eps this is mu_tilde (F8); with eps_theta it is the model mean (F9).
    """
    _check_batch(xt, "xt")
    _check_same_shape(xt, eps, "xt", "eps")
    _check_t(sched, t, xt)
    beta, alpha, alpha_bar, _ = _coefs(sched, t)
    return (xt - bcast(beta / (1 - alpha_bar).sqrt(), xt) * eps) / bcast(alpha.sqrt(), xt)


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats. [F13]

    1/2 [log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1]; the arguments broadcast.
    Sum over the data dimensions for the KL of N(m1, v1 I) and N(m2, v2 I).
    """
    var1, var2 = (v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
                  for v in (var1, var2))
    if (var1 <= 0).any() or (var2 <= 0).any():
        raise ValueError("var1 and var2 must be > 0")
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def reverse_var(sched, t, kind="beta"):
    """sigma_t^2 of p_theta(x_{t-1} | x_t): beta_t or beta_tilde_t, as (B,) float64. [F6, F7]

    beta_tilde_1 = 0 would give the decoder p(x0 | x1) zero variance and log(0); as in improved
    DDPM the log-variance is clipped: at t = 1 we use beta_tilde_2 (beta_1 when T = 1).
    """
    _check_choice("kind", kind, {"beta", "beta_tilde"})
    _check_t(sched, t, t)
    t = t.cpu()
    if kind == "beta":
        return sched.beta[t]
    floor = sched.beta_tilde[2] if sched.T > 1 else sched.beta[1]
    return torch.where(t == 1, floor, sched.beta_tilde[t])


def _std_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_logp(x0, mean, var):
    """log P(x0) of 8-bit data under N(mean, var) integrated over the pixel's bin. [F10, L_0]

    Data scaling: an 8-bit value k in 0..255 is x0 = 2 k / 255 - 1 in [-1, 1], so a bin has half
    width 1/255. P(x0) = Phi((x0 + 1/255 - mean) / std) - Phi((x0 - 1/255 - mean) / std), with the
    edge bins (k = 0, 255) extended to -inf and +inf so the 256 probabilities sum to 1.
    Elementwise, in nats. Probabilities are floored at 1e-12 to keep the log finite.
    """
    _check_same_shape(x0, mean, "x0", "mean")
    var = torch.as_tensor(var, dtype=x0.dtype, device=x0.device)
    if not (var > 0).all():
        raise ValueError(f"var must be > 0, got min {var.min().item()}")
    std = var.sqrt()
    upper = _std_normal_cdf((x0 + 1 / 255 - mean) / std)
    lower = _std_normal_cdf((x0 - 1 / 255 - mean) / std)
    upper = torch.where(x0 > 1 - 1e-3, torch.ones_like(upper), upper)    # k = 255: up to +inf
    lower = torch.where(x0 < -1 + 1e-3, torch.zeros_like(lower), lower)  # k = 0: from -inf
    return torch.log((upper - lower).clamp(min=1e-12))


def vlb_bpd(eps_model, sched, x0, *, sigma2="beta", decoder="discretized", generator=None):
    """The variational bound (F10) of an eps-model, per example, in bits per dimension.

    -ELBO = KL(q(x_T|x0) || N(0, I)) + sum_{t=2..T} L_{t-1} + L_0, where
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || N(mu_theta(x_t, t), sigma_t^2 I))  [F7, F9, F11, F13]
    L_0 = -log p_theta(x0 | x1): the discretized Gaussian decoder for 8-bit data scaled to [-1, 1]
    (``decoder='discretized'``, see discretized_gaussian_logp) or the continuous density
    N(x0; mu_theta(x1, 1), sigma_1^2 I) (``decoder='gaussian'``, for real-valued data).
    sigma_t^2 is ``reverse_var(sched, t, sigma2)``. One x_t ~ q(x_t | x0) is drawn for every t, so
    the bound costs T evaluations of eps_model. Returns a dict of (B,) tensors 'total' and 'prior'
    and a (B, T) tensor 'terms' (terms[:, 0] = L_0, terms[:, t-1] = L_{t-1}); nats / (d ln 2).
    """
    _check_batch(x0, "x0")
    _check_choice("decoder", decoder, {"discretized", "gaussian"})
    _check_choice("sigma2", sigma2, {"beta", "beta_tilde"})
    if decoder == "discretized" and not ((x0 >= -1) & (x0 <= 1)).all():
        raise ValueError(f"x0 must be 8-bit data scaled to [-1, 1] for decoder='discretized', got "
                         f"values in {x0.min().item():.4g}..{x0.max().item():.4g} (PITFALLS #12)")
    B, d = x0.shape[0], x0[0].numel()
    terms = x0.new_zeros(B, sched.T)
    for step in range(1, sched.T + 1):
        t = torch.full((B,), step, dtype=torch.long, device=x0.device)
        xt = q_sample(sched, x0, t, generator=generator)
        mu = mu_from_eps(sched, xt, t, eps_model(xt, t))
        var = bcast(reverse_var(sched, t, sigma2), x0)
        if step == 1 and decoder == "discretized":
            nll = -discretized_gaussian_logp(x0, mu, var)
        elif step == 1:
            nll = 0.5 * (torch.log(2 * math.pi * var) + (x0 - mu) ** 2 / var)
        else:
            nll = gaussian_kl(*posterior_mean_var(sched, x0, xt, t), mu, var)
        terms[:, step - 1] = _sum_flat(nll)
    T = torch.full((B,), sched.T, dtype=torch.long, device=x0.device)
    mean_T, var_T = q_mean_var(sched, x0, T)
    prior = _sum_flat(gaussian_kl(mean_T, var_T, torch.zeros_like(x0), torch.ones_like(var_T)))
    to_bpd = 1 / (d * math.log(2))
    terms, prior = terms * to_bpd, prior * to_bpd
    return {"total": prior + terms.sum(1), "prior": prior, "terms": terms}


# --- parameterizations: eps, score, x0 [F21] -----------------------------------------------------


def eps_to_score(eps, std):
    """score = -eps / std, the score of q(x_t | x0) = N(scale x0, std^2 I). [F21]

    For the DDPM chain std = sqrt(1 - alpha_bar_t); for an SDE std comes from ``sde.marginal``.
    ``std`` is a (B,) tensor or already broadcastable against eps.
    """
    return -eps / _as_coef(std, eps, "std")


def score_to_eps(score, std):
    """eps = -std * score, the inverse of eps_to_score. [F21]"""
    return -_as_coef(std, score, "std") * score


def x0_from_eps(xt, eps, scale, std):
    """x0 = (x_t - std eps) / scale, inverting x_t = scale x0 + std eps. [F3, F21, F29]"""
    _check_same_shape(xt, eps, "xt", "eps")
    return (xt - _as_coef(std, xt, "std") * eps) / _as_coef(scale, xt, "scale")


def tweedie(xt, score, scale, std):
    """Tweedie: E[x0 | x_t] = (x_t + std^2 grad log p_t(x_t)) / scale. [F21]

    For the DDPM chain scale = sqrt(alpha_bar_t), std = sqrt(1 - alpha_bar_t); for NCSN's
    x~ = x + sigma z, scale = 1 and std = sigma.
    """
    _check_same_shape(xt, score, "xt", "score")
    return (xt + _as_coef(std, xt, "std") ** 2 * score) / _as_coef(scale, xt, "scale")


def _as_coef(v, x, name):
    """A (B,) or broadcastable coefficient, cast to x's dtype; must be > 0."""
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    if (v <= 0).any():
        raise ValueError(f"{name} must be > 0, got min {v.min().item()}")
    if v.ndim == 1 and v.shape[0] == x.shape[0] and x.ndim > 1:
        return bcast(v, x)
    return v.to(device=x.device, dtype=x.dtype)


# --- losses (per example, shape (B,), mean over the data dimensions) -----------------------------


def eps_loss(eps_model, sched, x0, *, t=None, noise=None, generator=None):
    """L_simple = ||eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t)||^2 / d.

    [F12] Per example, the mean over the data dimensions (so d drops out of the loss's scale).

    t ~ U{1..T} and eps ~ N(0, I) unless given. eps_model(xt, t) gets t as a (B,) LongTensor.
    """
    _check_batch(x0, "x0")
    if t is None:
        t = torch.randint(1, sched.T + 1, x0.shape[:1], generator=generator, device=x0.device)
    eps = _noise(x0, noise, generator)
    xt = q_sample(sched, x0, t, eps)
    return _mean_flat((eps - eps_model(xt, t)) ** 2)


def dsm_loss(score_model, x0, sigmas, *, sigma=None, noise=None, generator=None):
    """NCSN: lambda(sigma) ||s_theta(x~, sigma) + (x~ - x0) / sigma^2||^2 / d. [F18, F19]

    x~ = x0 + sigma z with sigma drawn uniformly from ``sigmas`` (so the batch mean is F19's
    (1/L) sum_i) unless ``sigma``, a (B,) tensor, is given. The target -(x~ - x0) / sigma^2
    = -z / sigma is the score of q_sigma(x~ | x0) (F18), and lambda(sigma) = sigma^2 makes every
    level O(1) (PITFALLS #6).
    score_model(x, sigma) gets sigma as a (B,) tensor.
    """
    _check_batch(x0, "x0")
    if sigma is None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 1 or not (sigmas > 0).all():
            raise ValueError(f"sigmas must be a non-empty 1-D sequence of numbers > 0, "
                             f"got {sigmas.tolist()}")
        idx = torch.randint(0, len(sigmas), x0.shape[:1], generator=generator, device=x0.device)
        sigma = sigmas.to(x0.device)[idx].to(x0.dtype)
    _check_per_example(sigma, x0, "sigma")
    if not (sigma > 0).all():
        raise ValueError(f"sigma must be > 0, got min {sigma.min().item()}")
    z = _noise(x0, noise, generator)
    sigma_b = bcast(sigma, x0)
    x_tilde = x0 + sigma_b * z
    return _mean_flat(sigma_b ** 2 * (score_model(x_tilde, sigma) + z / sigma_b) ** 2)


def sde_loss(score_model, sde, x0, *, likelihood_weighting=False, s=None, noise=None,
             eps_s=1e-5, generator=None):
    """E_s lambda(s) ||s_theta(x_s, s) - grad log p_{0s}(x_s | x0)||^2 / d. [F25]

    s ~ U(eps_s, 1) unless given; (mean, std) = sde.marginal(x0, s); x_s = mean + std z, whose
    conditional score is -z / std. lambda(s) = std^2 by default (the F19 weighting) or g(s)^2 with
    ``likelihood_weighting`` (then the loss bounds KL(p_0 || p_theta)). Works with any object that
    has ``marginal(x0, s)`` (and ``diffusion(s)`` for likelihood weighting).
    score_model(x, s) gets s as a (B,) tensor.
    """
    _check_batch(x0, "x0")
    _check_unit_open("eps_s", eps_s)
    if s is None:
        s = eps_s + (1 - eps_s) * torch.rand(x0.shape[:1], generator=generator,
                                             device=x0.device, dtype=x0.dtype)
    _check_per_example(s, x0, "s")
    if not ((s >= 0) & (s <= 1)).all():
        raise ValueError(f"s must lie in [0, 1], got values in {s.min().item()}..{s.max().item()}")
    z = _noise(x0, noise, generator)
    mean, std = sde.marginal(x0, s)
    x_s = mean + std * z
    weight = bcast(sde.diffusion(s), x0) ** 2 if likelihood_weighting else std ** 2
    return _mean_flat(weight * (score_model(x_s, s) + z / std) ** 2)


def score_matching_loss(score_model, x):
    """Implicit score matching: (1/2 ||s_theta(x)||^2 + tr(grad_x s_theta(x))) / d. [F16]

    Equals the Fisher divergence (F15) / d minus a theta-free constant. The Jacobian trace is exact:
    one backward pass per data dimension, so use it for small d; see sliced_score_matching_loss.
    score_model(x) takes only x. Differentiable in the model's parameters.
    """
    _check_batch(x, "x")
    x = x.detach().requires_grad_(True)
    score = score_model(x).flatten(1)
    B, d = score.shape
    trace = x.new_zeros(B)
    for i in range(d):
        grad = torch.autograd.grad(score[:, i].sum(), x, create_graph=True)[0]
        trace = trace + grad.flatten(1)[:, i]
    return (0.5 * (score ** 2).sum(1) + trace) / d


def sliced_score_matching_loss(score_model, x, *, n_projections=1, probe="rademacher",
                               generator=None):
    """Sliced score matching: (1/2 ||s_theta(x)||^2 + v^T grad_x s_theta(x) v) / d. [F16]

    v has E[v v^T] = I (Rademacher +-1 or standard Gaussian), so E_v[v^T J v] = tr(J): one
    backward pass per projection instead of one per dimension. Averaged over ``n_projections``.
    """
    _check_batch(x, "x")
    _check_choice("probe", probe, {"rademacher", "gaussian"})
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
    x = x.detach().requires_grad_(True)
    score = score_model(x)
    vjv = x.new_zeros(x.shape[0])
    for _ in range(n_projections):
        v = _probe(x, probe, generator)
        grad = torch.autograd.grad((score * v).sum(), x, create_graph=True)[0]  # J^T v
        vjv = vjv + _sum_flat(grad * v) / n_projections
    return (0.5 * _sum_flat(score ** 2) + vjv) / x[0].numel()


def _probe(x, kind, generator):
    """A random probe v with E[v v^T] = I: Rademacher (+-1) or standard Gaussian. [F16, F27]"""
    if kind == "gaussian":
        return _randn_like(x, generator)
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return (2 * bits - 1).to(x.dtype)


# --- Langevin dynamics and NCSN [F17, F20] -------------------------------------------------------


@torch.no_grad()
def langevin(score_fn, x, *, step_size, n_steps, generator=None):
    """x_k = x_{k-1} + (eps / 2) grad log p(x_{k-1}) + sqrt(eps) z_k, k = 1..n_steps. [F17]

    ``step_size`` is eps. score_fn(x) returns grad_x log p(x). Samples p exactly only as eps -> 0;
    for a Gaussian N(0, c^2) the chain's stationary variance is c^2 / (1 - eps / (4 c^2)).
    """
    _check_batch(x, "x")
    _check_positive("step_size", step_size)
    for _ in range(n_steps):
        x = x + step_size / 2 * score_fn(x) + math.sqrt(step_size) * _randn_like(x, generator)
    return x


@torch.no_grad()
def annealed_langevin(score_fn, x, sigmas, *, eps=2e-5, n_steps_each=100, denoise=True,
                      generator=None):
    """Annealed Langevin (NCSN): for i = 1..L, K steps of F17 with s_theta(., sigma_i). [F20]

    Step alpha_i = eps sigma_i^2 / sigma_L^2 (sigmas descending, sigma_L the smallest). With
    ``denoise`` a last Tweedie step x + sigma_L^2 s_theta(x, sigma_L) removes the remaining noise
    (F21 with scale 1, std sigma_L). score_fn(x, sigma) gets sigma as a (B,) tensor.
    """
    _check_batch(x, "x")
    _check_positive("eps", eps)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    sigma_L = sigmas[-1].item()
    for sigma in sigmas.tolist():
        alpha = eps * sigma ** 2 / sigma_L ** 2
        sigma_b = x.new_full(x.shape[:1], sigma)
        x = langevin(lambda y: score_fn(y, sigma_b), x, step_size=alpha, n_steps=n_steps_each,
                     generator=generator)
    if denoise:
        x = tweedie(x, score_fn(x, x.new_full(x.shape[:1], sigma_L)), 1.0, sigma_L)
    return x


# --- SDEs and their samplers [F22-F29] -----------------------------------------------------------


class _LinearSDE:
    """dx = a(s) x ds + g(s) dw on s in [0, 1], with a Gaussian prior N(0, prior_std^2 I). [F22]

    Subclasses define ``drift_coef(s)`` = a(s), ``diffusion(s)`` = g(s) and ``marginal_coefs(s)``
    = (mean coefficient, std) of p_{0s}(x_s | x0). Every s is a (B,) tensor.
    """
    prior_std = 1.0

    def drift(self, x, s):
        """f(x, s) = a(s) x. [F22]"""
        return bcast(self.drift_coef(s), x) * x

    def marginal(self, x0, s):
        """p_{0s}(x_s | x0) = N(m(s) x0, std(s)^2 I); returns (mean, std (B, 1, ..., 1)). [F23]"""
        _check_batch(x0, "x0")
        _check_per_example(s, x0, "s")
        scale, std = self.marginal_coefs(s)
        return bcast(scale, x0) * x0, bcast(std, x0)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=torch.float32):
        """z ~ N(0, prior_std^2 I), the approximate p_1. [F5, F22]"""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per example, in nats."""
        d = z[0].numel()
        return (-0.5 * _sum_flat(z ** 2) / self.prior_std ** 2
                - d * math.log(self.prior_std) - 0.5 * d * math.log(2 * math.pi))


class VPSDE(_LinearSDE):
    """Variance preserving: f = -1/2 beta(s) x, g = sqrt(beta(s)), the continuous DDPM. [F22, F23]

    beta(s) = beta_min + s (beta_max - beta_min); mean exp(-1/2 B(s)) x0 and variance
    1 - exp(-B(s)), B(s) = int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2.
    """

    def __init__(self, beta_min=0.1, beta_max=20.0):
        _check_positive("beta_min", beta_min)
        _check_positive("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"beta_max must be >= beta_min = {beta_min}, got {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, s):
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def int_beta(self, s):
        return self.beta_min * s + (self.beta_max - self.beta_min) * s ** 2 / 2

    def drift_coef(self, s):
        return -0.5 * self.beta(s)

    def diffusion(self, s):
        return self.beta(s).sqrt()

    def marginal_coefs(self, s):
        return torch.exp(-0.5 * self.int_beta(s)), (-torch.expm1(-self.int_beta(s))).sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: f = -1/2 beta(s) x, g = sqrt(beta(s) (1 - exp(-2 B(s)))). [F22, F23]

    Mean as VP, variance (1 - exp(-B(s)))^2, always below the VP variance.
    """

    def diffusion(self, s):
        return (self.beta(s) * -torch.expm1(-2 * self.int_beta(s))).sqrt()

    def marginal_coefs(self, s):
        return torch.exp(-0.5 * self.int_beta(s)), -torch.expm1(-self.int_beta(s))


class VESDE(_LinearSDE):
    """Variance exploding: f = 0, g = sigma(s) sqrt(2 log(sigma_max / sigma_min)). [F22, F23]

    sigma(s) = sigma_min (sigma_max / sigma_min)^s; mean x0 and the exact variance
    sigma(s)^2 - sigma_min^2 (zero at s = 0); prior N(0, (sigma_max^2 - sigma_min^2) I).
    """

    def __init__(self, sigma_min=0.01, sigma_max=50.0):
        _check_positive("sigma_min", sigma_min)
        _check_positive("sigma_max", sigma_max)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {sigma_min}, got {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.prior_std = math.sqrt(sigma_max ** 2 - sigma_min ** 2)

    def sigma(self, s):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** s

    def drift_coef(self, s):
        return torch.zeros_like(s)

    def diffusion(self, s):
        return self.sigma(s) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal_coefs(self, s):
        return torch.ones_like(s), (self.sigma(s) ** 2 - self.sigma_min ** 2).sqrt()


def reverse_drift(sde, score, x, s, ode=False):
    """f(x, s) - g(s)^2 score (reverse SDE, F24), or f - 1/2 g^2 score (probability flow, F26)."""
    g2 = bcast(sde.diffusion(s), x) ** 2
    return sde.drift(x, s) - (0.5 if ode else 1.0) * g2 * score


def _time_grid(sched, steps):
    """Descending integer steps tau_S = T > ... > tau_1 >= 1: all T, S evenly spaced, or given."""
    if steps is None:
        steps = sched.T
    if isinstance(steps, int) and not isinstance(steps, bool):
        if not 1 <= steps <= sched.T:
            raise ValueError(f"steps must be in 1..T = 1..{sched.T}, got {steps}")
        return torch.linspace(sched.T, 1, steps, dtype=torch.float64).round().long().tolist()
    grid = [int(t) for t in steps]
    ok = (len(grid) >= 1 and grid[0] == sched.T and grid[-1] >= 1
          and all(a > b for a, b in zip(grid, grid[1:])))
    if not ok:
        raise ValueError(f"steps must be an int or a strictly descending sequence of steps that "
                         f"starts at T = {sched.T} and ends >= 1, got {grid}")
    return grid


def _check_inpainting(x, known, mask):
    if known is None and mask is None:
        return
    if known is None or mask is None:
        raise ValueError("known and mask must be given together for inpainting")
    _check_same_shape(x, known, "x", "known")
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask must be a bool tensor of the data's shape {tuple(x.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _replace_known(x, known, mask, alpha_bar, generator):
    """F31: on the mask, x_t := sqrt(alpha_bar) known + sqrt(1 - alpha_bar) z ~ q(x_t | known)."""
    if mask is None:
        return x
    noisy = math.sqrt(alpha_bar) * known + math.sqrt(1 - alpha_bar) * _randn_like(x, generator)
    return torch.where(mask, noisy, x)


def _replace_known_sde(x, known, mask, sde, s, generator):
    """F31 for an SDE: on the mask, x_s := m(s) known + std(s) z ~ p_{0s}(x_s | known)."""
    if mask is None:
        return x
    mean, std = sde.marginal(known, _full(x, s))
    return torch.where(mask, mean + std * _randn_like(x, generator), x)


@torch.no_grad()
def ddpm_sample(eps_model, sched, x, *, steps=None, sigma2="beta", generator=None,
                callback=None, known=None, mask=None):
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z, from x = x_T to x_0. [F6, F9]

    sigma_t^2 = beta_t or beta_tilde_t (``sigma2``). With a subsequence tau_S = T > ... > tau_1 of
    steps (``steps``, see _time_grid) the chain is respaced: beta'_i = 1 - alpha_bar_{tau_i} /
    alpha_bar_{tau_{i-1}} (tau_0 = 0), which keeps every alpha_bar_{tau_i}; with all T steps it is
    the original chain. The last step returns the mean: no noise is added at t = 1.
    Inpainting (F31): where the boolean ``mask`` is True, x is replaced after every step by a
    sample of q(x_t | known) at the new step, so the result equals ``known`` there exactly. The
    rest only approximates p(x_unknown | known): measured exactly on a 4-D correlated Gaussian
    (test_math.py), replacement recovers ~58% of the conditional mean shift, leaves variances
    ~0.1 too large and loses the correlation (KL 0.12 nats to the exact conditional, 1.05 for the
    prior), at 200 steps and at 1000 alike: a gap of the method, not of the discretization.
    ``callback(i, x)``, if given, sees x after each step.
    """
    _check_batch(x, "x")
    _check_choice("sigma2", sigma2, {"beta", "beta_tilde"})
    _check_inpainting(x, known, mask)
    taus = _time_grid(sched, steps)[::-1]  # ascending tau_1..tau_S
    alpha_bar = sched.alpha_bar[taus]
    sub = Schedule.from_betas(1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64),
                                                         alpha_bar[:-1]]))
    x = _replace_known(x, known, mask, sub.alpha_bar[-1].item(), generator)
    for i in range(len(taus), 0, -1):
        i_b = torch.full(x.shape[:1], i, dtype=torch.long, device=x.device)
        t_b = torch.full(x.shape[:1], taus[i - 1], dtype=torch.long, device=x.device)
        x = mu_from_eps(sub, x, i_b, eps_model(x, t_b))
        if i > 1:
            x = x + bcast(reverse_var(sub, i_b, sigma2), x).sqrt() * _randn_like(x, generator)
        x = _replace_known(x, known, mask, sub.alpha_bar[i - 1].item(), generator)
        if callback is not None:
            callback(len(taus) - i, x)
    return x


@torch.no_grad()
def ddim_sample(eps_model, sched, x, *, steps=50, eta=0.0, generator=None, callback=None):
    """DDIM: x_t' = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - sigma^2) eps + sigma z.

    [F29] x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eps = eps_theta(x_t, t).

    t' is the previous point of the grid (``steps``: an int S <= T or an explicit descending grid
    from T; the previous point of the last one is 0, where alpha_bar = 1, so the result is x0_hat).
    sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t'):
    eta = 0 is deterministic, eta = 1 with S = T is ancestral DDPM (sigma^2 = beta_tilde_t).
    """
    _check_batch(x, "x")
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    grid = _time_grid(sched, steps)
    for i, (t, t_prev) in enumerate(zip(grid, grid[1:] + [0])):
        alpha_bar, alpha_bar_prev = sched.alpha_bar[t].item(), sched.alpha_bar[t_prev].item()
        eps = eps_model(x, torch.full(x.shape[:1], t, dtype=torch.long, device=x.device))
        x0_hat = x0_from_eps(x, eps, math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar))
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)
                                * (1 - alpha_bar / alpha_bar_prev))
        c = 1 - alpha_bar_prev - sigma ** 2   # >= 0 for eta <= 1 up to float64 rounding
        if c < -1e-12:
            raise ValueError(f"1 - alpha_bar_prev - sigma^2 = {c} < 0 at t = {t}")
        x = math.sqrt(alpha_bar_prev) * x0_hat + math.sqrt(max(c, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def _s_grid(s_from, s_to, steps, x):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return torch.linspace(s_from, s_to, steps + 1, dtype=torch.float64).tolist()


def _full(x, s):
    return x.new_full(x.shape[:1], s)


@torch.no_grad()
def reverse_sde_sample(score_fn, sde, x, *, steps=1000, corrector_steps=0, snr=0.16,
                       eps_s=1e-3, generator=None, callback=None, known=None, mask=None):
    """Predictor-corrector sampling of the reverse SDE from s = 1 to eps_s. [F24, F28]

    Corrector (``corrector_steps`` Langevin steps at fixed s, F17 with eps = 2 delta):
    x <- x + delta score + sqrt(2 delta) z, delta = 2 alpha (snr ||z|| / ||score||)^2 with the norms
    averaged over the batch as in Song et al.'s code (per-example norms make delta heavy-tailed in
    low dimension: a point near a mode has a tiny score and would jump far), and alpha = 1 (the
    continuous-time rule; the discretized VP's alpha_i = 1 - beta_i -> 1 as steps grow).
    Predictor: Euler-Maruyama, x <- x - [f - g^2 score] ds + g sqrt(ds) z, ds = (1 - eps_s) / steps;
    the last predictor step adds no noise. The corrector runs before the predictor at each s.
    Inpainting (F31): where the boolean ``mask`` is True, x is replaced after every step by a
    sample of p_{0s}(x_s | known); the result equals ``known`` there exactly. The filled-in part
    is an approximation of the conditional (see ddpm_sample for the measured gap).
    score_fn(x, s) gets s as a (B,) tensor.
    """
    _check_batch(x, "x")
    _check_inpainting(x, known, mask)
    grid = _s_grid(1.0, eps_s, steps, x)
    x = _replace_known_sde(x, known, mask, sde, 1.0, generator)
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        s_b, ds = _full(x, s), s - s_next
        for _ in range(corrector_steps):
            score, z = score_fn(x, s_b), _randn_like(x, generator)
            ratio = _sum_flat(z ** 2).sqrt().mean() / _sum_flat(score ** 2).sqrt().mean()
            delta = 2 * (snr * ratio) ** 2
            x = x + delta * score + (2 * delta).sqrt() * z
        x = x - reverse_drift(sde, score_fn(x, s_b), x, s_b) * ds
        if i < steps - 1:
            x = x + bcast(sde.diffusion(s_b), x) * math.sqrt(ds) * _randn_like(x, generator)
            x = _replace_known_sde(x, known, mask, sde, s_next, generator)
        elif mask is not None:
            x = torch.where(mask, known, x)
        if callback is not None:
            callback(i, x)
    return x


def _ode_step(f, x, s, ds, method):
    """One step of size ds (either sign) of dx/ds = f(x, s): Euler, Heun or classic RK4."""
    if method == "euler":
        return x + ds * f(x, s)
    if method == "heun":
        k1 = f(x, s)
        k2 = f(x + ds * k1, s + ds)
        return x + ds / 2 * (k1 + k2)
    k1 = f(x, s)
    k2 = f(x + ds / 2 * k1, s + ds / 2)
    k3 = f(x + ds / 2 * k2, s + ds / 2)
    k4 = f(x + ds * k3, s + ds)
    return x + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


ODE_METHODS = ("euler", "heun", "rk4")


def _solve_ode(f, x, s_from, s_to, steps, method, callback=None):
    _check_choice("method", method, set(ODE_METHODS))
    grid = _s_grid(s_from, s_to, steps, x)
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        x = _ode_step(f, x, s, s_next - s, method)
        if callback is not None:
            callback(i, x)
    return x


def _flow(score_fn, sde):
    """The probability-flow drift f - 1/2 g^2 score as a function of (x, s float). [F26]"""
    return lambda x, s: reverse_drift(sde, score_fn(x, _full(x, s)), x, _full(x, s), ode=True)


@torch.no_grad()
def ode_sample(score_fn, sde, x, *, steps=100, method="rk4", eps_s=1e-3, callback=None):
    """Integrate the probability-flow ODE dx/ds = f - 1/2 g^2 score from s = 1 to eps_s. [F26]

    ``method`` is 'euler' (1 score evaluation per step), 'heun' (2) or 'rk4' (4). Deterministic:
    the same x gives the same sample, and ode_encode inverts it.
    """
    _check_batch(x, "x")
    return _solve_ode(_flow(score_fn, sde), x, 1.0, eps_s, steps, method, callback)


@torch.no_grad()
def ode_encode(score_fn, sde, x0, *, steps=100, method="rk4", eps_s=1e-3):
    """Run the probability-flow ODE forward, data -> latent, from s = eps_s to 1. [F26]"""
    _check_batch(x0, "x0")
    return _solve_ode(_flow(score_fn, sde), x0, eps_s, 1.0, steps, method)


# --- likelihood [F27] ----------------------------------------------------------------------------


def _divergence(f, x, probes):
    """div_x f(x) per example: exact (one backward pass per dimension) if probes is None, else
    Hutchinson's v^T (grad_x f) v averaged over the given probes. [F27]"""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x)
        if probes is None:
            flat = out.flatten(1)
            div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                      .flatten(1)[:, i] for i in range(flat.shape[1]))
        else:
            div = sum(_sum_flat(torch.autograd.grad((out * v).sum(), x, retain_graph=True)[0] * v)
                      for v in probes) / len(probes)
    return out.detach(), div.detach()


@torch.no_grad()
def ode_likelihood(score_fn, sde, x, *, steps=100, method="rk4", eps_s=1e-5,
                   divergence="exact", n_probes=1, probe="rademacher", dequantize=False,
                   generator=None):
    """log p_0(x) = log p_1(x_1) + int_0^1 div_x f~(x_s, s) ds along the probability flow. [F27]

    f~ is the F26 drift; the ODE runs from s = eps_s to 1 with the log-density change carried as
    an extra coordinate. ``divergence='exact'`` costs one backward pass per dimension (small d);
    'hutchinson' uses v^T (grad f~) v with ``n_probes`` fixed probes (``probe`` 'rademacher' or
    'gaussian'), an unbiased estimate. Returns a dict of (B,) tensors: 'nats' = log p(x) and
    'bpd' = -log p / (d ln 2).

    8-bit images (``dequantize=True``): x in [-1, 1] on the grid 2 k / 255 - 1 gets uniform noise
    over its bin (width 2 / 255), y = x + (2 / 255)(u - 1/2); 'nats' is then log p(y), and 'bpd' is
    bits per 8-bit value, -(log p(y) + d log(2 / 255)) / (d ln 2): the log-Jacobian of the scaling
    from 0..255 to [-1, 1] (and the bin volume) makes it comparable with published numbers.
    """
    _check_batch(x, "x")
    _check_choice("divergence", divergence, {"exact", "hutchinson"})
    shape, d = x.shape, x[0].numel()
    if dequantize:
        u = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + 2 / 255 * (u - 0.5)
    probes = None
    if divergence == "hutchinson":
        probes = [_probe(x, probe, generator) for _ in range(n_probes)]
    flow = _flow(score_fn, sde)

    def augmented(state, s):  # state = [x flattened, accumulated divergence]
        drift, div = _divergence(lambda y: flow(y, s), state[:, :d].reshape(shape), probes)
        return torch.cat([drift.flatten(1), div[:, None]], 1)

    state = torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], 1)
    state = _solve_ode(augmented, state, eps_s, 1.0, steps, method)
    nats = sde.prior_logp(state[:, :d].reshape(shape)) + state[:, d]
    offset = d * math.log(2 / 255) if dequantize else 0.0
    return {"nats": nats, "bpd": -(nats + offset) / (d * math.log(2))}


# --- controllable generation [F30, F31] and energy-based scores [F14] ----------------------------


def guided_score(score_fn, log_likelihood_fn, w):
    """grad log p_s(x) + w grad_x log p_s(y | x), by autograd of the log-likelihood. [F30]

    Bayes' rule for scores: with w = 1 this is grad log p_s(x | y) (p(y) drops out); w > 1
    sharpens the conditional (classifier guidance). log_likelihood_fn(x, s) returns log p_s(y | x)
    per example (B,) for the wanted y, e.g. a noise-conditional classifier's log-softmax at y.
    Returns a score function (x, s) usable in every sampler. Not differentiable in the classifier's
    parameters (a sampling tool).
    """
    def guided(x, s):
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(log_likelihood_fn(x_, s).sum(), x_)[0]
        return score_fn(x, s) + w * grad
    return guided


def classifier_free(cond_fn, uncond_fn, w):
    """Classifier-free guidance: (1 + w) cond(x, s) - w uncond(x, s). [F30]

    For eps-models eps_tilde = (1 + w) eps(x, y) - w eps(x, null); the same line combines scores.
    It is F30 with the classifier's gradient grad log p(y | x) = score(x | y) - score(x) read off
    one network trained with label dropout: w = 0 is the plain conditional model.
    """
    return lambda x, s: (1 + w) * cond_fn(x, s) - w * uncond_fn(x, s)


def energy_score(energy_fn):
    """Score of p(x) = exp(-E(x)) / Z: s(x, ...) = -grad_x E(x, ...); Z drops out. [F14]

    energy_fn(x, *cond) returns one energy per example (B,). The returned score takes the same
    arguments, so it plugs into every loss and sampler. While gradients are enabled (training) the
    gradient is taken with create_graph=True, so losses differentiate through it; inside a sampler
    (no_grad) it is a plain tensor.
    """
    def score(x, *cond):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_ = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = energy_fn(x_, *cond)
            return -torch.autograd.grad(energy.sum(), x_, create_graph=create_graph)[0]
    return score


def colour_basis(dtype=torch.float64, device=None):
    """An orthogonal 3x3 matrix M whose first row (1, 1, 1) / sqrt(3) is the grey axis. [F31]

    Colorization is inpainting in y = M x (per pixel, over the channel dimension): the first
    channel, sqrt(3) x grey, is known; the other two (orthonormal colour differences) are filled in.
    """
    return torch.tensor([[1 / math.sqrt(3)] * 3,
                         [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                         [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]],
                        dtype=dtype, device=device)


def to_colour_basis(x):
    """y = M x over the channel dimension of (B, 3, ...) images. [F31]"""
    return torch.einsum("ij,bj...->bi...", colour_basis(x.dtype, x.device), x)


def from_colour_basis(y):
    """x = M^T y, the inverse of to_colour_basis (M is orthogonal). [F31]"""
    return torch.einsum("ji,bj...->bi...", colour_basis(y.dtype, y.device), y)


def in_colour_basis(model_fn):
    """The model seen in the colour basis: y -> M model(M^T y, ...). [F31]

    An orthogonal change of variables maps scores (and eps predictions) by the same M, so any
    sampler run in y space with this model and ``colorization_known`` colorizes a grey image:
    ``from_colour_basis(ddpm_sample(in_colour_basis(eps_model), sched, to_colour_basis(x_T),
    known=known, mask=mask))``.
    """
    return lambda y, *args: to_colour_basis(model_fn(from_colour_basis(y), *args))


def colorization_known(grey):
    """(known, mask) in the colour basis for a grey image (B, 1, ...), the mean of R, G, B. [F31]"""
    if grey.ndim < 2 or grey.shape[1] != 1:
        raise ValueError(f"grey must have shape (B, 1, ...), got {tuple(grey.shape)}")
    known = torch.zeros(grey.shape[0], 3, *grey.shape[2:], dtype=grey.dtype, device=grey.device)
    known[:, :1] = math.sqrt(3) * grey
    mask = torch.zeros_like(known, dtype=torch.bool)
    mask[:, :1] = True
    return known, mask
