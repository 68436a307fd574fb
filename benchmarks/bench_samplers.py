"""Sampler benchmark: quality against score evaluations (NFE) with the exact score of a 2-D mixture.

    python benchmarks/bench_samplers.py            (or `make bench`; about 3 minutes on 2 cores)

For every sampler it prints, at several step counts, the unbiased MMD^2 to fresh data next to its
noise floor (the standard deviation of MMD^2 between two fresh data sets of the same size), the
mode-weight error (total variation between the sampled and true mode weights), the within-mode
spread (sampled std / true std, averaged over modes) and the share of samples far from every
mode. Then the sampler's own cost per step as a fraction of one evaluation of the default network
(3-layer, 256-wide MLP at batch 10,000), and the likelihood error of the probability-flow ODE
against the closed-form mixture density. Targets (issue 3): every overhead < 10%; some ODE sampler
within 2x the noise floor at <= 50 NFE; ancestral DDPM at 1000 steps within the noise floor.
"""
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddpm_score as ds  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
DT = torch.float64
N = 4000                                            # samples per configuration
MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], dtype=DT)
STDS = torch.tensor([0.25, 0.3, 0.2], dtype=DT)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=DT)


def draw_data(n, gen):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    return MEANS[k] + STDS[k, None] * torch.randn(n, 2, generator=gen, dtype=DT)


