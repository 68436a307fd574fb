"""Fit the few-step time grid of DPM-Solver++ (FORMULAS.md F38) once, on a family of Gaussians.

    OMP_NUM_THREADS=1 python benchmarks/tune_grid.py          (a few minutes on one core)

The criterion (issue 14): at K model calls, W2(output, data) <= F + 0.75 / K^2, F the prior
floor: the W2 to the data of the exact probability-flow ODE from N(0, I) at s = 1 all the way to
the data. The grid lives in lambda = log(alpha / sigma) (half the log-SNR), from lambda_0 =
lambda(1) of VP(0.1, 20), -5.03 (the module starts at max(lambda(1), -5.03)), and its steps shrink
by a constant factor: log(lambda_star - lambda_i) is uniform in i, c = log(lambda_star -
lambda_K). K >= 13 (fit_long): the end lambda_K = 5 (sigma / alpha = 0.007); for each K the
interval of c that meets the criterion with margin (worst (W2 - F) K^2 / 0.75 below 0.8) on every
family member is printed, and the rule c = 18.7 / (K - 1) lies in every interval. K <= 12: the
end lambda_K = 3.5 (sigma / alpha = 0.03: where a full-order last step beats a final denoise, and
away from the smallest noise levels, where trained networks are least accurate; FORMULAS.md F38
says why the switch is at 13). Against the floor to the data no c meets the criterion there on the
family's smallest stds (0.02), so these K were fitted against the floor to their own end: the
rule c = 0.7 + 8.2 / (K - 3) lies in every interval for K = 6..12; at K = 5, where no c works,
four interior nodes are fitted alone (Adam on a smooth maximum over the family), with the first
step corrected as order 3's (F38: the samplers' K = 5 rule): the fit then has more margin, which
a seeded random search spends on the 2-D mixtures below (never the ring). Checked, not fitted,
against the floor to the data on the benchmark Gaussians and the test Gaussian, whose stds start
at 0.05 or more: it holds there for K = 5..20.

For Gaussian data the solver is affine in its start, so its output law, and its W2 distance to the
data, are exact and differentiable in the grid. The family: 16-d diagonal Gaussians (the solver
commutes with rotations, so a diagonal covariance loses nothing), stds from 0.02 to 5 and means
from -4 to 4 in eight pairings, none of them the benchmark Gaussians (mean linspace(-2, 2) with
std logspace 0.1..2; mean linspace(-1, 3) with std logspace 0.05..3) or test_math.py's 3-d one.
The solver here is written from F32 and F37 in torch, not taken from ddpm_score; the result is
then checked with ddpm_score.dpm_solver_sde_sample (VP SDE) on the family.

Off the Gaussians (issue 14, item 3), K = 5: a family of 2-D Gaussian mixtures, none of them the
8-mode ring that bench_samplers.py reports (modes on circles: 3 at radius 1.2, std 0.1; 5 at 1,
std 0.07; 4 at 2, std 0.15; 6 at 1.8, std 0.12; and 3 unequal modes of stds 0.05..0.2), run by
the same 2M from 1,000 fixed N(0, I) starts with their exact x0_hat, scored by the unbiased MMD^2
against 1,000 fixed draws (common random numbers: deterministic and differentiable in the grid).
The script moves the K = 5 nodes from the fitted ones towards later ones and prints the Gaussian
worst beside the mixtures' MMD^2: every move that lowers the mixtures' MMD^2 breaks the Gaussian
criterion (t = 0.1: worst 2.1, MMD^2 1.52e-2 against 0.82, 1.66e-2), and Adam on the mixtures'
MMD^2 under the constraint worst <= 0.95 finds no better feasible point (it ends near the fitted
nodes, at (0.261, 0.442, 0.627, 0.798), worst 0.95, MMD^2 1.83e-2): with 2M uncorrected K = 5 is
a tradeoff. Correcting the first step (2M's only first-order step, and K = 5's longest) lowers the
best worst to 0.48 at (0.319, 0.492, 0.660, 0.812); the random search under worst <= 0.9 then
ends near the module's nodes (0.338, 0.505, 0.673, 0.819) (worst 0.73, mixtures' MMD^2 9.3e-3
against 1.6e-2 uncorrected), which are in F38.
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddpm_score as ds  # noqa: E402

F64 = torch.float64
D, KS, LAM_END, LONG_END = 16, range(5, 21), 3.5, 5.0
K5_NODES = (0.338, 0.505, 0.673, 0.819, 1.0)     # ddpm_score.few_step_grid's K = 5 fractions
K5_NODES_2M = (0.276, 0.449, 0.632, 0.805, 1.0)  # its earlier ones, fitted for 2M uncorrected


def logspace(a, b):
    return torch.logspace(math.log10(a), math.log10(b), D, dtype=F64)


def linspace(a, b):
    return torch.linspace(a, b, D, dtype=F64)


FAMILY = [(linspace(-3, 3), logspace(0.02, 5)),
          (linspace(-3, 3), logspace(0.02, 5).flip(0)),
          (torch.zeros(D, dtype=F64), logspace(0.03, 1)),
          (linspace(-3, 3), logspace(0.3, 5)),
          (linspace(0, 4), logspace(0.02, 0.5)),
          (linspace(-4, 0), logspace(0.5, 4)),
          (linspace(-1, 1), torch.full((D,), 0.1, dtype=F64)),
          (torch.full((D,), 2.0, dtype=F64), torch.ones(D, dtype=F64))]
MU, STD = torch.stack([m for m, _ in FAMILY]), torch.stack([s for _, s in FAMILY])   # (8, D)


def alpha_sigma(lam):
    """VP: alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda)."""
    return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()


def weights(h, nodes):
    """int_0^h e^{u - h} p(u) du = sum_j w_j p(u_j), p through the nodes (F37), written out."""
    e = torch.exp(-h)
    k = (1 - e, h - 1 + e, h * h - 2 * h + 2 - 2 * e)
    if len(nodes) == 1:
        return [k[0]]
    if len(nodes) == 2:
        u0, u1 = nodes
        return [(k[1] - u1 * k[0]) / (u0 - u1), (k[1] - u0 * k[0]) / (u1 - u0)]
    u0, u1, u2 = nodes
    lagrange = lambda a, b, uj: (k[2] - (a + b) * k[1] + a * b * k[0]) / ((uj - a) * (uj - b))
    return [lagrange(u1, u2, u0), lagrange(u0, u2, u1), lagrange(u0, u1, u2)]


def solve(lam, order, mu=MU, std=STD, first=False):
    """(A, b): the solver's output is A x + b per entry, x the N(0, 1) start at lam[0]; first:
    the first step corrected as in order 3 (F38's K = 5 grid)."""
    alpha, sigma = alpha_sigma(lam)
    gain = lambda i: alpha[i] * std ** 2 / (alpha[i] ** 2 * std ** 2 + sigma[i] ** 2)
    x0 = lambda i, A, b: (gain(i) * A, mu + gain(i) * (b - alpha[i] * mu))     # E[x0 | x], affine
    A, b = torch.ones_like(std), torch.zeros_like(std)
    preds, K = [x0(0, A, b)], len(lam) - 1
    for i in range(K):
        h, ratio = lam[i + 1] - lam[i], sigma[i + 1] / sigma[i]
        nodes = [lam[j] - lam[i] for j in range(i, max(i - 2, -1), -1)][:order]
        if order == 2 and i > 0:
            r = -h / (2 * nodes[1])
            w = [(1 - torch.exp(-h)) * (1 + r), -(1 - torch.exp(-h)) * r]
        else:
            w = weights(h, nodes)
        step = lambda w: [ratio * v + alpha[i + 1] * sum(c * p[n] for c, p in zip(w, preds[::-1]))
                          for n, v in enumerate((A, b))]
        A_new, b_new = step(w)
        if i < K - 1:
            preds.append(x0(i + 1, A_new, b_new))
            if order == 3 or (first and i == 0):
                A_new, b_new = step(weights(h, [h] + nodes))
        A, b = A_new, b_new
    return A, b


def w2(A, b, mu=MU, std=STD):
    """W2 from N(b, A^2) (per entry) to N(mu, std^2), per family member."""
    return ((b - mu) ** 2 + (A.abs() - std) ** 2).sum(-1).sqrt()


def floor(lam0, lamK, mu=MU, std=STD):
    """W2 to the data of the exact flow from N(0, 1) at lam0 to lamK: x -> m_K mu + r (x - m_0 mu),
    r = sqrt(C_K / C_0), C = alpha^2 std^2 + sigma^2 (the monotone map between the marginals)."""
    (a0, s0), (a1, s1) = alpha_sigma(lam0), alpha_sigma(lamK)
    r = ((a1 ** 2 * std ** 2 + s1 ** 2) / (a0 ** 2 * std ** 2 + s0 ** 2)).sqrt()
    return w2(r, a1 * mu - r * a0 * mu, mu, std)


def geometric(c, K, lam0, lam_end=LAM_END):
    """lambda_0..lambda_K: log(lambda_star - lambda_i) uniform in i; lambda_star = lam_end + e^c."""
    star = lam_end + math.exp(c)
    u = torch.arange(K + 1, dtype=F64) / K
    return star - (star - lam0) * ((star - lam_end) / (star - lam0)) ** u


def worst(lam, order=2, mu=MU, std=STD, first=False, to_data=False):
    """Per family member, (W2 - F) K^2 / 0.75: at most 1 where the criterion holds. F: the exact
    flow's W2 to the same end, or with to_data all the way to the data (lambda = 40)."""
    K, end = len(lam) - 1, torch.tensor(40.0, dtype=F64) if to_data else lam[-1]
    error = w2(*solve(lam, order, mu, std, first), mu, std) - floor(lam[0], end, mu, std)
    return error * K * K / 0.75


def fit_nodes(K, lam0, iters=300, first=False):
    """Interior nodes as fractions of [lambda_0, LAM_END], Adam on a smooth maximum of worst()."""
    theta = torch.zeros(K, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(iters):
        frac = torch.cat([torch.zeros(1, dtype=F64), torch.softmax(theta, 0).cumsum(0)])
        loss = torch.logsumexp(20 * worst(lam0 + (LAM_END - lam0) * frac, first=first), 0) / 20
        opt.zero_grad()
        loss.backward()
        opt.step()
    return frac.detach()[1:-1], loss.item()


def module_worst(K):
    """worst() of ddpm_score.dpm_solver_sde_sample's default at K calls on the family (VP SDE),
    against the floor to its end (K <= 12) or to the data (K >= 13)."""
    sde, out = ds.VPSDE(), []
    s_end = torch.tensor(ds.few_step_grid(sde, K)[-1:], dtype=F64)
    (m0, m1), (sd0, sd1) = sde.marginal_coefs(torch.tensor([1.0, s_end.item()], dtype=F64))
    for mu, std in FAMILY:
        def score(x, s):
            m, sd = sde.marginal_coefs(s[:1].double())
            return -(x - m * mu) / (m * m * std ** 2 + sd ** 2)
        x = torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)])
        y = ds.dpm_solver_sde_sample(score, sde, x, steps=K)
        A, b = (y[1:] - y[0]).diagonal(), y[0]
        end = torch.log(m1 / sd1) if K <= 12 else torch.tensor(40.0, dtype=F64)
        F = floor(torch.log(m0 / sd0), end, mu, std)
        out.append(((w2(A, b, mu, std) - F) * K * K / 0.75).item())
    return max(out)


