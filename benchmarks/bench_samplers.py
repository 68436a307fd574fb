"""Sampler benchmark: exact accuracy per score evaluation (NFE) and the cost of the loops.

    python benchmarks/bench_samplers.py            (or `make bench`; a few minutes on 1 core)

The data is a 16-d Gaussian N(MU, COV) (eigenvalues 0.01 .. 3.16, a random rotation and mean)
with its exact score on the VP SDE (beta in [0.1, 20]) or the exact eps on the linear T = 1000
schedule, so the model error is zero and only the solver differs. Three tables (issue 8):
1. ode_likelihood against the exact flow's log-likelihood (closed form), M = 500 points: RMS
   error in nats per point against NFE, rk45 at several rtol = atol and RK4 on each time grid.
2. The exact W2 distance of each sampler's output law to the data (no Monte Carlo: every sampler
   is affine in its start and its noise, so its law is read off by pushing a basis through it).
3. Loop overhead per NFE with a free model (returns its input), beside a bare loop that does the
   same arithmetic with precomputed floats, at batch N = 100 and N = 10,000.
4. Few-step sampling (issue 14), K = 4..20 network evaluations, counted by a wrapper around the
   model: this project's dpm_solver_sample, dpm_solver_sde_sample (order 2, and 3 when they take
   `order=`) and ode_sample rk4 beside diffusers' multistep solvers with their grid options
   (DPM++2M/3M on the default, Lu-lambda and Karras grids; UniPC bh1/bh2 of order 2 and 3; DEIS
   2 and 3), every one fed the exact eps of two diagonal 16-d Gaussians, G1 (mean -2..2, std
   0.1..2) and G2 (mean -1..3, std 0.05..3), with each one's prior floor F (the exact flow's W2
   from N(0, I)) and the target F + 0.75 / K^2; the best diffusers configuration at each K.
   diffusers is optional: without it those rows are skipped with a note.
5. Observed order of each solver: from the exact marginal at s = 0.5 (VP SDE) to s = 1e-3 on the
   same log-SNR-uniform times for all, 25..400 steps, the W2 error to the exact flow's output.
   diffusers' schedulers are run through exactly those times by giving them a schedule of n + 1
   training steps whose alpha_bar are the grid's (trained_betas) and n inference steps.
6. Few-step sampling off the Gaussians (issue 14, item 3): the 2-D ring of 8 Gaussians
   (ds.gaussian_ring: radius sqrt 2, std 0.1) with the exact score of its noised law, both
   few-step samplers at K = 5, 10, 20 calls on their default grid (F38) and on the grid they had
   before issue 14 (2M, uniform in lambda: dpm_solver_sample T..1 in K - 1 steps, then x0_hat at
   t = 0; dpm_solver_sde_sample s = 1..1e-3 in K steps); unbiased MMD^2 of 4,000 samples against
   4,000 fresh ring points (ds.mmd_bandwidths of the truth), mean +- SE over 5 seeds, beside
   truth against truth (the noise floor).
Run one table with e.g. `python benchmarks/bench_samplers.py fewstep order`.
"""
import inspect
import math
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddpm_score as ds  # noqa: E402

torch.set_num_threads(1)
F64 = torch.float64
D = 16
_g = torch.Generator().manual_seed(0)
_Q, _ = torch.linalg.qr(torch.randn(D, D, generator=_g, dtype=F64))
LAM = torch.logspace(-2, 0.5, D, dtype=F64)
COV = _Q @ torch.diag(LAM) @ _Q.T
MU = 0.5 * torch.randn(D, generator=_g, dtype=F64)
SDE = ds.VPSDE()
SIGMAS = ds.geometric_sigmas(10.0, 0.01, 10)       # NCSN levels for annealed Langevin
SCHED = ds.Schedule.from_betas(ds.linear_betas())
AB = SCHED.alpha_bar


def gauss_score(x, m, v):
    """grad log N(x; m MU, m^2 COV + v I), for one (m, v) shared by the batch."""
    return -(((x - m * MU) @ _Q) / (m * m * LAM + v)) @ _Q.T


def score(x, s):
    m, std = SDE.marginal_coefs(s[:1].double())
    return gauss_score(x, m.item(), std.item() ** 2)


def eps_model(x, t):
    ab = AB[t[0]].item()
    return -math.sqrt(1 - ab) * gauss_score(x, math.sqrt(ab), 1 - ab)


def exact_loglik(x, eps_s):
    """What F27 returns with the exact flow: log p_eps(x) + log N(x_1; 0, I) - log p_1(x_1)."""
    (m0, m1), (s0, s1) = SDE.marginal_coefs(torch.tensor([eps_s, 1.0], dtype=F64))
    ratio = ((m1 ** 2 * LAM + s1 ** 2) / (m0 ** 2 * LAM + s0 ** 2)).sqrt()
    x1 = m1 * MU + ((x - m0 * MU) @ _Q * ratio) @ _Q.T
    law = lambda m, s: torch.distributions.MultivariateNormal(  # noqa: E731
        m * MU, m ** 2 * COV + s ** 2 * torch.eye(D, dtype=F64))
    prior = torch.distributions.Normal(torch.zeros((), dtype=F64), 1.0)
    return law(m0, s0).log_prob(x) + prior.log_prob(x1).sum(1) - law(m1, s1).log_prob(x1)


