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
    Dhariwal, Nichol 2021, Diffusion Models Beat GANs (classifier guidance), arXiv:2105.05233
    Ho, Salimans 2022, Classifier-Free Diffusion Guidance, arXiv:2207.12598
    Lu et al. 2022, DPM-Solver++, arXiv:2211.01095; Karras et al. 2022, EDM, arXiv:2206.00364
    Dormand, Prince 1980, embedded Runge-Kutta formulae, J. Comput. Appl. Math. 6 (rk45)

Three ways in
    import ddpm_score                 # the math, samplers and networks as functions
    python ddpm_score.py train        # train on built-in data (no download), then sample
    make test                         # the spec tests

Controllable generation from the command line (``python ddpm_score.py --help`` has more):
    python ddpm_score.py train --data ring --conditional --out runs/ring
    python ddpm_score.py sample --run runs/ring --class 3 --guidance 1       # classifier-free
    python ddpm_score.py train --classifier --out RUN/classifier             # then --class K
    python ddpm_score.py sample --run runs/shapes --inpaint --mask centre    # image data
"""
import argparse
import ast
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# --- notation and helpers -----------------------------------------------------------------------


def bcast(v, x):
    """Reshape a per-example (B,) tensor to (B, 1, ..., 1) so it broadcasts against x (B, ...)."""
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _full(x, s):
    """Continuous time s as a (B,) tensor, at least float32 (PITFALLS #11: no bf16 time)."""
    return torch.full(x.shape[:1], s, device=x.device,
                      dtype=torch.promote_types(x.dtype, torch.float32))


def _check_batch(x, name="x"):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, ...) with B >= 1, got {got}")


def _check_shape(v, shape, name):
    if not isinstance(v, torch.Tensor) or v.shape != shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")


def _check_real(name, value, hi=math.inf):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < hi):
        raise ValueError(f"{name} must be a finite number in (0, {hi}), got {value!r}")


def _check_count(name, value, least):
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _mean_flat(x):
    """Per-example mean over every non-batch dimension: (B, ...) -> (B,)."""
    return reduce(x, "b ... -> b", "mean")


def _sum_flat(x):
    return reduce(x, "b ... -> b", "sum")


# --- schedules [F1, F2, Schedules] ---------------------------------------------------------------


def linear_betas(T=1000, beta_1=None, beta_T=None):
    """beta_t = beta_1 + (t - 1) / (T - 1) (beta_T - beta_1), t = 1..T, float64. [Schedules, F1, F5]
    Defaults 1e-4 and 0.02 (Ho et al.) scaled by 1000 / T as improved DDPM does, capped at 0.999:
    every T >= 20 ends near N(0, I), sqrt(alpha_bar_T) < 0.007 (unscaled, T = 100 gives 0.60)."""
    _check_count("T", T, 1)
    beta_1 = min(0.1 / T, 0.999) if beta_1 is None else beta_1
    beta_T = min(20 / T, 0.999) if beta_T is None else beta_T
    _check_real("beta_1", beta_1, 1)
    _check_real("beta_T", beta_T, 1)
    if beta_T < beta_1:
        raise ValueError(f"beta_T must be >= beta_1 = {beta_1}, got {beta_T}")
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T=1000, s=0.008, max_beta=0.999):
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) pi / 2). [Schedules]
    beta_t = min(1 - f(t) / f(t-1), max_beta), float64 (T,): the last steps are clipped, which
    is why every sampler coefficient is tested for them (PITFALLS #1)."""
    _check_count("T", T, 1)
    _check_real("s", s)
    _check_real("max_beta", max_beta, 1)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def geometric_sigmas(sigma_max, sigma_min, L):
    """sigma_1 > ... > sigma_L, geometric from sigma_max to sigma_min, float64 (L,). [F19]"""
    _check_real("sigma_max", sigma_max)
    _check_real("sigma_min", sigma_min)
    _check_count("L", L, 1)
    if L > 1 and not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min = {sigma_min}, got {sigma_max}")
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), L, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete schedule: float64 arrays of length T+1, index 0 meaning no noise. [F2, F7]
    beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{i<=t} alpha_i, beta_tilde_t = (1 -
    alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t. Plain tensors, not module buffers (PITFALLS #10);
    read-only (each array is a fresh copy); ``==`` is identity."""
    T: int
    _beta: torch.Tensor
    _alpha: torch.Tensor
    _alpha_bar: torch.Tensor
    _beta_tilde: torch.Tensor
    beta = property(lambda self: self._beta.clone())
    alpha = property(lambda self: self._alpha.clone())
    alpha_bar = property(lambda self: self._alpha_bar.clone())
    beta_tilde = property(lambda self: self._beta_tilde.clone())

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
        alpha_bar = torch.cumprod(1 - beta, 0)
        beta_tilde = torch.cat([beta[:1], (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * betas])
        return cls(len(betas), beta, 1 - beta, alpha_bar, beta_tilde)


def _check_t(sched, t, x):
    """t must be a LongTensor of shape (B,) with values in 1..T."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.shape != x.shape[:1]:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a LongTensor of shape ({x.shape[0]},), got {got}")
    if t.numel() and (t.min() < 1 or t.max() > sched.T):
        raise ValueError(f"t must lie in 1..T = 1..{sched.T}, got values in "
                         f"{int(t.min())}..{int(t.max())}")
    return t.cpu()


def marginal_coefs(sched, t):
    """(scale, std) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each (B,) float64. [F3]"""
    alpha_bar = sched._alpha_bar[_check_t(sched, t, t)]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


# --- forward process [F1-F5] ---------------------------------------------------------------------


def _noise(x, noise, generator, name="noise"):
    if noise is not None:
        _check_shape(noise, x.shape, name)
    return _randn_like(x, generator) if noise is None else noise


def q_step(sched, x_prev, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, one step of q(x_t | x_{t-1}). [F1]"""
    _check_batch(x_prev, "x_prev")
    t = _check_t(sched, t, x_prev)
    z = _noise(x_prev, noise, generator)
    return bcast(sched._alpha[t].sqrt(), x_prev) * x_prev + bcast(sched._beta[t].sqrt(), z) * z


def q_mean_var(sched, x0, t):
    """q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I); returns (mean, var). [F3]"""
    _check_batch(x0, "x0")
    alpha_bar = sched._alpha_bar[_check_t(sched, t, x0)]   # float64, cast at use (PITFALLS #11)
    return bcast(alpha_bar.sqrt(), x0) * x0, bcast(1 - alpha_bar, x0)


def q_sample(sched, x0, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, the closed form. [F3, F4]"""
    mean, var = q_mean_var(sched, x0, t)
    return mean + var.sqrt() * _noise(x0, noise, generator)


# --- posterior and ELBO [F6-F13] -----------------------------------------------------------------


def posterior_mean_var(sched, x0, xt, t):
    """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I); returns (mu_tilde, beta_tilde). [F7]
    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t."""
    _check_batch(x0, "x0")
    _check_shape(xt, x0.shape, "xt")
    t = _check_t(sched, t, x0)
    beta, alpha_bar, alpha_bar_prev = sched._beta[t], sched._alpha_bar[t], sched._alpha_bar[t - 1]
    mu_tilde = (bcast(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar), x0) * x0
                + bcast(sched._alpha[t].sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar), x0) * xt)
    return mu_tilde, bcast(sched._beta_tilde[t], x0)


def mu_from_eps(sched, xt, t, eps):
    """mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t): mu_tilde with the
    true eps (F8), the model mean with eps_theta (F9). [F8, F9]"""
    _check_batch(xt, "xt")
    _check_shape(eps, xt.shape, "eps")
    t = _check_t(sched, t, xt)
    coef = sched._beta[t] / (1 - sched._alpha_bar[t]).sqrt()
    return (xt - bcast(coef, xt) * eps) / bcast(sched._alpha[t].sqrt(), xt)


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element in nats, arguments broadcast: 1/2
    [log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1]. [F13]"""
    var1, var2 = (torch.as_tensor(v, dtype=torch.float64) if not torch.is_tensor(v) else v
                  for v in (var1, var2))
    if (var1 <= 0).any() or (var2 <= 0).any():
        raise ValueError("var1 and var2 must be > 0")
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def reverse_var(sched, t, kind="beta"):
    """sigma_t^2 of p_theta(x_{t-1} | x_t): beta_t or beta_tilde_t, (B,) float64; at t = 1
    beta_tilde is clipped to beta_tilde_2 (beta_1 if T = 1), as in improved DDPM. [F6, F7]"""
    _check_choice("kind", kind, {"beta", "beta_tilde"})
    t = _check_t(sched, t, t)
    if kind == "beta":
        return sched._beta[t]
    floor = sched._beta_tilde[2] if sched.T > 1 else sched._beta[1]
    return torch.where(t == 1, floor, sched._beta_tilde[t])


def discretized_gaussian_logp(x0, mean, var):
    """log P(x0) of 8-bit data under N(mean, var) over the pixel's bin, in nats. [F10, L_0]
    k in 0..255 is x0 = 2 k / 255 - 1: P = Phi((x0 + 1/255 - mean) / std) - Phi((x0 - 1/255 -
    mean) / std), edge bins open (the masses sum to 1), floored at 1e-12."""
    _check_shape(mean, x0.shape, "mean")
    var = torch.as_tensor(var, dtype=x0.dtype, device=x0.device)
    if not (var > 0).all():
        raise ValueError(f"var must be > 0, got min {var.min().item()}")
    phi = lambda u: 0.5 * (1 + torch.erf((u - mean) / (var * 2).sqrt()))  # noqa: E731
    upper = torch.where(x0 > 1 - 1e-3, 1.0, phi(x0 + 1 / 255))       # k = 255: up to +inf
    return torch.log((upper - torch.where(x0 < -1 + 1e-3, 0.0, phi(x0 - 1 / 255))).clamp(min=1e-12))


def vlb_bpd(eps_model, sched, x0, *, sigma2="beta", decoder="discretized",
            decoder_var="published", generator=None):
    """The variational bound (F10) of an eps-model per example, in bits per dimension:
    KL(q(x_T|x0) || N(0, I)) + sum_{t>=2} KL(q(x_{t-1} | x_t, x0) || N(mu_theta, sigma_t^2 I)) - log
    p(x0 | x1) [F7, F9, F11, F13], sigma_t^2 = reverse_var(t, sigma2), one x_t ~ q(x_t | x0) per t;
    decoder 'discretized' (8-bit data in [-1, 1]) or 'gaussian', with sigma_1^2 = beta_tilde_2 by
    ``decoder_var='published'`` (Ho et al.'s and improved DDPM's code: bits/dim as in papers) or
    reverse_var(1, sigma2) by 'sigma2'. Returns (B,) 'total', 'prior'; (B, T) 'terms'."""
    _check_batch(x0, "x0")
    _check_choice("decoder", decoder, {"discretized", "gaussian"})
    _check_choice("sigma2", sigma2, {"beta", "beta_tilde"})
    _check_choice("decoder_var", decoder_var, {"published", "sigma2"})
    if decoder == "discretized" and not ((x0 >= -1) & (x0 <= 1)).all():
        raise ValueError(f"x0 must be 8-bit data scaled to [-1, 1] for decoder='discretized', got "
                         f"values in {x0.min().item():.4g}..{x0.max().item():.4g} (PITFALLS #12)")
    B, d = x0.shape[0], x0[0].numel()
    terms = x0.new_zeros(B, sched.T)
    for step in range(1, sched.T + 1):
        t = torch.full((B,), step, dtype=torch.long, device=x0.device)
        xt = q_sample(sched, x0, t, generator=generator)
        mu = mu_from_eps(sched, xt, t, eps_model(xt, t))
        kind = "beta_tilde" if step == 1 and decoder_var == "published" else sigma2
        var = bcast(reverse_var(sched, t, kind), x0)
        if step > 1:
            nll = gaussian_kl(*posterior_mean_var(sched, x0, xt, t), mu, var)
        elif decoder == "discretized":
            nll = -discretized_gaussian_logp(x0, mu, var)
        else:
            nll = 0.5 * (torch.log(2 * math.pi * var) + (x0 - mu) ** 2 / var)
        terms[:, step - 1] = _sum_flat(nll)
    mean_T, var_T = q_mean_var(sched, x0, torch.full((B,), sched.T, device=x0.device))
    prior = _sum_flat(gaussian_kl(mean_T, var_T, torch.zeros_like(x0), torch.ones_like(var_T)))
    terms, prior = terms / (d * math.log(2)), prior / (d * math.log(2))
    return {"total": prior + terms.sum(1), "prior": prior, "terms": terms}


# --- parameterizations: eps, score, x0 [F21] -----------------------------------------------------


def _as_coef(v, x, name):
    """A (B,) or broadcastable coefficient, cast to x's dtype; must be > 0."""
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    if (v <= 0).any():
        raise ValueError(f"{name} must be > 0, got min {v.min().item()}")
    if v.ndim == 1 and v.shape[0] == x.shape[0] and x.ndim > 1:
        return bcast(v, x)
    return v.to(device=x.device, dtype=x.dtype)


def eps_to_score(eps, std):
    """score = -eps / std, the score of q(x_t | x0) = N(scale x0, std^2 I); std (B,) or
    broadcastable: sqrt(1 - alpha_bar_t) for DDPM, std(s) of ``sde.marginal`` for an SDE. [F21]"""
    return -eps / _as_coef(std, eps, "std")


def score_to_eps(score, std):
    """eps = -std * score, the inverse of eps_to_score. [F21]"""
    return -_as_coef(std, score, "std") * score


def x0_from_eps(xt, eps, scale, std):
    """x0 = (x_t - std eps) / scale, inverting x_t = scale x0 + std eps. [F3, F21, F29]"""
    _check_shape(eps, xt.shape, "eps")
    return (xt - _as_coef(std, xt, "std") * eps) / _as_coef(scale, xt, "scale")


def tweedie(xt, score, scale, std):
    """Tweedie: E[x0 | x_t] = (x_t + std^2 grad log p_t(x_t)) / scale; DDPM: scale =
    sqrt(alpha_bar_t), std = sqrt(1 - alpha_bar_t); NCSN: scale = 1, std = sigma. [F21]"""
    _check_shape(score, xt.shape, "score")
    return (xt + _as_coef(std, xt, "std") ** 2 * score) / _as_coef(scale, xt, "scale")


# --- losses (per example, shape (B,), mean over the data dimensions) -----------------------------


def draw_t(sched, x0, generator=None):
    """t ~ U{1..T}, one per example: the step F12 averages over. [F12]"""
    return torch.randint(1, sched.T + 1, x0.shape[:1], generator=generator, device=x0.device)


def _sigmas(sigmas):
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 1 or not (sigmas > 0).all():
        raise ValueError(f"sigmas must be a non-empty 1-D sequence of numbers > 0, "
                         f"got {sigmas.tolist()}")
    return sigmas