def circle(k, radius, std):
    a = 2 * math.pi * torch.arange(k, dtype=F64) / k + 0.3
    return (radius * torch.stack([a.cos(), a.sin()], 1), torch.full((k,), std, dtype=F64),
            torch.full((k,), 1 / k, dtype=F64))


MIXTURES = [circle(3, 1.2, 0.1), circle(5, 1.0, 0.07), circle(4, 2.0, 0.15),
            circle(6, 1.8, 0.12),
            (torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]], dtype=F64),
             torch.tensor([0.05, 0.2, 0.1], dtype=F64), torch.tensor([0.3, 0.5, 0.2], dtype=F64))]


def mixture_x0(x, lam, mu, std, w):
    """E[x0 | x] for sum_k w_k N(mu_k, std_k^2 I) at x = alpha x0 + sigma eps."""
    a, s = alpha_sigma(lam)
    var = a * a * std * std + s * s
    d = x[:, None, :] - a * mu
    post = torch.softmax(torch.log(w) - torch.log(var) - d.square().sum(-1) / (2 * var), 1)
    return (post[..., None] * (mu + (a * std * std / var)[:, None] * d)).sum(1)


def solve_mixture(lam, x, mixture, first=False):
    """2M (F37) on the points x from lam[0] to lam[-1], one x0 prediction per step; first: the
    first step corrected with the nodes (h, 0)."""
    alpha, sigma = alpha_sigma(lam)
    preds = [mixture_x0(x, lam[0], *mixture)]
    for i in range(len(lam) - 1):
        h, d, x_cur = lam[i + 1] - lam[i], preds[-1], x
        if i > 0:
            r = h / (2 * (lam[i] - lam[i - 1]))
            d = (1 + r) * preds[-1] - r * preds[-2]
        x = sigma[i + 1] / sigma[i] * x_cur - alpha[i + 1] * torch.expm1(-h) * d
        if i < len(lam) - 2:
            preds.append(mixture_x0(x, lam[i + 1], *mixture))
            if first and i == 0:
                w = weights(h, [h, torch.zeros_like(h)])
                x = sigma[1] / sigma[0] * x_cur + alpha[1] * (w[0] * preds[1] + w[1] * preds[0])
    return x