def likelihood_table():
    x = MU + torch.randn(500, D, generator=torch.Generator().manual_seed(1), dtype=F64) \
        @ torch.linalg.cholesky(COV).T
    ref = exact_loglik(x, 1e-5)
    rms = lambda out: (out["nats"] - ref).square().mean().sqrt().item()  # noqa: E731
    print("\n1. ode_likelihood, RMS error against the exact flow (nats per point), M = 500")
    print("| solver | NFE | RMS error | target |\n|---|---|---|---|")
    for rtol in (1e-3, 1e-4, 1e-5, 1e-6):
        out = ds.ode_likelihood(score, SDE, x, method="rk45", rtol=rtol, atol=rtol)
        target = "<= 1e-4 at <= 62 NFE (scipy RK45: 1.0e-4 at 62)" if rtol == 1e-5 else ""
        print(f"| rk45 rtol = atol = {rtol:g} | {out['nfe']} | {rms(out):.2e} | {target} |",
              flush=True)
    for spacing in ds.GRIDS:
        for steps in (12, 25, 50):
            out = ds.ode_likelihood(score, SDE, x, steps=steps, spacing=spacing)
            target = {12: "<= 5e-3", 25: "<= 2e-4"}.get(steps, "") if spacing == "quadratic" else ""
            print(f"| rk4, {spacing} grid{' (default)' * (spacing == 'quadratic')} | "
                  f"{out['nfe']} | {rms(out):.2e} | {target} |", flush=True)


def exact_law(run):
    """(mean, cov) of run(x_T), x_T ~ N(0, I), with torch.randn replaced by basis vectors."""
    def shape_of(size):
        return tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
    draws = []

    def counting(*size, dtype=None, **kw):
        draws.append(1)
        return torch.zeros(shape_of(size), dtype=dtype or F64)
    with mock.patch.object(torch, "randn", counting):
        run(torch.ones(1, D, dtype=F64))
    x = torch.zeros(1 + D + len(draws) * D, D, dtype=F64)
    x[1:1 + D] = torch.eye(D, dtype=F64)
    next_k = iter(range(len(draws)))

    def basis(*size, dtype=None, **kw):
        z, k = torch.zeros(shape_of(size), dtype=dtype or F64), next(next_k)
        z[1 + D + k * D:1 + D + (k + 1) * D] = torch.eye(D, dtype=F64)
        return z
    with mock.patch.object(torch, "randn", basis):
        out = run(x)
    cols = out[1:] - out[0]
    return out[0], cols.T @ cols


def w2(law):
    def sqrtm(P):
        lam, V = torch.linalg.eigh(P)
        return V @ torch.diag(lam.clamp(min=0).sqrt()) @ V.T
    (m, P), r = law, sqrtm(COV)
    return ((m - MU).square().sum() + torch.trace(P + COV - 2 * sqrtm(r @ P @ r))).sqrt().item()


