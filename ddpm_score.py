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
    Zhao et al. 2023, UniPC (the corrector of DPM-Solver++ order 3), arXiv:2302.04867
    Dormand, Prince 1980, embedded Runge-Kutta formulae, J. Comput. Appl. Math. 6 (rk45)

Three ways in
    import ddpm_score                 # the math, samplers and networks as functions
    python ddpm_score.py train        # train on built-in data (no download), then sample
    make test                         # the spec tests
and then, e.g. (``python ddpm_score.py --help`` and README.md have more):
    python ddpm_score.py sample --run runs/default --sampler ddim --steps 50 --trajectory
    python ddpm_score.py nll --run runs/default
"""
import argparse
import ast
import hashlib
import io
import json
import math
import os
import shutil
import signal
import struct
import sys
import threading
import time
import warnings
import zlib
from collections import namedtuple
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

with warnings.catch_warnings():  # torch without NumPy warns at import; this module needs no NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from einops import rearrange, reduce
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# --- notation and helpers -------------------------------------------------------------------------


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


def _check_batch(name, x):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, ...) with B >= 1, got {got}")


def _check_shape(name, v, shape):
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


def _check_clip(name, clip_x0):
    if not (clip_x0 is None or isinstance(clip_x0, (tuple, list)) and len(clip_x0) == 2 and all(
            isinstance(v, (int, float)) for v in clip_x0) and clip_x0[0] < clip_x0[1]):
        raise ValueError(f"{name} must be None or a range (lo, hi) with lo < hi, got {clip_x0!r}")


ODE_METHODS = ("euler", "heun", "rk4", "rk45")
GRIDS = ("uniform", "quadratic", "logsnr", "edm")
ARGS = {  # what each argument of the math must be, by name: the rules _check applies
    **dict.fromkeys(("x", "x0", "xt", "x_prev"), (_check_batch,)),
    **dict.fromkeys(("T", "L", "steps", "n_projections", "n_probes", "max_steps"),
                    (_check_count, 1)),
    **dict.fromkeys(("n_steps", "corrector_steps"), (_check_count, 0)),
    "levels": (_check_count, 2),
    # numbers in (0, inf): s is cosine_betas' offset (SDE times s are tensors, checked at use)
    **dict.fromkeys(("s", "beta_min", "beta_max", "sigma_min", "sigma_max", "step_size", "eps",
                     "rtol", "atol"), (_check_real,)),
    **dict.fromkeys(("beta_1", "beta_T", "max_beta", "eps_s"), (_check_real, 1)),
    **dict.fromkeys(("sigma2", "kind"), (_check_choice, {"beta", "beta_tilde"})),
    "decoder": (_check_choice, {"discretized", "gaussian"}),
    "decoder_var": (_check_choice, {"published", "sigma2"}),
    "probe": (_check_choice, {"rademacher", "gaussian"}),
    "divergence": (_check_choice, {"exact", "hutchinson"}),
    "predictor": (_check_choice, {"euler_maruyama", "reverse_diffusion"}),
    "method": (_check_choice, set(ODE_METHODS)),
    "spacing": (_check_choice, set(GRIDS)),
    "clip_x0": (_check_clip,),
}


def _check(**args):
    """Check each argument by the rule ARGS gives its name; a ValueError names the first bad one."""
    for name, value in args.items():
        rule, *spec = ARGS[name]
        rule(name, value, *spec)


def _check_above(name, value, low_name, low, strict=False):
    """value >= low (> if strict), e.g. beta_T >= beta_1: a ValueError naming both."""
    if value < low or strict and value == low:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low_name} = {low}, "
                         f"got {value}")


def _mean_flat(x):
    """Per-example mean over every non-batch dimension: (B, ...) -> (B,)."""
    return reduce(x, "b ... -> b", "mean")


def _sum_flat(x):
    return reduce(x, "b ... -> b", "sum")


# --- DDPM: schedules [F1, F2, Schedules] ----------------------------------------------------------


def linear_betas(T=1000, beta_1=None, beta_T=None):
    """beta_t = beta_1 + (t - 1) / (T - 1) (beta_T - beta_1), t = 1..T, float64. [Schedules, F1, F5]
    Defaults 1e-4 and 0.02 (Ho et al.) scaled by 1000 / T as improved DDPM does, capped at 0.999:
    every T >= 20 ends near N(0, I), sqrt(alpha_bar_T) < 0.007 (unscaled, T = 100 gives 0.60)."""
    _check(T=T)
    beta_1 = min(0.1 / T, 0.999) if beta_1 is None else beta_1
    beta_T = min(20 / T, 0.999) if beta_T is None else beta_T
    _check(beta_1=beta_1, beta_T=beta_T)
    _check_above("beta_T", beta_T, "beta_1", beta_1)
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T=1000, s=0.008, max_beta=0.999):
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) pi / 2). [Schedules]
    beta_t = min(1 - f(t) / f(t-1), max_beta), float64 (T,): the last steps are clipped, which
    is why every sampler coefficient is tested for them (PITFALLS #1)."""
    _check(T=T, s=s, max_beta=max_beta)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


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


def _check_t(sched, t, x=None):
    """t must be a LongTensor of shape (B,), B = len(x) where x is given, with values in 1..T."""
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.long and t.ndim == 1
            and (x is None or t.shape == x.shape[:1])):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a LongTensor of shape ({'B' if x is None else x.shape[0]},), "
                         f"got {got}")
    if t.numel() and (t.min() < 1 or t.max() > sched.T):
        raise ValueError(f"t must lie in 1..T = 1..{sched.T}, got values in "
                         f"{int(t.min())}..{int(t.max())}")
    return t.cpu()


def marginal_coefs(sched, t):
    """(scale, std) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each (B,) float64. [F3]"""
    alpha_bar = sched.alpha_bar[_check_t(sched, t)]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


# --- DDPM: forward process [F1-F5] ----------------------------------------------------------------


def _noise(x, noise, generator):
    if noise is not None:
        _check_shape("noise", noise, x.shape)
    return _randn_like(x, generator) if noise is None else noise


def q_step(sched, x_prev, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, one step of q(x_t | x_{t-1}). [F1]"""
    _check(x_prev=x_prev)
    t = _check_t(sched, t, x_prev)
    z = _noise(x_prev, noise, generator)
    return bcast(sched.alpha[t].sqrt(), x_prev) * x_prev + bcast(sched.beta[t].sqrt(), z) * z


def q_mean_var(sched, x0, t):
    """q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I); returns (mean, var). [F3]"""
    _check(x0=x0)
    alpha_bar = sched.alpha_bar[_check_t(sched, t, x0)]    # float64, cast at use (PITFALLS #11)
    return bcast(alpha_bar.sqrt(), x0) * x0, bcast(1 - alpha_bar, x0)


def q_sample(sched, x0, t, noise=None, *, generator=None):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, the closed form. [F3, F4]"""
    mean, var = q_mean_var(sched, x0, t)
    return mean + var.sqrt() * _noise(x0, noise, generator)


# --- DDPM: posterior and ELBO [F6-F11, F13, F36] --------------------------------------------------


def posterior_mean_var(sched, x0, xt, t):
    """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I); returns (mu_tilde, beta_tilde). [F7]
    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t."""
    _check(x0=x0)
    _check_shape("xt", xt, x0.shape)
    t = _check_t(sched, t, x0)
    beta, (alpha_bar, alpha_bar_prev) = sched.beta[t], sched.alpha_bar[torch.stack([t, t - 1])]
    mu_tilde = (bcast(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar), x0) * x0
                + bcast(sched.alpha[t].sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar), x0) * xt)
    return mu_tilde, bcast(sched.beta_tilde[t], x0)