def draw_sigma(sigmas, x0, generator=None):
    """sigma ~ U{sigma_1..sigma_L}, one per example in x0's dtype: F19's (1/L) sum_i. [F19]"""
    sigmas = _sigmas(sigmas)
    idx = torch.randint(0, len(sigmas), x0.shape[:1], generator=generator, device=x0.device)
    return sigmas.to(x0.device)[idx].to(x0.dtype)


def draw_s(x0, generator=None, eps_s=1e-5):
    """s ~ U(eps_s, 1), one per example, at least float32 (PITFALLS #11): F25's E_s. [F25]"""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    return eps_s + (1 - eps_s) * torch.rand(x0.shape[:1], generator=generator, device=x0.device,
                                            dtype=dtype)


def eps_loss(eps_model, sched, x0, *, t=None, noise=None, generator=None):
    """L_simple = ||eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t)||^2 / d.
    [F12] Per example; t ~ U{1..T}, eps ~ N(0, I) unless given; eps_model(xt, t), t (B,) long."""
    _check_batch(x0, "x0")
    t = draw_t(sched, x0, generator) if t is None else t
    eps = _noise(x0, noise, generator)
    return _mean_flat((eps - eps_model(q_sample(sched, x0, t, eps), t)) ** 2)


def dsm_loss(score_model, x0, sigmas, *, sigma=None, noise=None, generator=None):
    """NCSN: lambda(sigma) ||s_theta(x~, sigma) + (x~ - x0) / sigma^2||^2 / d, x~ = x0 + sigma z.
    [F18, F19] sigma (B,) given or drawn from ``sigmas``; lambda = sigma^2 (PITFALLS #6)."""
    _check_batch(x0, "x0")
    sigma = draw_sigma(sigmas, x0, generator) if sigma is None else sigma
    _check_shape(sigma, x0.shape[:1], "sigma")
    if not (sigma > 0).all():
        raise ValueError(f"sigma must be > 0, got min {sigma.min().item()}")
    z, sigma_b = _noise(x0, noise, generator), bcast(sigma, x0)
    return _mean_flat(sigma_b ** 2 * (score_model(x0 + sigma_b * z, sigma) + z / sigma_b) ** 2)


def sde_loss(score_model, sde, x0, *, likelihood_weighting=False, s=None, noise=None,
             eps_s=1e-5, generator=None):
    """E_s lambda(s) ||s_theta(x_s, s) - grad log p_{0s}(x_s | x0)||^2 / d, s ~ U(eps_s, 1). [F25]
    lambda = std(s)^2, or g(s)^2 with ``likelihood_weighting`` (then a bound on the KL)."""
    _check_batch(x0, "x0")
    _check_real("eps_s", eps_s, 1)
    s = draw_s(x0, generator, eps_s) if s is None else s
    _check_shape(s, x0.shape[:1], "s")
    if not ((s > 0) & (s <= 1)).all():
        raise ValueError(f"s must lie in (0, 1], got values in {s.min().item()}..{s.max().item()}")
    z = _noise(x0, noise, generator)
    mean, std = sde.marginal(x0, s)
    weight = bcast(sde.diffusion(s), x0) ** 2 if likelihood_weighting else std ** 2
    return _mean_flat(weight * (score_model(mean + std * z, s) + z / std) ** 2)


def score_matching_loss(score_model, x):
    """Implicit score matching: (1/2 ||s_theta(x)||^2 + tr(grad_x s_theta(x))) / d. [F16]
    F15 / d minus a theta-free constant; the trace is exact (one backward pass per dimension)."""
    _check_batch(x, "x")
    x = x.detach().requires_grad_(True)
    score = score_model(x).flatten(1)
    trace = sum(torch.autograd.grad(score[:, i].sum(), x, create_graph=True)[0].flatten(1)[:, i]
                for i in range(score.shape[1]))
    return (0.5 * (score ** 2).sum(1) + trace) / score.shape[1]


def sliced_score_matching_loss(score_model, x, *, n_projections=1, probe="rademacher",
                               generator=None):
    """Sliced score matching: (1/2 ||s_theta(x)||^2 + v^T grad_x s_theta(x) v) / d. [F16]
    E[v v^T] = I (Rademacher or Gaussian), so E_v[v^T J v] = tr(J); averaged over n_projections."""
    _check_batch(x, "x")
    _check_choice("probe", probe, {"rademacher", "gaussian"})
    _check_count("n_projections", n_projections, 1)
    x = x.detach().requires_grad_(True)
    score = score_model(x)
    vjv = sum(_sum_flat(torch.autograd.grad((score * v).sum(), x, create_graph=True)[0] * v)
              for v in (_probe(x, probe, generator) for _ in range(n_projections)))
    return (0.5 * _sum_flat(score ** 2) + vjv / n_projections) / x[0].numel()


def _probe(x, kind, generator):
    """A random probe v with E[v v^T] = I: Rademacher (+-1) or standard Gaussian. [F16, F27]"""
    if kind == "gaussian":
        return _randn_like(x, generator)
    return (2 * torch.randint(0, 2, x.shape, generator=generator, device=x.device) - 1).to(x.dtype)


# --- Langevin dynamics and NCSN [F17, F20] -------------------------------------------------------


@torch.no_grad()
def langevin(score_fn, x, *, step_size, n_steps, generator=None):
    """x_k = x_{k-1} + (eps / 2) grad log p(x_{k-1}) + sqrt(eps) z_k, k = 1..n_steps. [F17]
    Exact only as eps -> 0: for N(0, c^2) the stationary variance is c^2 / (1 - eps / (4 c^2))."""
    _check_batch(x, "x")
    _check_real("step_size", step_size)
    _check_count("n_steps", n_steps, 0)
    for _ in range(n_steps):
        x = x + step_size / 2 * score_fn(x) + math.sqrt(step_size) * _randn_like(x, generator)
    return x


@torch.no_grad()
def annealed_langevin(score_fn, x, sigmas, *, eps=2e-5, n_steps_each=100, denoise=True,
                      generator=None):
    """Annealed Langevin (NCSN): for i = 1..L, K steps of F17 with s_theta(., sigma_i). [F20]
    alpha_i = eps sigma_i^2 / sigma_L^2, Tweedie last (``denoise``), float32 sigma (PITFALLS 11)."""
    _check_batch(x, "x")
    _check_real("eps", eps)
    sigmas = _sigmas(sigmas).tolist()
    for sigma, sigma_b in zip(sigmas, [_full(x, sigma) for sigma in sigmas]):
        alpha = eps * sigma ** 2 / sigmas[-1] ** 2
        x = langevin(lambda y: score_fn(y, sigma_b), x, step_size=alpha, n_steps=n_steps_each,
                     generator=generator)
    return tweedie(x, score_fn(x, _full(x, sigmas[-1])), 1.0, sigmas[-1]) if denoise else x


# --- SDEs and their samplers [F22-F29, F32-F35] --------------------------------------------------


class _LinearSDE:
    """dx = a(s) x ds + g(s) dw on s in [0, 1], prior N(0, prior_std^2 I). [F22]
    Subclasses define drift_coef(s) = a(s), diffusion(s) = g(s), marginal_coefs(s) = (m, std) of
    p_{0s}(x_s | x0), s (B,); ``spacing`` is the solvers' default grid (s_grid)."""
    prior_std, spacing = 1.0, "uniform"

    def drift(self, x, s):
        """f(x, s) = a(s) x. [F22]"""
        return bcast(self.drift_coef(s), x) * x

    def marginal(self, x0, s):
        """p_{0s}(x_s | x0) = N(m(s) x0, std(s)^2 I); returns (mean, std (B, 1, ..., 1)). [F23]"""
        _check_batch(x0, "x0")
        _check_shape(s, x0.shape[:1], "s")
        scale, std = self.marginal_coefs(s)
        return bcast(scale, x0) * x0, bcast(std, x0)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=torch.float32):
        """z ~ N(0, prior_std^2 I), the approximate p_1. [F5, F22]"""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per example, in nats. [F22]"""
        d = z[0].numel()
        return (-0.5 * _sum_flat(z ** 2) / self.prior_std ** 2
                - d * math.log(self.prior_std) - 0.5 * d * math.log(2 * math.pi))


class VPSDE(_LinearSDE):
    """Variance preserving: f = -1/2 beta(s) x, g = sqrt(beta(s)); mean exp(-B/2) x0, variance
    1 - exp(-B), B(s) = int_0^s beta, beta(s) = beta_min + s (beta_max - beta_min). [F22, F23]"""
    spacing = "quadratic"

    def __init__(self, beta_min=0.1, beta_max=20.0):
        _check_real("beta_min", beta_min)
        _check_real("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"beta_max must be >= beta_min = {beta_min}, got {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, s):
        """beta(s) = beta_min + s (beta_max - beta_min). [F22]"""
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def int_beta(self, s):
        """B(s) = int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2. [F23]"""
        return self.beta_min * s + (self.beta_max - self.beta_min) * s ** 2 / 2

    def drift_coef(self, s):
        return -0.5 * self.beta(s)

    def diffusion(self, s):
        return self.beta(s).sqrt()

    def marginal_coefs(self, s):
        return torch.exp(-0.5 * self.int_beta(s)), (-torch.expm1(-self.int_beta(s))).sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: f = -1/2 beta(s) x, g = sqrt(beta(s) (1 - exp(-2 B(s)))); mean as VP, variance
    (1 - exp(-B(s)))^2. [F22, F23]"""

    def diffusion(self, s):
        return (self.beta(s) * -torch.expm1(-2 * self.int_beta(s))).sqrt()

    def marginal_coefs(self, s):
        return torch.exp(-0.5 * self.int_beta(s)), -torch.expm1(-self.int_beta(s))


class VESDE(_LinearSDE):
    """Variance exploding: f = 0, g = sigma(s) sqrt(2 log(sigma_max / sigma_min)), sigma(s) =
    sigma_min (sigma_max / sigma_min)^s; mean x0, variance sigma(s)^2 - sigma_min^2. [F22, F23]"""

    def __init__(self, sigma_min=0.01, sigma_max=50.0):
        _check_real("sigma_min", sigma_min)
        _check_real("sigma_max", sigma_max)
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


class DiscreteVPSDE(VPSDE):
    """A Schedule in continuous time: at s = t / T the marginal is exactly q(x_t | x0). [F35]
    log alpha_bar linear in t = s T between steps: B(s) = -log alpha_bar(s T), beta(s) = -T log(1 -
    beta_t) on ((t-1) / T, t / T] (F22); s within 1e-4 steps of a step is snapped to it."""

    def __init__(self, sched):
        self.sched, self.T, self._tables = sched, sched.T, {}

    def _steps(self, s):
        """(log alpha_bar on s's device, t = s T in float64 snapped to integer steps)."""
        if s.device not in self._tables:
            self._tables[s.device] = self.sched._alpha_bar.log().to(s.device)
        t = s.double() * self.T
        return self._tables[s.device], torch.where((t - t.round()).abs() < 1e-4, t.round(), t)

    def int_beta(self, s):
        """B(s) = -log alpha_bar(s T), log alpha_bar linear between steps. [F23]"""
        table, t = self._steps(s)
        k = t.floor().clamp(0, self.T - 1).long()
        return -(table[k] + (t - k) * (table[k + 1] - table[k])).to(s.dtype)

    def beta(self, s):
        """beta(s) = T (log alpha_bar_{t-1} - log alpha_bar_t), t = ceil(s T). [F22]"""
        table, t = self._steps(s)
        k = t.ceil().clamp(1, self.T).long()
        return (self.T * (table[k - 1] - table[k])).to(s.dtype)


def reverse_drift(sde, score, x, s, ode=False):
    """f(x, s) - g(s)^2 score (reverse SDE), or f - 1/2 g^2 score (probability flow). [F24, F26]"""
    return sde.drift(x, s) - (0.5 if ode else 1.0) * bcast(sde.diffusion(s), x) ** 2 * score


def _coefs(sde, times):
    """{s: (a(s), g(s)^2, m(s), std(s))} as Python floats, one float64 evaluation on the CPU."""
    s = torch.tensor(list(times), dtype=torch.float64)
    cols = (sde.drift_coef(s), sde.diffusion(s) ** 2, *sde.marginal_coefs(s))
    return dict(zip(s.tolist(), zip(*(c.tolist() for c in cols))))


def _s_at_log_sigma(sde, targets):
    """s where log(std(s) / m(s)) = target: linear interpolation in a table of 4096 times, then
    Newton steps in log s; below the table, a straight line in log s. [F34]"""
    def slope(u):                     # d log(std / m) / d log s = s g^2 / (2 std^2), from F23
        return u * sde.diffusion(u) ** 2 / (2 * sde.marginal_coefs(u)[1] ** 2)

    grid = torch.linspace(0, 1, 4097, dtype=torch.float64)[1:]
    table = torch.log(torch.div(*reversed(sde.marginal_coefs(grid))))   # increasing in s
    i = torch.searchsorted(table, targets).clamp(1, len(grid) - 1)
    w = (targets - table[i - 1]) / (table[i] - table[i - 1])
    s = torch.where(targets < table[0], grid[0] * torch.exp((targets - table[0]) / slope(grid[0])),
                    grid[i - 1] + w * (grid[i] - grid[i - 1]))
    for _ in range(2):
        m, std = sde.marginal_coefs(s)
        s = s * torch.exp(-(torch.log(std / m) - targets) / slope(s))
    return s


GRIDS = ("uniform", "quadratic", "logsnr", "edm")


def s_grid(sde, steps, eps_s=1e-3, spacing=None, rho=7.0):
    """Times 1 = s_0 > ... > s_N = eps_s (N = steps) for the SDE solvers: 'uniform'; 'quadratic',
    s_i = eps_s + (1 - eps_s) (1 - i / N)^2; 'logsnr', uniform in log(m / std); 'edm', std / m on
    Karras et al.'s rho-grid. None: sde.spacing, the best for RK4 likelihoods on a 16-d Gaussian
    (bench): quadratic for the VP family (RMS at 48 NFE 2.5e-3 nats; uniform 0.14, logsnr 0.019,
    edm 0.031), uniform for VE (0.078; quadratic 0.46). A sequence is the grid itself. [F34]"""
    if not isinstance(steps, (int, float)):
        grid = [float(s) for s in steps]
        if len(grid) < 2 or not all(1 >= a > b >= 0 for a, b in zip(grid, grid[1:])):
            raise ValueError(f"steps must be an int or a strictly descending grid of at least two "
                             f"times in [0, 1], got {grid}")
        return grid
    _check_count("steps", steps, 1)
    _check_real("eps_s", eps_s, 1)
    spacing = sde.spacing if spacing is None else spacing
    _check_choice("spacing", spacing, set(GRIDS))
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if spacing in ("uniform", "quadratic"):
        s = eps_s + (1 - eps_s) * (1 - u) ** (1 if spacing == "uniform" else 2)
        return [1.0, *s[1:].tolist()]
    ends = torch.tensor([1.0, eps_s], dtype=torch.float64)
    log_sigma = torch.log(torch.div(*reversed(sde.marginal_coefs(ends))))
    if spacing == "logsnr":
        log_sigma = log_sigma[0] + u * (log_sigma[1] - log_sigma[0])
    else:
        r = (log_sigma / rho).exp()
        log_sigma = rho * torch.log(r[0] + u * (r[1] - r[0]))
    return [1.0, *_s_at_log_sigma(sde, log_sigma[1:-1]).tolist(), eps_s]