def w2_table():
    """name -> run(x, nfe) for NFE in 10, 20, 50, 100 (None where the NFE does not fit)."""
    ode = lambda method, per: lambda x, n: (  # noqa: E731
        ds.ode_sample(score, SDE, x, steps=n // per, method=method) if n % per == 0 else None)
    samplers = {
        "ddpm_sample (ancestral, beta)": lambda x, n: ds.ddpm_sample(eps_model, SCHED, x, steps=n),
        "ddim_sample (eta = 0)": lambda x, n: ds.ddim_sample(eps_model, SCHED, x, steps=n),
        "dpm_solver_sample (Schedule, eps)": lambda x, n: ds.dpm_solver_sample(
            eps_model, SCHED, x, steps=n),
        "dpm_solver_sde_sample (VP, score)": lambda x, n: ds.dpm_solver_sde_sample(
            score, SDE, x, steps=n),
        "ode_sample euler (uniform)": ode("euler", 1),
        "ode_sample heun (quadratic)": ode("heun", 2),
        "ode_sample rk4 (quadratic)": ode("rk4", 4),
        "ode_sample rk4 (uniform, before)": lambda x, n: (ds.ode_sample(
            score, SDE, x, steps=n // 4, spacing="uniform") if n % 4 == 0 else None),
        "reverse_sde_sample euler_maruyama": lambda x, n: ds.reverse_sde_sample(
            score, SDE, x, steps=n),
        "reverse_sde_sample reverse_diffusion": lambda x, n: ds.reverse_sde_sample(
            score, SDE, x, steps=n, predictor="reverse_diffusion"),
        "annealed_langevin (L = 10, NFE = 10 K + 1)": lambda x, n: (ds.annealed_langevin(
            lambda y, sg: gauss_score(y, 1.0, sg[0].item() ** 2), SIGMAS, 10 * x,
            steps=n // 10) if n % 10 == 0 else None),
    }
    nfes = (10, 12, 20, 50, 100)
    print("\n2. Exact W2 of the output law to the data, 16-d Gaussian (DDPM/DDIM/DPM on the "
          "linear T = 1000 schedule; the SDE samplers stop at s = 1e-3, floor ~0.008)")
    print("| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for name, run in samplers.items():
        cells = []
        for n in nfes:
            out = run(torch.ones(1, D, dtype=F64), n)
            cells.append("" if out is None else f"{w2(exact_law(lambda x: run(x, n))):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    cells = []
    for rtol in (1e-2, 1e-3, 1e-4):
        stats = {}
        law = exact_law(lambda x: ds.ode_sample(score, SDE, x, method="rk45", rtol=rtol,
                                                 atol=rtol, stats=stats))
        cells.append(f"rtol {rtol:g}: {w2(law):.3f} at {stats['nfe']} NFE")
    print("| ode_sample rk45 | " + "; ".join(cells) + " |")
    print("| targets (issue 8) | DPM-Solver++ <= 0.15 at 10 NFE, <= 0.05 at 20 NFE; before: best "
          "RK4 12 NFE, DDIM 10 NFE (rows 'uniform, before' and ddim); diffusers DPM++2M 0.324 / "
          "0.144 in the issue's setting |")


def bare_loops(x, n):
    """Each sampler's update as a bare loop: constant float coefficients, the time tensor of each
    step made in the loop as any sampler must, the free model, no checks. The module's samplers
    are timed against these."""
    c1, c2, c3 = 0.99, 0.01, 0.1
    randn = lambda y: torch.randn(y.shape, dtype=y.dtype)  # noqa: E731
    t_of = lambda i: torch.full(x.shape[:1], n - i, dtype=torch.long)  # noqa: E731
    s_of = lambda i: torch.full(x.shape[:1], 1 - i / n, dtype=x.dtype)  # noqa: E731
    model = lambda y, t: y  # noqa: E731

    def ddpm():                    # x = (x - c eps) / sqrt(alpha) + sigma z
        y = x
        for i in range(n):
            y = (y - c1 * model(y, t_of(i))) / c2 + c3 * randn(y)
        return y

    def ddim():                    # x = r x + k eps
        y = x
        for i in range(n):
            y = c1 * y + c2 * model(y, t_of(i))
        return y

    def dpm():                     # x0 = (x - s eps) / a; D = x0 + k (x0 - x0'); x = r x - c D
        y, prev = x, x
        for i in range(n):
            x0 = (y - c1 * model(y, t_of(i))) / c2
            y, prev = c1 * y - c2 * (x0 + c3 * (x0 - prev)), x0
        return y

    def ode_euler():               # x = x + ds (a x - g2 / 2 score)
        y = x
        for i in range(n):
            y = y + c1 * (c2 * y - c3 * model(y, s_of(i)))
        return y

    def ode_rk4():                 # four such evaluations and the RK4 combination
        y = x
        f = lambda v, s_b: c2 * v - c3 * model(v, s_b)  # noqa: E731
        for i in range(n // 4):
            s0, s1, s2 = s_of(i), s_of(i + 0.5), s_of(i + 1)
            k1 = f(y, s0)
            k2 = f(y + c1 * k1, s1)
            k3 = f(y + c1 * k2, s1)
            k4 = f(y + c2 * k3, s2)
            y = y + c3 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y

    def sde_em():                  # x = x - (a x - g2 score) ds + g sqrt(ds) z
        y = x
        for i in range(n):
            y = y - (c1 * y - c2 * model(y, s_of(i))) * c3 + c3 * randn(y)
        return y

    def langevin():                # x = x + eps / 2 score + sqrt(eps) z
        y = x
        for i in range(n):
            y = y + c1 * model(y, s_of(i)) + c2 * randn(y)
        return y
    return {"ddpm": ddpm, "ddim": ddim, "dpm": dpm, "euler": ode_euler, "rk4": ode_rk4,
            "sde": sde_em, "langevin": langevin}


def timed_pair(f, g, repeat=15):
    """Best-of-repeat seconds of f and of g, measured alternately so load hits both alike."""
    f(), g()
    best = [math.inf, math.inf]
    for _ in range(repeat):
        for j, fn in enumerate((f, g)):
            start = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - start)
    return best


def overhead_table():
    free_eps, free_score = (lambda x, t: x), (lambda x, s: x)
    print("\n3. Loop overhead per NFE (us) with a free model, 16-d float32, beside the bare loop")
    print("| sampler | bare loop | N = 100 | ratio | N = 10,000 | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    rows = {
        "ddpm_sample": ("ddpm", lambda x, n: ds.ddpm_sample(free_eps, SCHED, x, steps=n)),
        "ddim_sample": ("ddim", lambda x, n: ds.ddim_sample(free_eps, SCHED, x, steps=n)),
        "dpm_solver_sample": ("dpm", lambda x, n: ds.dpm_solver_sample(free_eps, SCHED, x,
                                                                         steps=n)),
        "dpm_solver_sde_sample": ("dpm", lambda x, n: ds.dpm_solver_sde_sample(
            free_score, SDE, x, steps=n)),
        "ode_sample euler": ("euler", lambda x, n: ds.ode_sample(free_score, SDE, x, steps=n,
                                                                method="euler")),
        "ode_sample rk4": ("rk4", lambda x, n: ds.ode_sample(free_score, SDE, x, steps=n // 4)),
        "reverse_sde_sample": ("sde", lambda x, n: ds.reverse_sde_sample(free_score, SDE, x,
                                                                          steps=n)),
        "annealed_langevin": ("langevin", lambda x, n: ds.annealed_langevin(
            free_score, [1.0, 0.5, 0.1, 0.05], x, steps=n // 4)),
    }
    n = 100
    results = {}
    for N in (100, 10_000):
        x = torch.randn(N, D)
        bare = bare_loops(x, n)
        for name, (kind, run) in rows.items():
            pair = timed_pair(bare[kind], lambda: run(x, n))
            results.setdefault(name, [kind]).append((pair[0] / n, pair[1] / n))
    for name, (kind, small, large) in results.items():
        cells = [f"{1e6 * small[0]:.0f} / {1e6 * large[0]:.0f}"]
        for bare_t, t in (small, large):
            cells += [f"{1e6 * t:.0f}", f"{t / bare_t:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " | <= 1.5 |", flush=True)


# --- 4 and 5: few-step samplers beside diffusers, and their orders (issue 14) -------------------
# Two diagonal 16-d Gaussians, neither used to tune anything: G1 mean -2..2, std log-spaced
# 0.1..2; G2 mean -1..3, std log-spaced 0.05..3. With the exact eps every deterministic sampler is
# affine per dimension, out = a + b x_T, so pushing x_T = 0 and x_T = 1 gives its output law
# N(a, b^2) exactly, and W2^2 to N(mu, std^2) is sum (a - mu)^2 + (|b| - std)^2.
GAUSSIANS = {"G1": (torch.linspace(-2, 2, D, dtype=F64), torch.logspace(-1, math.log10(2), D,
                                                                         dtype=F64)),
             "G2": (torch.linspace(-1, 3, D, dtype=F64), torch.logspace(math.log10(0.05),
                                                                         math.log10(3), D,
                                                                         dtype=F64))}
FEW = range(4, 21)                   # NFE budgets of table 4
ORDER_STEPS = (25, 50, 100, 200, 400)
S_START, S_END = 0.5, 1e-3           # table 5: exact start at s = 0.5 on the VP SDE, end at 1e-3


def diag_eps(mu, std, alpha, sigma):
    """Exact eps of N(mu, diag std^2) at x_t = alpha x0 + sigma eps: sigma (x - alpha mu) / var."""
    var = alpha ** 2 * std ** 2 + sigma ** 2
    return lambda x: sigma * (x - alpha * mu) / var


def diag_w2(out, mu, std):
    """W2 of N(out[0], (out[1] - out[0])^2) per dimension (the pushes of 0 and 1) to
    N(mu, std^2)."""
    a, b = out[0], (out[1] - out[0]).abs()
    return ((a - mu).square().sum() + (b - std).square().sum()).sqrt().item()


def pushed(run):
    """run(x) on the two starts x_T = 0 and x_T = 1 (a batch of 2), float64."""
    return run(torch.stack([torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)]))


def flow_floor(mu, std, ab_start, ab_end):
    """W2 of the exact probability-flow ODE from N(0, I) at alpha_bar = ab_start to ab_end, to the
    data: the flow is the monotone map between the Gaussian marginals, x -> m1 mu + sd1 / sd0
    (x - m0 mu), so x ~ N(0, 1) lands on N(m1 mu - sd1 / sd0 m0 mu, (sd1 / sd0)^2)."""
    m0, m1 = math.sqrt(ab_start), math.sqrt(ab_end)
    sd0, sd1 = (m0 ** 2 * std ** 2 + 1 - ab_start).sqrt(), (m1 ** 2 * std ** 2 + 1 - ab_end).sqrt()
    a, b = m1 * mu - sd1 / sd0 * m0 * mu, sd1 / sd0
    return ((a - mu).square().sum() + (b - std).square().sum()).sqrt().item()


class Counter:
    """A model that counts its calls (the NFE) and returns fn(x, time)."""
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, x, time):
        self.n += 1
        return self.fn(x, time)


def ours(mu, std):
    """name -> (process, exact model, run(x, steps, model)) for this project's few-step samplers;
    order 3 only where the function takes `order=` (inspect.signature)."""
    eps = lambda x, t: diag_eps(mu, std, AB[t[0]].sqrt().item(),  # noqa: E731
                                (1 - AB[t[0]]).sqrt().item())(x)

    def score(x, s):
        m, sd = SDE.marginal_coefs(s[:1].double())
        return -diag_eps(mu, std, m.item(), sd.item())(x) / sd.item()
    rows = {}
    for fn, process, model, label in (
            (ds.dpm_solver_sample, "discrete", eps, "linear T = 1000, eps"),
            (ds.dpm_solver_sde_sample, "vp", score, "VP SDE, score")):
        has_order = "order" in inspect.signature(fn).parameters
        for order in (2, 3) if has_order else (2,):
            kw = {"order": order} if has_order else {}
            arg = SCHED if process == "discrete" else SDE
            rows[f"{fn.__name__} order {order} ({label})"] = (process, model, (
                lambda x, n, f, fn=fn, arg=arg, kw=kw: fn(f, arg, x, steps=n, **kw)))
    rows["ode_sample rk4 (VP SDE, default grid)"] = ("vp", score, (
        lambda x, n, f: ds.ode_sample(f, SDE, x, steps=n, method="rk4")))
    return rows


def diffusers_configs():
    """name -> (scheduler class, keyword arguments): diffusers' multistep solvers on its linear
    T = 1000 betas (1e-4..0.02, the same schedule), eps prediction, every other setting its
    default (final_sigmas_type 'zero' and lower_order_final=True where it has them), except UniPC
    bh1, which returns nan with a final step to sigma = 0 (B(h) = h is infinite there) and is run
    with final_sigmas_type 'sigma_min' (its last step lands on alpha_bar_1, sigma ~ 0.01)."""
    try:
        from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler,
                               UniPCMultistepScheduler)
    except ImportError:
        return None
    out = {}
    for order in (2, 3):
        for grid, kw in (("default grid", {}), ("use_lu_lambdas", {"use_lu_lambdas": True}),
                         ("use_karras_sigmas", {"use_karras_sigmas": True})):
            out[f"DPM++{order}M, {grid}"] = (DPMSolverMultistepScheduler,
                                             {"solver_order": order, **kw})
    for order in (2, 3):
        for kind in ("bh1", "bh2"):
            final = {"final_sigmas_type": "sigma_min"} if kind == "bh1" else {}
            out[f"UniPC-{order} {kind}"] = (UniPCMultistepScheduler,
                                            {"solver_order": order, "solver_type": kind, **final})
    for order in (2, 3):
        out[f"DEIS-{order}"] = (DEISMultistepScheduler, {"solver_order": order})
    return out


def run_diffusers(scheduler, x, model, n):
    """The standard diffusers loop with n inference steps; model(x, t) sees each timestep."""
    scheduler.set_timesteps(n)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def by_nfe(run, steps_range):
    """{counted NFE: W2} over the step counts in steps_range (the first step count that reaches an
    NFE keeps it); run(steps) -> (W2, counted NFE) or None."""
    cells = {}
    for n in steps_range:
        got = run(n)
        if got is not None and got[1] not in cells:
            cells[got[1]] = got[0]
    return cells


def fewstep_table():
    """Table 4: exact W2 at K = 4..20 counted NFE, beside each Gaussian's floor F + 0.75 / K^2."""
    peers = diffusers_configs()
    print("\n4. Few-step samplers: exact W2 to the data at K NFE (counted: each model wraps a call "
          "counter; a column holds the first step count giving that many calls)")
    if peers is None:
        print("(diffusers is not installed: its rows are skipped; `pip install diffusers`)")
    # diffusers' timestep t in 0..999 is this project's step t + 1 (alpha_bar[0] = 1 here)
    ab_T, ab_vp_end = AB[-1].item(), SDE.marginal_coefs(torch.tensor(1e-3, dtype=F64))[0] ** 2
    head = "| sampler | " + " | ".join(str(k) for k in FEW) + " |\n|---|" + "---|" * len(FEW)
    for name, (mu, std) in GAUSSIANS.items():
        floors = {"discrete": flow_floor(mu, std, ab_T, 1.0),
                  "vp": flow_floor(mu, std, SDE.marginal_coefs(torch.ones((), dtype=F64))[0]
                                   .item() ** 2, ab_vp_end.item())}
        print(f"\n{name}: mean {mu[0]:g}..{mu[-1]:g}, std {std[0]:g}..{std[-1]:g} (log-spaced); "
              f"prior floor F = {floors['discrete']:.4f} (linear T = 1000, t = T to 0), "
              f"{floors['vp']:.4f} (VP SDE, s = 1 to 1e-3)\n{head}")
        for kind in ("discrete", "vp"):
            print(f"| target F + 0.75 / K^2 ({kind}) | " + " | ".join(
                f"{floors[kind] + 0.75 / k ** 2:.3f}" for k in FEW) + " |")

        def row(label, cells):
            print(f"| {label} | " + " | ".join(
                f"{cells[k]:.3f}" if k in cells else "" for k in FEW) + " |", flush=True)
        for label, (_, model, sampler) in ours(mu, std).items():
            def run(n):
                f = Counter(model)
                return diag_w2(pushed(lambda x: sampler(x, n, f)), mu, std), f.n
            row(label, by_nfe(run, range(1, 25)))
        if peers is None:
            continue
        best = {}
        eps_at = lambda x, t: diag_eps(mu, std, AB[int(t) + 1].sqrt().item(),  # noqa: E731
                                       (1 - AB[int(t) + 1]).sqrt().item())(x)
        for label, (cls, kw) in peers.items():
            def run(n):
                f = Counter(eps_at)
                return diag_w2(pushed(lambda x: run_diffusers(cls(**kw), x, f, n)), mu, std), f.n
            cells = by_nfe(run, range(1, 25))
            row(f"diffusers {label}", cells)
            for k, v in cells.items():
                if v < best.get(k, (math.inf,))[0]:
                    best[k] = (v, label)
        row("**best diffusers configuration at each K**", {k: v for k, (v, _) in best.items()})
        short = {", default grid": "", ", use_lu_lambdas": " lu", ", use_karras_sigmas": " Karras"}
        which = [best[k][1] if k in best else "" for k in FEW]
        for long, brief in short.items():
            which = [w.replace(long, brief).replace("DPM++", "") for w in which]
        print("| (which) | " + " | ".join(which) + " |")


def lambda_grid(n):
    """n + 1 times from S_START to S_END on the VP SDE, uniform in lambda = log(m / std)
    (bisection in float64 on each target)."""
    def lam(s):
        m, sd = SDE.marginal_coefs(s)
        return torch.log(m / sd)
    ends = lam(torch.tensor([S_START, S_END], dtype=F64))
    targets = ends[0] + torch.linspace(0, 1, n + 1, dtype=F64) * (ends[1] - ends[0])
    lo, hi = torch.zeros_like(targets), torch.ones_like(targets)
    for _ in range(100):                             # lambda falls as s grows
        mid = (lo + hi) / 2
        big = lam(mid) > targets
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    s = (lo + hi) / 2
    s[0], s[-1] = S_START, S_END
    return s


def diffusers_on_grid(cls, kw, s, mu, std, exact_history=False):
    """diffusers' scheduler run through exactly the times s_0 > ... > s_n: a schedule of n + 1
    training steps whose alpha_bar[j] is m(s_{n-j})^2 (given as trained_betas), n inference steps
    with 'linspace' spacing (timesteps n, ..., 1) and final_sigmas_type 'sigma_min' where it has
    one (the last step lands on alpha_bar[0], i.e. s_n; DEIS always does). The model is exact at the
    scheduler's own sigma of each timestep (its float32 value), so only the solver errs. With
    exact_history, the state after the first two (lower-order start-up) steps is replaced by the
    exact flow's and the stored data predictions by the exact ones at the first two times: the
    steady multistep update alone. Returns (output on the starts, exact flow output)."""
    ab = SDE.marginal_coefs(s.flip(0))[0] ** 2                # alpha_bar[j] at s_{n-j}
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    extra = {"final_sigmas_type": "sigma_min"} if cls.__name__ != "DEISMultistepScheduler" else {}
    sch = cls(num_train_timesteps=len(s), trained_betas=betas.tolist(), lower_order_final=False,
              **{**kw, **extra})
    sch.set_timesteps(len(s) - 1)
    assert sch.timesteps.tolist() == list(range(len(s) - 1, 0, -1)), sch.timesteps
    sig = sch.sigmas.double()                                  # sigma / alpha, float32 values
    alpha = 1 / (1 + sig ** 2).sqrt()
    index = {int(t): i for i, t in enumerate(sch.timesteps)}
    model = lambda x, t: diag_eps(mu, std, alpha[index[int(t)]].item(),  # noqa: E731
                                  (sig * alpha)[index[int(t)]].item())(x)
    start = lambda z, i: alpha[i] * mu + (alpha[i] ** 2 * std ** 2 + (sig * alpha)[i] ** 2  # noqa
                                          ).sqrt() * z
    z = torch.stack([torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)])
    x = start(z, 0)
    for i, t in enumerate(sch.timesteps):
        if exact_history and i == 2:     # step() shifts the history, then appends this step's
            x = start(z, 2)
            sch.model_outputs[1:] = [(start(z, j) - (sig * alpha)[j] * model(
                start(z, j), sch.timesteps[j])) / alpha[j] for j in (0, 1)]
        x = sch.step(model(x, t), t, x).prev_sample
    return x, start(z, -1)


def doubled_phi3(base):
    """diffusers' DPM++(3M) with one change, to test why it is second order: the D2 term's
    coefficient doubled. Its D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 x0''/2, whose exact
    weight in int_0^h e^{u-h} x0(lambda_s + u) du is (h^2 - 2h + 2 - 2e^{-h}) / h^2 = h/3 + O(h^2);
    diffusers uses 1/2 - (h - 1 + e^{-h}) / h^2 = h/6 + O(h^2), half of it: an O(h^3) local error,
    so order 2. The subclass adds the missing half to the result of diffusers' own update."""
    class DoubledPhi3(base):
        def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None,
                                                    **kwargs):
            x = super().multistep_dpm_solver_third_order_update(model_output_list, *args,
                                                                sample=sample, **kwargs)
            i = self.step_index
            alpha_sigma = [self._sigma_to_alpha_sigma_t(self.sigmas[i + 1 - j]) for j in range(4)]
            lam = [torch.log(a) - torch.log(s) for a, s in alpha_sigma]
            h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
            m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
            d2 = h ** 2 * ((m0 - m1) / h0 - (m1 - m2) / h1) / (h0 + h1)
            return x - alpha_sigma[0][0] * ((torch.exp(-h) - 1 + h) / h ** 2 - 0.5) * d2
    return DoubledPhi3


def order_table():
    """Table 5: W2 error against the exact flow from an exact start, and the observed order."""
    mu, std = GAUSSIANS["G1"]
    print(f"\n5. Observed order: from the exact marginal at s = {S_START} to s = {S_END} on the VP "
          "SDE (G1), n steps uniform in log-SNR (the same times for every solver), W2 of the "
          "output law to the exact flow's; order = log2(error(n) / error(2n)); fitted: least "
          "squares over n = 25..200 (diffusers computes in float32: its sigmas, lambdas and "
          "DPM-Solver's sample, so its errors near 1e-5 are rounding)")
    print("| solver | " + " | ".join(f"n = {n}" for n in ORDER_STEPS) + " | order per doubling"
          " | fitted order (25..200) |\n|---|" + "---|" * (len(ORDER_STEPS) + 2))
    z = torch.stack([torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)])

    def score(x, s):
        m, sd = SDE.marginal_coefs(s[:1].double())
        return -diag_eps(mu, std, m.item(), sd.item())(x) / sd.item()

    def exact(s):
        m, sd = SDE.marginal_coefs(torch.tensor(s, dtype=F64))
        return lambda z: m * mu + (m ** 2 * std ** 2 + sd ** 2).sqrt() * z

    def w2_to(out, ref):
        a, b = out[0] - ref[0], (out[1] - out[0]).abs() - (ref[1] - ref[0]).abs()
        return (a.square().sum() + b.square().sum()).sqrt().item()

    def ours_run(fn, **kw):
        def run(s):
            grid = s.tolist()
            return fn(score, SDE, exact(grid[0])(z), steps=grid, **kw), exact(grid[-1])(z)
        return run
    rows = {}
    orders = (1, 2, 3) if "order" in inspect.signature(ds.dpm_solver_sde_sample).parameters \
        else (None,)
    for order in orders:                             # dpm_solver_sample runs the same solver
        try:                                         # but only from t = T: not measurable here
            ds.dpm_solver_sde_sample(score, SDE, exact(S_START)(z), steps=[S_START, S_END],
                                     **({} if order is None else {"order": order}))
        except (TypeError, ValueError) as error:
            print(f"(dpm_solver_sde_sample order {order}: {error})")
            continue
        label = "dpm_solver_sde_sample" + ("" if order is None else f" order {order}") + \
            (" (2M; no order= yet)" if order is None else "")
        rows[label] = ours_run(ds.dpm_solver_sde_sample, **({} if order is None else
                                                           {"order": order}))
    rows["ode_sample rk4 (4 NFE per step)"] = ours_run(ds.ode_sample, method="rk4")
    peers = diffusers_configs()
    if peers is None:
        print("(diffusers is not installed: its rows are skipped)")
    else:
        from diffusers import DPMSolverMultistepScheduler
        picked = {"DPM++1 (DDIM)": (DPMSolverMultistepScheduler, {"solver_order": 1}),
                  **{k: v for k, v in peers.items() if "," not in k or "default" in k}}
        for label, (cls, kw) in picked.items():
            rows[f"diffusers {label.replace(', default grid', '')}"] = (
                lambda s, cls=cls, kw=kw: diffusers_on_grid(cls, kw, s, mu, std))
        rows["diffusers DPM++3M, exact history (its 2 start-up steps replaced by the exact "
             "flow)"] = lambda s: diffusers_on_grid(DPMSolverMultistepScheduler,
                                                    {"solver_order": 3}, s, mu, std, True)
        rows["diffusers DPM++3M, its D2 weight doubled (to the exact phi_3 one), exact history"] \
            = lambda s: diffusers_on_grid(doubled_phi3(DPMSolverMultistepScheduler),
                                          {"solver_order": 3}, s, mu, std, True)
    for label, run in rows.items():
        errs = [w2_to(*run(lambda_grid(n))) for n in ORDER_STEPS]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        logn = torch.tensor([math.log2(n) for n in ORDER_STEPS[:-1]], dtype=F64)
        loge = torch.tensor([math.log2(e) for e in errs[:-1]], dtype=F64)
        fit = -((logn - logn.mean()) * (loge - loge.mean())).sum() / (logn - logn.mean()).square(
        ).sum()
        print(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errs) + " | " +
              ", ".join(f"{p:.2f}" for p in slopes) + f" | {fit:.2f} |", flush=True)


# --- 6: the ring mixture with its exact score (issue 14, item 3) --------------------------------
RING_K, RING_N, RING_SEEDS = (5, 10, 20), 4000, 5
_ANGLE = 2 * math.pi * torch.arange(8, dtype=F64) / 8
RING_MU = math.sqrt(2) * torch.stack([_ANGLE.cos(), _ANGLE.sin()], 1)    # ds.gaussian_ring's


def ring_score(x, m, v):
    """grad log of the ring pushed through x = m x0 + sqrt(v) eps: sum_k w_k N(m mu_k, (m^2 0.01
    + v) I), the weights of x's posterior over the modes."""
    var = m * m * 0.01 + v
    d = x.double()[:, None, :] - m * RING_MU
    post = torch.softmax(-d.square().sum(-1) / (2 * var), 1)
    return -(post[..., None] * d).sum(1) / var


def ring_samplers():
    """name -> run(x, K) -> (samples, counted calls): default and pre-issue-14 grids."""
    def eps(x, t):
        a = AB[t[0]].item()
        return -math.sqrt(1 - a) * ring_score(x, math.sqrt(a), 1 - a)

    def score(x, s):
        m, sd = SDE.marginal_coefs(s[:1].double())
        return ring_score(x, m.item(), sd.item() ** 2)

    def old_discrete(k):
        s = ds.s_grid(ds.DiscreteVPSDE(SCHED), k - 1, 1 / SCHED.T, "logsnr")
        return list(dict.fromkeys(max(1, round(u * SCHED.T)) for u in s)) + [0]

    def counted(model, run):
        def go(x, k):
            f = Counter(model)
            return run(f, x, k), f.n
        return go
    return {
        "dpm_solver_sample, default (F38)": counted(eps, lambda f, x, k: ds.dpm_solver_sample(
            f, SCHED, x, steps=k)),
        "dpm_solver_sample, old 2M grid": counted(eps, lambda f, x, k: ds.dpm_solver_sample(
            f, SCHED, x, steps=old_discrete(k))),
        "dpm_solver_sde_sample, default (F38)": counted(score, lambda f, x, k: (
            ds.dpm_solver_sde_sample(f, SDE, x, steps=k))),
        "dpm_solver_sde_sample, old 2M grid": counted(score, lambda f, x, k: (
            ds.dpm_solver_sde_sample(f, SDE, x, steps=k, eps_s=1e-3, spacing="logsnr")))}


def ring_table():
    """Table 6: MMD^2 to the ring at K calls, default grid against the pre-issue-14 2M grid."""
    truth = lambda seed: ds.gaussian_ring(RING_N, ds.rng(seed, "ring truth"))[0].double()  # noqa

    def cell(values):
        t = torch.tensor(values, dtype=F64)
        return f"{t.mean():.1e} +- {t.std() / math.sqrt(len(t)):.1e}"
    print(f"\n6. Ring of 8 Gaussians (radius sqrt 2, std 0.1), exact score: MMD^2 of "
          f"{RING_N} samples to {RING_N} ring points, mean +- SE over {RING_SEEDS} seeds")
    print("| sampler | " + " | ".join(f"K = {k}" for k in RING_K) + " |\n|---|" +
          "---|" * len(RING_K))
    floor = [ds.mmd2_unbiased(truth(100 + s), ref, ds.mmd_bandwidths(ref))
             for s, ref in ((s, truth(s)) for s in range(RING_SEEDS))]
    print(f"| truth against truth (noise floor) | {cell(floor)} |" + " |" * (len(RING_K) - 1))
    for label, run in ring_samplers().items():
        cells = []
        for k in RING_K:
            values = []
            for seed in range(RING_SEEDS):
                x = torch.randn(RING_N, 2, generator=ds.rng(seed, "ring start"), dtype=F64)
                out, nfe = run(x, k)
                assert nfe == k, (label, k, nfe)
                ref = truth(seed)
                values.append(ds.mmd2_unbiased(out, ref, ds.mmd_bandwidths(ref)))
            cells.append(cell(values))
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main():
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, 1 thread, "
          f"load average {load:.1f} ({os.cpu_count()} cores)")
    tables = {"likelihood": likelihood_table, "w2": w2_table, "overhead": overhead_table,
              "fewstep": fewstep_table, "order": order_table, "ring": ring_table}
    for name in sys.argv[1:] or tables:
        tables[name]()


if __name__ == "__main__":
    main()