def mu_from_eps(sched, xt, t, eps):
    """mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t): mu_tilde with the
    true eps (F8), the model mean with eps_theta (F9). [F8, F9]"""
    _check(xt=xt)
    _check_shape("eps", eps, xt.shape)
    t = _check_t(sched, t, xt)
    coef = sched.beta[t] / (1 - sched.alpha_bar[t]).sqrt()
    return (xt - bcast(coef, xt) * eps) / bcast(sched.alpha[t].sqrt(), xt)


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element in nats, arguments broadcast: 1/2
    [log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1]. [F13]"""
    var1, var2 = (torch.as_tensor(v, dtype=torch.float64) if not torch.is_tensor(v) else v
                  for v in (var1, var2))
    if (var1 <= 0).any() or (var2 <= 0).any():
        raise ValueError("var1 and var2 must be > 0")
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def reverse_var(sched, t, kind="beta"):
    """sigma_t^2 = beta_t or beta_tilde_t, the variance of p_theta(x_{t-1} | x_t). [F6, F7]
    (B,) float64; at t = 1 beta_tilde is clipped to beta_tilde_2 (beta_1 if T = 1), as in improved
    DDPM."""
    _check(kind=kind)
    t = _check_t(sched, t)
    if kind == "beta":
        return sched.beta[t]
    beta_tilde = sched.beta_tilde
    floor = beta_tilde[2] if sched.T > 1 else sched.beta[1]
    return torch.where(t == 1, floor, beta_tilde[t])


def discretized_gaussian_logp(x0, mean, var, levels=256):
    """log P(x0) = log int_bin N(y; mean, var) dy for data on K = levels levels, in nats. [F36]
    x0 = 2 k / (K - 1) - 1, bin x0 +- 1 / (K - 1), the bottom bin open to -inf and the top bin to
    +inf (the K masses sum to 1). As Ho et al.'s code: log Phi at k = 0, log(1 - Phi) at k = K - 1,
    log of the CDF difference between, each mass floored at 1e-12 (K = 256: their decoder)."""
    _check_shape("mean", mean, x0.shape)
    _check(levels=levels)
    var = torch.as_tensor(var, dtype=x0.dtype, device=x0.device)
    if not (var > 0).all():
        raise ValueError(f"var must be > 0, got min {var.min().item()}")
    h = 1 / (levels - 1)  # half a bin
    phi = lambda u: 0.5 * (1 + torch.erf((u - mean) / (var * 2).sqrt()))  # noqa: E731
    upper = torch.where(x0 > 1 - h / 2, 1.0, phi(x0 + h))            # k = K - 1: up to +inf
    return torch.log((upper - torch.where(x0 < -1 + h / 2, 0.0, phi(x0 - h))).clamp(min=1e-12))


def vlb_bpd(eps_model, sched, x0, *, sigma2="beta", decoder="discretized",
            decoder_var="published", levels=256, generator=None):
    """-ELBO = L_T + sum_{t>=2} L_{t-1} + L_0 of an eps-model, per example in bits/dim. [F10, F11]
    L_T = KL(q(x_T | x0) || N(0, I)), L_{t-1} = KL(q(x_{t-1} | x_t, x0) || N(mu_theta, sigma_t^2 I))
    (F7, F9, F13), L_0 = -log p(x0 | x1); sigma_t^2 = reverse_var(t, sigma2), one x_t ~ q(x_t | x0)
    per t; decoder 'discretized' (data on K = levels levels in [-1, 1], F36; 256: 8-bit) or
    'gaussian', with sigma_1^2 = beta_tilde_2 by ``decoder_var='published'`` (Ho et al.'s and
    improved DDPM's code: bits/dim as in papers) or reverse_var(1, sigma2) by 'sigma2'. Returns (B,)
    'total', 'prior'; (B, T) 'terms'."""
    _check(x0=x0, decoder=decoder, sigma2=sigma2, decoder_var=decoder_var)
    if decoder == "discretized" and not ((x0 >= -1) & (x0 <= 1)).all():
        raise ValueError(f"x0 must be {levels}-level data scaled to [-1, 1] for decoder='"
                         f"discretized', got values in {x0.min().item():.4g}.."
                         f"{x0.max().item():.4g} (PITFALLS #12)")
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
            nll = -discretized_gaussian_logp(x0, mu, var, levels)
        else:
            nll = 0.5 * (torch.log(2 * math.pi * var) + (x0 - mu) ** 2 / var)
        terms[:, step - 1] = _sum_flat(nll)
    mean_T, var_T = q_mean_var(sched, x0, torch.full((B,), sched.T, device=x0.device))
    prior = _sum_flat(gaussian_kl(mean_T, var_T, 0.0, 1.0))
    terms, prior = terms / (d * math.log(2)), prior / (d * math.log(2))
    return {"total": prior + terms.sum(1), "prior": prior, "terms": terms}


# --- DDPM: the eps loss [F12] ---------------------------------------------------------------------


def draw_t(sched, x0, generator=None):
    """t ~ U{1..T}, one per example: the step F12 averages over. [F12]"""
    return torch.randint(1, sched.T + 1, x0.shape[:1], generator=generator, device=x0.device)


def eps_loss(eps_model, sched, x0, *, t=None, noise=None, generator=None):
    """L_simple = ||eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t)||^2 / d.
    [F12] Per example; t ~ U{1..T}, eps ~ N(0, I) unless given; eps_model(xt, t), t (B,) long."""
    _check(x0=x0)
    t = draw_t(sched, x0, generator) if t is None else t
    eps = _noise(x0, noise, generator)
    return _mean_flat((eps - eps_model(q_sample(sched, x0, t, eps), t)) ** 2)


# --- DDPM: samplers, ancestral and DDIM [F6, F9, F29] ---------------------------------------------


def _time_grid(sched, steps, x):
    """Descending integer steps tau_S = T > ... > tau_1 >= 1 (all T, S evenly spaced, or given)
    and each as a (B,) LongTensor on x's device, made before the loop."""
    steps = sched.T if steps is None else steps
    if isinstance(steps, int):
        if isinstance(steps, bool) or not 1 <= steps <= sched.T:
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
        _check_shape("known", known, x.shape)
        if mask.dtype != torch.bool or mask.shape != x.shape:
            raise ValueError(f"mask must be a bool tensor of the data's shape {tuple(x.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def _replace_known(x, known, mask, scale, std, generator):
    """F31: on the mask, x := scale known + std z, a sample of q(x_t | known) or p_{0s}."""
    if mask is None:
        return x
    return torch.where(mask, scale * known + std * _randn_like(x, generator), x)


def _x0_hat(x, eps, alpha_bar, clip_x0):
    """x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), clipped to clip_x0. [F21]"""
    x0 = x.sub(eps, alpha=math.sqrt(1 - alpha_bar)).div_(math.sqrt(alpha_bar))   # fused: 2 ops
    return x0 if clip_x0 is None else x0.clamp(*clip_x0)


@torch.no_grad()
def ddpm_sample(eps_model, sched, x, *, steps=None, sigma2="beta", clip_x0=None, generator=None,
                callback=None, known=None, mask=None):
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z, from x = x_T to x_0. [F6, F9]
    sigma_t^2 = beta_t or beta_tilde_t (``sigma2``); on a grid tau_S = T > ... > tau_1 (``steps``)
    the chain is respaced, beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}; no noise at
    the last step. ``clip_x0=(lo, hi)`` (off by default) clips x0_hat and takes mu_tilde(x_t,
    x0_hat) (F7). Inpainting (F31): where ``mask`` is True, x is replaced after each step by a
    sample of q(x_t | known); the rest approximates p(x_unknown | known)."""
    _check(x=x, sigma2=sigma2, clip_x0=clip_x0)
    _check_inpainting(x, known, mask)
    grid, t_bs = _time_grid(sched, steps, x)
    ab = sched.alpha_bar[grid + [0]].tolist()        # alpha_bar at tau_S, ..., tau_1, tau_0 = 0
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
    _check(x=x, clip_x0=clip_x0)
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    grid, t_bs = _time_grid(sched, steps, x)
    ab = sched.alpha_bar[grid + [0]].tolist()
    for i, t_b in enumerate(t_bs):
        a, a_prev = ab[i], ab[i + 1]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        c = 1 - a_prev - sigma ** 2           # >= 0 for eta <= 1 up to rounding (PITFALLS #4)
        if c < -1e-12:
            raise ValueError(f"1 - alpha_bar_prev - sigma^2 = {c} < 0 at t = {grid[i]}")
        eps = eps_model(x, t_b)
        x0_hat = _x0_hat(x, eps, a, clip_x0)
        if clip_x0 is not None:               # eps follows the clipped x0_hat
            eps = (x - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        x = torch.add(math.sqrt(a_prev) * x0_hat, eps, alpha=math.sqrt(max(c, 0.0)))  # fused add
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


# --- energy-based models and score matching [F14-F16] ---------------------------------------------


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


def score_matching_loss(score_model, x):
    """Implicit score matching: (1/2 ||s_theta(x)||^2 + tr(grad_x s_theta(x))) / d. [F16]
    F15 / d minus a theta-free constant; the trace is exact (one backward pass per dimension)."""
    _check(x=x)
    x = x.detach().requires_grad_(True)
    score = score_model(x).flatten(1)
    trace = _jacobian_trace(score, x, None, create_graph=True)
    return (0.5 * (score ** 2).sum(1) + trace) / score.shape[1]


def sliced_score_matching_loss(score_model, x, *, n_projections=1, probe="rademacher",
                               generator=None):
    """Sliced score matching: (1/2 ||s_theta(x)||^2 + v^T grad_x s_theta(x) v) / d. [F16]
    E[v v^T] = I (Rademacher or Gaussian), so E_v[v^T J v] = tr(J); averaged over n_projections."""
    _check(x=x, probe=probe, n_projections=n_projections)
    x = x.detach().requires_grad_(True)
    score = score_model(x)
    probes = [_probe(x, probe, generator) for _ in range(n_projections)]
    vjv = _jacobian_trace(score, x, probes, create_graph=True)
    return (0.5 * _sum_flat(score ** 2) + vjv) / x[0].numel()


def _jacobian_trace(out, x, probes, create_graph=False):
    """tr(grad_x out) per example, out = f(x): exact (one backward pass per dimension) if probes is
    None, else Hutchinson's v^T (grad_x out) v averaged over the given probes. [F16, F27]"""
    grad = partial(torch.autograd.grad, inputs=x, retain_graph=True, create_graph=create_graph)
    if probes is None:
        flat = out.flatten(1)
        return sum(grad(flat[:, i].sum())[0].flatten(1)[:, i] for i in range(flat.shape[1]))
    return sum(_sum_flat(grad((out * v).sum())[0] * v) for v in probes) / len(probes)


def _probe(x, kind, generator):
    """A random probe v with E[v v^T] = I: Rademacher (+-1) or standard Gaussian. [F16, F27]"""
    if kind == "gaussian":
        return _randn_like(x, generator)
    return (2 * torch.randint(0, 2, x.shape, generator=generator, device=x.device) - 1).to(x.dtype)


# --- Langevin dynamics [F17] ----------------------------------------------------------------------


@torch.no_grad()
def langevin(score_fn, x, *, step_size, n_steps, generator=None, callback=None):
    """x_k = x_{k-1} + (eps / 2) grad log p(x_{k-1}) + sqrt(eps) z_k, k = 1..n_steps. [F17]
    Exact only as eps -> 0: for N(0, c^2) the stationary variance is c^2 / (1 - eps / (4 c^2))."""
    _check(x=x, step_size=step_size, n_steps=n_steps)
    for i in range(n_steps):
        x = x + step_size / 2 * score_fn(x) + math.sqrt(step_size) * _randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


# --- denoising score matching and NCSN [F18-F20] --------------------------------------------------


def geometric_sigmas(sigma_max, sigma_min, L):
    """sigma_1 > ... > sigma_L, geometric from sigma_max to sigma_min, float64 (L,). [F19]"""
    _check(sigma_max=sigma_max, sigma_min=sigma_min, L=L)
    if L > 1:
        _check_above("sigma_max", sigma_max, "sigma_min", sigma_min, strict=True)
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), L, dtype=torch.float64)


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


def dsm_loss(score_model, x0, sigmas, *, sigma=None, noise=None, generator=None):
    """NCSN: lambda(sigma) ||s_theta(x~, sigma) + (x~ - x0) / sigma^2||^2 / d, x~ = x0 + sigma z.
    [F18, F19] sigma (B,) given or drawn from ``sigmas``; lambda = sigma^2 (PITFALLS #6)."""
    _check(x0=x0)
    sigma = draw_sigma(sigmas, x0, generator) if sigma is None else sigma
    _check_shape("sigma", sigma, x0.shape[:1])
    if not (sigma > 0).all():
        raise ValueError(f"sigma must be > 0, got min {sigma.min().item()}")
    z, sigma_b = _noise(x0, noise, generator), bcast(sigma, x0)
    return _mean_flat(sigma_b ** 2 * (score_model(x0 + sigma_b * z, sigma) + z / sigma_b) ** 2)


@torch.no_grad()
def annealed_langevin(score_fn, sigmas, x, *, steps=100, eps=2e-5, denoise=True, generator=None,
                      callback=None):
    """Annealed Langevin (NCSN): for i = 1..L, K steps of F17 with s_theta(., sigma_i). [F20]
    K = ``steps``, alpha_i = eps sigma_i^2 / sigma_L^2, Tweedie last (``denoise``), float32 sigma
    (PITFALLS 11); callback(j, x) sees the state after each of the L K steps and Tweedie's (j =
    L K). Called as the other samplers are: (model, noise process, x)."""
    _check(x=x, eps=eps)
    sigmas = _sigmas(sigmas).tolist()
    for i, sigma in enumerate(sigmas):
        alpha, sigma_b = eps * sigma ** 2 / sigmas[-1] ** 2, _full(x, sigma)
        step_done = None if callback is None else lambda k, y: callback(i * steps + k, y)
        x = langevin(lambda y: score_fn(y, sigma_b), x, step_size=alpha, n_steps=steps,
                     generator=generator, callback=step_done)
    if denoise:
        x = tweedie(x, score_fn(x, _full(x, sigmas[-1])), 1.0, sigmas[-1])
        if callback is not None:
            callback(len(sigmas) * steps, x)
    return x


# --- parameterizations: eps, score, x0 [F21] ------------------------------------------------------


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
    _check_shape("eps", eps, xt.shape)
    return (xt - _as_coef(std, xt, "std") * eps) / _as_coef(scale, xt, "scale")


def tweedie(xt, score, scale, std):
    """Tweedie: E[x0 | x_t] = (x_t + std^2 grad log p_t(x_t)) / scale; DDPM: scale =
    sqrt(alpha_bar_t), std = sqrt(1 - alpha_bar_t); NCSN: scale = 1, std = sigma. [F21]"""
    _check_shape("score", score, xt.shape)
    return (xt + _as_coef(std, xt, "std") ** 2 * score) / _as_coef(scale, xt, "scale")


# --- score SDEs and their loss [F22, F23, F25, F35] -----------------------------------------------


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
        _check(x0=x0)
        _check_shape("s", s, x0.shape[:1])
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
        _check(beta_min=beta_min, beta_max=beta_max)
        _check_above("beta_max", beta_max, "beta_min", beta_min)
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
        _check(sigma_min=sigma_min, sigma_max=sigma_max)
        _check_above("sigma_max", sigma_max, "sigma_min", sigma_min, strict=True)
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
            self._tables[s.device] = self.sched.alpha_bar.log().to(s.device)
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


def draw_s(x0, generator=None, eps_s=1e-5):
    """s ~ U(eps_s, 1), one per example, at least float32 (PITFALLS #11): F25's E_s. [F25]"""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    return eps_s + (1 - eps_s) * torch.rand(x0.shape[:1], generator=generator, device=x0.device,
                                            dtype=dtype)


def sde_loss(score_model, sde, x0, *, likelihood_weighting=False, s=None, noise=None,
             eps_s=1e-5, generator=None):
    """E_s lambda(s) ||s_theta(x_s, s) - grad log p_{0s}(x_s | x0)||^2 / d, s ~ U(eps_s, 1). [F25]
    lambda = std(s)^2, or g(s)^2 with ``likelihood_weighting`` (then a bound on the KL)."""
    _check(x0=x0, eps_s=eps_s)
    s = draw_s(x0, generator, eps_s) if s is None else s
    _check_shape("s", s, x0.shape[:1])
    if not ((s > 0) & (s <= 1)).all():
        raise ValueError(f"s must lie in (0, 1], got values in {s.min().item()}..{s.max().item()}")
    z = _noise(x0, noise, generator)
    mean, std = sde.marginal(x0, s)
    weight = bcast(sde.diffusion(s), x0) ** 2 if likelihood_weighting else std ** 2
    return _mean_flat(weight * (score_model(mean + std * z, s) + z / std) ** 2)


# --- reverse SDE and predictor-corrector [F24, F28] -----------------------------------------------


def reverse_drift(sde, score, x, s, ode=False):
    """f(x, s) - g(s)^2 score (reverse SDE), or f - 1/2 g^2 score (probability flow). [F24, F26]"""
    return sde.drift(x, s) - (0.5 if ode else 1.0) * bcast(sde.diffusion(s), x) ** 2 * score