def mixture_mmd(lam, n=1000, first=False):
    """Per family mixture, MMD^2 of the 2M output from n fixed starts to n fixed draws."""
    g = torch.Generator().manual_seed(7)
    start, out = torch.randn(n, 2, generator=g, dtype=F64), []
    for mu, std, w in MIXTURES:
        k = torch.multinomial(w, n, replacement=True, generator=g)
        truth = mu[k] + std[k, None] * torch.randn(n, 2, generator=g, dtype=F64)
        out.append(ds.mmd2_unbiased(solve_mixture(lam, start, (mu, std, w), first), truth,
                                    ds.mmd_bandwidths(truth)))
    return torch.tensor(out, dtype=F64)


def mixture_tradeoff(lam0):
    """K = 5: the fitted nodes moved a fraction t of the way to later ones (0.33, 0.53, 0.70,
    0.85): Gaussian worst against the mixtures' mean MMD^2."""
    fitted, late = torch.tensor(K5_NODES_2M[:4], dtype=F64), torch.tensor([0.33, 0.53, 0.70,
                                                                         0.85], dtype=F64)
    print("K = 5, nodes moved towards later ones by t: Gaussian worst, mixtures' MMD^2 (mean)")
    ends = (torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64))
    for t in (0.0, 0.1, 0.25, 0.5, 1.0):
        frac = torch.cat([ends[0], fitted + t * (late - fitted), ends[1]])
        lam = lam0 + (LAM_END - lam0) * frac
        print(f"t = {t:.2f}: nodes {[round(f, 3) for f in frac[1:-1].tolist()]}, worst "
              f"{worst(lam).max():.2f}, MMD^2 {mixture_mmd(lam).mean():.2e}", flush=True)


