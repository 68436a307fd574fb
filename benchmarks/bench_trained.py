"""Few-step sampling of trained models (issue 14, item 3): quality per sampler and step count.

    python benchmarks/bench_trained.py            (or `make bench`; about 8 minutes on 1 thread)

Two runs, each trained once into a temporary folder with the command line, then sampled here:
1. moons: the default run, `python ddpm_score.py train --threads 1` (ddpm, linear T = 1000, the
   3-layer 256-wide MLP, 2,000 steps). 2,000 samples per sampler and step count, sampling seeds
   0, 1, 2; the unbiased MMD^2 to 2,000 held-out points (RBF kernels at 1/8..1 of the median
   distance, as `train` and `sample` print it) divided by the noise floor (the RMS MMD^2 between
   two held-out sets of 2,000, over 10 pairs), the mean over the seeds.
2. shapes8: 8x8 gray images, the built-in 16x16 shapes (disk, square, triangle, cross) averaged
   over 2x2 blocks, 20,000 in a .pt file (10% held out), a UNet with 16 base channels, 3,000
   steps. 500 samples per setting, seed 0; two metrics on the 64 pixels against 500 held-out
   images, each beside its noise floor from held-out against held-out: MMD^2 / floor as above,
   and the Frechet distance of pixel means and covariances, |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^(1/2)
   C2 C1^(1/2))^(1/2)), whose floor is its mean over 5 pairs of held-out sets of 500 (it is biased
   upwards at a finite size, so the floor is its value for a perfect model, not 0).
Samplers: --sampler dpm++ at 5, 10, 20 steps, ddim at 10 and 20, ancestral at 1,000. NFE is
counted with a forward hook on the network (per batch), not read off the step count.
"""
import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ddpm_score as ds  # noqa: E402

torch.set_num_threads(1)
SETTINGS = [("dpm++", 5), ("dpm++", 10), ("dpm++", 20), ("ddim", 10), ("ddim", 20),
            ("ancestral", 1000)]


def train(out, *args):
    """`python ddpm_score.py train --threads 1 --out OUT ARGS` in a subprocess; its seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "ddpm_score.py", "train", "--threads", "1", "--out",
                           str(out), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"training {out} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def sample(m, sampler, steps, n, seed):
    """(n samples, NFE per sample) from run m; the NFE counted by a hook on the network."""
    calls = []
    hook = m.net.register_forward_hook(lambda *_: calls.append(1))
    with contextlib.redirect_stderr(io.StringIO()):      # the progress line
        x = ds.draw_samples(m, n, sampler=sampler, steps=steps, seed=seed)
    hook.remove()
    return x, len(calls) // math.ceil(n / 2000)


def frechet(a, b):
    """Frechet distance of the means and covariances of a and b (n, ...) flattened, float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(c):
        lam, v = torch.linalg.eigh(c)
        return v @ torch.diag(lam.clamp(min=0).sqrt()) @ v.T
    root = sqrtm(ca)
    return ((a.mean(0) - b.mean(0)).square().sum()
            + torch.trace(ca + cb - 2 * sqrtm(root @ cb @ root))).item()


def held_out_pairs(x_test, k, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(x_test[i[:k]], x_test[i[k:2 * k]])
            for i in (torch.randperm(len(x_test), generator=g) for _ in range(count))]


def table(title, m, x_test, n, seeds, metrics):
    """Print a row per setting: NFE, then each metric(samples) over seeds, and the seconds."""
    print(f"\n{title}\n| sampler | steps | NFE | " + " | ".join(metrics) + " | seconds |")
    print("|---|---|---|" + "---|" * (len(metrics) + 1))
    for sampler, steps in SETTINGS:
        start, values = time.perf_counter(), {name: [] for name in metrics}
        for seed in seeds:
            x, nfe = sample(m, sampler, steps, n, seed)
            for name, fn in metrics.items():
                values[name].append(fn(x))
        cells = [f"{sum(v) / len(v):.2f}" for v in values.values()]
        print(f"| {sampler} | {steps} | {nfe} | " + " | ".join(cells) +
              f" | {time.perf_counter() - start:.0f} |", flush=True)


def moons(root):
    seconds = train(root / "moons")
    m = ds.load_run(root / "moons")
    x_test, k = ds.get_data(m.config).x_test, 2000
    h = ds.mmd_bandwidths(x_test)
    floor = math.sqrt(sum(ds.mmd2_unbiased(a, b, h) ** 2
                          for a, b in held_out_pairs(x_test, k, 10)) / 10)
    table(f"1. moons, the default run (trained in {seconds:.0f} s); MMD^2 / noise floor "
          f"({floor:.2e}), 2,000 samples, mean of seeds 0-2", m, x_test, k, (0, 1, 2),
          {"MMD^2 / floor": lambda x: ds.mmd2_unbiased(x, x_test[:k], h) / floor})


def shapes8(root):
    x, y = ds.shapes(20_000, ds.rng(0, "shapes8"))
    torch.save({"x": F.avg_pool2d(x, 2), "y": y}, root / "shapes8.pt")
    seconds = train(root / "shapes8", "--data", root / "shapes8.pt", "--channels", 16,
                    "--steps", 3000, "--n-samples", 0)
    m = ds.load_run(root / "shapes8")
    x_test, k = ds.get_data(m.config).x_test, 500
    h, ref = ds.mmd_bandwidths(x_test), x_test[-k:]      # the floors use the first 1,500
    pairs = held_out_pairs(x_test[:-k], k, 10)
    mmd_floor = math.sqrt(sum(ds.mmd2_unbiased(a, b, h) ** 2 for a, b in pairs) / 10)
    fd_floor = sum(frechet(a, b) for a, b in pairs[:5]) / 5
    table(f"2. shapes8, 8x8 images, UNet 16 channels, 3,000 steps (trained in {seconds:.0f} s); "
          f"pixel MMD^2 / noise floor ({mmd_floor:.2e}) and pixel Frechet distance (held-out "
          f"against held-out: {fd_floor:.3f}), 500 samples, seed 0", m, x_test, k, (0,),
          {"MMD^2 / floor": lambda x: ds.mmd2_unbiased(x, ref, h) / mmd_floor,
           "Frechet (pixels)": lambda x: frechet(x, ref)})


def main():
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, 1 thread, load "
          f"average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    only = sys.argv[1:] or ["moons", "shapes8"]
    with tempfile.TemporaryDirectory() as root:
        for name in only:
            {"moons": moons, "shapes8": shapes8}[name](Path(root))


if __name__ == "__main__":
    main()