def _coefs(sde, times):
    """{s: (a(s), g(s)^2, m(s), std(s))} as Python floats, one float64 evaluation on the CPU."""
    s = torch.tensor(list(times), dtype=torch.float64)
    cols = (sde.drift_coef(s), sde.diffusion(s) ** 2, *sde.marginal_coefs(s))
    return dict(zip(s.tolist(), zip(*(c.tolist() for c in cols))))


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
    diffusion. Grid: uniform (s_grid) or explicit, ending >= 0. Inpainting (F31) as in
    ddpm_sample, with p_{0s}(x_s | known)."""
    _check(x=x, corrector_steps=corrector_steps, predictor=predictor)
    _check_inpainting(x, known, mask)
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


# --- probability-flow ODE and likelihood [F26, F27, F33] ------------------------------------------


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
        _check(rtol=rtol, atol=atol, max_steps=max_steps)
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
    ``forward``): rk45 needs only its ends; Euler's default is uniform."""
    _check(method=method)
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
    _check(x=x)
    f, grid = _flow(score_fn, sde, x, steps, eps_s, spacing, method)
    return _solve_ode(f, x, grid, method, rtol, atol, max_steps, stats, callback)


@torch.no_grad()
def ode_encode(score_fn, sde, x0, *, steps=100, method="rk4", eps_s=1e-3, spacing=None,
               rtol=1e-5, atol=1e-5, max_steps=10_000, stats=None):
    """dx/ds = f - 1/2 g^2 score forward, data -> latent, from s = eps_s to 1. [F26]
    The probability-flow ODE on ode_sample's grid backwards, with the same methods."""
    _check(x0=x0)
    f, grid = _flow(score_fn, sde, x0, steps, eps_s, spacing, method, forward=True)
    return _solve_ode(f, x0, grid, method, rtol, atol, max_steps, stats)


@torch.no_grad()
def ode_likelihood(score_fn, sde, x, *, steps=100, method="rk4", eps_s=1e-5, spacing=None,
                   rtol=1e-5, atol=1e-5, max_steps=10_000, divergence="exact", n_probes=1,
                   probe="rademacher", dequantize=False, generator=None):
    """log p_0(x) = log p_1(x_1) + int_0^1 div_x f~(x_s, s) ds along the flow f~ (F26). [F27]
    Integrated from eps_s to 1 as ode_encode, the log-density an extra coordinate; divergence
    'exact' or 'hutchinson' (n_probes fixed probes, unbiased). Returns (B,) 'nats', 'bpd' = -nats
    / (d ln 2), and 'nfe'. ``dequantize`` (8-bit x = 2 k / 255 - 1): y = x + (2 / 255)(u - 1/2),
    'nats' = log p(y), 'bpd' = -(log p(y) + d log(2 / 255)) / (d ln 2), as in the papers."""
    _check(x=x, divergence=divergence, n_probes=n_probes)
    shape, d = x.shape, x[0].numel()
    if dequantize:
        x = x + 2 / 255 * (torch.rand(shape, generator=generator, device=x.device,
                                      dtype=x.dtype) - 0.5)
    probes = None
    if divergence == "hutchinson":
        probes = [_probe(x, probe, generator) for _ in range(n_probes)]
    flow, grid = _flow(score_fn, sde, x, steps, eps_s, spacing, method, forward=True)

    def augmented(state, s):  # state = [x flattened, accumulated divergence]
        with torch.enable_grad():
            y = state[:, :d].reshape(shape).detach().requires_grad_(True)
            drift = flow(y, s)
            div = _jacobian_trace(drift, y, probes)
        return torch.cat([drift.detach().flatten(1), div.detach()[:, None]], 1)
    state, stats = torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], 1), {}
    state = _solve_ode(augmented, state, grid, method, rtol, atol, max_steps, stats)
    nats = sde.prior_logp(state[:, :d].reshape(shape)) + state[:, d]
    offset = d * math.log(2 / 255) if dequantize else 0.0
    return {"nats": nats, "bpd": -(nats + offset) / (d * math.log(2)), "nfe": stats["nfe"]}


# --- few-step solvers and time grids [F32, F34, F37, F38] -----------------------------------------


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


def s_grid(sde, steps, eps_s=1e-3, spacing=None, rho=7.0):
    """Times 1 = s_0 > ... > s_N = eps_s (N = steps) for the SDE solvers. [F34]
    'uniform'; 'quadratic', s_i = eps_s + (1 - eps_s) (1 - i / N)^2; 'logsnr', uniform in log(m /
    std); 'edm', std / m on Karras et al.'s rho-grid. None: sde.spacing, quadratic for the VP family
    and uniform for VE (the better for RK4 likelihoods, README). A sequence is the grid itself."""
    if not isinstance(steps, (int, float)):
        grid = [float(s) for s in steps]
        if len(grid) < 2 or not all(1 >= a > b >= 0 for a, b in zip(grid, grid[1:])):
            raise ValueError(f"steps must be an int or a strictly descending grid of at least two "
                             f"times in [0, 1], got {grid}")
        return grid
    spacing = sde.spacing if spacing is None else spacing
    _check(steps=steps, eps_s=eps_s, spacing=spacing)
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


def few_step_grid(sde, steps):
    """log(lambda_star - lambda_i) uniform in i, lambda = log(m / std), K = steps calls. [F38]
    Times 1 = s_0 > ... > s_K for DPM-Solver++ at K model calls: lambda from lambda_0 =
    max(lambda(1), -5.03) to lambda_K in steps shrinking by a constant factor, lambda_star =
    lambda_K + e^c; K <= 12: lambda_K = 3.5, c = 0.7 + 8.2 / (K - 3) (K <= 3: near uniform);
    K >= 13: lambda_K = 5, c = 18.7 / (K - 1); fitted on a family of Gaussians; K = 5: nodes
    fitted alone, and the samplers (order 2) correct its first step."""
    _check(steps=steps)
    m, std = sde.marginal_coefs(torch.ones(1, dtype=torch.float64))
    lam_0 = torch.log(m / std).clamp(min=-5.03)
    if steps <= 12:                 # stop at std / m = e^-3.5: a full step, no final denoise
        lam_end, c = 3.5, 0.7 + 8.2 / max(steps - 3, 0.7)
    else:                           # more calls: stop closer to the data, std / m = e^-5
        lam_end, c = 5.0, 18.7 / (steps - 1)
    star = lam_end + math.exp(c)
    u = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    lam = star - (star - lam_0) * ((star - lam_end) / (star - lam_0)) ** u
    if steps == 5:                  # no lambda_star meets the criterion: nodes fitted alone,
        u = torch.tensor([0.338, 0.505, 0.673, 0.819, 1.0], dtype=torch.float64)  # first corrected
        lam = lam_0 + (lam_end - lam_0) * u
    return [1.0, *_s_at_log_sigma(sde, -lam).tolist()]


def _exp_weights(h, us):
    """w_j with int_0^h e^{u - h} p(u) du = sum_j w_j p(u_j), p the polynomial through the nodes
    u_j (at most three): the exactly integrated interpolant of DPM-Solver++. [F37]"""
    k = (-math.expm1(-h), h + math.expm1(-h), h * h - 2 * h - 2 * math.expm1(-h))  # u^0, u^1, u^2
    weights = []
    for j, uj in enumerate(us):
        poly, den = [1.0], 1.0                      # prod_{i != j} (u - u_i), lowest power first
        for ui in us[:j] + us[j + 1:]:
            poly, den = [b - ui * a for a, b in zip(poly + [0.0], [0.0] + poly)], den * (uj - ui)
        weights.append(sum(c * kn for c, kn in zip(poly, k)) / den)
    return weights


def _dpm_solver(x0_fn, x, alphas, sigmas, order, callback, correct_first=False):
    """DPM-Solver++ on points i with marginal x_i = alpha_i x0 + sigma_i eps, one x0_fn call per
    step: order 1 (DDIM), 2 (2M), 3 (2-point predictor, 3-point corrector). ``correct_first``:
    the first step is corrected as in order 3 (F38's K = 5 grid with order 2). [F32, F37, F38]"""
    if type(order) is not int or order not in (1, 2, 3):
        raise ValueError(f"order must be one of [1, 2, 3], got {order!r}")
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    x0s, n = [x0_fn(x, 0)], len(lam) - 1
    for i in range(n):
        if sigmas[i + 1] == 0:                      # a step to sigma = 0 lands on x0_hat (h -> inf)
            x = x0s[-1]
            continue
        h, ratio, x_cur = lam[i + 1] - lam[i], sigmas[i + 1] / sigmas[i], x

        def step(w):                                # (sigma' / sigma) x + alpha' sum_j w_j x0_j
            out = ratio * x_cur
            for w_j, x0_j in zip(w, reversed(x0s)):
                out = out.add(x0_j, alpha=alphas[i + 1] * w_j)
            return out
        nodes = [lam[j] - lam[i] for j in range(i, max(i - 2, -1), -1)][:order]   # u = 0, -h_prev
        if order == 2 and i > 0:                    # 2M: D = x0_hat + (h / 2 h_prev) difference
            r = -h / (2 * nodes[1])
            x = step([-math.expm1(-h) * (1 + r), math.expm1(-h) * r])
        else:                                       # the interpolant through the nodes
            x = step(_exp_weights(h, nodes))
        if i < n - 1:
            x0s = [*x0s[-2:], x0_fn(x, i + 1)]      # the last three predictions are enough
            if order == 3 or (correct_first and i == 0):   # corrector: the new x0_hat joins
                x = step(_exp_weights(h, [h] + nodes))
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def dpm_solver_sample(eps_model, sched, x, *, steps=10, order=2, clip_x0=None, callback=None):
    """DPM-Solver++: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} sum_j w_j x0_hat_j.
    [F32, F37, F21] alpha, sigma = sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t); ``order`` 1 (DDIM),
    2 (2M, Lu et al. 2022) or 3 (predictor-corrector). ``steps``: K, the number of eps_model
    calls, on the few-step grid (F38) rounded to distinct integer steps >= 1 (K < T; K = T ends
    at t = 0), or a grid T >= t_0 > ... > t_K >= 0, x at t_0 (K calls; a last t_K = 0 returns
    x0_hat, clipped)."""
    _check(x=x, clip_x0=clip_x0)
    first = isinstance(steps, int) and steps == 5 and order == 2    # F38's K = 5 grid
    if isinstance(steps, int):
        if isinstance(steps, bool) or not 1 <= steps <= sched.T:
            raise ValueError(f"steps must be in 1..T = 1..{sched.T}, got {steps}")
        grid, last = [sched.T], int(steps < sched.T)    # the lowest step: 1, or 0 if K = T
        for u in few_step_grid(DiscreteVPSDE(sched), steps)[1:]:   # rounded, room left below
            grid.append(min(max(round(u * sched.T), steps - len(grid) + last), grid[-1] - 1))
    else:
        grid = [int(t) for t in steps]
    if not (len(grid) > 1 and grid[0] <= sched.T and grid[-1] >= 0
            and all(a > b for a, b in zip(grid, grid[1:]))):
        raise ValueError(f"steps must be an int or a strictly descending grid of at least two "
                         f"steps in 0..T = 0..{sched.T}, got {grid}")
    ab = sched.alpha_bar[grid].tolist()
    t_b = [torch.full(x.shape[:1], t, dtype=torch.long, device=x.device) for t in grid]
    return _dpm_solver(lambda y, i: _x0_hat(y, eps_model(y, t_b[i]), ab[i], clip_x0), x,
                       [math.sqrt(a) for a in ab], [math.sqrt(1 - a) for a in ab], order, callback,
                       first)


@torch.no_grad()
def dpm_solver_sde_sample(score_fn, sde, x, *, steps=10, order=2, eps_s=None, spacing=None,
                          callback=None):
    """DPM-Solver++: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} sum_j w_j x0_hat_j.
    [F32, F37, F21, F26] For a score on a linear SDE: alpha = m(s), sigma = std(s), Tweedie's
    x0_hat = (x + std^2 score) / m. ``steps``: K, the number of score_fn calls; with eps_s and
    spacing None, the few-step grid (F38, which picks its end), else s_grid(sde, K, eps_s or
    1e-3, spacing or 'logsnr'); or a grid of K + 1 times."""
    _check(x=x)
    first = False
    if isinstance(steps, int) and eps_s is None and spacing is None:
        first = steps == 5 and order == 2                           # F38's K = 5 grid
        steps = few_step_grid(sde, steps)
    grid = s_grid(sde, steps, 1e-3 if eps_s is None else eps_s, spacing or "logsnr")
    _, _, m, std = zip(*_coefs(sde, grid).values())
    s_b = [_full(x, s) for s in grid]
    return _dpm_solver(lambda y, i: (y + std[i] ** 2 * score_fn(y, s_b[i])) / m[i], x, m, std,
                       order, callback, first)


