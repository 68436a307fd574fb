"""Training benchmark: throughput, and the wall time, sample quality and memory of `make train`.

    python benchmarks/bench_train.py            (or `make bench`; about 2 minutes on 2 cores)

1. Throughput: optimizer steps per second of the default TrainConfig (moons, ddpm, the 3-layer
   256-wide MLP; and shapes, the UNet) with 1 and 2 CPU threads (the figures behind the default
   --threads 1), and on CUDA (float32 and bf16 autocast) where present.
2. The default run, `python ddpm_score.py train` in a subprocess exactly as `make train` runs it:
   wall time, final loss, the unbiased MMD^2 of its samples to held-out data next to the noise
   floor (the standard deviation of MMD^2 between two held-out sets of the same size), and the
   peak resident memory of that process (resource.getrusage of the child).
Targets (issues 4 and 9): the default run in under 60 s on 2 CPU cores, MMD^2 within 3x the
noise floor.
Other work on the same cores slows multi-threaded torch far more than single-threaded torch, so
the load average is printed next to the numbers.
"""
import contextlib
import io
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ddpm_score as ds  # noqa: E402


def steps_per_second(device, threads=1, amp=False, data="moons", warmup=20, steps=200):
    """Optimizer steps per second of the default TrainConfig for `data` (no sampling): the time of
    warmup + steps steps minus that of warmup steps, so set-up and data drawing cancel."""
    torch.set_num_threads(threads)
    seconds = []
    for total in (warmup, warmup + steps):
        config = ds.TrainConfig(device=device, amp=amp, data=data, n_samples=0, steps=total,
                                n_train=5000, out=tempfile.mkdtemp())
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            ds.train(config)  # ends with .item() on the loss, so CUDA is synchronized
        seconds.append(time.perf_counter() - start)
    return steps / (seconds[1] - seconds[0])


def throughput_table():
    """Steps/s with 1 and 2 threads, twice each, interleaved (the load changes as it runs)."""
    print("| data | device | threads | autocast | steps/s (two runs) |")
    print("|---|---|---|---|---|")
    threads = torch.get_num_threads()
    for data, steps in (("moons", 200), ("shapes", 20)):
        for n in sorted({1, min(2, os.cpu_count() or 1)}):
            rates = [steps_per_second("cpu", n, data=data, steps=steps) for _ in range(2)]
            print(f'| {data} | cpu | {n} | - | {rates[0]:.1f}, {rates[1]:.1f} |')
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        for amp in (False, True):
            rate = steps_per_second("cuda", amp=amp)
            print(f'| moons | cuda | - | {"bf16" if amp else "-"} | {rate:.1f} |')


def default_run():
    """`python ddpm_score.py train` into a temporary folder: (seconds, stdout, peak RSS MiB)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "ddpm_score.py", "train", "--out", out],
                              cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the default run failed:\n{done.stderr[-2000:]}")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return seconds, done.stdout, peak_mib


def main():
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"default {torch.get_num_threads()}"
          f" threads, load average {os.getloadavg()[0]:.2f}\n")
    throughput_table()
    seconds, stdout, peak_mib = default_run()
    mmd2, floor = map(float, re.search(r"held-out data (\S+), noise floor (\S+)", stdout).groups())
    loss = re.search(r"final loss (\S+);", stdout)[1]
    print(f"\nDefault run (`python ddpm_score.py train`, load average {os.getloadavg()[0]:.2f}):")
    print("| wall time (s) | final loss | MMD^2 | noise floor | MMD^2 / floor | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    print(f"| {seconds:.1f} | {loss} | {mmd2:.2e} | {floor:.2e} | {mmd2 / floor:.2f} | "
          f"{peak_mib:.0f} |")
    ok_time, ok_quality = seconds < 60, mmd2 < 3 * floor
    print(f'\ntarget wall time < 60 s: {"met" if ok_time else "MISSED"}; '
          f'target MMD^2 < 3 x floor: {"met" if ok_quality else "MISSED"}')


if __name__ == "__main__":
    main()