def mmd2_torch(x, y, bandwidths):
    """ds.mmd2_unbiased kept differentiable (x, y (n, 2), equal n)."""
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h))  # noqa: E731
                         for h in bandwidths) / len(bandwidths)
    off = lambda m: (m.sum() - m.diagonal().sum()) / (len(m) * (len(m) - 1))  # noqa: E731
    return off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()


def fit_mixtures(lam0, cap=0.95, iters=100, n=1000):
    """K = 5 refit: Adam on the mixtures' mean MMD^2 from the fitted nodes, with the Gaussian
    criterion as a penalty above cap (smooth maximum of worst())."""
    g = torch.Generator().manual_seed(7)
    start, truths = torch.randn(n, 2, generator=g, dtype=F64), []
    for mu, std, w in MIXTURES:
        k = torch.multinomial(w, n, replacement=True, generator=g)
        truths.append(mu[k] + std[k, None] * torch.randn(n, 2, generator=g, dtype=F64))
    theta = torch.tensor(K5_NODES_2M, dtype=F64).diff(prepend=torch.zeros(1, dtype=F64)).log()
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.02)
    for _ in range(iters):
        frac = torch.cat([torch.zeros(1, dtype=F64), torch.softmax(theta, 0).cumsum(0)])
        lam = lam0 + (LAM_END - lam0) * frac
        gauss = torch.logsumexp(20 * worst(lam), 0) / 20
        mmd = sum(mmd2_torch(solve_mixture(lam, start, m), t, ds.mmd_bandwidths(t))
                  for m, t in zip(MIXTURES, truths)) / len(MIXTURES)
        loss = 1e3 * mmd + 1e4 * torch.relu(gauss - cap) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"K = 5 refitted on the mixtures under worst <= {cap}: nodes "
          f"{[round(f, 3) for f in frac[1:-1].tolist()]}, worst {gauss.item():.2f}, MMD^2 "
          f"{mmd.item():.2e}", flush=True)