# --- controllable generation [F30, F31] -----------------------------------------------------------


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
    """y -> M model(M^T y, ...), the model seen in the colour basis (scores and eps map by M). [F31]
    ``from_colour_basis(ddpm_sample(in_colour_basis(eps_model), sched, to_colour_basis(x_T),
    known=known, mask=mask))`` colorizes, (known, mask) from ``colorization_known``."""
    return lambda y, *args: to_colour_basis(model_fn(from_colour_basis(y), *args))


def colorization_known(grey):
    """(known, mask) in the colour basis for a grey image (B, 1, ...), the mean of R, G, B. [F31]"""
    if grey.ndim < 2 or grey.shape[1] != 1:
        raise ValueError(f"grey must have shape (B, 1, ...), got {tuple(grey.shape)}")
    known = torch.cat([math.sqrt(3) * grey, torch.zeros_like(grey), torch.zeros_like(grey)], 1)
    mask = torch.zeros_like(known, dtype=torch.bool)
    mask[:, :1] = True
    return known, mask


# --- networks: residual MLP, small UNet, and the three adapters to the math ---------------------
# A network is called as net(x, c, y=None): c (B,) the noise level in [0, 1000] (0 = clean), y (B,)
# optional labels. eps_model_of, ncsn_score_of and sde_score_of are the only places where a
# network meets the math; each reads the output as an eps (score = -output / std).


class NoiseEmbedding(nn.Module):
    """(c, y) -> MLP([cos(c w_k), sin(c w_k)]) + label embedding, w_k = 10^(-4 k / (dim / 2))
    (Vaswani et al. 2017); label num_classes is the null label, used when y is None."""

    def __init__(self, dim, num_classes=None):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, dim)

    def forward(self, c, y=None):
        half = self.dim // 2
        angle = rearrange(c.float(), "b -> b 1") * torch.exp(
            -math.log(1e4) * torch.arange(half, device=c.device) / half)
        emb = self.mlp(torch.cat([angle.cos(), angle.sin()], dim=-1))
        if self.label is None and y is not None:
            raise ValueError("y: class labels given to a network built with num_classes=None")
        if self.label is not None and y is None:
            y = torch.full(c.shape, self.num_classes, dtype=torch.long, device=c.device)
        return emb if y is None else emb + self.label(y)


class MLP(nn.Module):
    """Residual MLP for vectors (B, d): h = W_in x, then `depth` times h = h + W_k silu(LN(h) +
    emb(c, y)); out W_out silu(LN(h)), of size d or out_dim (a classifier's logits)."""

    def __init__(self, dim, width=256, depth=3, num_classes=None, out_dim=None):
        super().__init__()
        self.embed, self.inp = NoiseEmbedding(width, num_classes), nn.Linear(dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim or dim))

    def forward(self, x, c, y=None):
        emb, h = self.embed(c, y), self.inp(x)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(F.silu(norm(h) + emb))
        return self.out(h)


class ResBlock(nn.Module):
    """x + conv(silu(GN(conv(silu(GN(x))) + W emb))), a 1x1 conv on the skip when the channel
    count changes (Ho et al. 2020, appendix B)."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """x + W_o softmax(q k^T / sqrt(d)) v over the pixels, q, k, v = W_qkv GN(x), 4 heads."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, channels)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b (n h d) u v -> n b h (u v) d", n=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b h (u v) d -> b (h d) u v", u=x.shape[-2]))


