"""Likelihood benchmark: bits/dim of a DDPM on 17-level 8x8 digits-like images (no download).

    python benchmarks/bench_nll.py [--steps N] [--out DIR]  (or `make bench`; ~30 min, 1 thread)

1. Data: the ten digits of a 5x7 bitmap font drawn on a 32x32 canvas with a random scale, shift,
   stroke thickness and flipped pixels, then counted in 4x4 blocks (as the UCI 8x8 digits were
   made): values 0..16, K = 17 levels, x = k / 8 - 1. 1,500 training and 300 test images, seeded.
2. Two ddpm runs with the command line (`train --data train.pt --threads 1 --n-samples 0`), of N
   and 2N steps, and `nll --data test.pt` on each: the ELBO with the K-level discretized decoder
   (F36) and the dequantized ODE (F27, 20 RK4 steps: 100 agree within 1e-4 bits on these runs),
   both bits per 17-level value; beside them the old number, the ELBO of a Gaussian decoder on
   dequantized data minus log2(2/16), on the same model and examples.
3. For the longer run: the share of the bound from t <= 20 (per-t split of vlb_bpd's terms over
   the test set) and the network's eps error, the RMS of eps_theta - eps per value, at t = 1..5.
Prints the date, torch, threads and the load average (the machine is shared) with the numbers.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ddpm_score as ds  # noqa: E402

FONT = {  # 5x7 bitmaps, one string of 5 characters per row
    0: ".###.#...##..###.#.###..##...#.###.", 1: "..#...##....#....#....#....#...###.",
    2: ".###.#...#....#...#...#...#...#####", 3: "####.....#...#...##.....##...#.###.",
    4: "...#...##..#.#.#..#.#####...#....#.", 5: "######....####.....#....##...#.###.",
    6: "..##..#...#....####.#...##...#.###.", 7: "#####....#...#...#...#....#....#...",
    8: ".###.#...##...#.###.#...##...#.###.", 9: ".###.#...##...#.####....#...#..##..",
}


def digits(n, generator):
    """n images (n, 1, 8, 8) with values k / 8 - 1, k in 0..16, and their labels (n,)."""
    y = torch.randint(0, 10, (n,), generator=generator)
    canvas = torch.zeros(n, 1, 32, 32)
    for i in range(n):
        glyph = FONT[int(y[i])]
        bitmap = torch.tensor([[c == "#" for c in glyph[5 * r:5 * r + 5]] for r in range(7)])
        sx, sy = (int(v) for v in torch.randint(3, 5, (2,), generator=generator))  # scale
        big = bitmap.repeat_interleave(sy, 0).repeat_interleave(sx, 1).float()
        h, w = big.shape
        top = int(torch.randint(0, 32 - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, 32 - w + 1, (1,), generator=generator))
        canvas[i, 0, top:top + h, left:left + w] = big
    thick = torch.rand(n, 1, 1, 1, generator=generator) < 0.5  # thicker strokes for half
    canvas = torch.where(thick, torch.nn.functional.max_pool2d(canvas, 3, 1, 1), canvas)
    flip = torch.rand(canvas.shape, generator=generator) < 0.03  # pixel noise
    canvas = torch.where(flip, 1 - canvas, canvas)
    k = torch.nn.functional.avg_pool2d(canvas, 4) * 16  # on-pixels per 4x4 block: 0..16
    return k.round() / 8 - 1, y


def run(*argv):
    """The command line in a subprocess, one thread; returns its stdout."""
    done = subprocess.run([sys.executable, str(ROOT / "ddpm_score.py"), *map(str, argv),
                           "--threads", "1"], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.stdout


def printed(stdout):
    """{'elbo': (mean, se), 'ode': (mean, se)} from `nll`'s output."""
    return {m[1]: (float(m[2]), float(m[3]))
            for m in re.finditer(r"^(\w+) bits/dim (\S+) \+- (\S+)", stdout, re.M)}


@torch.no_grad()
def dequantized_gaussian_elbo(m, x, levels=17, seed=0):
    """The old `nll` number: vlb_bpd with the Gaussian decoder on x + w (u - 1/2), - log2 w."""
    w = 2 / (levels - 1)
    y = x + w * (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) - 0.5)
    out = ds.vlb_bpd(ds.eps_model_of(m.net, m.process), m.process, y, decoder="gaussian",
                     generator=torch.Generator().manual_seed(seed))
    return out["total"] - math.log2(w)


@torch.no_grad()
def per_t_split(m, x, t_max=20, levels=17, seed=0):
    """(share of the bound from t <= t_max, RMS eps error at t = 1..5, the bound) on x."""
    out = ds.vlb_bpd(ds.eps_model_of(m.net, m.process), m.process, x, levels=levels,
                     generator=torch.Generator().manual_seed(seed))
    share = out["terms"][:, :t_max].sum(1).mean() / out["total"].mean()
    g, errors = torch.Generator().manual_seed(seed), []
    for step in range(1, 6):
        t = torch.full((len(x),), step)
        eps = torch.randn(x.shape, generator=g)
        xt = ds.q_sample(m.process, x, t, eps)
        errors.append((ds.eps_model_of(m.net, m.process)(xt, t) - eps).pow(2).mean().sqrt())
    return share.item(), [e.item() for e in errors], out["total"].mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="N: the runs train N and 2N")
    parser.add_argument("--ode-steps", type=int, default=20, help="nll's RK4 steps")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits(1800, torch.Generator().manual_seed(0))
    torch.save({"x": x[:1500], "y": y[:1500]}, out / "train.pt")
    torch.save({"x": x[1500:], "y": y[1500:]}, out / "test.pt")
    assert ds.grid_levels(x) == 17
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, "
          f"1 thread, load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    print(f"data: 1,500 / 300 digits-like 8x8 images, 17 levels, pixel mean "
          f"{(x + 1).mean().item() * 8:.2f} of 16\n")
    print("| steps | train s | elbo, F36 (bits/dim) | old: dequantized Gaussian decoder | ode "
          "(dequantized) | nll s |")
    print("|---|---|---|---|---|---|")
    for steps in (args.steps, 2 * args.steps):
        run_dir, start = out / f"run{steps}", time.time()
        run("train", "--data", out / "train.pt", "--holdout", 0.01, "--batch-size", 64,
            "--steps", steps, "--n-samples", 0, "--out", run_dir, "--overwrite")
        trained, start = time.time() - start, time.time()
        nums = printed(run("nll", "--run", run_dir, "--data", out / "test.pt", "--n", 300,
                           "--steps", args.ode_steps))
        took = time.time() - start
        m = ds.load_run(run_dir)
        old = dequantized_gaussian_elbo(m, x[1500:])
        print(f"| {steps} | {trained:.0f} | {nums['elbo'][0]:.3f} +- {nums['elbo'][1]:.3f} | "
              f"{old.mean().item():.3f} +- {old.std().item() / math.sqrt(len(old)):.3f} | "
              f"{nums['ode'][0]:.3f} +- {nums['ode'][1]:.3f} | {took:.0f} |", flush=True)
    share, errors, bound = per_t_split(m, x[1500:])
    print(f"\n{2 * args.steps} steps: bound {bound:.3f} bits/dim, {share:.0%} of it from t <= 20; "
          "RMS eps error at t = 1..5: " + ", ".join(f"{e:.2f}" for e in errors))


if __name__ == "__main__":
    main()