def _time_grid(sched, steps, x):
    """Descending integer steps tau_S = T > ... > tau_1 >= 1 (all T, S evenly spaced, or given)
    and each as a (B,) LongTensor on x's device, made before the loop."""
    steps = sched.T if steps is None else steps
    if isinstance(steps, int) and not isinstance(steps, bool):
        if not 1 <= steps <= sched.T:
            raise ValueError(f"steps must be in 1..T = 1..{sched.T}, got {steps}")
        steps = torch.linspace(sched.T, 1, steps, dtype=torch.float64).round().long().tolist()
    grid = [int(t) for t in steps]
    if not (grid and grid[0] == sched.T and grid[-1] >= 1
            and all(a > b for a, b in zip(grid, grid[1:]))):
        raise ValueError(f"steps must be an int or a strictly descending sequence of steps that "
                         f"starts at T = {sched.T} and ends >= 1, got {grid}")
    return grid, [torch.full(x.shape[:1], t, dtype=torch.long, device=x.device) for t in grid]


def _check_inpainting(x, known, mask):
    if (known is None) != (mask is None):
        raise ValueError("known and mask must be given together for inpainting")
    if mask is not None:
        _check_shape(known, x.shape, "known")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape):
        raise ValueError(f"mask must be a bool tensor of the data's shape {tuple(x.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _replace_known(x, known, mask, scale, std, generator):
    """F31: on the mask, x := scale known + std z, a sample of q(x_t | known) or p_{0s}."""
    if mask is None:
        return x
    return torch.where(mask, scale * known + std * _randn_like(x, generator), x)


def _check_clip(clip_x0):
    if not (clip_x0 is None or isinstance(clip_x0, (tuple, list)) and len(clip_x0) == 2 and all(
            isinstance(v, (int, float)) for v in clip_x0) and clip_x0[0] < clip_x0[1]):
        raise ValueError(f"clip_x0 must be None or a range (lo, hi) with lo < hi, got {clip_x0!r}")


def _x0_hat(x, eps, alpha_bar, clip_x0):
    """x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), clipped to clip_x0. [F21]"""
    x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return x0 if clip_x0 is None else x0.clamp(*clip_x0)


@torch.no_grad()
def ddpm_sample(eps_model, sched, x, *, steps=None, sigma2="beta", clip_x0=None, generator=None,
                callback=None, known=None, mask=None):
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z, from x = x_T to x_0. [F6, F9]
    sigma_t^2 = beta_t or beta_tilde_t (``sigma2``); on a grid tau_S = T > ... > tau_1 (``steps``)
    the chain is respaced, beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}; no noise at
    the last step. ``clip_x0=(lo, hi)`` (off by default) clips x0_hat and takes mu_tilde(x_t,
    x0_hat) (F7). Inpainting (F31): where ``mask`` is True, x is replaced after each step by a
    sample of q(x_t | known); the rest approximates p(x_unknown | known) (on a 4-D Gaussian, KL
    0.12 nats to the exact conditional against 1.05 for the prior, at 200 and 1000 steps alike)."""
    _check_batch(x, "x")
    _check_choice("sigma2", sigma2, {"beta", "beta_tilde"})
    _check_inpainting(x, known, mask)
    _check_clip(clip_x0)
    grid, t_bs = _time_grid(sched, steps, x)
    ab = sched._alpha_bar[grid + [0]].tolist()       # alpha_bar at tau_S, ..., tau_1, tau_0 = 0
    x = _replace_known(x, known, mask, math.sqrt(ab[0]), math.sqrt(1 - ab[0]), generator)
    for i, t_b in enumerate(t_bs):
        a, a_prev = ab[i], ab[i + 1]
        beta = 1 - a / a_prev                           # beta' of the respaced chain
        eps = eps_model(x, t_b)
        if clip_x0 is None:                             # F9
            x = (x - beta / math.sqrt(1 - a) * eps) / math.sqrt(1 - beta)
        else:                                           # F7 with the clipped x0_hat
            x = (math.sqrt(a_prev) * beta / (1 - a) * _x0_hat(x, eps, a, clip_x0)
                 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x)
        if i < len(grid) - 1:
            var = beta if sigma2 == "beta" else (1 - a_prev) / (1 - a) * beta
            x = x + math.sqrt(var) * _randn_like(x, generator)
        x = _replace_known(x, known, mask, math.sqrt(a_prev), math.sqrt(1 - a_prev), generator)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def ddim_sample(eps_model, sched, x, *, steps=50, eta=0.0, clip_x0=None, generator=None,
                callback=None):
    """DDIM: x_t' = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - sigma^2) eps + sigma z.
    [F29] x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), t' the previous grid
    point (0 after the last: the result is x0_hat), sigma = eta sqrt((1 - alpha_bar_t') / (1 -
    alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t'). ``clip_x0`` clips x0_hat (eps follows)."""
    _check_batch(x, "x")
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    _check_clip(clip_x0)
    grid, t_bs = _time_grid(sched, steps, x)
    ab = sched._alpha_bar[grid + [0]].tolist()
    for i, t_b in enumerate(t_bs):
        a, a_prev = ab[i], ab[i + 1]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        c = 1 - a_prev - sigma ** 2           # >= 0 for eta <= 1 up to rounding (PITFALLS #4)
        if c < -1e-12:
            raise ValueError(f"1 - alpha_bar_prev - sigma^2 = {c} < 0 at t = {grid[i]}")
        eps, r = eps_model(x, t_b), math.sqrt(a_prev / a)
        if clip_x0 is None:                   # the same update folded into two coefficients
            x = r * x + (math.sqrt(max(c, 0.0)) - r * math.sqrt(1 - a)) * eps
        else:
            x0_hat = _x0_hat(x, eps, a, clip_x0)
            eps = (x - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0_hat + math.sqrt(max(c, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def _dpm_solver_2m(x0_fn, x, alphas, sigmas, callback):
    """DPM-Solver++(2M) on points i with marginal x_i = alpha_i x0 + sigma_i eps. [F32]"""
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    h = [b - a for a, b in zip(lam, lam[1:])]
    x0_prev = None
    for i in range(len(h)):
        x0 = x0_fn(x, i)
        if sigmas[i + 1] == 0:                   # a step to sigma = 0 lands on x0 (h -> inf)
            x = x0
        else:
            D = x0 if i == 0 else x0 + h[i] / (2 * h[i - 1]) * (x0 - x0_prev)
            x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * math.expm1(-h[i]) * D
        x0_prev = x0
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def dpm_solver_sample(eps_model, sched, x, *, steps=10, clip_x0=None, callback=None):
    """DPM-Solver++(2M): x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i.
    [F32, F21] alpha, sigma = sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t); h_i the step in lambda =
    log(alpha / sigma); D = x0_hat, after the first step (1 + 1/(2 r)) x0_hat - 1/(2 r) x0_hat_prev,
    r = h_{i-1} / h_i (Lu et al. 2022). ``steps`` S: uniform in lambda from T to 1, rounded (any
    repeat dropped), or a grid; the last step (to sigma = 0) returns x0_hat, clipped by clip_x0."""
    _check_batch(x, "x")
    _check_clip(clip_x0)
    if isinstance(steps, int) and not isinstance(steps, bool) and 2 <= steps <= sched.T:
        s = s_grid(DiscreteVPSDE(sched), steps - 1, 1 / sched.T, "logsnr")
        steps = list(dict.fromkeys(max(1, round(u * sched.T)) for u in s))
    grid, t_b = _time_grid(sched, steps, x)
    ab = sched._alpha_bar[grid + [0]].tolist()
    return _dpm_solver_2m(lambda y, i: _x0_hat(y, eps_model(y, t_b[i]), ab[i], clip_x0), x,
                          [math.sqrt(a) for a in ab], [math.sqrt(1 - a) for a in ab], callback)


@torch.no_grad()
def dpm_solver_sde_sample(score_fn, sde, x, *, steps=10, eps_s=1e-3, spacing="logsnr",
                          callback=None):
    """DPM-Solver++(2M) for a score on a linear SDE, s = 1 to eps_s: alpha = m(s), sigma = std(s),
    Tweedie's x0_hat = (x + std^2 score) / m; uniform in lambda by default. [F32, F21, F26]"""
    _check_batch(x, "x")
    grid = s_grid(sde, steps, eps_s, spacing)
    _, _, m, std = zip(*_coefs(sde, grid).values())
    s_b = [_full(x, s) for s in grid]
    return _dpm_solver_2m(lambda y, i: (y + std[i] ** 2 * score_fn(y, s_b[i])) / m[i], x, m, std,
                          callback)


@torch.no_grad()
def reverse_sde_sample(score_fn, sde, x, *, steps=1000, corrector_steps=0, snr=0.16,
                       eps_s=1e-3, predictor="euler_maruyama", spacing="uniform", generator=None,
                       callback=None, known=None, mask=None):
    """Predictor-corrector sampling of the reverse SDE from s = 1 to eps_s. [F24, F28]
    Predictor, s to s' < s: 'euler_maruyama', x <- x - (a x - g^2 score)(s - s') + g sqrt(s - s')
    z (F24); 'reverse_diffusion', x <- (x + G^2 score) / A + G z, the reverse of the exact forward
    step x_s = A x_s' + G z, A = m(s) / m(s'), G^2 = v(s) - A^2 v(s') (F28): on DiscreteVPSDE with
    the grid t / T, t = T..0, ancestral DDPM step for step. No noise at the last step. Before it,
    ``corrector_steps`` Langevin steps x <- x + delta score + sqrt(2 delta) z, delta = 2 alpha (snr
    ||z|| / ||score||)^2 (batch-averaged norms), alpha = 1, or A^2 (F28's alpha_i) with reverse
    diffusion. Grid: uniform (measured: quadratic is worse at 200-1000 steps) or explicit, ending
    >= 0. Inpainting (F31) as in ddpm_sample, with p_{0s}(x_s | known)."""
    _check_batch(x, "x")
    _check_inpainting(x, known, mask)
    _check_count("corrector_steps", corrector_steps, 0)
    _check_choice("predictor", predictor, {"euler_maruyama", "reverse_diffusion"})
    grid = s_grid(sde, steps, eps_s, spacing)
    coefs, s_b = list(_coefs(sde, grid).values()), [_full(x, s) for s in grid]
    x = _replace_known(x, known, mask, *coefs[0][2:], generator)
    for i, ((a, g2, m, std), (_, _, m_next, std_next)) in enumerate(zip(coefs, coefs[1:])):
        ds, A = grid[i] - grid[i + 1], m / m_next              # forward transition s' -> s
        G2 = max(std ** 2 - A ** 2 * std_next ** 2, 0.0)
        alpha = A ** 2 if predictor == "reverse_diffusion" else 1.0
        for _ in range(corrector_steps):                        # Langevin corrector [F28]
            score, z = score_fn(x, s_b[i]), _randn_like(x, generator)
            ratio = _sum_flat(z ** 2).sqrt().mean() / _sum_flat(score ** 2).sqrt().mean()
            delta = 2 * alpha * (snr * ratio) ** 2
            x = x + delta * score + (2 * delta).sqrt() * z
        score = score_fn(x, s_b[i])
        if predictor == "euler_maruyama":                       # F24
            x, noise = x - (a * x - g2 * score) * ds, math.sqrt(g2 * ds)
        else:                                                   # F28, reverse diffusion
            x, noise = (x + G2 * score) / A, math.sqrt(G2)
        if i < len(grid) - 2:
            x = x + noise * _randn_like(x, generator)
            x = _replace_known(x, known, mask, m_next, std_next, generator)
        elif mask is not None:
            x = torch.where(mask, known, x)
        if callback is not None:
            callback(i, x)
    return x


def _ode_step(f, x, s, ds, method):
    """One step of size ds (either sign) of dx/ds = f(x, s): Euler, Heun or classic RK4."""
    k1 = f(x, s)
    if method == "euler":
        return x + ds * k1
    if method == "heun":
        return x + ds / 2 * (k1 + f(x + ds * k1, s + ds))
    k2 = f(x + ds / 2 * k1, s + ds / 2)
    k3 = f(x + ds / 2 * k2, s + ds / 2)
    k4 = f(x + ds * k3, s + ds)
    return x + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


ODE_METHODS = ("euler", "heun", "rk4", "rk45")
_STAGES = {"euler": (0.0,), "heun": (0.0, 1.0), "rk4": (0.0, 0.5, 0.5, 1.0)}
# Dormand-Prince 5(4): c_2..c_7, a_2..a_7 (a_7 = b: k_7 = f(x_new) is reused), b - b*.
_DOPRI_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DOPRI_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rk45(f, x, s0, s1, rtol, atol, max_steps):
    """dx/ds = f(x, s) from s0 to s1 by Dormand-Prince 5(4); returns (x, nfe). [F33]
    The error is the max over the batch of per-example RMS(e / (atol + rtol max(|x|, |x_new|))),
    so no example is integrated more loosely; h *= min(10, max(0.2, 0.9 err^(-1/5))), no growth
    after a rejection; first h as Hairer et al. II.4. One host sync per attempt (adaptivity)."""
    def norm(v, y, y_new):
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        return (v / scale).flatten(1).square().mean(1).sqrt().max().item()
    sign, k1 = (1.0 if s1 > s0 else -1.0), f(x, s0)
    d0, d1 = norm(x, x, x), norm(k1, x, x)
    h0 = 1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
    d2 = norm(f(x + sign * h0 * k1, s0 + sign * h0) - k1, x, x) / h0
    h = min(100 * h0, max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2)
    s, nfe, attempts, rejected = s0, 2, 0, False
    while sign * (s1 - s) > 0:
        if attempts >= max_steps:
            raise RuntimeError(f"rk45 reached max_steps = {max_steps} at s = {s:.6g} before "
                               f"s = {s1} (rtol = {rtol}, atol = {atol})")
        attempts, last = attempts + 1, h >= abs(s1 - s)
        ds, ks = (s1 - s if last else sign * h), [k1]
        for c, row in zip(_DOPRI_C, _DOPRI_A):
            y = x + ds * sum(a * k for a, k in zip(row, ks) if a)
            ks.append(f(y, s1 if last and c == 1 else s + c * ds))
        nfe, err = nfe + 6, norm(ds * sum(e * k for e, k in zip(_DOPRI_E, ks) if e), x, y)
        if err <= 1:
            s, x, k1 = (s1 if last else s + ds), y, ks[-1]
            h *= min(10.0 if err == 0 else 0.9 * err ** -0.2, 1.0 if rejected else 10.0)
            rejected = False
        else:                                        # a NaN error also shrinks h
            h, rejected = h * max(0.2, 0.9 * err ** -0.2), True
    return x, nfe


def _solve_ode(f, x, grid, method, rtol, atol, max_steps, stats, callback=None):
    """dx/ds = f along grid (either direction): fixed steps, or rk45 between its ends."""
    if method == "rk45":
        _check_real("rtol", rtol)
        _check_real("atol", atol)
        _check_count("max_steps", max_steps, 1)
        x, nfe = _rk45(f, x, grid[0], grid[-1], rtol, atol, max_steps)
    else:
        for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
            x = _ode_step(f, x, s, s_next - s, method)
            if callback is not None:
                callback(i, x)
        nfe = len(_STAGES[method]) * (len(grid) - 1)
    if stats is not None:
        stats["nfe"] = nfe
    return x


def _flow(score_fn, sde, x, steps, eps_s, spacing, method, forward=False):
    """(f, grid): the flow a(s) x - 1/2 g(s)^2 score(x, s) as f(x, s float) [F26], its floats and
    time tensors for every stage made before the loop, and the grid from 1 (from eps_s if
    ``forward``): rk45 needs only its ends; Euler's default is uniform (measured: quadratic raises
    its W2 on the 16-d Gaussian, 0.20 against 0.13 at 10 NFE)."""
    _check_choice("method", method, set(ODE_METHODS))
    steps = 1 if method == "rk45" and isinstance(steps, int) else steps
    spacing = "uniform" if spacing is None and method == "euler" else spacing
    grid = s_grid(sde, steps, eps_s, spacing)[::-1 if forward else 1]
    times = {s + c * (b - s) for s, b in zip(grid, grid[1:]) for c in _STAGES.get(method, ())}
    cache = {s: (a, g2, _full(x, s)) for s, (a, g2, _, _) in _coefs(sde, times).items()}

    def f(y, s):
        if s not in cache:
            (a, g2, _, _), = _coefs(sde, [s]).values()
            cache[s] = a, g2, _full(x, s)
        a, g2, s_b = cache[s]
        return a * y - 0.5 * g2 * score_fn(y, s_b)
    return f, grid


@torch.no_grad()
def ode_sample(score_fn, sde, x, *, steps=100, method="rk4", eps_s=1e-3, spacing=None,
               rtol=1e-5, atol=1e-5, max_steps=10_000, stats=None, callback=None):
    """The probability-flow ODE dx/ds = f - 1/2 g^2 score from s = 1 to eps_s. [F26]
    ``method`` 'euler', 'heun', 'rk4' (1, 2, 4 evaluations per step) on the grid ``steps``,
    ``spacing`` (s_grid; by default the SDE's, uniform for Euler), or 'rk45' between the grid's
    ends (``rtol``, ``atol``, RuntimeError after ``max_steps``); ``stats`` receives 'nfe'."""
    _check_batch(x, "x")
    f, grid = _flow(score_fn, sde, x, steps, eps_s, spacing, method)
    return _solve_ode(f, x, grid, method, rtol, atol, max_steps, stats, callback)


@torch.no_grad()
def ode_encode(score_fn, sde, x0, *, steps=100, method="rk4", eps_s=1e-3, spacing=None,
               rtol=1e-5, atol=1e-5, max_steps=10_000, stats=None):
    """The probability-flow ODE forward, data -> latent, from s = eps_s to 1: ode_sample's grid
    backwards, the same methods. [F26]"""
    _check_batch(x0, "x0")
    f, grid = _flow(score_fn, sde, x0, steps, eps_s, spacing, method, forward=True)
    return _solve_ode(f, x0, grid, method, rtol, atol, max_steps, stats)


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
def ode_likelihood(score_fn, sde, x, *, steps=100, method="rk4", eps_s=1e-5, spacing=None,
                   rtol=1e-5, atol=1e-5, max_steps=10_000, divergence="exact", n_probes=1,
                   probe="rademacher", dequantize=False, generator=None):
    """log p_0(x) = log p_1(x_1) + int_0^1 div_x f~(x_s, s) ds along the flow f~ (F26). [F27]
    Integrated from eps_s to 1 as ode_encode, the log-density an extra coordinate; divergence
    'exact' or 'hutchinson' (n_probes fixed probes, unbiased). Returns (B,) 'nats', 'bpd' = -nats
    / (d ln 2), and 'nfe'. ``dequantize`` (8-bit x = 2 k / 255 - 1): y = x + (2 / 255)(u - 1/2),
    'nats' = log p(y), 'bpd' = -(log p(y) + d log(2 / 255)) / (d ln 2), as in the papers."""
    _check_batch(x, "x")
    _check_choice("divergence", divergence, {"exact", "hutchinson"})
    _check_count("n_probes", n_probes, 1)
    shape, d = x.shape, x[0].numel()
    if dequantize:
        x = x + 2 / 255 * (torch.rand(shape, generator=generator, device=x.device,
                                      dtype=x.dtype) - 0.5)
    probes = None
    if divergence == "hutchinson":
        probes = [_probe(x, probe, generator) for _ in range(n_probes)]
    flow, grid = _flow(score_fn, sde, x, steps, eps_s, spacing, method, forward=True)

    def augmented(state, s):  # state = [x flattened, accumulated divergence]
        drift, div = _divergence(lambda y: flow(y, s), state[:, :d].reshape(shape), probes)
        return torch.cat([drift.flatten(1), div[:, None]], 1)
    state, stats = torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], 1), {}
    state = _solve_ode(augmented, state, grid, method, rtol, atol, max_steps, stats)
    nats = sde.prior_logp(state[:, :d].reshape(shape)) + state[:, d]
    offset = d * math.log(2 / 255) if dequantize else 0.0
    return {"nats": nats, "bpd": -(nats + offset) / (d * math.log(2)), "nfe": stats["nfe"]}


# --- controllable generation [F30, F31] and energy-based scores [F14] ----------------------------


def guided_score(score_fn, log_likelihood_fn, w):
    """grad log p_s(x) + w grad_x log p_s(y | x), by autograd of the log-likelihood. [F30]
    w = 1 gives grad log p_s(x | y) (p(y) drops out), w > 1 sharpens it; log_likelihood_fn(x, s)
    -> (B,). Where x requires grad (ode_likelihood's divergence) the graph is kept, so the
    divergence includes w tr(Hessian of log p(y | x))."""
    def guided(x, s):
        create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            x_ = x if create_graph else x.detach().requires_grad_(True)
            grad = torch.autograd.grad(log_likelihood_fn(x_, s).sum(), x_,
                                       create_graph=create_graph)[0]
        return score_fn(x, s) + w * grad
    return guided


def classifier_free(cond_fn, uncond_fn, w):
    """Classifier-free guidance: (1 + w) cond(x, s) - w uncond(x, s), for eps or scores. [F30]
    F30 with grad log p(y | x) = score(x | y) - score(x); w = 0 is the conditional model."""
    return lambda x, s: (1 + w) * cond_fn(x, s) - w * uncond_fn(x, s)


def energy_score(energy_fn):
    """Score of p(x) = exp(-E(x)) / Z: s(x, ...) = -grad_x E(x, ...); Z drops out. [F14]
    energy_fn(x, *cond) -> (B,). With gradients enabled it keeps the graph (losses differentiate
    through it); in a no_grad sampler it is a plain tensor."""
    def score(x, *cond):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_ = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = energy_fn(x_, *cond)
            return -torch.autograd.grad(energy.sum(), x_, create_graph=create_graph)[0]
    return score


def colour_basis(dtype=torch.float64, device=None):
    """An orthogonal 3x3 M whose first row (1, 1, 1) / sqrt(3) is the grey axis. [F31]
    Colorization is inpainting in y = M x over the channels: the grey channel is known."""
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
    """The model seen in the colour basis: y -> M model(M^T y, ...); scores and eps map by M.
    ``from_colour_basis(ddpm_sample(in_colour_basis(eps_model), sched, to_colour_basis(x_T),
    known=known, mask=mask))`` colorizes, (known, mask) from ``colorization_known``. [F31]"""
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


# --- networks: residual MLP, small UNet, EMA, and how each method reads the output ---------------
# A network is called as net(x, c, y=None): x the noisy data, c (B,) float the noise level mapped
# to [0, 1000] (0 = clean), y (B,) optional class labels. c is 1000 t / T for DDPM, 1000 s for the
# SDEs and 1000 log(sigma / sigma_min) / log(sigma_max / sigma_min) for NCSN. Every method reads
# the output as an eps (score = -net / std), so every loss is an eps-prediction error of O(1).


def sinusoidal_embedding(c, dim, max_period=10_000.0):
    """emb(c) = [cos(c w_k), sin(c w_k)], w_k = max_period^(-k / (dim/2)), k < dim/2 (Vaswani et
    al. 2017, as used for t by Ho et al. 2020). c (B,) float -> (B, dim) float32."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, device=c.device) / half)
    angle = rearrange(c.float(), "b -> b 1") * w
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class NoiseEmbedding(nn.Module):
    """Noise level c (B,) and optional class y (B,) -> (B, dim). With num_classes, label
    num_classes is the null label, used when y is None (for classifier-free guidance)."""

    def __init__(self, dim, num_classes=None):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, dim)

    def forward(self, c, y=None):
        emb = self.mlp(sinusoidal_embedding(c, self.dim))
        if self.label is None:
            if y is not None:
                raise ValueError("y: class labels given to a network built with num_classes=None")
            return emb
        if y is None:
            y = torch.full(c.shape, self.num_classes, dtype=torch.long, device=c.device)
        return emb + self.label(y)


class MLP(nn.Module):
    """Residual MLP for vectors (B, d): h = W_in x, then `depth` times
    h = h + W_k silu(LayerNorm(h) + emb(c, y)), output W_out silu(LayerNorm(h)) of size d, or of
    size out_dim (a classifier's logits)."""

    def __init__(self, dim, width=256, depth=3, num_classes=None, out_dim=None):
        super().__init__()
        self.embed = NoiseEmbedding(width, num_classes)
        self.inp = nn.Linear(dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim or dim))

    def forward(self, x, c, y=None):
        emb = self.embed(c, y)
        h = self.inp(x)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(F.silu(norm(h) + emb))
        return self.out(h)


class ResBlock(nn.Module):
    """x + conv(silu(GN(conv(silu(GN(x))) + W emb))), with a 1x1 conv on the skip when the
    channel count changes (Ho et al. 2020, appendix B)."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Residual multi-head self-attention over the pixels of a feature map:
    x + W_o softmax(q k^T / sqrt(d)) v, with q, k, v = W_qkv GN(x) per pixel."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b (n h d) u v -> n b h (u v) d", n=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b h (u v) d -> b (h d) u v", u=x.shape[-2]))


class UNet(nn.Module):
    """Small UNet for images (B, C, H, W), H and W divisible by 2^(len(mults) - 1): one ResBlock
    per level going down (average pooling between levels) and up (nearest upsampling, skip
    connections concatenated), ResBlock-attention-ResBlock at the lowest resolution."""

    def __init__(self, channels=1, width=32, mults=(1, 2, 2), num_classes=None):
        super().__init__()
        widths, emb_dim = [width * m for m in mults], 4 * width
        self.embed = NoiseEmbedding(emb_dim, num_classes)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip([width] + widths, widths))
        self.mid1, self.attn = ResBlock(widths[-1], widths[-1], emb_dim), Attention(widths[-1])
        self.mid2 = ResBlock(widths[-1], widths[-1], emb_dim)
        ups = zip([widths[-1]] + widths[::-1], widths[::-1])
        self.up = nn.ModuleList(ResBlock(a + b, b, emb_dim) for a, b in ups)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, c, y=None):
        emb, h, skips = self.embed(c, y), self.inp(x), []
        for i, block in enumerate(self.down):
            h = F.avg_pool2d(h, 2) if i > 0 else h
            h = block(h, emb)
            skips.append(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = F.interpolate(h, scale_factor=2, mode="nearest") if i > 0 else h
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class ImageClassifier(nn.Module):
    """Noise-conditional image classifier: logits of p_c(y | x) from the UNet's downward path
    (ResBlocks, average pooling between levels), then GN, SiLU, the spatial mean and a linear
    layer (Dhariwal & Nichol 2021 use the UNet's encoder the same way)."""

    def __init__(self, channels, num_classes, width=32, mults=(1, 2, 2)):
        super().__init__()
        widths, emb_dim = [width * m for m in mults], 4 * width
        self.embed = NoiseEmbedding(emb_dim)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip([width] + widths, widths))
        self.norm = nn.GroupNorm(8, widths[-1])
        self.logits = nn.Linear(widths[-1], num_classes)

    def forward(self, x, c):
        emb, h = self.embed(c), self.inp(x)
        for i, block in enumerate(self.down):
            h = block(F.avg_pool2d(h, 2) if i > 0 else h, emb)
        return self.logits(reduce(F.silu(self.norm(h)), "b ch u v -> b ch", "mean"))


def make_network(config, shape, num_classes=None):
    """The default network for examples of `shape`: MLP for (d,), UNet for (C, H, W), with
    num_classes labels in. With config.classifier: the MLP or the UNet's encoder, num_classes
    logits out."""
    if len(shape) > 1 and (shape[1] % 4 or shape[2] % 4):
        raise ValueError(f"data: image size {tuple(shape[1:])} must be divisible by 4 (UNet)")
    if config.classifier and len(shape) == 1:
        return MLP(shape[0], config.width, config.depth, out_dim=num_classes)
    if config.classifier:
        return ImageClassifier(shape[0], num_classes, config.channels)
    if len(shape) == 1:
        return MLP(shape[0], config.width, config.depth, num_classes)
    return UNet(shape[0], config.channels, num_classes=num_classes)


def make_ema(net, decay):
    """EMA of the weights, theta_ema <- decay theta_ema + (1 - decay) theta, as an AveragedModel.
    Schedules, sigmas and SDEs are plain objects outside the network, so they are never averaged."""
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def update_ema(ema, net, step, warmup):
    """One EMA update; for the first `warmup` steps the EMA copies the live weights instead."""
    if step <= warmup:
        ema.n_averaged.zero_()  # AveragedModel copies the weights when n_averaged == 0
    ema.update_parameters(net)


def eps_model_of(net, sched, y=None):
    """DDPM eps_model(xt, t) = net(xt, 1000 t / T, y). [F12]"""
    return lambda xt, t: net(xt, 1000 * t.float() / sched.T, y)


def ncsn_level(sigmas, sigma):
    """The network's c for an NCSN noise level: 1000 log(sigma / sigma_min) / log(sigma_max /
    sigma_min), from 0 at the smallest sigma to 1000 at the largest."""
    lo, hi = math.log(sigmas.min()), math.log(sigmas.max())
    return 1000 * (sigma.log() - lo) / (hi - lo)


def ncsn_score_of(net, sigmas, y=None):
    """NCSN score_model(x, sigma) = -net(x, c(log sigma), y) / sigma: the output divided by sigma
    (Song & Ermon 2020, technique 3), signed so the net predicts the noise. [F19, F21]"""
    return lambda x, sigma: -net(x, ncsn_level(sigmas, sigma), y) / bcast(sigma, x)


def sde_score_of(net, sde, y=None):
    """SDE score_fn(x, s) = -net(x, 1000 s, y) / std(s), std from sde.marginal. [F21, F23]"""
    def score_fn(x, s):
        _, std = sde.marginal(x, s)
        return -net(x, 1000 * s, y) / std
    return score_fn


def cfg_net(net, w):
    """Classifier-free guidance on the network's output: (1 + w) net(x, c, y) - w net(x, c, null)
    for one network trained with label dropout; w = 0 is the conditional model. Every method
    reads the output as an eps (score = -net / std), so this is classifier_free on eps and on
    the score alike. Returns a network (x, c, y) for every sampler. [F30]"""
    def guided(x, c, y):
        return classifier_free(lambda x, c: net(x, c, y), lambda x, c: net(x, c), w)(x, c)
    return guided


def classifier_guided_net(net, classifier, w, std):
    """Classifier guidance on the network's output: the score -net(x, c) / std(c) guided by
    log p_c(y | x) = log_softmax(classifier(x, c))[y] (guided_score), read back as an output:
    net - std w grad_x log p_c(y | x); for DDPM eps - sqrt(1 - alpha_bar_t) w grad. [F30, F21]

    w = 1 samples p(x | y) exactly when the classifier and the network are exact. std(c) is the
    noise std at level c (Method.std); `net` is called without labels (the null label of a
    conditional network). Returns a network (x, c, y) for every sampler.
    """
    def guided(x, c, y):
        sigma = bcast(std(c), x)

        def log_likelihood(x, c):  # log p_c(y | x) per example
            return F.log_softmax(classifier(x, c), dim=-1).gather(1, y[:, None])[:, 0]
        return -sigma * guided_score(lambda x, c: -net(x, c) / sigma, log_likelihood, w)(x, c)
    return guided


# --- data: built-in sets, user files, sample quality (MMD), pictures (PNG) -----------------------


def rng(*key, device="cpu"):
    """A torch.Generator seeded by a hash of `key`, e.g. rng(seed, 'batch', rank, step): every
    random draw of a run is a function of its key, so resuming replays it exactly."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def moons(n, generator):
    """Two interleaving half circles with N(0, 0.1^2) noise, centred and scaled; y = the moon."""
    y = torch.randint(0, 2, (n,), generator=generator)
    a = math.pi * torch.rand(n, generator=generator)
    x = torch.stack([a.cos(), a.sin()], dim=1)
    x = torch.where(rearrange(y, "n -> n 1") == 1, torch.tensor([1.0, 0.5]) - x, x)
    x = x + 0.1 * torch.randn(n, 2, generator=generator)
    return (x - torch.tensor([0.5, 0.25])) / 0.75, y


def swiss_roll(n, generator):
    """The 2-D swiss roll (t cos t, t sin t), t ~ U(1.5 pi, 4.5 pi), noise 0.3, scaled by 1/6."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    return (x + 0.3 * torch.randn(n, 2, generator=generator)) / 6, None


def gaussian_ring(n, generator, k=8):
    """A ring of k Gaussians (radius sqrt 2, std 0.1); y = the mode."""
    y = torch.randint(0, k, (n,), generator=generator)
    angle = 2 * math.pi * y / k
    x = math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], dim=1)
    return x + 0.1 * torch.randn(n, 2, generator=generator), y


def checkerboard(n, generator):
    """Uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2, scaled by 1/1.15."""
    col = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2
    x = torch.stack([col, row], dim=1) + torch.rand(n, 2, generator=generator) - 2
    return x / 1.15, None


def shapes(n, generator, size=16):
    """size x size gray images of a disk, square, triangle or cross (y = 0..3) of random centre
    and radius, anti-aliased, on the 8-bit grid, in [-1, 1] (shape (n, 1, size, size))."""
    y = torch.randint(0, 4, (n,), generator=generator)
    r = 3 + 3 * torch.rand(n, 1, 1, generator=generator)  # radius in pixels
    cx, cy = r + (size - 2 * r) * torch.rand(2, n, 1, 1, generator=generator)
    grid = torch.arange(size) + 0.5  # pixel centres
    dx, dy = (grid.view(1, 1, -1) - cx) / r, (grid.view(1, -1, 1) - cy) / r
    gauge = torch.stack([
        (dx ** 2 + dy ** 2).sqrt(),                                       # disk
        torch.maximum(dx.abs(), dy.abs()),                                # square
        2 * torch.maximum(dy, 0.866 * dx.abs() - 0.5 * dy),               # triangle
        torch.minimum(torch.maximum(dx.abs(), 3 * dy.abs()), torch.maximum(3 * dx.abs(), dy.abs())),
    ])[y, torch.arange(n)]
    inside = ((1 - gauge) * r + 0.5).clamp(0, 1)  # ~1 pixel of anti-aliasing at the edge
    return rearrange(torch.round(255 * inside) / 127.5 - 1, "n h w -> n 1 h w"), y


DATASETS = {"moons": moons, "swissroll": swiss_roll, "ring": gaussian_ring,
            "checkerboard": checkerboard, "shapes": shapes}
NPY_DTYPES = {"<f4": torch.float32, "<f8": torch.float64, "<f2": torch.float16,
              "|u1": torch.uint8, "|i1": torch.int8, "<i2": torch.int16, "<i4": torch.int32,
              "<i8": torch.int64}


def one_line(error, limit=200):
    """An exception's message on one line: whitespace collapsed, cut at `limit` characters."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def read_npy(path):
    """Read a little-endian .npy array with the standard library: magic, version, header dict
    (ast.literal_eval), then the raw bytes through torch.frombuffer."""
    raw = Path(path).read_bytes()
    if raw[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file (bad magic bytes)")
    size_fmt = "<H" if raw[6] == 1 else "<I"
    start = 8 + struct.calcsize(size_fmt)
    (header_len,) = struct.unpack(size_fmt, raw[8:start])
    header = ast.literal_eval(raw[start:start + header_len].decode("latin1"))
    dtype = NPY_DTYPES.get(header["descr"])
    if dtype is None:
        raise ValueError(f"{path}: unsupported dtype {header['descr']!r} (use float or uint8)")
    shape, offset = header["shape"], start + header_len
    nbytes = math.prod(shape) * dtype.itemsize
    if len(raw) - offset < nbytes:
        raise ValueError(f"{path}: truncated ({len(raw) - offset} of {nbytes} data bytes)")
    x = torch.frombuffer(bytearray(raw[offset:offset + nbytes]), dtype=dtype)
    if header["fortran_order"]:
        return x.reshape(shape[::-1]).permute(*reversed(range(len(shape))))
    return x.reshape(shape)


def read_tensor(path):
    """A tensor from a .pt (torch.load, weights_only) or .npy file; ValueError naming the file."""
    if not str(path).endswith((".pt", ".npy")):
        raise ValueError(f"{path}: unsupported file type (expected .pt or .npy)")
    try:
        x = read_npy(path) if str(path).endswith(".npy") else torch.load(path, weights_only=True)
    except ValueError:
        raise
    except Exception as e:  # unreadable, missing or corrupt: one line naming the file
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {one_line(e)})")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(x).__name__}")
    return x


def load_data(path):
    """User data from .pt or .npy, shape (N, d) or (N, C, H, W). uint8 images are scaled to
    [-1, 1]; float images must already lie in [-1, 1], vectors within +-100 (roughly unit scale:
    the prior is N(0, I)). Anything else is a ValueError naming the file and the problem."""
    x = read_tensor(path)
    if x.ndim not in (2, 4) or len(x) < 10:
        raise ValueError(f"{path}: expected shape (N, d) or (N, C, H, W) with N >= 10, "
                         f"found {tuple(x.shape)}")
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
    lo, hi = x.min().item(), x.max().item()
    if x.ndim == 4 and (lo < -1 or hi > 1):
        raise ValueError(f"{path}: image values must lie in [-1, 1] (or be uint8), "
                         f"found [{lo:.4g}, {hi:.4g}]")
    if x.ndim == 2 and max(-lo, hi) > 100:
        raise ValueError(f"{path}: values up to {max(-lo, hi):.4g}; standardize the data first "
                         "(the prior is N(0, I))")
    return x


@dataclass
class Data:
    """Training and held-out examples, with class labels (None where the data has none)."""
    x: torch.Tensor
    y: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None


def get_data(config, n_test=10_000):
    """Built-in data: n_train training and n_test held-out examples, drawn from generators keyed
    by the seed. A file: a seeded permutation holds out 10% (at most n_test)."""
    if config.data in DATASETS:
        make = DATASETS[config.data]
        x, y = make(config.n_train, rng(config.seed, "train"))
        return Data(x, y, *make(n_test, rng(config.seed, "test")))
    x = load_data(config.data)
    perm = torch.randperm(len(x), generator=rng(config.seed, "split"))
    held = min(len(x) // 10, n_test)
    return Data(x[perm[held:]], None, x[perm[:held]], None)


def mmd2_unbiased(x, y, bandwidths):
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2)):
    sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 mean_ij k(x_i, y_j).
    x (m, ...), y (n, ...); computed in float64; its mean is 0 when x and y share a law."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h ** 2)) for h in bandwidths) / len(bandwidths)

    def within(a):
        kaa, m = k(a, a), len(a)
        return (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    return (within(x) + within(y) - 2 * k(x, y).mean()).item()


def mmd_bandwidths(x):
    """RBF bandwidths for mmd2_unbiased: the median distance between points of x, times
    1/8, 1/4, 1/2 and 1 (fine structure to global shape)."""
    x = x[:1000].flatten(1).double()
    med = torch.pdist(x).median().item()
    return [med / 8, med / 4, med / 2, med]


def mmd2_floor(x_test, n, bandwidths, generator, pairs=10):
    """The noise floor of mmd2_unbiased at n vs n points: the root mean square of the MMD^2
    between `pairs` pairs of disjoint held-out subsets of size n. Its mean being 0, this is its
    standard deviation when the model is perfect (needs len(x_test) >= 2 n)."""
    values = []
    for _ in range(pairs):
        i = torch.randperm(len(x_test), generator=generator)[:2 * n]
        values.append(mmd2_unbiased(x_test[i[:n]], x_test[i[n:]], bandwidths))
    return math.sqrt(sum(v * v for v in values) / pairs)


def write_png(path, img):
    """Write a uint8 image, gray (H, W) or RGB (H, W, 3), as a PNG with zlib and struct."""
    img = img.to(torch.uint8).cpu()
    h, w = img.shape[:2]
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), img.reshape(h, -1)], dim=1)

    def chunk(kind, data):  # length, type, data, CRC-32 of type and data
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if img.ndim == 3 else 0, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(bytes(rows.flatten().tolist()), 6)) + chunk(b"IEND", b""))
    write_atomic(path, lambda f: f.write(png))


def density_image(x, lo, hi, res=160, zoom=2):
    """2-D points -> uint8 (res zoom, res zoom) histogram picture of the square [lo, hi]^2, white
    background, darker where denser (square-root scale), y axis up."""
    ij = ((x.float().cpu() - lo) / (hi - lo) * res).floor().long()
    ij = ij[((ij >= 0) & (ij < res)).all(dim=1)]
    counts = torch.bincount((res - 1 - ij[:, 1]) * res + ij[:, 0], minlength=res * res)
    v = (counts.float() / max(counts.float().quantile(0.995).item(), 1.0)).clamp(max=1).sqrt()
    img = (255 * (1 - v)).round().to(torch.uint8).reshape(res, res)
    return img.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def image_grid(x, ncol=8, zoom=4):
    """Images (N, C, H, W) in [-1, 1] -> uint8 grid picture (gray or RGB), 1 pixel of white
    between images, each pixel shown as zoom x zoom."""
    n = len(x)
    x = torch.cat([x.float().cpu(), x.new_full((-n % ncol, *x.shape[1:]), -1).float().cpu()])
    x = F.pad(x, (1, 1, 1, 1), value=1.0)
    grid = rearrange(x, "(r c) ch h w -> (r h) (c w) ch", c=ncol)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    img = img.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
    return img[..., 0] if img.shape[-1] == 1 else img


def picture(samples, reference=None):
    """The picture of a sample: 2-D points as a density beside the reference points (samples
    left, reference right, on one square); images as a grid of the first 64."""
    if samples.ndim == 4:
        return image_grid(samples[:64])
    if samples.shape[1] != 2:
        raise ValueError(f"samples: can only picture 2-D points or images, found {samples.shape}")
    panels = [p[torch.isfinite(p).all(dim=1)] for p in (samples, reference) if p is not None]
    hi = max(p.abs().quantile(0.995).item() for p in panels if len(p)) * 1.1
    imgs = [density_image(p, -hi, hi) for p in panels]
    gap = torch.full((imgs[0].shape[0], 6), 160, dtype=torch.uint8)
    return torch.cat([imgs[0]] + [t for img in imgs[1:] for t in (gap, img)], dim=1)


def trajectory_picture(frames):
    """A strip of frames from noise (left) to data (right): 2-D densities side by side, or one
    row of images per sample (the first 8 samples)."""
    if frames[0].ndim == 4:
        return image_grid(rearrange(torch.stack([f[:8] for f in frames]), "k b ... -> (b k) ..."),
                          ncol=len(frames))
    frames = [f[torch.isfinite(f).all(dim=1)] for f in frames]
    hi = frames[-1].abs().quantile(0.995).item() * 1.1
    imgs = [density_image(f, -hi, hi, res=100) for f in frames]
    gap = torch.full((imgs[0].shape[0], 4), 160, dtype=torch.uint8)
    return torch.cat([t for img in imgs for t in (img, gap)][:-1], dim=1)


# --- training: the methods, TrainConfig, checkpoints, the loop, using a trained run --------------


def ddpm_process(config):
    """The discrete schedule: linear or cosine betas, T steps. [F1, F2]"""
    return Schedule.from_betas(BETAS[config.schedule](config.T))


def ncsn_process(config):
    """The NCSN noise levels: geometric from sigma_max down to sigma_min. [F19]"""
    return geometric_sigmas(config.sigma_max, config.sigma_min, config.n_sigmas)


def ddpm_loss(net, sched, x0, y, generator):
    """eps_loss with the network as eps_model. [F12]"""
    return eps_loss(eps_model_of(net, sched, y), sched, x0, generator=generator)


def ncsn_loss(net, sigmas, x0, y, generator):
    """dsm_loss over the noise levels, lambda(sigma) = sigma^2. [F19]"""
    return dsm_loss(ncsn_score_of(net, sigmas, y), x0, sigmas, generator=generator)


def sde_train_loss(net, sde, x0, y, generator):
    """sde_loss with lambda(s) = std(s)^2. [F25]"""
    return sde_loss(sde_score_of(net, sde, y), sde, x0, generator=generator)


def ddpm_noised(sched, x0, generator):
    """(x_t, c): x_t ~ q(x_t | x0) with t ~ U{1..T}, and the network's c = 1000 t / T. [F3]"""
    t = draw_t(sched, x0, generator)
    return q_sample(sched, x0, t, generator=generator), 1000 * t.float() / sched.T


def ncsn_noised(sigmas, x0, generator):
    """(x0 + sigma z, c(sigma)) with sigma uniform over the noise levels. [F19]"""
    sigma = draw_sigma(sigmas, x0, generator)
    return x0 + bcast(sigma, x0) * _randn_like(x0, generator), ncsn_level(sigmas, sigma)


def sde_noised(sde, x0, generator):
    """(x_s, c = 1000 s): x_s ~ p_{0s}(x_s | x0) with s drawn as in sde_loss. [F23]"""
    s = draw_s(x0, generator)
    mean, std = sde.marginal(x0, s)
    return mean + std * _randn_like(x0, generator), 1000 * s


def ddpm_std(sched, c):
    """Noise std sqrt(1 - alpha_bar_t) at the network's c = 1000 t / T. [F3]"""
    return marginal_coefs(sched, (c * sched.T / 1000).round().long())[1]


def ncsn_std(sigmas, c):
    """The noise level sigma at the network's c (the inverse of ncsn_level). [F19]"""
    lo, hi = math.log(sigmas.min()), math.log(sigmas.max())
    return torch.exp(lo + c.double() / 1000 * (hi - lo))


def sde_std(sde, c):
    """std(s) of p_{0s}(x_s | x0) at the network's c = 1000 s. [F23]"""
    return sde.marginal_coefs(c.double() / 1000)[1]


def classifier_method(method):
    """The method with its loss replaced by a noise-conditional classifier's cross-entropy
    -log p_c(y | x_s), x_s drawn by the method's forward process, and no samplers."""
    def loss(net, process, x0, y, generator):
        x_s, c = method.noised(process, x0, generator)
        return F.cross_entropy(net(x_s, c), y, reduction="none")
    return replace(method, loss=loss, samplers={})


def gaussian_prior(process, shape, generator, device):
    """x_T ~ N(0, I), the prior of the DDPM chain. [F5]"""
    return torch.randn(shape, generator=generator, device=device)


def ncsn_prior(sigmas, shape, generator, device):
    """x ~ N(0, sigma_max^2 I), the start of annealed Langevin dynamics. [F20]"""
    return float(sigmas.max()) * torch.randn(shape, generator=generator, device=device)


def sde_prior(sde, shape, generator, device):
    """x_1 ~ p_1, the SDE's prior. [F22]"""
    return sde.prior_sample(shape, generator=generator, device=device)


def sample_ancestral(net, sched, x, steps, y, generator, known=None, mask=None):
    """Ancestral DDPM sampling, respaced to `steps` steps; inpainting with known/mask. [F6, F9]"""
    return ddpm_sample(eps_model_of(net, sched, y), sched, x, steps=steps, generator=generator,
                       known=known, mask=mask)


def sample_ddim(net, sched, x, steps, y, generator):
    """Deterministic DDIM (eta = 0) on `steps` steps. [F29]"""
    return ddim_sample(eps_model_of(net, sched, y), sched, x, steps=steps, generator=generator)


def sample_als(net, sigmas, x, steps, y, generator):
    """Annealed Langevin dynamics, `steps` steps per noise level. [F20]"""
    score = ncsn_score_of(net, sigmas, y)
    return annealed_langevin(score, x, sigmas, n_steps_each=steps, generator=generator)


def sample_em(net, sde, x, steps, y, generator, known=None, mask=None):
    """Euler-Maruyama on the reverse SDE; inpainting with known/mask. [F24, F31]"""
    return reverse_sde_sample(sde_score_of(net, sde, y), sde, x, steps=steps, generator=generator,
                              known=known, mask=mask)


def sample_pc(net, sde, x, steps, y, generator, known=None, mask=None):
    """Predictor-corrector: reverse-SDE step plus one Langevin corrector step. [F28, F31]"""
    return reverse_sde_sample(sde_score_of(net, sde, y), sde, x, steps=steps, corrector_steps=1,
                              generator=generator, known=known, mask=mask)


def sample_ode(net, sde, x, steps, y, generator):
    """Probability-flow ODE with RK4 (deterministic; `generator` unused). [F26]"""
    return ode_sample(sde_score_of(net, sde, y), sde, x, steps=steps)


@dataclass(frozen=True)
class Method:
    """A training method: its noise process (built from the config), per-example loss, prior,
    samplers {name: (sampler, default steps)}, the first being the default, and its noise levels
    as the network sees them (for a classifier's training and for classifier guidance)."""
    process: Callable  # config -> Schedule | sigmas | SDE
    loss: Callable  # (net, process, x0, y, generator) -> (B,)
    prior: Callable  # (process, shape, generator, device) -> start of sampling
    samplers: dict  # name -> (sampler(net, process, x, steps, y, generator), default steps)
    noised: Callable  # (process, x0, generator) -> (x at a random noise level, its c (B,))
    std: Callable  # (process, c (B,)) -> noise std (B,) at level c: score = -net / std


BETAS = {"linear": linear_betas, "cosine": cosine_betas}
SDE_SAMPLERS = {"em": (sample_em, 500), "pc": (sample_pc, 250), "ode": (sample_ode, 50)}
METHODS = {
    "ddpm": Method(ddpm_process, ddpm_loss, gaussian_prior,
                   {"ancestral": (sample_ancestral, 250), "ddim": (sample_ddim, 50)},
                   ddpm_noised, ddpm_std),
    "ncsn": Method(ncsn_process, ncsn_loss, ncsn_prior, {"als": (sample_als, 100)},
                   ncsn_noised, ncsn_std),
    "vp": Method(lambda config: VPSDE(), sde_train_loss, sde_prior, SDE_SAMPLERS,
                 sde_noised, sde_std),
    "ve": Method(lambda config: VESDE(config.sigma_min, config.sigma_max), sde_train_loss,
                 sde_prior, SDE_SAMPLERS, sde_noised, sde_std),
    "subvp": Method(lambda config: SubVPSDE(), sde_train_loss, sde_prior, SDE_SAMPLERS,
                    sde_noised, sde_std),
}
SAMPLERS = sorted({name for m in METHODS.values() for name in m.samplers})
INPAINTING_SAMPLERS = ("ancestral", "em", "pc")  # the samplers that take known= and mask=


@dataclass
class TrainConfig:
    """Everything `train` needs; `python ddpm_score.py train --help` lists the same fields."""
    data: str = "moons"  # built-in data set or a .pt/.npy file of shape (N, d) or (N, C, H, W)
    method: str = "ddpm"  # ddpm (eps_loss), ncsn (dsm_loss), vp, ve or subvp (sde_loss)
    steps: int = 2000  # total optimizer steps (with --resume: the new total)
    batch_size: int = 512  # global batch size, split evenly across DDP ranks
    lr: float = 1e-3  # peak Adam learning rate, reached after lr_warmup steps
    lr_warmup: int = 100  # steps of linear learning-rate warm-up
    lr_decay: bool = True  # cosine decay to 0 at `steps` (so a resume that raises it re-plans)
    grad_clip: float = 1.0  # largest gradient norm (0: no clipping)
    ema: float = 0.99  # EMA decay of the weights used for sampling (0: EMA = live weights)
    ema_warmup: int = 100  # steps during which the EMA copies the live weights
    seed: int = 0  # seeds the data, the initial weights, every training draw and the samples
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    threads: int = 0  # CPU threads for torch, 0 = torch's default (1 is faster on busy cores)
    amp: bool = False  # bf16 autocast on CUDA
    out: str = "runs/default"  # run folder: ckpt.pt, config.json, loss.csv, samples.png
    resume: bool = False  # continue from OUT/ckpt.pt (its config.json supplies the defaults)
    width: int = 256  # MLP width (vector data)
    depth: int = 3  # MLP residual layers (vector data)
    channels: int = 32  # UNet base channels (image data)
    conditional: bool = False  # condition the network on the data's class labels
    label_dropout: float = 0.1  # conditional: share of null labels (for classifier-free guidance)
    classifier: bool = False  # train p(y | x_s) for classifier guidance, with --out RUN/classifier
    schedule: str = "linear"  # ddpm: beta schedule, linear or cosine
    T: int = 1000  # ddpm: number of discrete steps
    sigma_min: float = 0.01  # ncsn and ve: smallest noise level
    sigma_max: float = 0.0  # ncsn and ve: largest noise level; 0 = largest data distance
    n_sigmas: int = 10  # ncsn: number of noise levels
    sampler: str = ""  # sampler for the final samples; '' = the method's default
    sample_steps: int = 0  # steps of that sampler; 0 = its default
    n_samples: int = 2000  # final samples for picture and MMD (images: <= 256; 0: none)
    n_train: int = 50_000  # training examples drawn for a built-in data set
    log_every: int = 100  # steps between plain progress lines and loss-log rows
    ckpt_every: int = 1000  # steps between checkpoints (one is also written at the end)


@dataclass
class TrainResult:
    """What `train` returns. `ema` is the network to sample with."""
    loss: float  # mean training loss over the last logged interval
    step: int  # steps done
    net: nn.Module  # live network
    ema: nn.Module  # EMA network
    process: object  # the method's Schedule, sigmas or SDE
    paths: dict  # name -> path of each file written in the run folder
    quality: dict  # mmd2, floor and prior_mmd2 of the final samples (empty if not evaluated)
    interrupted: bool = False  # stopped early by Ctrl-C (a checkpoint was saved)


def check_config(config):
    """Raise ValueError naming the first bad field of a TrainConfig."""
    m = METHODS.get(config.method)
    checks = [
        (config.data in DATASETS or config.data.endswith((".pt", ".npy")),
         f"data: {config.data!r} is neither one of {sorted(DATASETS)} nor a .pt/.npy file"),
        (m is not None, f"method: {config.method!r} is not one of {sorted(METHODS)}"),
        (config.schedule in BETAS, f"schedule: {config.schedule!r} is not one of {sorted(BETAS)}"),
        (config.device in ("auto", "cpu", "cuda"),
         f"device: {config.device!r} is not one of auto, cpu, cuda"),
        (m is None or config.sampler in ("", *m.samplers),
         f"sampler: {config.sampler!r} is not one of {sorted(m.samplers) if m else []}"),
        (config.steps >= 0 and config.batch_size >= 1 and config.lr > 0 and config.T >= 1,
         "steps, batch_size, lr, T: expected steps >= 0, batch_size >= 1, lr > 0, T >= 1"),
        (0 <= config.ema < 1, f"ema: decay {config.ema} is not in [0, 1)"),
        (0 <= config.label_dropout < 1, f"label_dropout: {config.label_dropout} not in [0, 1)"),
        (not (config.classifier and config.conditional),
         "classifier: a classifier takes no labels in; drop --conditional"),
        (config.device != "cuda" or torch.cuda.is_available(), "device: cuda is not available"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def pick_device(name):
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_distributed(device):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group: nccl
    with one GPU per rank on CUDA, gloo on CPU (with the cores shared out between ranks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def write_atomic(path, write):
    """Write a file so readers see the old or the new one, never half of one: write(f) into a
    temporary file in the same folder, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, net, ema, opt, step, log, shape, num_classes):
    """Tensors-only checkpoint (weights, EMA, optimizer, step, loss log, data shape), written
    atomically. No RNG state is needed: every draw of step k comes from rng(seed, ..., k)."""
    state = {"model": net.state_dict(), "ema": ema.module.state_dict(), "ema_n": ema.n_averaged,
             "opt": opt.state_dict(), "step": torch.tensor(step),
             "loss_log": torch.tensor(log, dtype=torch.float64).reshape(-1, 3),
             "shape": torch.tensor(shape), "num_classes": torch.tensor(num_classes or 0)}
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint with weights_only=True; strip a DDP 'module.' prefix from the weights.
    A missing, truncated or foreign file is a ValueError naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # missing, truncated, corrupt: one line naming the file
        raise ValueError(f"{path}: cannot load checkpoint ({type(e).__name__}: {one_line(e)})")
    if not isinstance(state, dict) or not {"model", "ema", "step"} <= state.keys():
        raise ValueError(f"{path}: not a ddpm_score checkpoint (no model/ema/step)")
    for key in ("model", "ema"):
        state[key] = {k.removeprefix("module."): v for k, v in state[key].items()}
    return state


def write_run_files(run, config, log):
    """config.json and loss.csv (step, mean loss since the previous row, seconds), atomically."""
    text = json.dumps(asdict(config), indent=2) + "\n"
    write_atomic(run / "config.json", lambda f: f.write(text.encode()))
    rows = "".join(f"{int(s)},{loss:.6g},{t:.2f}\n" for s, loss, t in log)
    write_atomic(run / "loss.csv", lambda f: f.write(("step,loss,seconds\n" + rows).encode()))


def resolve_config(config, data):
    """Fill in the automatic fields: sigma_max = 0 becomes the largest distance between two of
    (up to) 2,000 training points, rounded up (Song & Ermon 2020, technique 1)."""
    if config.sigma_max > 0 or config.method not in ("ncsn", "ve"):
        return config
    x = data.x[:2000].flatten(1)
    return replace(config, sigma_max=math.ceil(torch.pdist(x).max().item()))


@dataclass
class Run:
    """The state the training loop works on (built by `setup_run`)."""
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    data: Data
    method: Method
    process: object
    net: nn.Module
    model: nn.Module  # net, or net wrapped in DistributedDataParallel
    ema: AveragedModel
    opt: torch.optim.Optimizer
    num_classes: int | None  # classes of the labels the network takes in or (classifier) puts out
    step: int
    log: list  # rows (step, mean loss, seconds)
    dir: Path


def build_model(config, shape, num_classes, device, world):
    """Network (initialized from the seed, the same on every rank), EMA, Adam, and the network as
    the loss calls it (wrapped in DistributedDataParallel when world > 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = make_network(config, shape, num_classes).to(device)
    model = DistributedDataParallel(net) if world > 1 else net
    return net, model, make_ema(net, config.ema), torch.optim.Adam(net.parameters(), lr=config.lr)


def setup_run(config):
    """Check the config, join DDP, load the data (this rank's shard x[rank::world]), build the
    model; resume from OUT/ckpt.pt when config.resume."""
    check_config(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    rank, world, device = setup_distributed(pick_device(config.device))
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by {world} ranks")
    if config.amp and device.type != "cuda":
        raise ValueError("amp: bf16 autocast is for CUDA, and the device is cpu")
    data = get_data(config)
    config = resolve_config(config, data)
    num_classes = labels_needed(config, data)
    net, model, ema, opt = build_model(config, data.x.shape[1:], num_classes, device, world)
    shard = Data(data.x[rank::world].to(device),
                 None if num_classes is None else data.y[rank::world].to(device),
                 data.x_test, data.y_test)
    method = METHODS[config.method]
    method = classifier_method(method) if config.classifier else method
    run = Run(config, rank, world, device, shard, method, method.process(config), net, model,
              ema, opt, num_classes, 0, [], Path(config.out))
    return resume(run) if config.resume else run


def labels_needed(config, data):
    """The number of classes when the run uses labels (conditional or classifier), else None;
    ValueError if it needs labels and the data has none."""
    if not (config.conditional or config.classifier):
        return None
    if data.y is None:
        flag = "conditional" if config.conditional else "classifier"
        labelled = [name for name, make in DATASETS.items() if make(1, rng(0))[1] is not None]
        raise ValueError(f"{flag}: data {config.data!r} has no class labels "
                         f"(built-in data with labels: {', '.join(labelled)})")
    return int(data.y.max()) + 1


def resume(run):
    """Load weights, EMA, optimizer, step and loss log from OUT/ckpt.pt into `run`."""
    path = run.dir / "ckpt.pt"
    if not path.exists():
        raise ValueError(f"resume: no checkpoint at {path}")
    state = load_checkpoint(path, run.device)
    try:
        run.net.load_state_dict(state["model"])
        run.ema.module.load_state_dict(state["ema"])
        run.opt.load_state_dict(state["opt"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: does not fit this config ({one_line(e)})")
    run.ema.n_averaged.copy_(state["ema_n"])
    run.step, run.log = int(state["step"]), state["loss_log"].tolist()
    return run


def learning_rate(config, step):
    """lr min(1, step / lr_warmup), times (1 + cos(pi step / steps)) / 2 with lr_decay."""
    lr = config.lr * min(1.0, step / max(config.lr_warmup, 1))
    return lr * (1 + math.cos(math.pi * step / config.steps)) / 2 if config.lr_decay else lr


def get_batch(run, step):
    """This rank's batch of step `step` (a function of seed, rank and step): examples drawn with
    replacement from its shard; with labels, for a conditional network a label_dropout share
    replaced by the null label (label num_classes), for a classifier none."""
    B, g = run.config.batch_size // run.world, rng(run.config.seed, "batch", run.rank, step)
    i = torch.randint(len(run.data.x), (B,), generator=g).to(run.device)
    if run.data.y is None:
        return run.data.x[i], None
    dropout = run.config.label_dropout if run.config.conditional else 0.0
    drop = (torch.rand(B, generator=g) < dropout).to(run.device)
    return run.data.x[i], torch.where(drop, run.num_classes, run.data.y[i])


def train_step(run, step):
    """One optimizer step on the batch of `step`: forward (bf16 autocast when config.amp),
    backward, clip, Adam at learning_rate(step), EMA. Returns the loss tensor."""
    config = run.config
    x0, y = get_batch(run, step)
    noise_rng = rng(config.seed, "noise", run.rank, step, device=run.device.type)
    with torch.autocast("cuda", torch.bfloat16, enabled=config.amp):
        loss = run.method.loss(run.model, run.process, x0, y, noise_rng).mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(run.net.parameters(), config.grad_clip or math.inf)
    if not (torch.isfinite(loss) and torch.isfinite(norm)):  # the same on every DDP rank
        raise FloatingPointError(f"non-finite loss ({loss.item():.4g}) or gradient at step {step}")
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(config, step)
    run.opt.step()
    update_ema(run.ema, run.net, step, config.ema_warmup)
    return loss.detach()


class Progress:
    """One progress line: step/total, loss, steps/s, time left. Redrawn in place (\\r) on a
    terminal, printed as plain lines every log_every steps when stderr is not a terminal."""

    def __init__(self, start, total, log_every):
        self.start, self.total, self.log_every = start, total, log_every
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def show(self, step, loss):
        now = time.time()
        due = step % self.log_every == 0 or step == self.total
        if not (due or self.tty and now - self.last > 0.2):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - step) / max(rate, 1e-9)
        line = (f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  "
                f"{left:.0f} s left")
        end = "\n" if not self.tty or step == self.total else ""
        print(("\r" + line if self.tty else line), end=end, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_sigint():
    """Turn the first Ctrl-C into a request to stop after the current step (an Event that the
    loop checks); a second Ctrl-C interrupts at once. Only in the main thread."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def save(run):
    """Rank 0 writes the checkpoint, config.json and loss.csv of the run."""
    if run.rank == 0:
        shape, k = tuple(run.data.x.shape[1:]), run.num_classes
        save_checkpoint(run.dir / "ckpt.pt", run.net, run.ema, run.opt, run.step, run.log, shape, k)
        write_run_files(run.dir, run.config, run.log)


def train_loop(run, stop):
    """Steps run.step + 1 .. config.steps; a loss-log row every log_every steps, a checkpoint
    every ckpt_every steps and at the end. Stops early, saved, once `stop` is set."""
    config, t0 = run.config, time.time() - (run.log[-1][2] if run.log else 0.0)
    progress, total, count = Progress(run.step, config.steps, config.log_every), 0.0, 0
    last = run.step >= config.steps
    while not last:  # `last` is read once per step: a Ctrl-C after it is read is seen next step
        loss = train_step(run, run.step + 1).item()
        run.step, total, count = run.step + 1, total + loss, count + 1
        last = run.step == config.steps or stop.is_set()
        if run.rank == 0:
            progress.show(run.step, total / count)
        if run.step % config.log_every == 0 or last:
            run.log.append((run.step, total / count, time.time() - t0))
            total, count = 0.0, 0
        if run.step % config.ckpt_every == 0 or last:
            save(run)
    return run.log[-1][1] if run.log else math.nan


def train(config):
    """Train a model as `config` says and write the run folder (rank 0 only): ckpt.pt,
    config.json, loss.csv, samples.png (for a classifier no samples: its held-out accuracy).
    Returns a TrainResult. Ctrl-C stops after the current step with a checkpoint; a non-finite
    loss raises FloatingPointError and writes nothing, so the last checkpoint stays as it was."""
    joined = not dist.is_initialized()
    run = setup_run(config)
    try:
        with stop_on_sigint() as stop:
            loss = train_loop(run, stop)
    except FloatingPointError as e:
        kept = run.dir / "ckpt.pt"
        kept = f'{kept} (step {int(load_checkpoint(kept)["step"])})' if kept.exists() else "none"
        raise FloatingPointError(f"{e}; training stopped, last good checkpoint: {kept}") from None
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
    paths = {name: run.dir / name for name in ("ckpt.pt", "config.json", "loss.csv")}
    quality = {}
    if run.rank == 0 and config.classifier and not stop.is_set():
        quality = classifier_accuracy(run)
    elif run.rank == 0 and config.n_samples > 0 and not stop.is_set():
        quality, paths["samples.png"] = final_samples(run)
    return TrainResult(loss, run.step, run.net, run.ema.module, run.process, paths, quality,
                       interrupted=stop.is_set())


def draw_samples(net, config, process, shape, n, *, sampler="", steps=0, seed=0, y=None,
                 device="cpu", known=None, mask=None):
    """n samples of `shape` from the network with the method's `sampler` ('' = the config's, else
    the method's default) and `steps` (0 = the sampler's default), in batches of 2,000. With
    `known` and `mask` (n, *shape) each sample inpaints its row of `known` (F31)."""
    method = METHODS[config.method]
    name = sampler or config.sampler or next(iter(method.samplers))
    if name not in method.samplers:
        raise ValueError(f"sampler: {name!r} is not one of {sorted(method.samplers)} for "
                         f"method {config.method}")
    if known is not None and name not in INPAINTING_SAMPLERS:
        can = [s for s in method.samplers if s in INPAINTING_SAMPLERS] or "none"
        raise ValueError(f"sampler: {name} cannot inpaint; samplers of method {config.method} "
                         f"that can: {can}")
    fn, default_steps = method.samplers[name]
    steps = steps or config.sample_steps or default_steps
    g, out = rng(seed, "sample", device=torch.device(device).type), []
    for start in range(0, n, 2000):
        x = method.prior(process, (min(2000, n - start), *shape), g, device)
        part = slice(start, start + len(x))
        yb = None if y is None else y[part].to(device)
        inpaint = {} if known is None else {"known": known[part], "mask": mask[part]}
        out.append(fn(net, process, x, steps, yb, g, **inpaint).float().cpu())
    return torch.cat(out)


def class_labels(num_classes, n):
    """Labels 0, 1, ..., K-1, 0, 1, ... for a class-conditional network, else None."""
    return None if num_classes is None else torch.arange(n) % num_classes


def final_samples(run):
    """Draw the final samples with the EMA network, write samples.png (samples beside held-out
    data) and print their MMD^2 to held-out data, its noise floor and the prior's MMD^2."""
    config, net, x_test = run.config, run.ema.module.eval(), run.data.x_test
    shape = tuple(x_test.shape[1:])
    n = min(config.n_samples, len(x_test) // 2, 256 if len(shape) > 1 else len(x_test))
    t0 = time.time()
    samples = draw_samples(net, config, run.process, shape, n, seed=config.seed, device=run.device,
                           y=class_labels(run.num_classes, n))
    seconds = time.time() - t0
    write_png(run.dir / "samples.png", picture(samples, x_test[:n]))
    h, g = mmd_bandwidths(x_test), rng(config.seed, "mmd")
    prior = run.method.prior(run.process, samples.shape, g, "cpu")
    quality = {"mmd2": mmd2_unbiased(samples, x_test[:n], h), "floor": mmd2_floor(x_test, n, h, g),
               "prior_mmd2": mmd2_unbiased(prior, x_test[:n], h), "n": n,
               "sample_seconds": seconds}
    layout = "a grid" if len(shape) > 1 else "left samples, right held-out data"
    print(f"samples: {run.dir / 'samples.png'} ({n} in {seconds:.1f} s; {layout})\n"
          f"MMD^2 to held-out data {quality['mmd2']:.2e}, noise floor "
          f"{quality['floor']:.2e} (std of MMD^2 between two held-out sets of {n}), "
          f"prior {quality['prior_mmd2']:.2e}")
    return quality, run.dir / "samples.png"


def classifier_accuracy(run, n=2000):
    """Print and return the classifier's accuracy on (up to) n held-out examples, each noised to
    a random level of the method as in training, overall and on the least noisy tenth."""
    net, g = run.ema.module.eval(), rng(run.config.seed, "accuracy", device=run.device.type)
    x0, y = run.data.x_test[:n].to(run.device), run.data.y_test[:n].to(run.device)
    with torch.no_grad():
        x_s, c = run.method.noised(run.process, x0, g)
        right = (net(x_s, c).argmax(dim=-1) == y).float()
    accuracy, low_noise = right.mean().item(), right[c <= c.quantile(0.1)].mean().item()
    print(f"classifier: held-out accuracy {accuracy:.1%} at random noise levels, {low_noise:.1%} "
          f"at the least noisy tenth of them (chance {1 / run.num_classes:.1%})")
    return {"accuracy": accuracy, "low_noise_accuracy": low_noise, "n": len(y)}


@dataclass
class Trained:
    """A trained run loaded for use: its config, network, process and example shape."""
    config: TrainConfig
    net: nn.Module  # EMA (or live) weights, in eval mode
    process: object  # Schedule, sigmas or SDE
    shape: tuple  # shape of one example
    num_classes: int | None


def read_config(path):
    """The TrainConfig in a run's config.json (`cond`, the old name of `conditional`, is read)."""
    saved = json.loads(Path(path).read_text())
    if "cond" in saved:
        saved["conditional"] = saved.pop("cond")
    return TrainConfig(**saved)


def load_run(run_dir, device="cpu", use_ema=True):
    """Load a run folder written by `train`: config.json and the weights from ckpt.pt."""
    run_dir = Path(run_dir)
    try:
        config = read_config(run_dir / "config.json")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{run_dir / 'config.json'}: cannot read the run's config ({e})")
    state = load_checkpoint(run_dir / "ckpt.pt", device)
    shape, k = tuple(state["shape"].tolist()), int(state["num_classes"]) or None
    net = make_network(config, shape, k).to(device)
    try:
        net.load_state_dict(state["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir}: ckpt.pt does not fit config.json "
                         f"({one_line(e)})")
    return Trained(config, net.eval(), METHODS[config.method].process(config), shape, k)


PROCESS_FIELDS = {"ddpm": ("schedule", "T"), "ncsn": ("sigma_min", "sigma_max", "n_sigmas"),
                  "ve": ("sigma_min", "sigma_max")}  # the fields that define each noise process


def load_classifier(run_dir, run, device="cpu"):
    """The classifier of a run, RUN/classifier (`train --classifier --out RUN/classifier`);
    ValueError if there is none or it was trained on other data or another noise process."""
    path = Path(run_dir) / "classifier"
    if not (path / "ckpt.pt").exists():
        raise ValueError(f"guide: {run_dir} has no classifier; train one with "
                         f"`python ddpm_score.py train --classifier --out {path}`")
    clf = load_run(path, device)
    for key in ("data", "method", *PROCESS_FIELDS.get(run.config.method, ())):
        mine, theirs = getattr(clf.config, key), getattr(run.config, key)
        if mine != theirs:
            raise ValueError(f"classifier: {path} was trained with {key} = {mine!r}, "
                             f"the run with {key} = {theirs!r}")
    clf.net.requires_grad_(False)
    return clf


def guide_net(net, config, process, w, classifier=None):
    """`net` under classifier guidance with weight w when a classifier is given, else under
    classifier-free guidance with weight w. [F30]"""
    if classifier is None:
        return cfg_net(net, w)
    std = METHODS[config.method].std
    return classifier_guided_net(net, classifier, w, lambda c: std(process, c))


MASKS = ("right", "bottom", "centre")


def inpainting_mask(shape, kind):
    """The known part (True) of images of `shape` (B, C, H, W) whose `kind` region is missing:
    the right half, the bottom half, or the centre square of half the side. [F31]"""
    if len(shape) != 4:
        raise ValueError(f"shape: inpainting masks are for images (B, C, H, W), got "
                         f"{tuple(shape)}")
    _check_choice("kind", kind, set(MASKS))
    H, W = shape[-2:]
    missing = {"right": (slice(None), slice(W // 2, None)),
               "bottom": (slice(H // 2, None), slice(None)),
               "centre": (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))}[kind]
    mask = torch.ones(shape, dtype=torch.bool)
    mask[(..., *missing)] = False
    return mask


def inpainting_picture(x0, mask, completions):
    """One row per example: the input (its missing part grey), the completions, the original.
    x0 and mask (n, C, H, W), completions (n, m, C, H, W)."""
    shown = torch.where(mask, x0, torch.zeros_like(x0))
    rows = torch.cat([shown[:, None], completions, x0[:, None]], dim=1)
    return image_grid(rearrange(rows, "n k ... -> (n k) ..."), ncol=rows.shape[1])


def nll_bpd(net, config, process, x, *, steps=100, generator=None):
    """Bits per dimension of held-out x: {'ode': probability-flow ODE (ode_likelihood) [F27],
    'elbo': the DDPM variational bound (vlb_bpd) [F10-F13]}. 8-bit images are dequantized.
    DDPM's ODE uses the VP SDE matching its linear schedule, beta(s) = T beta_{sT}."""
    eight_bit = bool(((x + 1) * 127.5 - ((x + 1) * 127.5).round()).abs().max() < 1e-3)
    div = "exact" if x[0].numel() <= 16 else "hutchinson"
    out, sde = {}, process
    if config.method == "ncsn":
        raise ValueError("nll: method ncsn has discrete noise levels and no likelihood; "
                         "use ddpm, vp, ve or subvp")
    if config.method == "ddpm":
        elbo = vlb_bpd(eps_model_of(net, process), process, x, generator=generator,
                       decoder="discretized" if eight_bit else "gaussian")
        out["elbo"] = elbo["total"]
        if config.schedule != "linear":
            return out
        sde = VPSDE(float(process.beta[1]) * process.T, float(process.beta[-1]) * process.T)
    score = sde_score_of(net, sde)
    out["ode"] = ode_likelihood(score, sde, x, steps=steps, divergence=div,
                                dequantize=eight_bit, generator=generator)["bpd"]
    return out


# --- command line: python ddpm_score.py train | sample | nll -------------------------------------


def load_generator(args, device):
    """The run of --run for sample and nll: a generative model, not a classifier."""
    run = load_run(args.run, device, use_ema=not getattr(args, "no_ema", False))
    if run.config.classifier:
        raise ValueError(f"run: {args.run} is a classifier (for guidance); use the run it "
                         f"guides, {Path(args.run).parent}")
    return run


def pick_guide(args, run, device):
    """(guide, classifier) for --guide: 'cfg' needs a conditional run, 'classifier' a classifier
    in RUN/classifier; auto takes cfg, else the classifier; (None, None) when nothing asks for
    guidance (no --class, --guidance or --guide)."""
    if args.guidance is not None and not args.guidance >= 0:
        raise ValueError(f"guidance: the weight must be a number >= 0, got {args.guidance}")
    if args.label is None and args.guidance is None and args.guide == "auto":
        return None, None
    guide = args.guide
    if guide == "auto":
        if not run.num_classes and not (Path(args.run) / "classifier" / "ckpt.pt").exists():
            raise ValueError(f"class: {args.run} is unconditional and has no classifier; train "
                             f"with --conditional, or a classifier with `python ddpm_score.py "
                             f"train --classifier --out {Path(args.run) / 'classifier'}`")
        guide = "cfg" if run.num_classes else "classifier"
    if guide == "cfg" and not run.num_classes:
        raise ValueError(f"guide: cfg needs a run trained with --conditional; {args.run} is "
                         "unconditional")
    return guide, load_classifier(args.run, run, device) if guide == "classifier" else None


def guidance(args, run, n, device):
    """(network, labels (n,) or None, file-name tag): the run's network, or it guided (see
    pick_guide) towards --class K, or each class in turn, with weight --guidance; by default
    the plain conditional (w = 0 for cfg, w = 1 for the classifier). [F30]"""
    guide, classifier = pick_guide(args, run, device)
    if guide is None:
        return run.net, class_labels(run.num_classes, n), ""
    k, label = run.num_classes or classifier.num_classes, args.label
    if label is not None and not 0 <= label < k:
        raise ValueError(f"class: {label} is out of range; the run has {k} classes, 0..{k - 1}")
    w = args.guidance if args.guidance is not None else (0.0 if guide == "cfg" else 1.0)
    y = class_labels(k, n) if label is None else torch.full((n,), label)
    net = guide_net(run.net, run.config, run.process, w,
                    None if classifier is None else classifier.net)
    which = "classifier-free" if guide == "cfg" else f"classifier {Path(args.run) / 'classifier'}"
    print(f"guidance: {which}, w = {w:g}, "
          f"{f'classes 0..{k - 1} in turn' if label is None else f'class {label}'}")
    return net, y, f"_{guide}{w:g}" + ("" if label is None else f"_class{label}")


def sample_command(args):
    """`sample`: draw --n samples from a run, write samples_SAMPLER[_GUIDE_classK].pt and .png
    (with --trajectory a strip of frames from noise to data); with --inpaint, inpaint_command."""
    device = pick_device(args.device)
    run, out = load_generator(args, device), Path(args.run)
    name = args.sampler or run.config.sampler or next(iter(METHODS[run.config.method].samplers))
    if args.inpaint:
        return inpaint_command(args, run, name, device)
    net, y, tag = guidance(args, run, args.n or 2000, device)
    frames = []

    def recording_net(x, c, y=None):  # the network, keeping each input: the trajectory
        frames.append(x.detach().float().cpu())
        return net(x, c, y)
    x = draw_samples(recording_net if args.trajectory else net, run.config, run.process,
                     run.shape, args.n or 2000, sampler=name, steps=args.steps, seed=args.seed,
                     y=y, device=device)
    stem = out / f"samples_{name}{tag}"
    write_atomic(f"{stem}.pt", lambda f: torch.save({"x": x, "y": y}, f))
    write_png(f"{stem}.png", picture(x))
    print(f"wrote {stem}.pt and {stem}.png")
    if args.trajectory:
        keep = [frames[round(i * (len(frames) - 1) / 8)] for i in range(9)] + [x]
        write_png(out / f"trajectory_{name}{tag}.png", trajectory_picture(keep))
        print(f"wrote {out / f'trajectory_{name}{tag}.png'} (noise on the left, data on the right)")


def inpaint_command(args, run, name, device):
    """`sample --inpaint`: complete --n held-out images (default 8), --completions times each,
    with their --mask region missing; write inpaint_MASK_SAMPLER.pt (x, known, mask, y) and .png
    (a row per image: the input, the completions, the original). [F31]"""
    if len(run.shape) != 3:
        raise ValueError(f"inpaint: the run's data are vectors of shape {run.shape}; inpainting "
                         "needs images (C, H, W)")
    if args.completions < 1 or args.trajectory:
        raise ValueError(f"inpaint: needs --completions >= 1 (got {args.completions}) and no "
                         "--trajectory")
    x0 = get_data(run.config).x_test[:args.n or 8]
    known = x0.repeat_interleave(args.completions, dim=0)
    mask = inpainting_mask(known.shape, args.mask)
    net, y, tag = guidance(args, run, len(known), device)
    x = draw_samples(net, run.config, run.process, run.shape, len(known), sampler=name,
                     steps=args.steps, seed=args.seed, y=y, device=device,
                     known=known.to(device), mask=mask.to(device))
    stem = Path(args.run) / f"inpaint_{args.mask}_{name}{tag}"
    write_atomic(f"{stem}.pt", lambda f: torch.save({"x": x, "known": known, "mask": mask,
                                                    "y": y}, f))
    completions = rearrange(x, "(n m) ... -> n m ...", m=args.completions)
    write_png(f"{stem}.png", inpainting_picture(x0, mask[::args.completions], completions))
    print(f"wrote {stem}.pt and {stem}.png (a row per image: the input, {args.completions} "
          f"completions of its {args.mask} part, the original)")


def nll_command(args):
    """`nll`: bits/dim of --n held-out examples of the run's data."""
    device = pick_device(args.device)
    run = load_generator(args, device)
    x = get_data(run.config).x_test[:args.n].to(device)
    t0, g = time.time(), rng(args.seed, "nll", device=device.type)
    bpd = nll_bpd(run.net, run.config, run.process, x, steps=args.steps, generator=g)
    for name, v in bpd.items():
        se = v.std().item() / math.sqrt(len(v))
        print(f"{name} bits/dim {v.mean().item():.4f} +- {se:.4f} (n={len(v)})")
    print(f"({time.time() - t0:.1f} s)")


def field_comments(cls):
    """{field: the comment on its line in the class source}: the dataclass comments are the one
    place the fields are described, and the --help text comes from them."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    matches = (re.match(r"\s+(\w+): .*?#\s*(.*)", line) for line in lines)
    return {m[1]: m[2].replace("%", "%%") for m in matches if m}


def data_name(value):
    """argparse type for --data: a built-in name or a .pt/.npy path."""
    if value in DATASETS or value.endswith((".pt", ".npy")):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                     f'{", ".join(DATASETS)}, or a .pt/.npy file)')


def add_train_arguments(parser, defaults):
    """One flag per TrainConfig field, defaults from `defaults`, help from the comments."""
    helps = field_comments(TrainConfig)
    choices = {"method": list(METHODS), "schedule": list(BETAS),
               "device": ["auto", "cpu", "cuda"], "sampler": ["", *SAMPLERS]}
    for f in fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        help = helps.get(f.name, "") + " (default: %(default)s)"
        if isinstance(default, bool):  # --flag / --no-flag
            aliases = ["--cond"] if f.name == "conditional" else []
            parser.add_argument(flag, *aliases, action=argparse.BooleanOptionalAction,
                                default=default, help=help)
        elif f.name == "data":
            parser.add_argument(flag, type=data_name, default=default, help=help)
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                choices=choices.get(f.name), help=help)


def add_control_arguments(sample):
    """The `sample` flags of controllable generation: guidance [F30] and inpainting [F31]."""
    sample.add_argument("--class", dest="label", type=int, metavar="K",
                        help="guide towards class K (default: every class in turn)")
    sample.add_argument("--guidance", type=float, metavar="W",
                        help="guidance weight: cfg (1 + W) eps(x, K) - W eps(x, null), "
                        "classifier score + W grad log p(K | x) (default: the plain "
                        "conditional, W = 0 for cfg, 1 for the classifier)")
    sample.add_argument("--guide", default="auto", choices=["auto", "cfg", "classifier"],
                        help="auto: cfg on a --conditional run, else RUN/classifier (%(default)s)")
    sample.add_argument("--inpaint", action="store_true",
                        help="complete held-out images whose --mask region is missing")
    sample.add_argument("--mask", default="right", choices=MASKS,
                        help="the region --inpaint fills in (%(default)s)")
    sample.add_argument("--completions", type=int, default=4,
                        help="completions per image with --inpaint (%(default)s)")


def make_parser(train_defaults=TrainConfig()):
    """The argparse parser: train (defaults from `train_defaults`), sample and nll."""
    parser = argparse.ArgumentParser(prog="ddpm_score.py", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a model, write a run folder"),
                        train_defaults)
    sample = sub.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("--sampler", default="", choices=["", *SAMPLERS],
                        help="sampler ('' = the run's default)")
    sample.add_argument("--steps", type=int, default=0, help="sampler steps (0 = its default)")
    sample.add_argument("--n", type=int, default=0,
                        help="number of samples (0: 2000; with --inpaint: 8 images)")
    sample.add_argument("--trajectory", action="store_true", help="also picture the trajectory")
    sample.add_argument("--no-ema", action="store_true", help="use the live, not the EMA, weights")
    add_control_arguments(sample)
    nll = sub.add_parser("nll", help="bits/dim of held-out data")
    nll.add_argument("--n", type=int, default=256, help="held-out examples (%(default)s)")
    nll.add_argument("--steps", type=int, default=100, help="ODE steps (%(default)s)")
    for p in (sample, nll):
        p.add_argument("--run", required=True, help="run folder written by train")
        p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def train_command(args, argv):
    """`train`: with --resume the run's config.json supplies the defaults; with --classifier
    and --out RUN/classifier, RUN's config.json does (flags still win)."""
    config_path, run_path = Path(args.out) / "config.json", Path(args.out).parent / "config.json"
    if args.resume and config_path.exists():
        args = make_parser(replace(read_config(config_path), resume=True)).parse_args(argv)
    elif args.classifier and run_path.exists():  # RUN/classifier: RUN's config, as a classifier
        defaults = replace(read_config(run_path), classifier=True, conditional=False,
                           resume=False, out=args.out)
        args = make_parser(defaults).parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    result = train(config)
    if result.interrupted:
        print(f'interrupted at step {result.step}; checkpoint {result.paths["ckpt.pt"]}; '
              "continue with --resume", file=sys.stderr)
        sys.exit(130)
    print(f"trained {result.step} steps, final loss {result.loss:.4f}; run folder {config.out}")


def main(argv=None):
    """Train and sample diffusion and score-based models.

    examples:
      python ddpm_score.py train                                  # moons, ddpm, about a minute
      python ddpm_score.py train --method vp --data checkerboard --out runs/vp
      python ddpm_score.py train --out runs/default --resume --steps 6000
      python ddpm_score.py sample --run runs/default --sampler ddim --steps 50 --trajectory
      python ddpm_score.py nll --run runs/default
      torchrun --nproc_per_node=2 ddpm_score.py train --out runs/ddp

    controllable generation (data with labels: moons, ring, shapes):
      python ddpm_score.py train --data ring --conditional --out runs/ring  # label dropout 0.1
      python ddpm_score.py sample --run runs/ring --class 3 --guidance 1    # classifier-free
      python ddpm_score.py train --data ring --out runs/ring_u              # unconditional
      python ddpm_score.py train --classifier --out runs/ring_u/classifier --steps 1000
      python ddpm_score.py sample --run runs/ring_u --class 3 --guidance 2  # classifier guidance
      python ddpm_score.py train --data shapes --conditional --steps 4000 --lr 5e-4 \\
          --batch-size 64 --out runs/shapes
      python ddpm_score.py sample --run runs/shapes --inpaint --mask centre  # inpaint_*.png

    A classifier trained with --out RUN/classifier takes RUN's config as its defaults and
    learns p(y | x_s) on data noised by RUN's process; `sample --run RUN` then finds it. On a
    run with both, --guide cfg|classifier picks one (auto: cfg).
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train_command(args, argv)
        else:
            {"sample": sample_command, "nll": nll_command}[args.command](args)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)


if __name__ == "__main__":
    main()