class UNet(nn.Module):
    """Small UNet for images (B, C, H, W), H and W divisible by 2^(len(mults) - 1): a ResBlock per
    level down (average pooling) and up (nearest upsampling, skips concatenated), ResBlock-
    attention-ResBlock at the bottom. With `logits` = K, a noise-conditional classifier: the way
    down, GN, SiLU, the spatial mean and K logits (Dhariwal & Nichol 2021)."""

    def __init__(self, channels=1, width=32, mults=(1, 2, 2), num_classes=None, logits=None):
        super().__init__()
        widths, emb_dim = [width * m for m in mults], 4 * width
        self.embed = NoiseEmbedding(emb_dim, num_classes)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in zip([width] + widths, widths))
        if logits:
            self.head = nn.Sequential(nn.GroupNorm(8, widths[-1]), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(widths[-1], logits))
            return
        self.mid1, self.attn = ResBlock(widths[-1], widths[-1], emb_dim), Attention(widths[-1])
        self.mid2 = ResBlock(widths[-1], widths[-1], emb_dim)
        ups = zip([widths[-1]] + widths[::-1], widths[::-1])
        self.up = nn.ModuleList(ResBlock(a + b, b, emb_dim) for a, b in ups)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, c, y=None):
        emb, h, skips = self.embed(c, y), self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(F.avg_pool2d(h, 2) if i > 0 else h, emb)
            skips.append(h)
        if hasattr(self, "head"):
            return self.head(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = F.interpolate(h, scale_factor=2, mode="nearest") if i > 0 else h
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def make_network(config, shape, num_classes=None):
    """MLP for vectors (d,), UNet for images (C, H, W); num_classes labels in, or with
    config.classifier num_classes logits out."""
    k_in, k_out = (None, num_classes) if config.classifier else (num_classes, None)
    if len(shape) == 1:
        return MLP(shape[0], config.width, config.depth, k_in, k_out)
    return UNet(shape[0], config.channels, num_classes=k_in, logits=k_out)


def ncsn_level(sigmas, sigma):
    """c = 1000 log(sigma / sigma_min) / log(sigma_max / sigma_min): 0 at the smallest. [F19]"""
    lo, hi = math.log(sigmas.min()), math.log(sigmas.max())
    return 1000 * (sigma.log() - lo) / (hi - lo)


def eps_model_of(net, sched, y=None):
    """DDPM eps_model(x_t, t) = net(x_t, c = 1000 t / T, y). [F12]"""
    return lambda xt, t: net(xt, 1000 * t.float() / sched.T, y)


def ncsn_score_of(net, sigmas, y=None):
    """NCSN score_model(x, sigma) = -net(x, c(sigma), y) / sigma: the output divided by sigma
    (Song & Ermon 2020, technique 3), signed so the net predicts the noise. [F19, F21]"""
    return lambda x, sigma: -net(x, ncsn_level(sigmas, sigma), y) / bcast(sigma, x)


def sde_score_of(net, sde, y=None):
    """SDE score_fn(x, s) = -net(x, c = 1000 s, y) / std(s), std from sde.marginal; on
    DiscreteVPSDE s = t / T, so c = 1000 t / T as for DDPM. [F21, F23]"""
    return lambda x, s: -net(x, 1000 * s, y) / sde.marginal(x, s)[1]


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
NPY_DTYPES = {"<f4": torch.float32, "<f8": torch.float64, "<f2": torch.float16, "|u1": torch.uint8,
              "|i1": torch.int8, "<i2": torch.int16, "<i4": torch.int32, "<i8": torch.int64}


def one_line(error, limit=200):
    """An exception's message on one line: whitespace collapsed, cut at `limit` characters."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def read_npy(path):
    """A little-endian .npy array, read with the standard library and torch.frombuffer."""
    raw = Path(path).read_bytes()
    if raw[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file (bad magic bytes)")
    start = 10 if raw[6] == 1 else 12  # the header's length: 2 bytes in version 1, else 4
    end = start + int.from_bytes(raw[8:start], "little")
    header = ast.literal_eval(raw[start:end].decode("latin1"))
    dtype, shape = NPY_DTYPES.get(header["descr"]), header["shape"]
    if dtype is None:
        raise ValueError(f"{path}: unsupported dtype {header['descr']!r} (use float or uint8)")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(raw) - end < nbytes:
        raise ValueError(f"{path}: truncated ({len(raw) - end} of {nbytes} data bytes)")
    x = torch.frombuffer(bytearray(raw[end:end + nbytes]), dtype=dtype)
    if header["fortran_order"]:
        return x.reshape(shape[::-1]).permute(*reversed(range(len(shape))))
    return x.reshape(shape)


def load_data(path):
    """(x, y or None) from a .pt/.npy tensor x (N, d) or (N, C, H, W) or a .pt dict {'x', 'y'},
    labels y (N,) in 0..K-1. uint8 is scaled to [-1, 1]; float images must lie in [-1, 1],
    vectors within +-100 (the prior is N(0, I)); else a ValueError naming the file."""
    if not str(path).endswith((".pt", ".npy")):
        raise ValueError(f"{path}: unsupported file type (expected .pt or .npy)")
    try:
        x = read_npy(path) if str(path).endswith(".npy") else torch.load(path, weights_only=True)
    except ValueError:
        raise
    except Exception as e:  # unreadable, missing or corrupt: one line naming the file
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {one_line(e)})")
    x, y = (x.get("x"), x.get("y")) if isinstance(x, dict) else (x, None)
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 4) or len(x) < 10:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{path}: expected x of shape (N, d) or (N, C, H, W) with N >= 10, or a "
                         f"dict {{'x', 'y'}}, found {found}")
    if x.ndim == 4 and (x.shape[2] % 4 or x.shape[3] % 4):
        raise ValueError(f"{path}: image size {tuple(x.shape[2:])} must be divisible by 4 (UNet)")
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
    if y is not None and not (isinstance(y, torch.Tensor) and y.shape == x.shape[:1]
                              and not y.is_floating_point() and y.min() >= 0):
        raise ValueError(f"{path}: labels y must be integers >= 0 of shape ({len(x)},)")
    return x, None if y is None else y.long()


def grid_levels(x):
    """K when all of the images x lie on K evenly spaced levels 2 k / (K - 1) - 1 in [-1, 1]
    (K = 256, 8-bit, tried first; then the number of distinct values), else 0 (vectors too)."""
    for k in (256, len(x.unique())) if x.ndim == 4 else ():
        u = (x.double() + 1) * (k - 1) / 2
        if 2 <= k and (u - u.round()).abs().max() < 1e-3:
            return k
    return 0


Data = namedtuple("Data", "x y x_test y_test")  # training and held-out examples, labels or None


def get_data(config, n_test=10_000):
    """Built-in data: n_train training and n_test held-out examples, from generators keyed by the
    seed. A file: a seeded permutation holds out the share config.holdout (at least 2)."""
    if config.data in DATASETS:
        make = DATASETS[config.data]
        return Data(*make(config.n_train, rng(config.seed, "train")),
                    *make(n_test, rng(config.seed, "test")))
    x, y = load_data(config.data)
    perm = torch.randperm(len(x), generator=rng(config.seed, "split"))
    held = max(2, round(config.holdout * len(x)))
    if len(x) - held < 2:
        raise ValueError(f"holdout: {config.holdout} leaves {len(x) - held} examples to train on")
    test, train = perm[:held], perm[held:]
    return Data(x[train], None if y is None else y[train], x[test], None if y is None else y[test])


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
    """RBF bandwidths for mmd2_unbiased: the median distance in x times 1/8, 1/4, 1/2 and 1."""
    med = torch.pdist(x[:1000].flatten(1).double()).median().item()
    return [med / 8, med / 4, med / 2, med]


def write_atomic(path, data):
    """Write bytes (or torch.save an object) so that readers see the old file or the new one:
    a new file beside it (mode 0o666 less the umask, which is not touched), fsync, os.replace."""
    if not isinstance(data, bytes):
        buffer = io.BytesIO()
        torch.save(data, buffer)
        data = buffer.getvalue()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_png(path, img):
    """Write a uint8 image, gray (H, W) or RGB (H, W, 3), as a PNG with zlib and struct."""
    img = img.to(torch.uint8).cpu()
    rows = F.pad(img.reshape(len(img), -1), (1, 0))  # each row starts with filter type 0 (none)

    def chunk(kind, data):  # length, type, data, CRC-32 of type and data
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", img.shape[1], len(img), 8, 2 if img.ndim == 3 else 0, 0, 0, 0)
    write_atomic(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                 + chunk(b"IDAT", zlib.compress(bytes(rows.flatten().tolist()), 6))
                 + chunk(b"IEND", b""))


DIGITS = (0x7B6F, 0x2C97, 0x73E7, 0x73CF, 0x5BC9, 0x79CF, 0x79EF, 0x7249, 0x7BEF, 0x7BCF)  # 3x5


def stamp(img, number, zoom=2):
    """Write `number` in 3x5-pixel digits, black, at the top left of a uint8 picture (H, W) or
    (H, W, 3)."""
    for i, ch in enumerate(str(number)):
        bits = torch.tensor([(DIGITS[int(ch)] >> (14 - k)) & 1 for k in range(15)]).reshape(5, 3)
        glyph = (255 * (1 - bits)).to(torch.uint8).repeat_interleave(zoom, 0)
        glyph = glyph.repeat_interleave(zoom, 1).view(5 * zoom, 3 * zoom, *[1] * (img.ndim - 2))
        img[2:2 + 5 * zoom, 2 + 4 * zoom * i:2 + 4 * zoom * i + 3 * zoom] = glyph
    return img


def plane(x):
    """Points (N, d) -> their first two coordinates (N', 2), 0 if d = 1, the non-finite dropped."""
    x = F.pad(x[:, :2], (0, max(0, 2 - x.shape[1])))
    return x[torch.isfinite(x).all(dim=1)]


def density_image(x, hi, res=160, zoom=2):
    """Points (N, d) -> uint8 (res zoom)^2 histogram picture of plane(x) on the square
    [-hi, hi]^2, white background, darker where denser (square-root scale), y axis up."""
    ij = ((plane(x).float().cpu() + hi) / (2 * hi) * res).floor().long()
    ij = ij[((ij >= 0) & (ij < res)).all(dim=1)]
    counts = torch.bincount((res - 1 - ij[:, 1]) * res + ij[:, 0], minlength=res * res).float()
    v = (counts / max(counts.quantile(0.995).item(), 1.0)).clamp(max=1).sqrt()
    img = (255 * (1 - v)).round().to(torch.uint8).reshape(res, res)
    return img.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def image_grid(x, ncol=8, zoom=4):
    """Images (N, C, H, W) in [-1, 1] -> uint8 grid picture (gray or RGB), 1 pixel of white
    between images and white empty cells, each pixel shown as zoom x zoom."""
    x = F.pad(x.float().cpu().clamp(-1, 1), (1, 1, 1, 1, 0, 0, 0, -len(x) % ncol), value=1.0)
    grid = rearrange(x, "(r c) ch h w -> (r h) (c w) ch", c=ncol).squeeze(-1)  # gray: (H, W)
    img = ((grid + 1) * 127.5).round().to(torch.uint8)
    return img.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def side_by_side(imgs, gap=6):
    """Pictures of one height in a row, with grey gaps between them."""
    bar = torch.full((imgs[0].shape[0], gap, *imgs[0].shape[2:]), 160, dtype=torch.uint8)
    return torch.cat([t for img in imgs for t in (img, bar)][:-1], dim=1)


def extent(x):
    """Half-width of the square that shows points: 1.1 times the 99.5% quantile of |plane(x)|."""
    return 1.1 * plane(x).abs().quantile(0.995).item()


def picture(samples, data):
    """Samples (left) beside held-out data (right): points as densities on one square fixed to
    the data (exploded samples fall outside it), images as two grids of up to 32."""
    if samples.ndim == 4:
        n = min(32, len(samples), len(data))
        return side_by_side([image_grid(samples[:n]), image_grid(data[:n])])
    hi = extent(data)
    return side_by_side([density_image(samples, hi), density_image(data[:len(samples)], hi)])


def trajectory_picture(frames, data):
    """Frames (steps done, x) from noise (left) to data, each marked with its steps done, then
    held-out data: 2-D densities (each on a square that also holds the data), or for images a
    row per sample (the first 8)."""
    if data.ndim == 4:
        n = min(8, len(frames[0][1]), len(data))
        rows = torch.stack([x[:n].cpu() for _, x in frames] + [data[:n]], 1)
        img = image_grid(rearrange(rows, "b k ... -> (b k) ..."), ncol=len(frames) + 1)
        header, width = torch.full((14, *img.shape[1:]), 255, dtype=torch.uint8), img.shape[1]
        for j, (done, _) in enumerate(frames):
            stamp(header[:, j * width // (len(frames) + 1):], done)
        return torch.cat([header, img])
    hi, start = extent(data), extent(frames[0][1])   # no frame wider than the start's noise
    imgs = [stamp(density_image(x, max(hi, min(extent(x), start)), res=100), done)
            for done, x in frames]
    return side_by_side(imgs + [density_image(data, hi, res=100)], gap=4)


# --- training: the methods, TrainConfig, train(), using a trained run ----------------------------


def noised(process, x0, generator):
    """(x at a random noise level, its time (B,)) drawn as the method's loss draws them: a
    noise-conditional classifier's data. DDPM: t ~ U{1..T}, x_t (F12, F3); NCSN: sigma,
    x0 + sigma z (F19); an SDE: s ~ U(eps_s, 1), x_s ~ p_{0s}(x_s | x0) (F25, F23)."""
    if isinstance(process, Schedule):
        t = draw_t(process, x0, generator)
        return q_sample(process, x0, t, generator=generator), t
    if isinstance(process, torch.Tensor):  # NCSN's sigmas
        sigma = draw_sigma(process, x0, generator)
        return x0 + bcast(sigma, x0) * _randn_like(x0, generator), sigma
    s = draw_s(x0, generator)
    mean, std = process.marginal(x0, s)
    return mean + std * _randn_like(x0, generator), s


# A sampler: fn(model, process, x, steps=, callback=, **options), its default step count,
# whether it takes known= and mask= (inpainting) and clip_x0=, whether it draws noise (then it
# takes generator=), and its number of states.
Sampler = namedtuple("Sampler", "fn steps inpaint clip random states",
                     defaults=(False, False, True, lambda steps, process: steps))
# A method: process(config) -> Schedule | sigmas | SDE; model_of(net, process, y) -> eps_model or
# score_fn; loss(model, process, x0, g) -> (B,); level(process, time) -> the network's c;
# prior(process, shape, g, device); samplers {name: Sampler}, the first the default.
Method = namedtuple("Method", "process model_of loss level prior samplers")
BETAS = {"linear": linear_betas, "cosine": cosine_betas}
SDE_SAMPLERS = {"em": Sampler(reverse_sde_sample, 500, inpaint=True),
                "pc": Sampler(partial(reverse_sde_sample, corrector_steps=1), 250, inpaint=True),
                "rd": Sampler(partial(reverse_sde_sample, predictor="reverse_diffusion"), 500,
                              inpaint=True),
                "ode": Sampler(ode_sample, 50, random=False),
                "dpm++": Sampler(dpm_solver_sde_sample, 20, random=False)}


METHODS = {
    "ddpm": Method(
        process=lambda c: Schedule.from_betas(BETAS[c.schedule](c.T)), model_of=eps_model_of,
        loss=lambda m, sched, x0, g: eps_loss(m, sched, x0, generator=g),
        level=lambda sched, t: 1000 * t.float() / sched.T,
        prior=lambda sched, shape, g, dev: torch.randn(shape, generator=g, device=dev),
        samplers={"ancestral": Sampler(ddpm_sample, 250, inpaint=True, clip=True),
                  "ddim": Sampler(ddim_sample, 50, clip=True),
                  "dpm++": Sampler(dpm_solver_sample, 20, clip=True, random=False)}),
    "ncsn": Method(
        process=lambda c: geometric_sigmas(c.sigma_max, c.sigma_min, c.n_sigmas),
        model_of=ncsn_score_of, loss=lambda m, sigmas, x0, g: dsm_loss(m, x0, sigmas, generator=g),
        level=ncsn_level,
        prior=lambda sigmas, shape, g, dev: sigmas.max().item() * torch.randn(
            shape, generator=g, device=dev),
        samplers={"als": Sampler(annealed_langevin, 100,
                                 states=lambda n, sigmas: len(sigmas) * n + 1)}),
    **{name: Method(
        process=make, model_of=sde_score_of,
        loss=lambda m, sde, x0, g: sde_loss(m, sde, x0, generator=g), level=lambda sde, s: 1000 * s,
        prior=lambda sde, shape, g, dev: sde.prior_sample(shape, generator=g, device=dev),
        samplers=SDE_SAMPLERS)
       for name, make in (("vp", lambda c: VPSDE()), ("subvp", lambda c: SubVPSDE()),
                          ("ve", lambda c: VESDE(c.sigma_min, c.sigma_max)))},
}
SAMPLERS = sorted({name for m in METHODS.values() for name in m.samplers})


def opt(default, help, *, lo=None, above=None, below=None, choices=None, auto=None):
    """A TrainConfig field: default, --help text, range (lo <= v, above < v, v < below) or
    choices, and `auto` = (for points, for images), the values a default of None becomes."""
    return field(default=default, metadata=dict(help=help, lo=lo, above=above, below=below,
                                                choices=choices, auto=auto))


def out_of_range(value, lo=None, above=None, below=None, **_):
    """Why a number is out of its range, or ''."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    wanted = [f"{op} {bound}" for op, bound, ok in ((">=", lo, lo is None or value >= lo),
                                                    (">", above, above is None or value > above),
                                                    ("<", below, below is None or value < below))
              if not ok]
    return f"must be {' and '.join(wanted)}, got {value}" if wanted else ""


@dataclass
class TrainConfig:
    """Everything `train` needs; `python ddpm_score.py train --help` lists the same fields."""
    data: str = opt("moons", "built-in data or a .pt/.npy file: x (N, d) or (N, C, H, W), or a "
                    ".pt dict {'x', 'y'} with labels y; the run stores its absolute path")
    holdout: float = opt(0.1, "share of a data file held out (for samples, nll)", above=0, below=1)
    levels: int = opt(None, "grey levels of image data, 2 k / (K - 1) - 1, for nll's "
                      "dequantization (256: 8-bit; 0: continuous; default: detected)", lo=0)
    method: str = opt("ddpm", "ddpm (eps_loss), ncsn (dsm_loss), vp, ve or subvp (sde_loss)",
                      choices=list(METHODS))
    steps: int = opt(None, "optimizer steps (--resume: the new total)", lo=1, auto=(2000, 4000))
    batch_size: int = opt(None, "global batch size, split across DDP ranks", lo=1, auto=(512, 64))
    lr: float = opt(None, "peak Adam learning rate", above=0, auto=(1e-3, 5e-4))
    lr_warmup: int = opt(100, "steps of linear learning-rate warm-up", lo=0)
    lr_decay: bool = opt(True, "cosine decay to 0 at `steps` (a resume that raises it re-plans)")
    grad_clip: float = opt(1.0, "largest gradient norm (0: no clipping)", lo=0)
    ema: float = opt(0.99, "EMA decay of the weights used for sampling (0: live)", lo=0, below=1)
    ema_warmup: int = opt(100, "steps during which the EMA copies the live weights", lo=0)
    seed: int = opt(0, "seeds the data, the weights, every training draw, the samples", lo=0)
    device: str = opt("auto", "auto: cuda when available", choices=["auto", "cpu", "cuda"])
    amp: bool = opt(False, "bf16 autocast on CUDA")
    out: str = opt("runs/default", "run folder: ckpt.pt, config.json, loss.csv, samples.png")
    resume: bool = opt(False, "continue from OUT/ckpt.pt (its config.json gives the defaults)")
    overwrite: bool = opt(False, "replace the run in OUT: its outputs are deleted first")
    width: int = opt(256, "MLP width (vector data)", lo=1)
    depth: int = opt(3, "MLP residual layers (vector data)", lo=1)
    channels: int = opt(32, "UNet base channels (image data), a multiple of 8", lo=8)
    conditional: bool = opt(False, "condition the network on the data's class labels")
    label_dropout: float = opt(0.1, "share of null labels (for cfg)", lo=0, below=1)
    classifier: bool = opt(False, "train p(y | x_s) for classifier guidance, --out RUN/classifier")
    schedule: str = opt("linear", "ddpm: beta schedule", choices=list(BETAS))
    T: int = opt(1000, "ddpm: number of discrete steps", lo=2)
    sigma_min: float = opt(0.01, "ncsn and ve: smallest noise level", above=0)
    sigma_max: float = opt(0.0, "ncsn and ve: largest noise level (0: the data's diameter)", lo=0)
    n_sigmas: int = opt(10, "ncsn: number of noise levels", lo=2)
    sampler: str = opt("", "final samples' sampler ('': the method's)", choices=["", *SAMPLERS])
    sample_steps: int = opt(0, "steps of that sampler (0: its default)", lo=0)
    n_samples: int = opt(None, "final samples (picture, MMD; 0: none)", lo=0, auto=(2000, 64))
    n_train: int = opt(50_000, "training examples drawn for built-in data", lo=10)
    log_every: int = opt(100, "steps between plain progress lines and loss-log rows", lo=1)
    ckpt_every: int = opt(1000, "steps between checkpoints (and one at the end)", lo=1)


# What `train` returns: the mean loss of the last logged interval, the steps done, the live and
# EMA networks, the process, {name: path} of the files written, the final samples' quality (mmd2,
# floor, prior_mmd2) or a classifier's accuracy, and whether `stop` ended it early.
TrainResult = namedtuple("TrainResult", "loss step net ema process paths quality interrupted")


def check_config(config):
    """Raise ValueError naming the first bad field of a TrainConfig; touches nothing."""
    for f in fields(TrainConfig):
        value, meta = getattr(config, f.name), f.metadata
        if meta["choices"] and value not in meta["choices"]:
            raise ValueError(f"{f.name}: {value!r} is not one of {meta['choices']}")
        problem = f.type in (int, float) and value is not None and out_of_range(value, **meta)
        if problem:
            raise ValueError(f"{f.name}: {problem}")
    method, _ = METHODS[config.method], pick_sampler(config)
    labels = "conditional" if config.conditional else "classifier" if config.classifier else ""
    checks = [
        (config.data in DATASETS or config.data.endswith((".pt", ".npy")),
         f"data: {config.data!r} is neither one of {sorted(DATASETS)} nor a .pt/.npy file"),
        (config.channels % 8 == 0, f"channels: {config.channels} is not a multiple of 8"),
        (config.method != "ddpm" or config.sample_steps <= config.T,
         f"sample_steps: {config.sample_steps} is more than the T = {config.T} steps of the chain"),
        (config.levels != 1, "levels: 1 grey level has no bins; use 0 (continuous) or K >= 2"),
        (not config.sigma_max or config.sigma_max > config.sigma_min,
         f"sigma_max: {config.sigma_max} must be > sigma_min = {config.sigma_min} (or 0: auto)"),
        (not labels or config.data not in DATASETS or DATASETS[config.data](2, rng(0))[1]
         is not None, f"{labels}: data {config.data!r} has no class labels (built-in data with "
         "labels: moons, ring, shapes; a file: a .pt dict {'x', 'y'})"),
        (not (config.classifier and config.conditional),
         "classifier: a classifier takes no labels in; drop --conditional"),
        (not (config.resume and config.overwrite), "resume: --resume and --overwrite exclude "
         "each other"),
        (not config.amp or pick_device(config.device).type == "cuda",
         "amp: bf16 autocast is for CUDA, and the device is cpu"),
    ]
    end = method.process(config).alpha_bar[-1].sqrt().item() if config.method == "ddpm" else 0
    checks.append((end <= 0.05, f"T: the {config.schedule} schedule with T = {config.T} ends at "
                   f"sqrt(alpha_bar_T) = {end:.3f}, far from the N(0, I) that sampling starts "
                   "from (F5); use a larger T"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_out(config):
    """The run folder, before any work: not a file, writable, and holding no checkpoint unless
    resuming (then it must) or overwriting."""
    out, kept = Path(config.out), Path(config.out) / "ckpt.pt"
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a folder")
    if config.resume != kept.exists() and not config.overwrite:
        raise ValueError(f"resume: no checkpoint at {kept}" if config.resume else
                         f"out: {out} holds a run (ckpt.pt); continue it with --resume or "
                         "replace it with --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"   # one per process: DDP ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out: cannot write to {out} ({one_line(e)})")


def resolve_config(config, data):
    """The config as the run stores it: the data path made absolute, None (auto) fields set for
    points or images, levels detected, and for ncsn and ve sigma_max = 0 set to the largest
    distance between two of (up to) 2,000 training points, rounded up (Song & Ermon 2020)."""
    auto = {f.name: f.metadata["auto"][data.x.ndim == 4] for f in fields(TrainConfig)
            if f.metadata["auto"] and getattr(config, f.name) is None}
    if config.levels is None:
        auto["levels"] = grid_levels(data.x)
    if config.data not in DATASETS:
        auto["data"] = str(Path(config.data).resolve())
    if not config.sigma_max and config.method in ("ncsn", "ve"):
        auto["sigma_max"] = math.ceil(torch.pdist(data.x[:2000].flatten(1)).max().item())
    return replace(config, **auto)


def pick_device(name):
    """'auto' -> cuda when available, else cpu; 'cuda' without a CUDA device is a ValueError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda is not available")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto"
                        else name)


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


OUTPUTS = ("ckpt.pt", "config.json", "loss.csv", "samples*.p*", "trajectory_*.png",
           "inpaint_*.p*", "classifier")  # a run's own outputs: --overwrite deletes them


def start_run(config):
    """Check the config and the run folder, read the data and settle the config (resolve_config)
    before any work; rank 0 deletes an overwritten run's outputs. Returns (config, data, device,
    rank, world size, number of classes or None)."""
    check_config(config)
    check_out(config)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = pick_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    data = get_data(config)
    config, labels = resolve_config(config, data), config.conditional or config.classifier
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by {world} ranks")
    if labels and data.y is None:
        raise ValueError(f"data: {config.data} has no labels y (save a .pt dict {{'x', 'y'}})")
    if rank == 0 and config.overwrite:
        for path in [p for pattern in OUTPUTS for p in Path(config.out).glob(pattern)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if rank == 0 and config.data not in DATASETS:
        print(f"data: {len(data.x)} training and {len(data.x_test)} held-out examples of shape "
              f"{tuple(data.x.shape[1:])}, {config.levels or 'continuous'} levels",
              file=sys.stderr)
    return config, data, device, rank, world, int(data.y.max()) + 1 if labels else None


def resume_run(config, device, net, ema, opt):
    """Load OUT/ckpt.pt into the network, its EMA and the optimizer; (steps done, loss log)."""
    path = Path(config.out) / "ckpt.pt"
    state = load_checkpoint(path, device)
    try:
        net.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: does not fit this config ({one_line(e)})")
    ema.n_averaged.copy_(state["ema_n"])
    step, log = int(state["step"]), state["loss_log"].tolist()
    if step > config.steps:
        raise ValueError(f"steps: {config.steps} is below the {step} steps done (the total)")
    return step, log


def learning_rate(config, step):
    """Linear warm-up over lr_warmup steps to config.lr, then (lr_decay) cosine decay to 0."""
    lr = config.lr * min(1.0, step / max(config.lr_warmup, 1))
    return lr * (1 + math.cos(math.pi * step / config.steps)) / 2 if config.lr_decay else lr


def save_run(config, net, ema, opt, step, log, shape, k):
    """Write OUT/ckpt.pt (tensors only: loads with weights_only=True), config.json and
    loss.csv, each atomically."""
    out = Path(config.out)
    write_atomic(out / "ckpt.pt", {
        "model": net.state_dict(), "ema": ema.module.state_dict(), "ema_n": ema.n_averaged,
        "opt": opt.state_dict(), "step": torch.tensor(step),
        "loss_log": torch.tensor(log, dtype=torch.float64).reshape(-1, 3),
        "shape": torch.tensor(shape), "num_classes": torch.tensor(k or 0)})
    write_atomic(out / "config.json", json.dumps(asdict(config), indent=2).encode())
    rows = "".join(f"{int(s)},{loss:.6g},{t:.2f}\n" for s, loss, t in log)
    write_atomic(out / "loss.csv", ("step,loss,seconds\n" + rows).encode())


def nonfinite(loss, step, config):
    """The FloatingPointError of a non-finite loss or gradient, naming the last good checkpoint."""
    kept = Path(config.out) / "ckpt.pt"
    kept = f'{kept} (step {int(load_checkpoint(kept)["step"])})' if kept.exists() else "none"
    return FloatingPointError(f"non-finite loss ({loss.item():.4g}) or gradient at step {step}; "
                              f"training stopped, last good checkpoint: {kept}")


def train(config, stop=None):
    """Train as `config` says; rank 0 writes ckpt.pt (tensors only), config.json, loss.csv and
    samples.png (a classifier: prints its accuracy). Returns TrainResult. Leaves threads, signal
    handlers and process groups as found; in a joined process group it trains with DDP. Once the
    threading.Event `stop` is set it ends after the step (DDP: after the next, on every rank,
    whichever rank's `stop` was set), with a checkpoint. A non-finite loss raises
    FloatingPointError and leaves the last checkpoint."""
    config, data, device, rank, world, k = start_run(config)
    method, shape = METHODS[config.method], tuple(data.x.shape[1:])
    process = method.process(config)
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank
        torch.manual_seed(config.seed)
        net = make_network(config, shape, k).to(device)
    model = DistributedDataParallel(net) if world > 1 else net
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    step, log = resume_run(config, device, net, ema, opt) if config.resume else (0, [])

    # This rank's shard; each step: batch, loss, backward, clip, Adam, EMA, log, checkpoint.
    x, y = data.x[rank::world].to(device), None if k is None else data.y[rank::world].to(device)
    B, t0 = config.batch_size // world, time.time() - (log[-1][2] if log else 0.0)
    show, total, count = progress("step", config.steps, config.log_every, step), 0.0, 0
    stopped, agreeing = False, None
    while step < config.steps and not stopped:
        step += 1
        g = rng(config.seed, "batch", rank, step)
        i = torch.randint(len(x), (B,), generator=g).to(device)
        x0, y0 = x[i], None if k is None else y[i]
        if config.conditional:  # label dropout: the null label k trains the unconditional model
            y0 = torch.where((torch.rand(B, generator=g) < config.label_dropout).to(device), k, y0)
        noise_g = rng(config.seed, "noise", rank, step, device=device.type)
        with torch.autocast("cuda", torch.bfloat16, enabled=config.amp):
            if config.classifier:
                xs, time_s = noised(process, x0, noise_g)
                loss = F.cross_entropy(model(xs, method.level(process, time_s)), y0)
            else:
                loss = method.loss(method.model_of(model, process, y0), process, x0, noise_g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):  # the same on every DDP rank
            raise nonfinite(loss, step, config)
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        opt.step()
        if step <= config.ema_warmup:
            ema.n_averaged.zero_()  # AveragedModel copies the weights when n_averaged == 0
        ema.update_parameters(net)
        stopped = stop is not None and stop.is_set()  # read once: a later signal is seen next step
        if world > 1:  # every rank stops after the step that follows any rank's stop: the
            # all-reduce (MAX) of the flags overlaps that step, adding no wait (wait() is True)
            last, flag = agreeing, torch.tensor(float(stopped), device=device)
            agreeing = flag, dist.all_reduce(flag, dist.ReduceOp.MAX, async_op=True)
            stopped = last is not None and last[1].wait() and bool(last[0])
        total, count = total + loss.item(), count + 1
        if rank == 0:
            show(step, f"  loss {total / count:.4f}")
        if step % config.log_every == 0 or step == config.steps or stopped:
            log.append((step, total / count, time.time() - t0))
            total, count = 0.0, 0
        if rank == 0 and (step % config.ckpt_every == 0 or step == config.steps or stopped):
            save_run(config, net, ema, opt, step, log, shape, k)
    if agreeing is not None:  # no collective left under way
        agreeing[1].wait()

    # Rank 0 evaluates: the classifier's accuracy, or final samples beside the held-out data.
    out = Path(config.out)
    paths, quality = {name: out / name for name in ("ckpt.pt", "config.json", "loss.csv")}, {}
    trained = Model(config, ema.module.eval(), process, shape, k)
    if rank == 0 and not stopped and config.classifier:
        quality = classifier_accuracy(trained, data, device)
    elif rank == 0 and not stopped and config.n_samples:
        quality, paths["samples.png"] = final_samples(trained, data, device), out / "samples.png"
    return TrainResult(log[-1][1] if log else math.nan, step, net, ema.module, process, paths,
                       quality, stopped)


def progress(label, total, every=None, start=0):
    """show(done, extra=''): a line `label done/total  rate/s  time left` on stderr every `every`
    units (None: every 10 s) and at the end, the same on a terminal and in a log."""
    t0, last = time.time(), [time.time()]

    def show(done, extra=""):
        now = time.time()
        if done == total or every and done % every == 0 or now - last[0] > 10:
            last[0], rate = now, (done - start) / max(now - t0, 1e-9)
            print(f"{label} {done}/{total}{extra}  {rate:.1f}/s  "
                  f"{(total - done) / max(rate, 1e-9):.0f} s left", file=sys.stderr, flush=True)
    return show


# A trained network and what it needs to be used: its config, noise process, example shape and
# the number of classes of its labels (None: unconditional).
Model = namedtuple("Model", "config net process shape num_classes")


def guided_model(m, y=None, w=0.0, classifier=None):
    """What the math takes from run m, eps_model(x, t) or score_fn(x, time), for labels y (n,):
    with a classifier (net(x, c) -> logits), classifier guidance of the unconditional model,
    score + w grad log p(y | x) (F30, at the score level); else with w > 0 classifier-free
    guidance (1 + w) model(x, y) - w model(x, null) (F30); else the plain model."""
    method = METHODS[m.config.method]
    uncond = method.model_of(m.net, m.process, None)
    if classifier is None:
        model = method.model_of(m.net, m.process, y)
        return classifier_free(model, uncond, w) if w and y is not None else model

    def log_likelihood(x, time):  # log p_time(y | x) per example
        logits = classifier(x, method.level(m.process, time))
        return F.log_softmax(logits, dim=-1).gather(1, y[:, None])[:, 0]
    if m.config.method != "ddpm":
        return guided_score(uncond, log_likelihood, w)

    def std(t):  # eps-models: guided at the score level, score = -eps / std [F21]
        return marginal_coefs(m.process, t)[1]
    score = guided_score(lambda x, t: eps_to_score(uncond(x, t), std(t)), log_likelihood, w)
    return lambda x, t: score_to_eps(score(x, t), std(t))


def pick_sampler(config, name=""):
    """(name, Sampler): `name`, else the run's config.sampler, else its method's first sampler;
    a name its method lacks is a ValueError listing the method's samplers."""
    samplers = METHODS[config.method].samplers
    name = name or config.sampler or next(iter(samplers))
    if name not in samplers:
        raise ValueError(f"sampler: {name!r} is not one of {sorted(samplers)} for method "
                         f"{config.method}")
    return name, samplers[name]


FRAMES = 9  # states of x kept by draw_samples(frames=...): at most this many plus the start


def draw_samples(m, n, *, sampler="", steps=0, seed=0, y=None, w=0.0, classifier=None,
                 device="cpu", known=None, mask=None, frames=None, batch=2000):
    """n samples from run m with `sampler` ('': the run's) and `steps` (0: its default), in
    batches: labels y (n,), guidance w (guided_model), inpainting with known and mask [F31];
    images clipped to [-1, 1] (x0_hat too). The list `frames` receives (steps done, x) for the
    start and at most FRAMES evenly spaced states of the first batch."""
    method, (name, spec) = METHODS[m.config.method], pick_sampler(m.config, sampler)
    if known is not None and not spec.inpaint:
        can = [k for k, v in method.samplers.items() if v.inpaint] or "none"
        raise ValueError(f"sampler: {name} cannot inpaint; those of {m.config.method} that can: "
                         f"{can}")
    cap = m.process.T if isinstance(m.process, Schedule) else spec.steps    # a chain has T steps
    steps = steps or m.config.sample_steps or min(spec.steps, cap)
    states, out = spec.states(steps, m.process), []
    g = rng(seed, "sample", device=torch.device(device).type)
    keep = {round(j * (states - 1) / (FRAMES - 1)) for j in range(FRAMES)}
    show = progress(f"sampling ({name}, {steps} steps) state", math.ceil(n / batch) * states)
    for b, start in enumerate(range(0, n, batch)):
        x = method.prior(m.process, (min(batch, n - start), *m.shape), g, device)
        if frames is not None and b == 0:
            frames.append((0, x.float().cpu()))

        def callback(i, x):
            show(b * states + i + 1)
            if frames is not None and b == 0 and i in keep:
                frames.append((i + 1, x.float().cpu()))
        part = slice(start, start + len(x))
        options = {"known": known[part], "mask": mask[part]} if known is not None else {}
        if spec.clip and len(m.shape) == 3:
            options["clip_x0"] = (-1.0, 1.0)
        if spec.random:
            options["generator"] = g
        model = guided_model(m, None if y is None else y[part].to(device), w, classifier)
        out.append(spec.fn(model, m.process, x, steps=steps, callback=callback, **options)
                   .float().cpu())
    return torch.cat(out).clamp(-1, 1) if len(m.shape) == 3 else torch.cat(out)


def final_samples(m, data, device):
    """Draw config.n_samples samples, write samples.png and print their mmd_report."""
    n, out, seed, t0 = m.config.n_samples, Path(m.config.out), m.config.seed, time.time()
    y = None if m.num_classes is None else torch.arange(n) % m.num_classes
    samples = draw_samples(m, n, seed=seed, y=y, device=device)
    seconds = time.time() - t0
    write_png(out / "samples.png", picture(samples, data.x_test))
    print(f"samples: {out / 'samples.png'} ({n} in {seconds:.1f} s; left samples, right held-out "
          "data)")
    return mmd_report(m, samples, data.x_test, seed)


def mmd_report(m, samples, x_test, seed):
    """Print the MMD^2 of k = min(n, held-out / 2) >= 2 samples to as many held-out points beside
    the prior's and the noise floor (the RMS MMD^2 between 10 pairs of held-out sets of k: its
    std for a perfect model); return them as a dict."""
    k, h, g = min(len(samples), len(x_test) // 2), mmd_bandwidths(x_test), rng(seed, "mmd")
    if k < 2:  # the unbiased MMD^2 needs two points a side
        print(f"too few samples ({len(samples)}) or held-out points ({len(x_test)}) for an MMD")
        return {"n": k}
    prior = METHODS[m.config.method].prior(m.process, (k, *m.shape), g, "cpu")
    pairs = [torch.randperm(len(x_test), generator=g)[:2 * k] for _ in range(10)]
    floor = math.sqrt(sum(mmd2_unbiased(x_test[i[:k]], x_test[i[k:]], h) ** 2 for i in pairs) / 10)
    quality = {"mmd2": mmd2_unbiased(samples[:k], x_test[:k], h), "floor": floor,
               "prior_mmd2": mmd2_unbiased(prior, x_test[:k], h), "n": k}
    print(f"MMD^2 to held-out data {quality['mmd2']:.2e}, noise floor {quality['floor']:.2e}"
          f" (std of MMD^2 between two held-out sets of {k}), prior {quality['prior_mmd2']:.2e}"
          + (f"; only {k} per set: the MMD says little" if k < 200 else ""))
    return quality


def classifier_accuracy(m, data, device, n=2000):
    """Print and return the classifier's accuracy on (up to) n held-out examples, each noised to
    a random level of the method as in training, overall and on the least noisy tenth."""
    method, g = METHODS[m.config.method], rng(m.config.seed, "accuracy", device=device.type)
    x0, y = data.x_test[:n].to(device), data.y_test[:n].to(device)
    with torch.no_grad():
        xs, time_s = noised(m.process, x0, g)
        c = method.level(m.process, time_s)
        right = (m.net(xs, c).argmax(dim=-1) == y).float()
    accuracy, low_noise = right.mean().item(), right[c <= c.quantile(0.1)].mean().item()
    print(f"classifier: held-out accuracy {accuracy:.1%} at random noise levels, {low_noise:.1%} "
          f"at the least noisy tenth of them (chance {1 / m.num_classes:.1%})")
    return {"accuracy": accuracy, "low_noise_accuracy": low_noise, "n": len(y)}


def read_config(path):
    """The TrainConfig in a run's config.json (fields of older versions are ignored)."""
    saved = json.loads(Path(path).read_text())
    return TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})


def load_run(run_dir, device="cpu", use_ema=True):
    """A run folder written by `train` as a Model: config.json and the weights of ckpt.pt."""
    run_dir = Path(run_dir)
    try:
        config = read_config(run_dir / "config.json")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{run_dir / 'config.json'}: cannot read it ({one_line(e)})")
    state = load_checkpoint(run_dir / "ckpt.pt", device)
    shape, k = tuple(state["shape"].tolist()), int(state["num_classes"]) or None
    net = make_network(config, shape, k).to(device)
    try:
        net.load_state_dict(state["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"{run_dir}: ckpt.pt does not fit config.json ({one_line(e)})")
    return Model(config, net.eval(), METHODS[config.method].process(config), shape, k)


MASKS = ("right", "bottom", "centre")


def inpainting_mask(shape, kind):
    """The known part (True) of images of `shape` (B, C, H, W) whose `kind` region is missing:
    the right half, the bottom half, or the centre square of half the side. [F31]"""
    if len(shape) != 4:
        raise ValueError(f"shape: masks are for images (B, C, H, W), got {tuple(shape)}")
    _check_choice("kind", kind, set(MASKS))
    H, W = shape[-2:]
    rows, cols = {"right": (slice(None), slice(W // 2, None)),
                  "bottom": (slice(H // 2, None), slice(None)),
                  "centre": (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))}[kind]
    mask = torch.ones(shape, dtype=torch.bool)
    mask[..., rows, cols] = False
    return mask


@torch.no_grad()
def bits_per_dim(m, x, *, levels=0, steps=100, batch=256, seed=0, device="cpu"):
    """({'elbo': (N,), 'ode': (N,)}, convention): bits/dim of each example of x under run m, in
    batches, without autograd. levels = K >= 2, data on K levels: elbo (ddpm) = vlb_bpd with the
    K-level discretized decoder [F10-F13, F36] on x as it is, -log2 P(x) / d bounded above; ode
    (steps > 0, not ncsn) = F27, RK4, dequantized: (-log p(x + w (u - 1/2)) - d log w) / (d ln 2),
    w = 2 / (K - 1), u ~ U(0, 1); both bits per K-level value (K = 256: as published). levels =
    0: -log2 p(x) / d of a continuous density (elbo: Gaussian decoder). For ddpm the ODE runs
    through DiscreteVPSDE from s = 1 / T (the lowest noise level of training)."""
    if m.config.method == "ncsn":
        raise ValueError("nll: method ncsn has discrete noise levels and no likelihood; "
                         "use ddpm, vp, ve or subvp")
    if levels == 1:
        raise ValueError("levels: 1 grey level has no bins; use 0 (continuous) or K >= 2")
    if not steps and m.config.method != "ddpm":
        raise ValueError(f"steps: 0 leaves {m.config.method} without a likelihood (its only one is "
                         "the ODE's); use steps >= 1")
    ddpm, d, dev = m.config.method == "ddpm", x[0].numel(), torch.device(device)
    w, sde = 2 / (levels - 1) if levels else 1.0, DiscreteVPSDE(m.process) if ddpm else m.process
    calls = math.ceil(len(x) / batch) * ((m.process.T if ddpm else 0) + 4 * steps)
    out, show, done = {"elbo": [], "ode": []}, progress("nll network calls", calls), [0]

    def net(*args):  # the run's network, counting its calls for the progress line
        done[0] += 1
        show(done[0])
        return m.net(*args)
    for b, start in enumerate(range(0, len(x), batch)):
        xb = x[start:start + batch].to(dev)
        if ddpm:
            elbo = vlb_bpd(eps_model_of(net, m.process), m.process, xb, levels=levels or 256,
                           decoder="discretized" if levels else "gaussian",
                           generator=rng(seed, "elbo", b, device=dev.type))["total"]
            out["elbo"].append(elbo.cpu())
        if steps:
            u = torch.rand(xb.shape, generator=rng(seed, "dequantize", b, device=dev.type),
                           device=dev)
            ode = ode_likelihood(sde_score_of(net, sde), sde, xb + w * (u - 0.5) if levels else xb,
                                 steps=steps, eps_s=1 / m.process.T if ddpm else 1e-5,
                                 divergence="exact" if d <= 16 else "hutchinson",
                                 generator=rng(seed, "ode", b, device=dev.type))
            out["ode"].append(ode["bpd"].cpu() - math.log2(w))
    convention = ("continuous data: -log2 density per dimension, not comparable with image "
                  "bits/dim (can be negative)")
    if levels:
        name = "8-bit" if levels == 256 else f"{levels}-level"
        convention = (f"{name} data: bits per {name} value, upper bounds on the discrete NLL ("
                      + ("elbo: discretized decoder over the bins, F36; " if ddpm else "")
                      + f"ode: dequantized over bins of width 2/{levels - 1})")
    return {k: torch.cat(v) for k, v in out.items() if v}, convention


# --- command line: python ddpm_score.py train | sample | nll -------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: argument --n: must be >= 1, got 0`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def number(kind, **bounds):
    """An argparse type: an int or float within `bounds` (see out_of_range)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}")
        if problem := out_of_range(value, **bounds):
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


RUN_FLAGS = [  # (subcommands, flag, argparse keywords) of sample and nll
    ("sample nll", "--run", dict(required=True, help="run folder written by train")),
    ("sample nll", "--seed", dict(type=number(int, lo=0), default=0, help="(%(default)s)")),
    ("sample nll", "--device", dict(default="auto", choices=["auto", "cpu", "cuda"])),
    ("sample", "--sampler", dict(default="", choices=["", *SAMPLERS], help="('': the run's)")),
    ("sample", "--steps", dict(type=number(int, lo=0), default=0,
                               help="(0: its default; for dpm++ the number of model calls)")),
    ("sample", "--n", dict(type=number(int, lo=1), help="samples (default: the run's n_samples, "
                           "2000 points or 64 images; --inpaint: 8 images)")),
    ("sample", "--trajectory", dict(action="store_true", help=f"picture {FRAMES} states too")),
    ("sample", "--no-ema", dict(action="store_true", help="the live, not the EMA, weights")),
    ("sample", "--class", dict(dest="label", type=number(int, lo=0), metavar="K",
                               help="guide towards class K (default: every class in turn)")),
    ("sample", "--guidance", dict(type=number(float, lo=0), metavar="W", help=(
        "weight: cfg (1 + W) eps(x, K) - W eps(x, null), classifier score + W grad log p(K | x)"
        " (default: the plain conditional, W = 0 for cfg, 1 for the classifier)"))),
    ("sample", "--guide", dict(default="auto", choices=["auto", "cfg", "classifier"],
                               help="auto: cfg on a --conditional run, else RUN/classifier")),
    ("sample", "--inpaint", dict(action="store_true", help="complete held-out images")),
    ("sample", "--mask", dict(default="right", choices=MASKS, help="region --inpaint fills in")),
    ("sample", "--completions", dict(type=number(int, lo=1), default=4,
                                     help="completions per image (%(default)s)")),
    ("nll", "--n", dict(type=number(int, lo=1), default=256, help="examples (%(default)s)")),
    ("nll", "--data", dict(help="score this .pt/.npy file, not the held-out data")),
    ("nll", "--levels", dict(type=number(int, lo=0), help="grey levels (0: continuous; "
                             "default: the run's)")),
    ("nll", "--steps", dict(type=number(int, lo=0), default=100,
                            help="RK4 steps of the ODE likelihood (0: none; %(default)s)")),
    ("nll", "--batch", dict(type=number(int, lo=1), default=256,
                            help="examples per batch, which bounds memory (%(default)s)")),
]


def make_parser(defaults=TrainConfig()):
    """train (a flag per TrainConfig field: defaults from `defaults`, help from the field's
    metadata), sample and nll; every number is checked as it is parsed."""
    parser = Parser(prog="ddpm_score.py", description=main.__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"train": "train a model, write a run folder", "sample": "draw samples from a run",
             "nll": "bits/dim of held-out data or a file"}
    subs = {name: sub.add_parser(name, help=text) for name, text in helps.items()}
    for p in subs.values():
        p.add_argument("--threads", type=number(int, lo=1), default=1,
                       help="CPU threads for torch (%(default)s; see the README)")
    for f in fields(TrainConfig):
        meta, default = f.metadata, getattr(defaults, f.name)
        auto = meta["auto"] and f" (default: {meta['auto'][0]} for points, {meta['auto'][1]} " \
            "for images)"
        kw = dict(default=default, help=meta["help"].replace("%", "%%") + (
            auto or ("" if default is None else " (default: %(default)s)")))
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kw["choices"] = meta["choices"]
        else:
            kw["type"] = str if f.type is str else number(f.type, **meta)
        subs["train"].add_argument("--" + f.name.replace("_", "-"), **kw)
    for names, flag, kw in RUN_FLAGS:
        for name in names.split():
            subs[name].add_argument(flag, **kw)
    return parser


def train_command(args, argv):
    """`train`: with --resume the run's config.json supplies the defaults; with --classifier
    and --out RUN/classifier, RUN's config.json does (flags still win). Under torchrun it joins
    the process group (nccl on GPUs, gloo on CPUs). SIGINT (Ctrl-C) or SIGTERM stops every rank
    after the same step, with a checkpoint: exit 130 or 143; a second Ctrl-C stops at once."""
    config_path, run_path = Path(args.out) / "config.json", Path(args.out).parent / "config.json"
    if args.resume and config_path.exists():
        args = make_parser(replace(read_config(config_path), overwrite=False)).parse_args(argv)
    elif args.classifier and run_path.exists():  # RUN/classifier: RUN's config, as a classifier
        args = make_parser(replace(read_config(run_path), classifier=True, conditional=False,
                                   resume=False, overwrite=False, out=args.out)).parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        check_config(config)
        cuda = pick_device(config.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    stop, received = threading.Event(), []

    def on_signal(signum, frame):  # stop after a step (every rank); a second Ctrl-C at once
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
    previous = {signum: signal.signal(signum, on_signal) for signum in signals}
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        result = train(config, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.interrupted:  # exit 128 + signal: 130 SIGINT, 143 SIGTERM or another rank's signal
        if rank == 0:
            print(f"interrupted at step {result.step}: checkpoint saved to "
                  f"{result.paths['ckpt.pt']}; continue with --resume", file=sys.stderr)
        sys.exit(128 + (received[0] if received else signal.SIGTERM))
    if rank == 0:
        print(f"trained {result.step} steps, final loss {result.loss:.4f}; run folder {config.out}")


def open_run(args):
    """(device, the run of --run) for sample and nll: a generative model, not a classifier."""
    device = pick_device(args.device)
    m = load_run(args.run, device, use_ema=not getattr(args, "no_ema", False))
    if m.config.classifier:
        raise ValueError(f"run: {args.run} is a classifier (for guidance); use the run it "
                         f"guides, {Path(args.run).parent}")
    return device, m


def guidance(args, m, n, device):
    """(labels (n,) or None, w, classifier net or None, file-name tag) for --class, --guidance
    and --guide: cfg needs a conditional run, classifier one in RUN/classifier trained on the
    run's data and noise process (auto: cfg if the run is conditional). By default the plain
    conditional (w = 0 cfg, 1 classifier)."""
    if args.label is None and args.guidance is None and args.guide == "auto":
        return None if m.num_classes is None else torch.arange(n) % m.num_classes, 0.0, None, ""
    guide = args.guide if args.guide != "auto" else "cfg" if m.num_classes else "classifier"
    if guide == "cfg" and not m.num_classes:
        raise ValueError(f"guide: cfg needs a run trained with --conditional; {args.run} is "
                         "unconditional")
    clf, path = None, Path(args.run) / "classifier"
    if guide == "classifier":
        if not (path / "ckpt.pt").exists():
            raise ValueError(f"guide: {args.run} is {'' if m.num_classes else 'un'}conditional "
                             f"and has no classifier; train one with `python ddpm_score.py train "
                             f"--classifier --out {path}`")
        clf = load_run(path, device)
        process = {"ddpm": ("schedule", "T"), "ncsn": ("sigma_min", "sigma_max", "n_sigmas"),
                   "ve": ("sigma_min", "sigma_max")}.get(m.config.method, ())
        for key in ("data", "method", *process):
            if getattr(clf.config, key) != getattr(m.config, key):
                raise ValueError(f"classifier: {path} was trained with {key} = "
                                 f"{getattr(clf.config, key)!r}, the run with {key} = "
                                 f"{getattr(m.config, key)!r}")
    k, label = m.num_classes or clf.num_classes, args.label
    if label is not None and label >= k:
        raise ValueError(f"class: {label} is out of range; the run has {k} classes, 0..{k - 1}")
    w = args.guidance if args.guidance is not None else (0.0 if guide == "cfg" else 1.0)
    which = "classifier-free" if guide == "cfg" else f"classifier {path}"
    print(f"guidance: {which}, w = {w:g}, "
          f"{f'classes 0..{k - 1} in turn' if label is None else f'class {label}'}")
    y = torch.arange(n) % k if label is None else torch.full((n,), label)
    tag = f"_{guide}{w:g}" + ("" if label is None else f"_class{label}")
    return y, w, clf and clf.net.requires_grad_(False), tag


def sample_command(args):
    """`sample`: samples_SAMPLER[_GUIDE_classK].pt ({'x', 'y'}) and .png; with --trajectory,
    trajectory_*.png; with --inpaint, inpaint_MASK_SAMPLER.pt and .png. [F30, F31]"""
    (device, m), out = open_run(args), Path(args.run)
    name, _ = pick_sampler(m.config, args.sampler)
    data = get_data(m.config)
    if args.inpaint and (len(m.shape) != 3 or args.trajectory):
        raise ValueError(f"inpaint: needs images (C, H, W), the run's data have shape {m.shape}, "
                         "and no --trajectory")
    x0 = data.x_test[:args.n or 8].repeat_interleave(args.completions, dim=0)
    n = len(x0) if args.inpaint else args.n or m.config.n_samples or (64 if x0.ndim == 4 else 2000)
    y, w, clf, tag = guidance(args, m, n, device)
    kw = dict(sampler=name, steps=args.steps, seed=args.seed, y=y, w=w, classifier=clf,
              device=device)
    if args.inpaint:
        mask = inpainting_mask(x0.shape, args.mask)
        x = draw_samples(m, n, known=x0.to(device), mask=mask.to(device), **kw)
        stem, k = out / f"inpaint_{args.mask}_{name}{tag}", args.completions
        write_atomic(f"{stem}.pt", {"x": x, "known": x0, "mask": mask, "y": y})
        rows = torch.cat([torch.where(mask, x0, 0.0)[::k, None],
                          rearrange(x, "(n k) ... -> n k ...", k=k), x0[::k, None]], dim=1)
        write_png(f"{stem}.png", image_grid(rearrange(rows, "n k ... -> (n k) ..."), k + 2))
        print(f"wrote {stem}.pt and {stem}.png (a row per image: the input, {k} completions of "
              f"its {args.mask} part, the original)")
        return
    frames = [] if args.trajectory else None
    x = draw_samples(m, n, frames=frames, **kw)
    stem = out / f"samples_{name}{tag}"
    write_atomic(f"{stem}.pt", {"x": x, "y": y})
    write_png(f"{stem}.png", picture(x, data.x_test))
    print(f"wrote {stem}.pt (a dict: 'x' the samples, 'y' their labels or None) and {stem}.png "
          "(left samples, right held-out data)")
    if args.label is None:  # samples of one class are not the data's law
        mmd_report(m, x, data.x_test, args.seed)
    if frames:
        write_png(out / f"trajectory_{name}{tag}.png", trajectory_picture(frames, data.x_test))
        print(f"wrote {out / f'trajectory_{name}{tag}.png'} (noise on the left, each frame "
              "marked with the sampler's states done; held-out data on the right)")


def nll_command(args):
    """`nll`: bits/dim of the first --n held-out examples of the run's data, or of --data FILE."""
    device, m = open_run(args)
    x = load_data(args.data)[0] if args.data else get_data(m.config).x_test
    if tuple(x.shape[1:]) != m.shape:
        raise ValueError(f"data: {args.data} holds examples of shape {tuple(x.shape[1:])}, the "
                         f"run's are {m.shape}")
    t0, levels = time.time(), m.config.levels if args.levels is None else args.levels
    bpd, convention = bits_per_dim(m, x[:args.n], levels=levels, steps=args.steps,
                                   batch=args.batch, seed=args.seed, device=device)
    for name, v in bpd.items():
        se = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else math.nan
        print(f"{name} bits/dim {v.mean().item():.6f} +- {se:.6f} (n={len(v)})")
    print(f"({convention}; {time.time() - t0:.1f} s)")


def main(argv=None):
    """Train and sample diffusion and score-based models (README.md has more).

    examples:
      python ddpm_score.py train                                   # moons, ddpm, under a minute
      python ddpm_score.py sample --run runs/default --sampler ddim --steps 50 --trajectory
      python ddpm_score.py nll --run runs/default
      python ddpm_score.py train --data ring --conditional --out runs/ring
      python ddpm_score.py sample --run runs/ring --class 3 --guidance 1   # classifier-free
      python ddpm_score.py train --data shapes --out runs/shapes           # image defaults
      python ddpm_score.py sample --run runs/shapes --inpaint --mask centre
      torchrun --nproc_per_node=2 ddpm_score.py train --out runs/ddp

    exit codes: 0 done, 1 non-finite loss, 2 bad input, 130 SIGINT (Ctrl-C), 143 SIGTERM; either
    signal stops training after the current step (DDP: the next, every rank at the same one),
    with a checkpoint (train --resume continues it); a second Ctrl-C stops at once
    """
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            train_command(args, argv)
        else:
            {"sample": sample_command, "nll": nll_command}[args.command](args)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {one_line(e, 1000)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)
    except KeyboardInterrupt:  # Ctrl-C in sample or nll, or a second one in train
        print("interrupted (files are written whole or not at all)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