def fit_long(lam0, lam_end=LONG_END):
    """K >= 13: the end at lambda = 5 and the floor to the data; for each K the interval of c with
    worst < 0.8 on every member, then the rule c = b / (K - 1) with the widest margin in all."""
    print(f"K >= 13: c = log(lambda_star - {lam_end}) meeting the criterion (floor to the data) "
          "with margin on every member:")
    grid, ok = torch.arange(0.5, 4.0, 0.01).tolist(), {}
    for K in range(13, 21):
        good = [c for c in grid
                if worst(geometric(c, K, lam0, lam_end), to_data=True).max() < 0.8]
        ok[K] = (min(good), max(good)) if good else None
        print(f"K = {K:2d}: " + (f"{ok[K][0]:.2f} .. {ok[K][1]:.2f}" if good else "none"),
              flush=True)
    if None in ok.values():
        return print("no rule: some K has no interval")
    margin = lambda b: min(min(b / (K - 1) - lo, hi - b / (K - 1))  # noqa: E731
                           for K, (lo, hi) in ok.items())
    b = max(torch.arange(5, 30, 0.1).tolist(), key=margin)
    print(f"rule c = b / (K - 1): b = {b:.1f} (module: 18.7), least margin {margin(b):.3f}")


def search_corrected(lam0, start, cap=0.9, tries=60, scale=0.02):
    """K = 5 with the first step corrected (F38): from the Gaussian fit, a seeded random search
    (moves of the interior fractions by scale N(0, 1), kept if increasing and worst <= cap) that
    keeps a move when it lowers the mixtures' mean MMD^2; tries counts the feasible moves."""
    g, inner = torch.Generator().manual_seed(1), torch.tensor(start, dtype=F64)
    lam_of = lambda f: lam0 + (LAM_END - lam0) * torch.cat(  # noqa: E731
        [torch.zeros(1, dtype=F64), f, torch.ones(1, dtype=F64)])
    best, n = mixture_mmd(lam_of(inner), first=True).mean().item(), 0
    while n < tries:
        cand = inner + scale * torch.randn(len(inner), generator=g, dtype=F64)
        if not (0 < cand[0] and cand[-1] < 1 and bool((cand.diff() > 0).all())):
            continue
        if worst(lam_of(cand), first=True).max() > cap:
            continue
        n += 1
        mmd = mixture_mmd(lam_of(cand), first=True).mean().item()
        if mmd < best:
            inner, best = cand, mmd
    print(f"K = 5, first step corrected, nodes searched on the mixtures under worst <= {cap}: "
          f"{[round(f, 3) for f in inner.tolist()]}, worst "
          f"{worst(lam_of(inner), first=True).max():.2f}, MMD^2 {best:.2e}; the module's "
          f"{list(K5_NODES[:4])}: worst "
          f"{worst(lam_of(torch.tensor(K5_NODES[:4], dtype=F64)), first=True).max():.2f}, MMD^2 "
          f"{mixture_mmd(lam_of(torch.tensor(K5_NODES[:4], dtype=F64)), first=True).mean():.2e}",
          flush=True)


def main():
    torch.set_num_threads(1)
    lam0 = torch.tensor(-5.025, dtype=F64)
    print(f"K <= 12: c = log(lambda_star - {LAM_END}) meeting the criterion (floor to the same "
          "end) with margin on every member:")
    for K in range(6, 13):
        ok = [c for c in torch.linspace(-0.5, 6, 66).tolist()
              if worst(geometric(c, K, lam0)).max() < 0.8]
        rule = 0.7 + 8.2 / (K - 3)
        at_rule = worst(geometric(rule, K, lam0)).max()
        print(f"K = {K:2d}: {f'{min(ok):.1f} .. {max(ok):.1f}' if ok else 'none'}; the rule "
              f"0.7 + 8.2 / (K - 3) = {rule:.2f}, worst {at_rule:.2f}", flush=True)
    fit_long(lam0)
    frac, loss = fit_nodes(5, lam0)
    print(f"K = 5 fitted alone: fractions {[round(f, 3) for f in frac.tolist()]}, "
          f"worst {loss:.2f}")
    mixture_tradeoff(lam0)
    fit_mixtures(lam0)
    frac, loss = fit_nodes(5, lam0, first=True)
    print(f"K = 5 fitted alone, first step corrected: fractions "
          f"{[round(f, 3) for f in frac.tolist()]}, worst {loss:.2f}")
    search_corrected(lam0, [round(f, 3) for f in frac.tolist()[:4]])
    print("ddpm_score's default, worst over the family per K:",
          {K: round(module_worst(K), 2) for K in KS})


if __name__ == "__main__":
    main()