def log_components(x, scale, std):
    """log w_k + log N(x; scale mu_k, (scale^2 c_k^2 + std^2) I), shape (B, K)."""
    var = scale[:, None] ** 2 * STDS ** 2 + std[:, None] ** 2           # (B, K)
    diff = x[:, None, :] - scale[:, None, None] * MEANS                 # (B, K, 2)
    logc = WEIGHTS.log() - (diff ** 2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    return logc, diff, var


def mixture_score(x, scale, std):
    """Exact grad log of the mixture pushed through x = scale x0 + std z."""
    logc, diff, var = log_components(x, scale, std)
    r = torch.softmax(logc, 1)
    return -(r[:, :, None] * diff / var[:, :, None]).sum(1)


def mixture_logp(x):
    one = torch.ones(x.shape[0], dtype=DT)
    return torch.logsumexp(log_components(x, one, 0 * one)[0], 1)


SCHED = ds.Schedule.from_betas(ds.linear_betas())
SDE = ds.VPSDE()


def eps_model(xt, t):
    scale, std = ds.marginal_coefs(SCHED, t)
    return -std[:, None] * mixture_score(xt, scale, std)


def sde_score(x, s):
    scale, std = SDE.marginal_coefs(s)
    return mixture_score(x, scale, std)


def ncsn_score(x, sigma):
    return mixture_score(x, torch.ones_like(sigma), sigma)


def clean_score(x):
    one = torch.ones(x.shape[0], dtype=DT)
    return mixture_score(x, one, 0 * one)


SIGMAS = ds.geometric_sigmas(3.0, 0.01, 10)


def samplers():
    """name -> (list of (nfe, run(x_T, gen)))."""
    out = {}
    for kind in ("beta", "beta_tilde"):
        out[f"ddpm sigma2={kind}"] = [
            (S, lambda x, g, S=S, k=kind: ds.ddpm_sample(eps_model, SCHED, x, steps=S, sigma2=k,
                                                         generator=g))
            for S in (10, 50, 100, 250, 1000)]
    for eta in (0.0, 1.0):
        out[f"ddim eta={eta:g}"] = [
            (S, lambda x, g, S=S, e=eta: ds.ddim_sample(eps_model, SCHED, x, steps=S, eta=e,
                                                        generator=g))
            for S in (10, 20, 50, 100, 250)]
    out["reverse SDE (EM), VP"] = [
        (S, lambda x, g, S=S: ds.reverse_sde_sample(sde_score, SDE, x, steps=S, generator=g))
        for S in (50, 100, 250, 1000)]
    out["PC (EM + 1 corrector), VP"] = [
        (2 * S, lambda x, g, S=S: ds.reverse_sde_sample(sde_score, SDE, x, steps=S,
                                                        corrector_steps=1, generator=g))
        for S in (50, 100, 250, 500)]
    for method, per in (("euler", 1), ("heun", 2), ("rk4", 4)):
        out[f"ODE {method}, VP"] = [
            (per * S, lambda x, g, S=S, m=method: ds.ode_sample(sde_score, SDE, x, steps=S,
                                                                method=m))
            for S in (5, 10, 25, 50, 100) if per * S <= 400]
    out["annealed Langevin (L=10)"] = [
        (10 * K + 1, lambda x, g, K=K: ds.annealed_langevin(ncsn_score, 3.0 * x, SIGMAS, eps=2e-5,
                                                            n_steps_each=K, generator=g))
        for K in (5, 20, 100)]
    out["Langevin (clean score, eps=2e-3)"] = [
        (K, lambda x, g, K=K: ds.langevin(clean_score, x, step_size=2e-3, n_steps=K, generator=g))
        for K in (100, 1000, 5000)]
    return out


def quality(x, gen):
    ref = draw_data(len(x), gen)
    mmd = ds_mmd(x, ref)
    logc = log_components(x, torch.ones(len(x), dtype=DT), torch.zeros(len(x), dtype=DT))[0]
    k = logc.argmax(1)
    weights = torch.bincount(k, minlength=3).to(DT) / len(x)
    tv = 0.5 * (weights - WEIGHTS).abs().sum().item()
    spread = torch.stack([(x[k == j] - MEANS[j]).pow(2).mean().sqrt() / STDS[j]
                          for j in range(3)]).mean().item()
    far = ((x[:, None, :] - MEANS).norm(dim=-1) > 5 * STDS).all(1).to(DT).mean().item()
    return mmd, tv, spread, far


BANDWIDTHS = ds.mmd_bandwidths(draw_data(1000, torch.Generator().manual_seed(1)))


def ds_mmd(x, y):
    return ds.mmd2_unbiased(x, y, BANDWIDTHS)


def noise_floor(gen, reps=20):
    """Root mean square of MMD^2 between fresh data sets: its std when the sampler is exact."""
    vals = torch.tensor([ds_mmd(draw_data(N, gen), draw_data(N, gen)) for _ in range(reps)])
    return vals.pow(2).mean().sqrt().item()


def overhead_table():
    """Seconds per sampler step with a free score, over one default-network evaluation."""
    net = default_net()
    x = torch.randn(10_000, 2)
    with torch.no_grad():
        t_net = timeit(lambda: net(x, torch.rand(10_000)))
    free_eps = lambda x, t: x                     # noqa: E731  (costs ~nothing)
    free_score = lambda x, s: x                   # noqa: E731
    sched = ds.Schedule.from_betas(ds.linear_betas())
    sigmas = ds.geometric_sigmas(1.0, 0.01, 10)
    steps = 100
    runs = {
        "ddpm_sample": lambda: ds.ddpm_sample(free_eps, sched, x, steps=steps),
        "ddim_sample": lambda: ds.ddim_sample(free_eps, sched, x, steps=steps, eta=1.0),
        "reverse_sde_sample": lambda: ds.reverse_sde_sample(free_score, SDE, x, steps=steps),
        "PC (1 corrector)": lambda: ds.reverse_sde_sample(free_score, SDE, x, steps=steps // 2,
                                                          corrector_steps=1),
        "ode_sample euler": lambda: ds.ode_sample(free_score, SDE, x, steps=steps, method="euler"),
        "ode_sample rk4": lambda: ds.ode_sample(free_score, SDE, x, steps=steps // 4),
        "annealed_langevin": lambda: ds.annealed_langevin(free_score, x, sigmas,
                                                          n_steps_each=steps // 10),
    }
    print(f"\nOne default-network evaluation at batch 10,000: {1e3 * t_net:.2f} ms")
    print("| sampler | overhead per score evaluation (ms) | fraction of a network evaluation |")
    print("|---|---|---|")
    for name, run in runs.items():
        per = timeit(run) / steps
        print(f"| {name} | {1e3 * per:.3f} | {per / t_net:.1%} |")


def default_net():
    config = ds.TrainConfig()
    return ds.MLP(2, config.width, config.depth)


def timeit(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def likelihood_table(gen):
    x = draw_data(200, gen)
    true = mixture_logp(x)
    print("\nProbability-flow ODE likelihood, exact score and exact divergence, 200 points:")
    print("| solver | steps | NFE | mean abs error (nats/dim) | mean error (nats/dim) |")
    print("|---|---|---|---|---|")
    for method, per in (("euler", 1), ("heun", 2), ("rk4", 4)):
        for steps in (5, 10, 25, 50, 100):
            est = ds.ode_likelihood(sde_score, SDE, x, steps=steps, method=method)["nats"]
            err = (est - true) / 2
            print(f"| {method} | {steps} | {per * steps} | {err.abs().mean():.2e} | "
                  f"{err.mean():+.2e} |")


def main():
    gen = torch.Generator().manual_seed(0)
    floor = noise_floor(gen)
    print(f"2-D mixture of 3 Gaussians, {N} samples per row; MMD^2 noise floor (RMS of MMD^2 "
          f"between fresh data sets) = {floor:.2e}; load average {os.getloadavg()[0]:.1f}\n")
    print("| sampler | NFE | MMD^2 | MMD^2 / floor | mode-weight TV | spread ratio | far |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in samplers().items():
        for nfe, run in rows:
            x = run(torch.randn(N, 2, generator=gen, dtype=DT), gen)
            mmd, tv, spread, far = quality(x, gen)
            print(f"| {name} | {nfe} | {mmd:.2e} | {mmd / floor:+.1f} | {tv:.3f} | "
                  f"{spread:.3f} | {far:.4f} |", flush=True)
    overhead_table()
    likelihood_table(gen)


if __name__ == "__main__":
    main()
