"""Tests of the program around the math: training lowers the loss and yields samples close to the
data for every method; every number `nll` prints is pinned against an independent computation;
the command line works end to end (the README's commands verbatim, from a folder holding only the
module); checkpoints round-trip and resume exactly; nothing is lost, nothing global is changed;
every bad flag is one line and exit 2 before any work.

Kept small: the whole file runs in about 100 s on 2 CPU cores (the CLI runs are shared between
tests through module-scoped fixtures).
"""
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ddpm_score as ds

HERE = Path(__file__).resolve().parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = torch.float64

# Per method: a sampler and step count that are quick and good enough for the smoke test.
QUICK_SAMPLERS = {"ddpm": ("ancestral", 200), "ncsn": ("als", 10), "vp": ("em", 200),
                  "ve": ("pc", 100), "subvp": ("ode", 25)}


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train faster on one thread, and far faster when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(out, **changes):
    """A config that trains in about a second: a small MLP on moons, no final samples."""
    config = ds.TrainConfig(data="moons", steps=600, batch_size=128, lr=3e-3, width=64, depth=2,
                            ema=0.98, n_train=5000, n_samples=0, log_every=50, ckpt_every=10**6,
                            out=str(out), device="cpu")
    return replace(config, **changes)


def env_without_numpy(tmp):
    """Environment for a subprocess: one thread, and a `numpy` that fails to import (as on a fresh
    install without NumPy, where torch warns at import)."""
    fake = Path(tmp) / "no_numpy" / "numpy"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\")\n")
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(fake.parent)}


def read_png(path):
    """An independent PNG reader (8-bit gray or RGB, filter type 0 rows as write_png makes):
    checks the signature and every chunk's CRC; returns (width, height, channels, pixel rows)."""
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        chunks[kind] = chunks.get(kind, b"") + data
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color in (0, 2) and b"IEND" in chunks
    channels = 1 if color == 0 else 3
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(pixels) == height * (1 + width * channels)
    return width, height, channels, pixels


def one_line_error(capsys, argv):
    """Run main(argv); it must exit with code 2 after one line on stderr. Returns that line."""
    capsys.readouterr()  # forget earlier output
    with pytest.raises(SystemExit) as exit:
        ds.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def as_model(config, net, process, shape):
    return ds.Model(config, net, process, shape, None)


# --- training works ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ds.METHODS))
def test_cpu_training_lowers_the_loss_and_samples_approach_the_data(tmp_path, method):
    """Margin: the samples' MMD^2 to held-out data is under 1/4 of the prior's (measured: 0.02 to
    0.19 of it after these 600 steps; an untrained network scores 1 to 8 times the prior's, and
    the noise floor of MMD^2 at 500 vs 500 points is about 0.03 of it)."""
    config = small_config(tmp_path, method=method)
    result = ds.train(config)
    log = result.paths["loss.csv"].read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in log]
    assert losses[-1] < 0.85 * losses[0], losses
    m = ds.load_run(tmp_path)
    x_test = ds.get_data(m.config).x_test
    h = ds.mmd_bandwidths(x_test)
    sampler, steps = QUICK_SAMPLERS[method]
    x = ds.draw_samples(m, 500, sampler=sampler, steps=steps, seed=1)
    prior = ds.METHODS[method].prior(m.process, (500, 2), ds.rng(2), "cpu")
    mmd2 = ds.mmd2_unbiased(x, x_test[:500], h)
    prior_mmd2 = ds.mmd2_unbiased(prior, x_test[:500], h)
    assert mmd2 < prior_mmd2 / 4, (mmd2, prior_mmd2)


@CUDA
@pytest.mark.parametrize("method", sorted(ds.METHODS))
def test_cuda_bf16_training_lowers_the_loss(tmp_path, method):
    """The same on CUDA under bf16 autocast: the loss falls and the samples are finite."""
    result = ds.train(small_config(tmp_path, method=method, device="cuda", amp=True))
    losses = [row[1] for row in ds.load_checkpoint(result.paths["ckpt.pt"])["loss_log"].tolist()]
    assert losses[-1] < 0.85 * losses[0], losses
    x = ds.draw_samples(ds.load_run(tmp_path, "cuda"), 100, steps=20, device="cuda")
    assert torch.isfinite(x).all()


def test_ema_with_decay_0_equals_the_live_model_and_averages_after_its_warm_up(tmp_path):
    """Decay 0: the EMA is the live model. Decay 0.9 with a warm-up of 28 steps: the EMA equals
    the live weights w_28 after step 28, and after step 30 it is 0.9 (0.9 w_28 + 0.1 w_29) +
    0.1 w_30, with w_k read off the same run stopped at 28, 29, 30 steps (resume is exact);
    tolerance: float32 rounding of three multiply-adds, rtol 1e-5."""
    result = ds.train(small_config(tmp_path / "a", steps=20, ema=0.0, ema_warmup=0))
    for (name, live), ema in zip(result.net.state_dict().items(), result.ema.state_dict().values()):
        assert torch.equal(live, ema), name
    config, w = small_config(tmp_path / "b", ema=0.9, ema_warmup=28, lr_decay=False), []
    for steps in (28, 29, 30):
        ds.train(replace(config, steps=steps, resume=steps > 28))
        w.append(ds.load_checkpoint(tmp_path / "b" / "ckpt.pt"))
    for name, ema in w[2]["ema"].items():
        assert torch.equal(w[0]["ema"][name], w[0]["model"][name]), name
        expected = 0.9 * (0.9 * w[0]["model"][name] + 0.1 * w[1]["model"][name]) \
            + 0.1 * w[2]["model"][name]
        torch.testing.assert_close(ema, expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(ema, w[2]["model"][name]), name


# --- checkpoints, resuming, DDP, nothing lost, nothing global ------------------------------------


def same_weights(ckpt_a, ckpt_b):
    """Two checkpoints hold bitwise the same model, EMA and Adam state."""
    a, b = ds.load_checkpoint(ckpt_a), ds.load_checkpoint(ckpt_b)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for state_a, state_b in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    return a, b


def test_resume_gives_the_same_weights_as_training_straight(tmp_path):
    """N steps, then N more with resume, equals 2N straight (constant lr: the schedule does not
    depend on the total); a new total below the steps done is refused. The checkpoint is tensors
    only and a DDP 'module.' prefix is stripped."""
    config = small_config(tmp_path / "a", steps=40, ckpt_every=7, log_every=10, lr_decay=False)
    straight = ds.train(config)
    ds.train(replace(config, steps=20, out=str(tmp_path / "b")))
    resumed = ds.train(replace(config, out=str(tmp_path / "b"), resume=True))
    a, b = same_weights(straight.paths["ckpt.pt"], resumed.paths["ckpt.pt"])
    assert int(b["step"]) == 40 and torch.equal(a["loss_log"][:, :2], b["loss_log"][:, :2])
    with pytest.raises(ValueError, match="steps: 30 is below the 40 steps done"):
        ds.train(replace(config, steps=30, out=str(tmp_path / "b"), resume=True))
    state = torch.load(straight.paths["ckpt.pt"], weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "ddp.pt")
    assert ds.load_checkpoint(tmp_path / "ddp.pt")["model"].keys() == a["model"].keys()


def test_ddp_two_gloo_processes_keep_identical_weights_and_write_one_checkpoint(tmp_path):
    """Under torchrun: the script joins the process group (as a library caller must) and train()
    trains with DDP: identical weights on both ranks, one checkpoint, written by rank 0. Then the
    command line, in two processes given the environment torchrun sets (RANK, WORLD_SIZE,
    MASTER_ADDR, ...), joins the group itself, trains and leaves it."""
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import ddpm_score as ds\n"
        "torch.distributed.init_process_group('gloo')\n"
        f"config = ds.TrainConfig(steps=20, batch_size=64, width=32, depth=1, n_train=2000,\n"
        f'                        n_samples=0, out={str(tmp_path / "run")!r}, device="cpu")\n'
        "result = ds.train(config)\n"
        "assert torch.distributed.is_initialized()\n"
        f"out = {str(tmp_path)!r} + '/rank' + os.environ['RANK'] + '.pt'\n"
        "torch.save(result.net.state_dict(), out)\n"
        "torch.distributed.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with ending([subprocess.Popen([*run, str(script)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)]) as (done,):
        err = done.communicate(timeout=120)[1]
    assert done.returncode == 0, err[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt", "config.json",
                                                                  "loss.csv"]
    assert int(ds.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"]) == 20
    cli = [sys.executable, str(HERE / "ddpm_score.py"), "train", "--steps", "5", "--width", "16",
           "--n-train", "500", "--n-samples", "0", "--out", str(tmp_path / "cli")]
    with two_ranks(cli, env) as ranks:
        errs = [proc.communicate(timeout=120)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0] and "step 5/5" in errs[0], errs
    assert int(ds.load_checkpoint(tmp_path / "cli" / "ckpt.pt")["step"]) == 5


@contextlib.contextmanager
def two_ranks(argv, env, cwd=None):
    """Two processes running argv with the environment torchrun gives its workers, killed on
    leaving (none is left behind by a failed test). They meet at a TCPStore served here, as
    torchrun's agent serves one, on a port the OS picks and that stays bound: a free port picked
    here and bound later by rank 0 (after its seconds of imports) can be taken in between."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**env, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    procs = [subprocess.Popen(argv, cwd=cwd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in (0, 1)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def ending(procs):
    """Yield procs; on leaving, SIGTERM those still running (torchrun passes it on to its
    workers) and wait for them: a failed test leaves no process behind."""
    try:
        yield procs
    finally:
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.communicate(timeout=120)


def test_too_few_samples_for_an_mmd_print_no_nan(tmp_path, capsys):
    """One final sample: the unbiased MMD^2 needs two a side, so none is printed (it was nan)."""
    result = ds.train(small_config(tmp_path, steps=2, n_samples=1, sample_steps=2))
    out = capsys.readouterr().out
    assert result.quality == {"n": 1} and "too few" in out and "nan" not in out, out


def test_mmd2_unbiased_is_the_u_statistic_written_out():
    """mmd2_unbiased (printed by train as 'MMD^2 to held-out data', and for the prior and the
    noise floor) is Gretton et al.'s unbiased estimate, written here with explicit loops over
    pairs i != j and the mean of the Gaussian kernels over the bandwidths; float64, 1e-12."""
    g = torch.Generator().manual_seed(0)
    x, y, bandwidths = torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g), [0.5, 2]
    y = y + 0.5

    def k(a, b):
        d2 = sum((float(u) - float(v)) ** 2 for u, v in zip(a, b))
        return sum(math.exp(-d2 / (2 * h * h)) for h in bandwidths) / len(bandwidths)

    def within(a):
        pairs = [(i, j) for i in range(len(a)) for j in range(len(a)) if i != j]
        return sum(k(a[i], a[j]) for i, j in pairs) / len(pairs)
    cross = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    expected = within(x) + within(y) - 2 * cross
    assert abs(ds.mmd2_unbiased(x, y, bandwidths) - expected) < 1e-12


def test_final_samples_print_mmd2_beside_the_noise_floor_and_the_prior(tmp_path, monkeypatch,
                                                                       capsys):
    """final_samples (the MMD line train prints): with k = min(n, held-out / 2), the samples'
    MMD^2 to the first k held-out points; the noise floor, the RMS of the MMD^2 between the two
    halves (k each, disjoint) of 10 random subsets of 2k held-out points; the prior's MMD^2 to
    the same first k held-out points. mmd2_unbiased is replaced by a recorder that returns 1, 2,
    3, ... so the floor must be sqrt(mean of the squares of the 10 pair values), by hand."""
    calls = []

    def mmd2(x, y, bandwidths):
        calls.append((x, y))
        return float(len(calls))
    n, x_test = 30, torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    samples = torch.full((n, 2), 7.0)
    monkeypatch.setattr(ds, "mmd2_unbiased", mmd2)
    monkeypatch.setattr(ds, "draw_samples", lambda *args, **kwargs: samples)
    config = ds.TrainConfig(data="ring", n_samples=n, out=str(tmp_path))
    m = ds.Model(config, None, ds.METHODS["ddpm"].process(config), (2,), None)
    quality = ds.final_samples(m, ds.Data(None, None, x_test, None), torch.device("cpu"))
    k = 30
    value = {i: float(i + 1) for i in range(len(calls))}
    rows = {tuple(r.tolist()) for r in x_test}
    pairs = [i for i, (x, y) in enumerate(calls) if all(tuple(r.tolist()) in rows for r in x)]
    assert len(calls) == 12 and len(pairs) == 10
    for i in pairs:
        x, y = calls[i]
        assert len(x) == len(y) == k
        assert not ({tuple(r.tolist()) for r in x} & {tuple(r.tolist()) for r in y})
    floor = math.sqrt(sum(value[i] ** 2 for i in pairs) / 10)
    (i_samples,) = [i for i, (x, _) in enumerate(calls) if torch.equal(x, samples[:k])]
    (i_prior,) = set(range(12)) - set(pairs) - {i_samples}
    assert torch.equal(calls[i_samples][1], x_test[:k])
    assert torch.equal(calls[i_prior][1], x_test[:k]) and calls[i_prior][0].shape == (k, 2)
    assert quality == {"mmd2": value[i_samples], "floor": floor, "prior_mmd2": value[i_prior],
                       "n": k}
    assert f"noise floor {floor:.2e}" in capsys.readouterr().out


def test_printed_and_logged_losses_are_the_means_over_each_log_window(tmp_path, monkeypatch,
                                                                     capsys):
    """The loss on train's progress lines ('step 5/10  loss L'), in the loss log (loss.csv and the
    checkpoint) and in result.loss (printed as 'final loss') is the mean of the per-step losses
    since the previous log row: recorded here by wrapping eps_loss, two windows of 5 steps."""
    seen, eps_loss = [], ds.eps_loss

    def recorded(*args, **kwargs):
        out = eps_loss(*args, **kwargs)
        seen.append(out.mean().item())
        return out
    monkeypatch.setattr(ds, "eps_loss", recorded)
    result = ds.train(small_config(tmp_path, steps=10, log_every=5))
    windows = [sum(seen[:5]) / 5, sum(seen[5:]) / 5]
    assert len(seen) == 10
    printed = re.findall(r"^step (5|10)/10  loss (\S+)", capsys.readouterr().err, re.M)
    assert [int(step) for step, _ in printed] == [5, 10]
    assert all(abs(float(v) - w) <= 5e-5 + 1e-6 for (_, v), w in zip(printed, windows)), printed
    log = ds.load_checkpoint(result.paths["ckpt.pt"])["loss_log"]
    assert log[:, 0].tolist() == [5, 10]
    torch.testing.assert_close(log[:, 1], torch.tensor(windows, dtype=F64), rtol=1e-6, atol=0)
    assert abs(result.loss - windows[-1]) <= 1e-6 * abs(windows[-1])


def test_progress_prints_the_rate_since_start_and_the_time_left(monkeypatch, capsys):
    """The progress line (train, sample, nll): 'label done/total  rate/s  N s left' with rate =
    (done - start) / seconds since the call (start: the steps a resumed run had done) and the
    time left (total - done) / rate; printed at multiples of `every` and at the end."""
    clock = iter([100.0, 100.0, 105.0, 110.0])  # progress() reads the clock twice, then per show
    monkeypatch.setattr(ds.time, "time", lambda: next(clock))
    show = ds.progress("step", 100, every=10, start=20)
    show(30, "  loss 0.5000")
    show(100)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 30/100  loss 0.5000  2.0/s  35 s left", "step 100/100  8.0/s  0 s left"]


def test_classifier_accuracy_is_overall_and_on_the_least_noisy_tenth(tmp_path, capsys):
    """classifier_accuracy (printed after training a classifier): a stand-in classifier that is
    right exactly when its noise level c is below 100 (of 1000) scores the share of such levels
    overall and 100% on the least noisy tenth; chance is 1 / (number of classes)."""
    config = ds.TrainConfig(data="ring", classifier=True, T=1000, out=str(tmp_path))
    process = ds.METHODS["ddpm"].process(config)
    n, k = 2000, 8
    y = torch.arange(n) % k

    def net(x, c):  # the true class where c < 100, the next one elsewhere
        right = (c < 100).long()
        return torch.nn.functional.one_hot((y + 1 - right) % k, k).float()
    m = ds.Model(config, net, process, (2,), k)
    data = ds.Data(None, None, torch.randn(n, 2), y)
    quality = ds.classifier_accuracy(m, data, torch.device("cpu"), n=n)
    t_share = 99 / 1000  # c = t < 100 for t = 1..99 of 1..1000, uniform
    se = math.sqrt(t_share * (1 - t_share) / n)
    assert abs(quality["accuracy"] - t_share) < 5 * se, quality
    assert quality["low_noise_accuracy"] == 1.0 and quality["n"] == n
    assert "(chance 12.5%)" in capsys.readouterr().out


def test_a_library_call_of_train_leaves_threads_signals_and_process_groups_as_found(tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as inside torchrun: train must not join on its own
    torch.set_num_threads(2)
    handler = signal.getsignal(signal.SIGINT)
    ds.train(small_config(tmp_path, steps=5, n_samples=50, sample_steps=2))
    assert torch.get_num_threads() == 2 and signal.getsignal(signal.SIGINT) is handler
    assert not torch.distributed.is_initialized()


def test_a_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    """A new run where a checkpoint is: exit 2, one line, nothing touched; --overwrite deletes the
    run's own outputs (stale samples, the classifier) and nothing else; the new run resumes."""
    out = tmp_path / "run"
    ds.train(small_config(out, steps=5))
    (out / "samples_ddim.png").write_bytes(b"stale")
    (out / "classifier").mkdir()
    (out / "classifier" / "ckpt.pt").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    before = (out / "ckpt.pt").read_bytes()
    argv = ["train", "--out", str(out), "--steps", "5", "--n-samples", "0"]
    err = one_line_error(capsys, argv)
    assert "--resume" in err and "--overwrite" in err and (out / "ckpt.pt").read_bytes() == before
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    ds.main([*argv, "--overwrite"])
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.json", "loss.csv",
                                                     "notes.txt"]
    ds.main(["train", "--out", str(out), "--resume", "--steps", "6"])  # not refused as overwrite
    assert int(ds.load_checkpoint(out / "ckpt.pt")["step"]) == 6


def test_atomic_writes_leave_the_umask_alone_and_give_the_usual_mode(tmp_path, monkeypatch):
    umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("write_atomic touched the umask"))
        ds.write_atomic(tmp_path / "f.bin", b"abc")
        assert (tmp_path / "f.bin").read_bytes() == b"abc"
        assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~0o027
        assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left
    finally:
        monkeypatch.undo()
        os.umask(umask)


def test_a_set_stop_event_ends_training_after_a_step_and_resuming_equals_training_straight(
        tmp_path):
    """train(config, stop) with stop set: one step, its checkpoint, interrupted; resuming it ends
    with exactly the weights of an uninterrupted run (the cosine schedule included)."""
    config, stop = small_config(tmp_path / "a", steps=40), threading.Event()
    stop.set()
    result = ds.train(config, stop)
    assert result.interrupted and result.step == 1 and result.quality == {}
    assert int(ds.load_checkpoint(tmp_path / "a" / "ckpt.pt")["step"]) == 1
    assert ds.train(replace(config, resume=True)).step == 40
    ds.train(replace(config, out=str(tmp_path / "b")))
    same_weights(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt")


# Tiny runs for the stop tests: far more steps than they get to, about a millisecond each (so
# ranks a few ms apart see a signal at different steps), a constant lr (a resume to any total
# then equals training straight to it), a progress line every 5 steps.
STOP_ARGS = ["train", "--steps", "100000", "--no-lr-decay", "--width", "16", "--depth", "1",
             "--batch-size", "16", "--n-train", "500", "--n-samples", "0", "--log-every", "5",
             "--out", "run"]


def wait_for_a_step(proc):
    """Read proc's stderr until rank 0's progress line (maybe prefixed by torchrun) shows a step."""
    lines = iter(proc.stderr.readline, "")
    assert any(re.search(r"(^|\]:)step \d+/", line) for line in lines), "never trained"


def stop_once_training(procs, signums):
    """Send each process its signal once rank 0 has logged a step; return their stderr."""
    for proc, signum in zip(procs, signums):
        wait_for_a_step(proc)
        proc.send_signal(signum)
    return [proc.communicate(timeout=120)[1] for proc in procs]


def check_stopped(run, err, codes, expected):
    """The processes exit with the expected codes, one line names the step, no traceback, and
    the checkpoint is of that step: returns it."""
    assert codes == expected and "Traceback" not in err, (codes, err)
    lines = re.findall(r"interrupted at step (\d+): checkpoint saved to (.*);", err)
    assert len(lines) == 1 and err.count("interrupted") == 1, err
    assert lines[0][1] == "run/ckpt.pt", err
    step = int(ds.load_checkpoint(run / "ckpt.pt")["step"])
    assert step == int(lines[0][0]), err
    return step


def resume_each(folders, steps, straight=None):
    """Resume each stopped run (in this process) to a common total; with `straight`, check that
    each then has the weights of a run trained straight to it there."""
    config = ds.read_config(folders[0] / "run" / "config.json")
    total = max(steps) + 5
    if straight:
        ds.train(replace(config, steps=total, out=str(straight)))
    for folder in folders:
        result = ds.train(replace(config, steps=total, out=str(folder / "run"), resume=True))
        assert result.step == total and not result.interrupted
        if straight:
            same_weights(folder / "run" / "ckpt.pt", straight / "ckpt.pt")


def test_sigint_and_sigterm_stop_a_process_after_a_step_and_resume_bit_for_bit(tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's), twice each, at whatever step: exit 130 / 143,
    one line naming the step, no traceback, a checkpoint of that step; each resumed to a common
    total has exactly the weights of a run trained straight to it."""
    shutil.copy(HERE / "ddpm_score.py", tmp_path / "ddpm_score.py")
    signums, folders = [signal.SIGINT, signal.SIGTERM] * 2, [tmp_path / str(i) for i in range(4)]
    for folder in folders:
        folder.mkdir()
    with ending([subprocess.Popen([sys.executable, str(tmp_path / "ddpm_score.py"), *STOP_ARGS],
                                  cwd=folder, env=env_without_numpy(tmp_path), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for folder in folders]) as procs:
        errs = stop_once_training(procs, signums)
    steps = [check_stopped(folder / "run", err, [proc.returncode], [128 + signum])
             for folder, err, proc, signum in zip(folders, errs, procs, signums)]
    resume_each(folders, steps, straight=tmp_path / "straight")


def test_torchrun_stops_both_gloo_ranks_at_the_same_step_on_sigint_and_sigterm(tmp_path):
    """torchrun forwards a signal to each rank on its own, a few ms apart: the ranks agree on the
    step, rank 0 saves it and prints one line, both exit 130 / 143 without a traceback; twice
    per signal (a race: ranks used to stop a step apart, one failing in its all-reduce); each
    checkpoint then resumes to the final step."""
    worker = tmp_path / "worker.py"  # main() of ddpm_score, keeping its exit code in exit_RANK
    worker.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import ddpm_score\n"
        "try:\n"
        "    ddpm_score.main()\n"
        "    code = 0\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "open('exit_' + os.environ['RANK'], 'w').write(str(code))\n"
        "sys.exit(code)\n")
    # Each rank's stderr goes to logs/.../attempt_0/RANK/stderr.log and, prefixed
    # [defaultRANK]:, to the console, which also holds torchrun's own report: after forwarding a
    # signal torchrun exits 1 with a SignalException traceback. That one is torchrun's, so the
    # checks read the ranks' logs.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "--log-dir", "logs", "--tee", "3", str(worker), *STOP_ARGS]
    signums, folders = [signal.SIGINT, signal.SIGTERM] * 2, [tmp_path / str(i) for i in range(4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for folder in folders:
        folder.mkdir()
    with ending([subprocess.Popen(torchrun, cwd=folder, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for folder in folders]) as procs:
        stop_once_training(procs, signums)
    steps = []
    for folder, signum in zip(folders, signums):
        logs = sorted(folder.glob("logs/*/attempt_0/*/stderr.log"))
        err = "".join(log.read_text() for log in logs)
        codes = [int((folder / f"exit_{rank}").read_text()) for rank in (0, 1)]
        assert len(logs) == 2 and "interrupted" in logs[0].read_text(), err
        steps.append(check_stopped(folder / "run", err, codes, [128 + signum] * 2))
    resume_each(folders, steps)  # on one rank: 2-rank resumes cost 5 s each here


def test_a_signal_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    """Two ranks, a signal to one of them (SIGTERM to rank 1 in one run, SIGINT to rank 0 in
    another, at once): both stop after the same step, rank 0 saves it and prints one line, no
    traceback; the signalled rank exits 128 + the signal, the other 143. Without the ranks
    agreeing, the other one trained on and failed in its all-reduce (or hung)."""
    argv = [sys.executable, str(HERE / "ddpm_score.py"), *STOP_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folders = [tmp_path / "term1", tmp_path / "int0"]
    for folder in folders:
        folder.mkdir()
    with two_ranks(argv, env, folders[0]) as term1, two_ranks(argv, env, folders[1]) as int0:
        for ranks, signalled, signum in ((term1, 1, signal.SIGTERM), (int0, 0, signal.SIGINT)):
            wait_for_a_step(ranks[0])
            ranks[signalled].send_signal(signum)
        errs = [[proc.communicate(timeout=120)[1] for proc in ranks] for ranks in (term1, int0)]
        codes = [[proc.returncode for proc in ranks] for ranks in (term1, int0)]
    steps = [check_stopped(folders[0] / "run", "".join(errs[0]), codes[0], [143, 143]),
             check_stopped(folders[1] / "run", "".join(errs[1]), codes[1], [130, 143])]
    assert all("interrupted" in err[0] for err in errs), errs
    resume_each(folders, steps)


def test_ctrl_c_in_sample_is_one_line_and_exit_130(tiny_runs, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ds, "draw_samples", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        ds.main(["sample", "--run", str(tiny_runs / "cond"), "--n", "4"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 130 and err.startswith("interrupted") and "\n" not in err, err


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    config = small_config(tmp_path, steps=10)
    ds.train(config)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss") as error:
        ds.train(replace(config, steps=20, lr=1e30, lr_warmup=0, resume=True))
    assert "step 10" in str(error.value) and (tmp_path / "ckpt.pt").read_bytes() == before
    with pytest.raises(SystemExit) as exit:
        ds.main(["train", "--out", str(tmp_path), "--resume", "--steps", "20", "--lr", "1e30",
                 "--lr-warmup", "0"])
    assert exit.value.code == 1 and "non-finite" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    result = ds.train(small_config(tmp_path, steps=5))
    ckpt = result.paths["ckpt.pt"]
    good = ckpt.read_bytes()
    for bad in (good[:len(good) // 2], b"not a checkpoint", b""):
        ckpt.write_bytes(bad)
        with pytest.raises(ValueError, match="ckpt.pt"):
            ds.load_checkpoint(ckpt)
        assert "ckpt.pt" in one_line_error(capsys, ["sample", "--run", str(tmp_path)])
    with pytest.raises(ValueError, match="no checkpoint"):
        ds.train(small_config(tmp_path / "empty", resume=True))
    ckpt.write_bytes(good)
    with pytest.raises(ValueError, match="does not fit"):  # a different network
        ds.train(small_config(tmp_path, steps=10, width=32, resume=True))


# --- every flag checked before any work ----------------------------------------------------------

BAD_FLAGS = [  # (subcommand, flag, bad value, what the message says)
    ("train", "--holdout", "0", "> 0"), ("train", "--holdout", "1", "< 1"),
    ("train", "--levels", "-1", ">= 0"), ("train", "--steps", "0", ">= 1"),
    ("train", "--batch-size", "0", ">= 1"), ("train", "--lr", "0", "> 0"),
    ("train", "--lr", "inf", "finite"), ("train", "--lr-warmup", "-1", ">= 0"),
    ("train", "--grad-clip", "-1", ">= 0"), ("train", "--ema", "1", "< 1"),
    ("train", "--ema-warmup", "-1", ">= 0"), ("train", "--seed", "-1", ">= 0"),
    ("train", "--width", "0", ">= 1"), ("train", "--depth", "0", ">= 1"),
    ("train", "--channels", "4", ">= 8"), ("train", "--label-dropout", "1", "< 1"),
    ("train", "--T", "1", ">= 2"), ("train", "--sigma-min", "0", "> 0"),
    ("train", "--sigma-max", "-1", ">= 0"), ("train", "--n-sigmas", "1", ">= 2"),
    ("train", "--sample-steps", "-1", ">= 0"), ("train", "--n-samples", "-1", ">= 0"),
    ("train", "--n-train", "5", ">= 10"), ("train", "--log-every", "0", ">= 1"),
    ("train", "--ckpt-every", "0", ">= 1"), ("train", "--threads", "-3", ">= 1"),
    ("sample", "--steps", "-1", ">= 0"), ("sample", "--n", "-5", ">= 1"),
    ("sample", "--class", "-1", ">= 0"), ("sample", "--guidance", "-1", ">= 0"),
    ("sample", "--completions", "0", ">= 1"), ("sample", "--seed", "-1", ">= 0"),
    ("sample", "--threads", "0", ">= 1"), ("nll", "--n", "0", ">= 1"),
    ("nll", "--n", "-1", ">= 1"), ("nll", "--levels", "-1", ">= 0"),
    ("nll", "--steps", "-1", ">= 0"), ("nll", "--batch", "0", ">= 1"),
    ("nll", "--seed", "-1", ">= 0"), ("nll", "--threads", "0", ">= 1"),
    ("train", "--steps", "two", "expected int"),
]


def test_every_numeric_flag_of_every_subcommand_is_in_the_bad_flag_table():
    parser, covered = ds.make_parser(), {(cmd, flag) for cmd, flag, _, _ in BAD_FLAGS}
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    numeric = {(cmd, a.option_strings[0]) for cmd, p in subparsers.items() for a in p._actions
               if getattr(a.type, "__qualname__", "").startswith("number.")}
    assert numeric == covered, numeric ^ covered


@pytest.mark.parametrize("command, flag, value, says", BAD_FLAGS)
def test_bad_flag_values_exit_2_with_one_line_naming_the_flag(capsys, tmp_path, command, flag,
                                                              value, says):
    run = [] if command == "train" else ["--run", str(tmp_path)]
    err = one_line_error(capsys, [command, *run, f"{flag}={value}"])
    assert f"argument {flag}" in err and says in err, err


@pytest.mark.parametrize("argv, says", [
    (["--channels", "12"], "channels: 12 is not a multiple of 8"),
    (["--method", "ncsn", "--sigma-max", "0.005"], "sigma_max: 0.005 must be > sigma_min"),
    (["--method", "ddpm", "--sampler", "em"], "sampler: 'em' is not one of"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--amp", "--device", "cpu"], "amp: bf16 autocast is for CUDA"),
    (["--T", "100", "--sample-steps", "200"], "sample_steps: 200 is more than the T = 100"),
    (["--levels", "1"], "levels: 1 grey level has no bins"),
])
def test_bad_combinations_exit_2_before_any_work(capsys, tmp_path, argv, says):
    err = one_line_error(capsys, ["train", "--out", str(tmp_path / "never"), *argv])
    assert says in err and not (tmp_path / "never").exists(), err


def test_a_schedule_that_ends_far_from_the_prior_is_refused(tmp_path, capsys, monkeypatch):
    """F5: with the unscaled linear betas (1e-4..0.02 for every T) T = 100 ends at
    sqrt(alpha_bar_T) = 0.60, while sampling starts from N(0, I): one line, exit 2."""
    monkeypatch.setitem(ds.BETAS, "linear", lambda T: torch.linspace(1e-4, 0.02, T, dtype=F64))
    err = one_line_error(capsys, ["train", "--T", "100", "--out", str(tmp_path / "never")])
    assert "sqrt(alpha_bar_T) = 0.60" in err and not (tmp_path / "never").exists()


def test_an_unusable_out_fails_before_training_starts(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = one_line_error(capsys, ["train", "--out", str(tmp_path / "file")])
    assert "is a file" in err
    err = one_line_error(capsys, ["train", "--out", str(tmp_path / "file" / "run")])
    assert "cannot write" in err and "out:" in err


@pytest.mark.parametrize("flag, value, says", [("--method", "ddim", "invalid choice: 'ddim'"),
                                               ("--data", "mnist", "neither one of"),
                                               ("--schedule", "quadratic", "invalid choice")])
def test_unknown_names_exit_2_listing_the_choices(capsys, tmp_path, flag, value, says):
    err = one_line_error(capsys, ["train", flag, value, "--out", str(tmp_path / "never")])
    listed = {"--method": "ddpm", "--data": "moons", "--schedule": "cosine"}[flag]
    assert says in err and listed in err
    with pytest.raises(ValueError, match=listed):
        ds.check_config(ds.TrainConfig(**{flag[2:]: value}))
    assert not (tmp_path / "never").exists()


def write_npy(path, header, payload):
    """A .npy file written by hand (format version 1.0)."""
    text = repr(header).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload)


def test_npy_reader_matches_numpy(tmp_path):
    np = pytest.importorskip("numpy")
    x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.save(tmp_path / "u.npy", np.arange(192, dtype=np.uint8).reshape(12, 1, 4, 4))
    for name in ("c.npy", "f.npy"):
        assert torch.equal(ds.read_npy(tmp_path / name), torch.from_numpy(x))
    images, labels = ds.load_data(tmp_path / "u.npy")
    assert images.shape == (12, 1, 4, 4) and images.min() == -1 and labels is None
    assert ds.grid_levels(images) == 256


@pytest.mark.parametrize("name, make, problem", [
    ("nan.pt", lambda p: torch.save(torch.tensor([[0.0, math.nan]] * 20), p), "non-finite"),
    ("rank.pt", lambda p: torch.save(torch.zeros(20), p), "expected x of shape"),
    ("range.pt", lambda p: torch.save(torch.full((20, 1, 4, 4), 3.0), p), "[-1, 1]"),
    ("odd.pt", lambda p: torch.save(torch.zeros(20, 1, 6, 6), p), "divisible by 4"),
    ("scale.pt", lambda p: torch.save(torch.full((20, 2), 255.0), p), "standardize"),
    ("labels.pt", lambda p: torch.save({"x": torch.zeros(20, 2), "y": torch.zeros(19)}, p),
     "labels y must be integers"),
    ("list.pt", lambda p: torch.save([1, 2], p), "or a dict"),
    ("garbage.pt", lambda p: p.write_bytes(b"\x00" * 10), "cannot read"),
    ("short.npy", lambda p: write_npy(p, {"descr": "<f4", "fortran_order": False,
                                          "shape": (20, 2)}, b"\x00" * 8), "truncated"),
    ("magic.npy", lambda p: p.write_bytes(b"PK\x03\x04"), "not a .npy"),
    ("big.npy", lambda p: write_npy(p, {"descr": ">f4", "fortran_order": False,
                                        "shape": (20, 2)}, b"\x00" * 160), "unsupported"),
    ("missing.npy", lambda p: None, "cannot read"),
])
def test_bad_data_files_are_one_line_errors_naming_the_file(tmp_path, capsys, name, make,
                                                             problem):
    path = tmp_path / name
    make(path)
    with pytest.raises(ValueError, match=name) as error:
        ds.load_data(path)
    assert problem in str(error.value)
    err = one_line_error(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "r")])
    assert name in err and problem in err


# --- every number nll prints ---------------------------------------------------------------------


def alpha_bars(sched):
    """alpha_bar_0..T by a product loop over the betas (F2), float64."""
    out = [1.0]
    for beta in sched.beta[1:].tolist():
        out.append(out[-1] * (1 - beta))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("method", sorted(ds.METHODS))
def test_each_methods_noise_level_map_matches_its_process_marginal(method):
    """For each method: x0 = 0 noised by `draw` has, at its drawn time, the std of the process's
    marginal written out here (F3 product loop, F19 sigma, F23 for each SDE); the adapter divides
    the network's output by that same std (score = -output / std, eps = output for DDPM); and
    the network's c grows with the std from about 0 to 1000. Tolerance on the mean of z^2 over
    B d = 64,000 normals: 5 standard errors, 5 sqrt(2 / (B d))."""
    config = ds.TrainConfig(method=method, sigma_max=5.0)
    process = ds.METHODS[method].process(config)
    B, d = 8000, 8
    x, time = ds.noised(process, torch.zeros(B, d), torch.Generator().manual_seed(0))
    time = time.double()
    if method == "ddpm":
        std = (1 - alpha_bars(process)[time.long()]).sqrt()
    elif method == "ncsn":
        std = time
    elif method == "ve":
        std = (0.01 ** 2 * (5.0 / 0.01) ** (2 * time) - 0.01 ** 2).sqrt()
    else:  # vp and subvp: B(s) = 0.1 s + (20 - 0.1) s^2 / 2
        var = 1 - torch.exp(-(0.1 * time + 19.9 * time ** 2 / 2))
        std = var.sqrt() if method == "vp" else var
    z2 = ((x.double() / std[:, None]) ** 2).mean().item()
    assert abs(z2 - 1) < 5 * math.sqrt(2 / (B * d)), z2
    ones = torch.ones(B, d)
    out = ds.METHODS[method].model_of(lambda x, c, y=None: ones, process, None)(x, time.to(
        torch.long if method == "ddpm" else torch.float32))
    expected = ones.double() if method == "ddpm" else -1 / std[:, None].expand(B, d)
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=0)  # float32 std near 0
    c = ds.METHODS[method].level(process, time.to(torch.long if method == "ddpm" else
                                                  torch.float32)).double()
    order = std.argsort()
    assert (c[order].diff() >= -1e-3).all() and c.min() >= 0 and c.max() <= 1000 + 1e-3
    assert c.max() > 900 and c.min() < 100


def gaussian_eps_net(sched, mean, std0):
    """The exact eps of N(mean, std0^2 I) data, as a network net(x, c): E[eps | x_t] =
    b (x_t - a mean) / (a^2 std0^2 + b^2), a^2 = alpha_bar, b^2 = 1 - alpha_bar, at the step
    t = c T / 1000, log alpha_bar linear between steps (the continuous time of DiscreteVPSDE)."""
    log_ab = alpha_bars(sched).log()

    def net(x, c, y=None):
        t = c.double() * sched.T / 1000
        k = t.floor().clamp(0, sched.T - 1).long()
        ab = torch.exp(log_ab[k] + (t - k) * (log_ab[k + 1] - log_ab[k]))[:, None]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return (b * (x.double() - a * mean) / (a ** 2 * std0 ** 2 + b ** 2)).to(x.dtype)
    return net


def test_f10_nll_with_the_exact_eps_of_gaussian_data_is_the_entropy_plus_the_known_gap():
    """Data N(0.3, 0.5^2 I), d = 4, T = 100, the exact eps. The expected -ELBO is written out
    here term by term (F10-F13): the prior KL, for t >= 2 the KL between N(mu_tilde, beta_tilde)
    and N(E[mu_tilde | x_t], beta_t), whose mean gap is c0^2 Var(x0 | x_t) / (2 beta_t) with
    c0 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), and the decoder N(x0; E[x0 | x1],
    beta_tilde_2) (the published decoder variance). It lies above the exact entropy by the ELBO
    gap; the printed mean must match it within 5 of its standard errors. The ODE value (F27,
    exact score, DiscreteVPSDE from s = 1 / T) must match E[-log p_{1/T}(x0)] written out here
    within 5 standard errors plus 2e-3 bits for RK4 on 50 steps (measured error: <1e-3)."""
    T, mean, std0, d, n = 100, 0.3, 0.5, 4, 2000
    sched = ds.Schedule.from_betas(ds.linear_betas(T))
    config = ds.TrainConfig(method="ddpm", T=T)
    x = mean + std0 * torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    m = as_model(config, gaussian_eps_net(sched, mean, std0), sched, (d,))
    bpd, convention = ds.bits_per_dim(m, x, levels=0, steps=50, batch=500)
    assert "continuous" in convention
    ab, beta = alpha_bars(sched), sched.beta.double()
    var_x0 = std0 ** 2 * (1 - ab) / (ab * std0 ** 2 + 1 - ab)  # Var(x0 | x_t)
    nats = 0.5 * (-(1 - ab[T]).log() + (1 - ab[T]) + ab[T] * (mean ** 2 + std0 ** 2) - 1)
    for t in range(2, T + 1):
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * beta[t]
        c0 = ab[t - 1].sqrt() * beta[t] / (1 - ab[t])
        nats += 0.5 * ((beta[t] / beta_tilde).log() + beta_tilde / beta[t] - 1)
        nats += c0 ** 2 * var_x0[t] / (2 * beta[t])
    decoder_var = (1 - ab[1]) / (1 - ab[2]) * beta[2]
    nats += 0.5 * (2 * math.pi * decoder_var).log() + var_x0[1] / (2 * decoder_var)
    expected, entropy = nats.item() / math.log(2), 0.5 * math.log2(2 * math.pi * math.e * std0 ** 2)
    elbo, se = bpd["elbo"].mean().item(), bpd["elbo"].std().item() / math.sqrt(n)
    assert expected > entropy and abs(elbo - expected) < 5 * se, (elbo, expected, entropy, se)
    a1, var1 = ab[1].sqrt(), ab[1] * std0 ** 2 + 1 - ab[1]
    ode_expected = (0.5 * (2 * math.pi * var1).log() + ((1 - a1) ** 2 * mean ** 2 + std0 ** 2)
                    / (2 * var1)).item() / math.log(2)
    ode, se = bpd["ode"].mean().item(), bpd["ode"].std().item() / math.sqrt(n)
    assert abs(ode - ode_expected) < 5 * se + 2e-3, (ode, ode_expected, se)


def discrete_pixels_eps_net(sched, levels, probs):
    """The exact eps of i.i.d. pixels on the K levels v_k = 2k/(K-1) - 1 with probabilities p_k,
    as a network: x_t = a x0 + b eps is the mixture sum_k p_k N(a v_k, b^2), so E[x0 | x_t] =
    sum_k w_k v_k with posterior weights w_k proportional to p_k exp(-(x_t - a v_k)^2 / (2 b^2)),
    and E[eps | x_t] = (x_t - a E[x0 | x_t]) / b (a^2 = alpha_bar_t, b^2 = 1 - alpha_bar_t)."""
    ab_table = alpha_bars(sched)
    v = torch.linspace(-1, 1, levels, dtype=F64)
    log_p = torch.tensor(probs, dtype=F64).log()

    def net(x, c, y=None):
        t = (c.double() * sched.T / 1000).round().long()
        ab = ab_table[t].reshape(-1, *[1] * x.ndim)
        a, b, xt = ab.sqrt(), (1 - ab).sqrt(), x.double()[..., None]
        w = torch.softmax(log_p - (xt - a * v) ** 2 / (2 * b ** 2), -1)
        return ((x.double() - a[..., 0] * (w * v).sum(-1)) / b[..., 0]).to(x.dtype)
    return net


def k_level_bound_by_quadrature(sched, levels, probs, n_eps=1001):
    """(E[-ELBO], the fixed-variance part of E[-ELBO] - H), in bits per pixel, of i.i.d. K-level
    pixels under their exact eps (F10-F13 with the F36 decoder, sigma_t^2 = beta_t, decoder
    variance beta_tilde_2), written out here by quadrature in float64, no Monte Carlo.

    With the exact eps, mu_theta(x_t) = E[mu_tilde | x_t], and mu_tilde = c0 x0 + c1 x_t with
    c0 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) (F7), so for t >= 2
    E L_{t-1} = 1/2 [log(beta_t / beta_tilde_t) + beta_tilde_t / beta_t - 1]
              + c0^2 E[Var(x0 | x_t)] / (2 beta_t);
    L_0 = E[-log P_bin(x0 | E[x0 | x_1], beta_tilde_2)] with the bin masses of F36 written here;
    L_T = E KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)). The expectations over x_t = a v_k + b e
    are sums over the levels k (weights p_k) and a grid of e in [-10, 10] (n_eps points,
    trapezoid weights times the normal density, normalized; the posterior weights change over
    e-widths >= 0.1 here, the grid step is 0.02).

    The gap E[-ELBO] - H(x0) is KL(q(x_{0:T}) || p_theta(x_{0:T})) = KL(q(x_T) || N(0, 1))
    + sum_{t>=2} E KL(q(x_{t-1} | x_t) || N(mu_theta, beta_t)) + E KL(q(x0 | x_1) || P_bin).
    The true reverse kernel q(x_{t-1} | x_t) is a mixture of F7 posteriors with mean mu_theta and
    variance V = beta_tilde_t + c0^2 Var(x0 | x_t); its KL to N(mu_theta, beta_t) is that of
    N(mu_theta, V) (the cost of the fixed variance) plus its KL to N(mu_theta, V) (>= 0). So
    the fixed-variance part, sum_t E 1/2 [log(beta_t / V) + V / beta_t - 1] + the decoder's KL,
    is a lower limit on the gap, computed here independently of E[-ELBO]."""
    T, ab, beta = sched.T, alpha_bars(sched), sched.beta.double()
    v = torch.linspace(-1, 1, levels, dtype=F64)
    p = torch.tensor(probs, dtype=F64)
    e = torch.linspace(-10, 10, n_eps, dtype=F64)
    we = torch.exp(-e ** 2 / 2)
    we[[0, -1]] /= 2
    weight = p[:, None] * we / we.sum()  # (K, n_eps): the law of (level, e)

    def posterior(t):  # E[x0 | x_t], Var(x0 | x_t) at x_t = a v_k + b e_j, (K, n_eps) each
        a, b = ab[t].sqrt(), (1 - ab[t]).sqrt()
        xt = a * v[:, None] + b * e
        w = torch.softmax(p.log() - (xt[..., None] - a * v) ** 2 / (2 * b ** 2), -1)
        mean = (w * v).sum(-1)
        return mean, (w * v ** 2).sum(-1) - mean ** 2, w
    nats = 0.5 * (-(1 - ab[T]).log() + (1 - ab[T]) + ab[T] * (p * v ** 2).sum() - 1)
    fixed_variance = torch.zeros((), dtype=F64)
    for t in range(2, T + 1):
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * beta[t]
        c0 = ab[t - 1].sqrt() * beta[t] / (1 - ab[t])
        var_x0 = posterior(t)[1]
        nats += 0.5 * ((beta[t] / beta_tilde).log() + beta_tilde / beta[t] - 1)
        nats += c0 ** 2 * (weight * var_x0).sum() / (2 * beta[t])
        V = beta_tilde + c0 ** 2 * var_x0
        fixed_variance += (weight * 0.5 * ((beta[t] / V).log() + V / beta[t] - 1)).sum()
    mu, _, w = posterior(1)  # the decoder: x0 = v_k, mean E[x0 | x_1], variance beta_tilde_2
    std = ((1 - ab[1]) / (1 - ab[2]) * beta[2]).sqrt()
    edges = torch.cat([torch.tensor([-math.inf], dtype=F64), (v[:-1] + v[1:]) / 2,
                       torch.tensor([math.inf], dtype=F64)])
    unit = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), 1.0)
    lo, hi = (edges[:-1] - mu[..., None]) / std, (edges[1:] - mu[..., None]) / std
    bins = torch.where(lo > 0, unit.cdf(-lo) - unit.cdf(-hi), unit.cdf(hi) - unit.cdf(lo))
    own = bins[torch.arange(levels), :, torch.arange(levels)]  # P_bin(v_k | mu[k, j]), (K, n_eps)
    nats += -(weight * own.clamp(min=1e-300).log()).sum()
    fixed_variance += (weight[..., None] * w * (w.clamp(min=1e-300) / bins.clamp(
        min=1e-300)).log()).sum()  # E KL(q(x0 | x_1) || P_bin)
    return nats.item() / math.log(2), fixed_variance.item() / math.log(2)


def test_f36_nll_of_independent_17_level_pixels_with_the_exact_eps_is_the_bound_above_the_entropy():
    """2x2 images of i.i.d. pixels on K = 17 levels with a known pmf (entropy H = 3.331 bits),
    the exact eps of the undequantized pixels (discrete_pixels_eps_net), T = 200: bits_per_dim
    (levels = 17) prints the ELBO with the F36 decoder on the data as it is. Checked against
    k_level_bound_by_quadrature, computed here independently (see its docstring):
    - each example's elbo minus its exact code length -mean log2 p_k has mean E[-ELBO] - H
      (E[-log2 p] = H exactly), within 5 of its paired standard errors;
    - E[-ELBO] - H >= the fixed-variance part of the gap > 0 (deterministic, float64), and the
      printed mean is >= H up to 5 SE. Measured: E[-ELBO] = 3.749 bits, a gap of 0.418 of which
      0.184 is the fixed variances' and the rest the non-Gaussian reverse kernels; printed gap
      0.412 +- 0.021 (quadrature on 1,001 or 2,001 points agrees to 1e-15).
    The old number (Gaussian decoder on dequantized data, - log2 w) is 5.48 here, 1.7 bits
    looser; a wrong offset or bin width moves the result by whole bits."""
    levels, n, T = 17, 1000, 200
    k = torch.arange(levels, dtype=F64)
    probs = (torch.exp(-((k - 4) / 3) ** 2) + 0.1 * torch.exp(-((k - 14) / 2) ** 2)).tolist()
    probs = [q / sum(probs) for q in probs]
    sched = ds.Schedule.from_betas(ds.linear_betas(T))
    kk = torch.multinomial(torch.tensor(probs, dtype=F64), n * 4, replacement=True,
                           generator=torch.Generator().manual_seed(0))
    x = (2 * kk / (levels - 1) - 1).reshape(n, 1, 2, 2).double()
    assert ds.grid_levels(x) == levels
    m = as_model(ds.TrainConfig(method="ddpm", T=T), discrete_pixels_eps_net(sched, levels, probs),
                 sched, (1, 2, 2))
    bpd, convention = ds.bits_per_dim(m, x, levels=levels, steps=0, batch=500)
    assert "17-level data: bits per 17-level value" in convention and "F36" in convention
    entropy = -sum(q * math.log2(q) for q in probs)
    expected, fixed_variance = k_level_bound_by_quadrature(sched, levels, probs)
    assert expected - entropy >= fixed_variance > 0, (expected, entropy, fixed_variance)
    code_length = -torch.log2(torch.tensor(probs, dtype=F64)[kk]).reshape(n, 4).mean(1)
    gap = bpd["elbo"].double() - code_length
    se = gap.std().item() / math.sqrt(n)
    assert abs(gap.mean().item() - (expected - entropy)) < 5 * se, (gap.mean(), expected, se)
    assert gap.mean().item() > -5 * se


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_f27_ode_bits_per_dim_of_grid_data_is_the_dequantized_density_minus_log2_bin_width(levels):
    """Data on K levels, d = 4, scored under a known density: the model N(0.3, 0.5^2 I) (its exact
    eps at every continuous time, gaussian_eps_net), T = 100. The ODE of a ddpm run starts at s =
    1 / T, so it returns log p_{1/T}(y) of the dequantized y = x + w (u - 1/2), w = 2 / (K - 1),
    u ~ U(0, 1), with p_{1/T} = N(a m, v I), a^2 = alpha_bar_1, v = a^2 c^2 + 1 - a^2. Averaged
    over u, per example: sum_i [1/2 log(2 pi v) + ((x_i - a m)^2 + w^2 / 12) / (2 v)] nats, and
    the printed bits/dim subtract d log w: expected = (that - d ln w) / (d ln 2) (F27). The mean
    difference must be within 5 paired SE (spread from u) + 2e-3 bits (RK4, 20 steps). The sign
    of the offset is worth 2 |log2 w| = 2, 8 and 16 bits at K = 2, 17, 256."""
    T, mean, std0, d, n = 100, 0.3, 0.5, 4, 200
    sched = ds.Schedule.from_betas(ds.linear_betas(T))
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    k = ((mean + std0 * z + 1) * (levels - 1) / 2).round().clamp(0, levels - 1)
    x, w = 2 * k / (levels - 1) - 1, 2 / (levels - 1)
    m = as_model(ds.TrainConfig(method="ddpm", T=T), gaussian_eps_net(sched, mean, std0), sched,
                 (d,))
    bpd, _ = ds.bits_per_dim(m, x, levels=levels, steps=20, batch=n)
    a2 = alpha_bars(sched)[1].item()
    v = a2 * std0 ** 2 + 1 - a2
    nats = (0.5 * math.log(2 * math.pi * v) + ((x - math.sqrt(a2) * mean) ** 2 + w ** 2 / 12)
            / (2 * v)).sum(1)
    expected = (nats - d * math.log(w)) / (d * math.log(2))
    diff = bpd["ode"].double() - expected
    se = diff.std().item() / math.sqrt(n)
    assert abs(diff.mean().item()) < 5 * se + 2e-3, (diff.mean(), se)


def test_f35_ode_likelihood_of_a_ddpm_run_queries_the_network_only_at_trained_noise_levels():
    """A ddpm network is trained at t = 1..T only, i.e. c = 1000 t / T >= 1000 / T: bits_per_dim
    (the ELBO and the ODE through DiscreteVPSDE, which must start at s = 1 / T, not at the SDEs'
    1e-5) never calls it below c = 1000 / T, nor above 1000. Recorded at every call, T = 10."""
    T, seen = 10, []
    sched = ds.Schedule.from_betas(ds.linear_betas(T))

    def net(x, c, y=None):
        seen.append(c.detach().double())
        return 0.1 * x
    m = as_model(ds.TrainConfig(method="ddpm", T=T), net, sched, (1, 2, 2))
    x = torch.linspace(-1, 1, 12).reshape(3, 1, 2, 2)
    ds.bits_per_dim(m, x, levels=3, steps=2)
    c = torch.cat(seen)
    assert len(seen) == T + 4 * 2  # T calls for the ELBO; RK4: 4 stages x 2 steps
    assert c.min() >= 1000 / T * (1 - 1e-6) and c.max() <= 1000 * (1 + 1e-6), (c.min(), c.max())


def test_nll_of_a_trained_run_is_vlb_bpd_computed_directly_in_bounded_batches(tiny_runs, capsys):
    """`nll` on the trained ring run prints the mean of vlb_bpd (F10) over fixed-size batches with
    the generators rng(seed, 'elbo', batch), its standard error and n: recomputed here, they agree
    to the printed 6 decimals. Memory does not grow with --n: the network never sees more than
    --batch examples and no autograd graph is kept."""
    capsys.readouterr()
    ds.main(["nll", "--run", str(tiny_runs / "cond"), "--n", "30", "--batch", "16", "--steps", "1"])
    captured = capsys.readouterr()
    found = re.finditer(r"^(\w+) bits/dim (\S+) \+- (\S+) \(n=(\d+)\)", captured.out, re.M)
    printed, se = {}, {}
    for m in found:
        printed[m[1]], se[m[1]] = float(m[2]), float(m[3])
        assert m[4] == "30"
    assert printed.keys() == {"elbo", "ode"} and "continuous data" in captured.out
    assert "nll network calls 2008/2008" in captured.err  # 2 batches of T + 4 x 1 RK4 stages
    m = ds.load_run(tiny_runs / "cond")
    x = ds.get_data(m.config).x_test[:30]
    seen = []

    def net(x, c, y=None):
        seen.append(len(x))
        return m.net(x, c, y)
    with torch.no_grad():
        direct = torch.cat([ds.vlb_bpd(ds.eps_model_of(net, m.process), m.process, x[i:i + 16],
                                       decoder="gaussian", generator=ds.rng(0, "elbo", b))["total"]
                            for b, i in enumerate(range(0, 30, 16))])
    assert abs(direct.mean().item() - printed["elbo"]) < 2e-6
    # the standard error printed beside it: sample std (n - 1) over sqrt(n), by hand
    mean = sum(direct.tolist()) / 30
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in direct.tolist()) / 29 / 30)
    assert abs(by_hand - se["elbo"]) < 2e-6, (by_hand, se)
    seen.clear()
    bpd, _ = ds.bits_per_dim(m._replace(net=net), x, steps=1, batch=16)
    assert max(seen) <= 16 and all(v.grad_fn is None and not v.requires_grad for v in bpd.values())


# --- the command line, controllable generation, your own data ------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Runs of a few steps made with the command line: ring with --conditional; ring without,
    plus a classifier in RUN/classifier (which takes RUN's config as its defaults); shapes with
    ddpm and with vp."""
    root, threads = tmp_path_factory.mktemp("runs"), torch.get_num_threads()
    small = ["--steps", "20", "--width", "32", "--depth", "1", "--n-train", "1000",
             "--n-samples", "0"]
    image = ["--data", "shapes", "--steps", "2", "--batch-size", "8", "--channels", "8",
             "--n-train", "64"]
    for argv in ([*small, "--data", "ring", "--conditional", "--out", root / "cond"],
                 [*small, "--data", "ring", "--out", root / "uncond"],
                 ["--classifier", "--steps", "10", "--out", root / "uncond" / "classifier"],
                 [*small, *image, "--out", root / "shapes"],
                 [*small, *image, "--method", "vp", "--out", root / "shapes_vp"]):
        ds.main(["train", *map(str, argv)])
    torch.set_num_threads(threads)
    return root


# The ring of 8 Gaussians (radius sqrt 2, std 0.1, y = the mode): the centres are 1.08 apart, so a
# sample of class k should lie nearest centre k. Shares are over 800 samples (100 per class), with
# 5 binomial standard errors SE = sqrt(p (1 - p) / 800) as the margin.
RING_CENTRES = math.sqrt(2) * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                           torch.sin(torch.arange(8) * math.pi / 4)], dim=1)


def share_in_class_mode(m, w=0.0, classifier=None, y=None):
    """The share of 800 samples, 100 of each class, nearest to the centre of their class's mode
    (the network is given y, default: the classes themselves)."""
    classes = torch.arange(800) % 8
    x = ds.draw_samples(m, 800, sampler="ancestral", steps=200, seed=1,
                        y=classes if y is None else y, w=w, classifier=classifier)
    return (torch.cdist(x, RING_CENTRES).argmin(dim=1) == classes).float().mean().item()


def test_f30_conditional_training_puts_each_class_in_its_mode(tmp_path):
    """conditional (label dropout 0.1), 600 steps. Measured over training seeds 0-4: 99.9% to
    100% in the class's mode, plain (w = 0) and with classifier-free guidance w = 1; bar 0.99 =
    0.999 - 5 SE (SE = 0.0011). The null label (the unconditional model the dropout trains) puts
    1/8 there (measured 0.12; bar 1/8 + 5 SE = 0.18): the labels do the work."""
    ds.train(small_config(tmp_path, data="ring", conditional=True))
    m = ds.load_run(tmp_path)
    null = torch.full((800,), 8)
    shares = share_in_class_mode(m), share_in_class_mode(m, w=1.0), share_in_class_mode(m, y=null)
    assert shares[0] >= 0.99 and shares[1] >= 0.99 and shares[2] < 0.18, shares


def test_f30_classifier_guidance_puts_each_class_in_its_mode(tmp_path):
    """An unconditional model and a classifier of the same config (600 steps each) in
    RUN/classifier; guidance w = 2 through guided_score at the score level. Measured over seeds
    0-4: 98.4% to 99.0% in the class's mode; bar 0.96 = 0.984 - 5 SE (SE = 0.0044). Unguided
    (w = 0): 0.12, bar 0.18. The classifier's held-out accuracy on the least noisy tenth:
    measured 96% to 99%; bar 0.89 = 0.96 - 5 SE (SE = 0.014)."""
    config = small_config(tmp_path, data="ring")
    ds.train(config)
    classifier = ds.train(replace(config, classifier=True, out=str(tmp_path / "classifier")))
    assert classifier.quality["low_noise_accuracy"] >= 0.89, classifier.quality
    m = ds.load_run(tmp_path)
    clf = ds.load_run(tmp_path / "classifier").net
    shares = [share_in_class_mode(m, w, clf) for w in (0.0, 2.0)]
    assert shares[0] < 0.18 and shares[1] >= 0.96, shares


def test_cli_guided_sampling_writes_samples_of_the_class(tiny_runs, capsys):
    """sample --class K --guidance W: classifier-free on the conditional run, with the run's
    classifier on the unconditional one; the classifier took the run's config."""
    clf_config = json.loads((tiny_runs / "uncond" / "classifier" / "config.json").read_text())
    assert clf_config["classifier"] and not clf_config["conditional"]
    assert (clf_config["data"], clf_config["width"], clf_config["steps"]) == ("ring", 32, 10)
    for run, guide in (("cond", "cfg"), ("uncond", "classifier")):
        capsys.readouterr()
        ds.main(["sample", "--run", str(tiny_runs / run), "--class", "3", "--guidance", "1",
                 "--n", "50", "--steps", "10"])
        captured = capsys.readouterr()
        assert {"cfg": "classifier-free", "classifier": "classifier "}[guide] in captured.out
        assert "sampling (ancestral, 10 steps) state 10/10" in captured.err
        stem = tiny_runs / run / f"samples_ancestral_{guide}1_class3"
        saved = torch.load(f"{stem}.pt", weights_only=True)
        assert saved["x"].shape == (50, 2) and torch.isfinite(saved["x"]).all()
        assert torch.equal(saved["y"], torch.full((50,), 3))
        assert read_png(f"{stem}.png")[:3] == (2 * 320 + 6, 320, 1)  # samples | data


def test_cli_sample_prints_the_mmd_line_of_train_computed_from_its_saved_samples(tiny_runs,
                                                                                 capsys):
    """`sample` on 2-D data prints train's "MMD^2 to held-out data ..., noise floor ..." line; its
    MMD^2 is recomputed here from samples_ddim.pt and the first k = 300 held-out points: unbiased
    MMD^2 (Gretton et al. 2012, eq. 3), the mean of 4 RBF kernels with bandwidths 1/8, 1/4, 1/2, 1
    of the median pairwise distance of the first 1,000 held-out points; equal to the printed 3
    significant digits."""
    capsys.readouterr()
    ds.main(["sample", "--run", str(tiny_runs / "uncond"), "--sampler", "ddim", "--steps", "5",
             "--n", "300"])
    out = capsys.readouterr().out
    printed = re.search(r"MMD\^2 to held-out data (\S+), noise floor (\S+) \(std of MMD\^2 "
                        r"between two held-out sets of 300\), prior (\S+)", out)
    assert printed, out
    x = torch.load(tiny_runs / "uncond" / "samples_ddim.pt", weights_only=True)["x"].double()
    y = ds.get_data(ds.load_run(tiny_runs / "uncond").config).x_test[:1000].double()
    d = (y[:, None] - y[None]).square().sum(-1).sqrt()
    med = d[torch.triu_indices(1000, 1000, 1).unbind()].median().item()
    x, y = x[:300], y[:300]

    def k(a, b):
        d2 = (a[:, None] - b[None]).square().sum(-1)
        return sum(torch.exp(-d2 / (2 * (med * f) ** 2)) for f in (1 / 8, 1 / 4, 1 / 2, 1)) / 4
    off = 1 - torch.eye(300, dtype=F64)
    mine = ((k(x, x) * off).sum() + (k(y, y) * off).sum()) / (300 * 299) - 2 * k(x, y).mean()
    assert float(printed[1]) == pytest.approx(mine.item(), rel=6e-3), (printed[0], mine)
    assert 0 < float(printed[2]) < float(printed[3])


@pytest.mark.parametrize("run, sampler", [("shapes", "ancestral"), ("shapes_vp", "em")])
def test_cli_inpaint_keeps_the_known_pixels_and_pictures_rows(tiny_runs, run, sampler):
    """sample --inpaint --mask centre: 3 held-out images, 2 completions each. The known pixels
    of every completion equal the held-out image exactly; the picture has a row per image
    (input with the missing square grey, 2 completions, original), 18 x 18 cells shown 4x."""
    ds.main(["sample", "--run", str(tiny_runs / run), "--inpaint", "--mask", "centre", "--n", "3",
             "--completions", "2", "--steps", "5"])
    stem = tiny_runs / run / f"inpaint_centre_{sampler}"
    saved = torch.load(f"{stem}.pt", weights_only=True)
    x0 = ds.get_data(ds.load_run(tiny_runs / run).config).x_test[:3]
    known, mask, x = x0.repeat_interleave(2, dim=0), saved["mask"], saved["x"]
    assert torch.equal(saved["known"], known) and mask.float().mean() == 0.75
    assert not mask[:, :, 4:12, 4:12].any() and mask[:, :, :4].all()
    assert torch.equal(x[mask], known[mask]) and not torch.equal(x[~mask], known[~mask])
    width, height, channels, pixels = read_png(f"{stem}.png")
    assert (width, height, channels) == (4 * 18 * 4, 3 * 18 * 4, 1)
    row = (1 + 8) * 4  # pixel row 8 of the first image row: its missing square is grey
    assert pixels[row * (1 + width) + 1 + (1 + 8) * 4] == 128


@pytest.mark.parametrize("run, argv, problem", [
    ("uncond", ["--class", "0", "--guide", "cfg"], "cfg needs a run trained with --conditional"),
    ("shapes", ["--class", "0"], "unconditional and has no classifier"),
    ("cond", ["--class", "8"], "the run has 8 classes, 0..7"),
    ("shapes", ["--guide", "classifier"], "has no classifier"),
    ("cond", ["--inpaint"], "needs images"),
    ("shapes", ["--inpaint", "--sampler", "ddim"], "cannot inpaint"),
    ("uncond/classifier", [], "is a classifier"),
])
def test_cli_bad_guidance_and_inpainting_exit_2_naming_the_problem(tiny_runs, capsys, run, argv,
                                                                    problem):
    err = one_line_error(capsys, ["sample", "--run", str(tiny_runs / run), "--n", "8", *argv])
    assert problem in err, err


def test_nll_with_no_ode_steps_or_one_grey_level_is_refused(tiny_runs, capsys):
    """vp, ve and subvp have only the ODE likelihood: --steps 0 would print no number; one grey
    level has no bins to dequantize over (bin width 2 / (K - 1))."""
    err = one_line_error(capsys, ["nll", "--run", str(tiny_runs / "shapes_vp"), "--steps", "0"])
    assert "steps: 0 leaves vp without a likelihood" in err, err
    err = one_line_error(capsys, ["nll", "--run", str(tiny_runs / "shapes_vp"), "--levels", "1"])
    assert "levels: 1 grey level has no bins" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_naming_the_flag(tiny_runs, capsys):
    for command in ("sample", "nll"):
        err = one_line_error(capsys, [command, "--run", str(tiny_runs / "cond"), "--device",
                                      "cuda"])
        assert "device: cuda is not available" in err, err


def test_bad_conditional_training_and_mismatched_classifier_are_clear_errors(tmp_path, capsys,
                                                                             tiny_runs):
    out = ["--out", str(tmp_path / "never")]
    err = one_line_error(capsys, ["train", "--data", "swissroll", "--conditional", *out])
    assert "no class labels" in err and "ring" in err
    err = one_line_error(capsys, ["train", "--data", "ring", "--conditional", "--classifier", *out])
    assert "drop --conditional" in err and not (tmp_path / "never").exists()
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "uncond", run)
    config = json.loads((run / "classifier" / "config.json").read_text())
    (run / "classifier" / "config.json").write_text(json.dumps({**config, "T": 500}))
    err = one_line_error(capsys, ["sample", "--run", str(run), "--class", "0"])
    assert "trained with T = 500, the run with T = 1000" in err


def test_trajectories_keep_a_bounded_number_of_states_and_pictures_fix_axes_to_the_data(
        tiny_runs):
    """--trajectory keeps the start and at most FRAMES evenly spaced states, whatever the number
    of steps (annealed Langevin's states included); the picture's data panel does not depend on
    the samples, even exploded ones."""
    m = ds.load_run(tiny_runs / "cond")
    for steps in (10, 400):
        frames = []
        ds.draw_samples(m, 30, steps=steps, frames=frames)
        done = [k for k, _ in frames]
        assert done[0] == 0 and done[-1] == steps and len(done) <= ds.FRAMES + 1, done
    data = ds.get_data(m.config).x_test[:2000]
    tame, wild = ds.picture(torch.zeros(100, 2), data), ds.picture(1e6 * torch.randn(100, 2), data)
    assert torch.equal(tame[:, 326:], wild[:, 326:]) and (tame[:, 326:] < 200).any()
    picture = ds.trajectory_picture(frames, data)
    assert picture.shape == (200, (len(frames) + 1) * 204 - 4)


@pytest.mark.parametrize("method", sorted(ds.METHODS))
def test_every_samplers_trajectory_runs_from_its_start_to_the_samples_it_returns(method):
    """The first frame is the prior draw, the last (marked with all the sampler's states) is the
    returned sample: for annealed Langevin, Tweedie's denoised end, not the state before it."""
    config = ds.TrainConfig(method=method, sigma_max=3.0, width=16, depth=1)
    m = ds.Model(config, ds.MLP(2, 16, 1), ds.METHODS[method].process(config), (2,), None)
    for name, sampler in ds.METHODS[method].samplers.items():
        frames = []
        x = ds.draw_samples(m, 5, sampler=name, steps=3, seed=1, frames=frames)
        start = ds.METHODS[method].prior(m.process, (5, 2), ds.rng(1, "sample"), "cpu")
        assert torch.equal(frames[0][1], start) and torch.equal(frames[-1][1], x), name
        assert frames[-1][0] == sampler.states(3, m.process), name


def test_pictures_show_vectors_of_any_dimension_and_few_images():
    """Vectors (N, d) are pictured by their first two coordinates (d = 1: on the line y = 0),
    the same picture as for those coordinates alone; image trajectories of fewer than 8 samples
    or held-out images show as many rows as both have, colour ones too; empty cells of a grid
    are white, not black images."""
    g = torch.Generator().manual_seed(0)
    x, data = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    zero = torch.zeros(300, 1)
    as_2d = ds.picture(x, data)
    assert torch.equal(ds.picture(torch.cat([x, zero], 1), torch.cat([data, zero], 1)), as_2d)
    on_line = ds.picture(torch.cat([x[:, :1], zero], 1), torch.cat([data[:, :1], zero], 1))
    assert torch.equal(ds.picture(x[:, :1], data[:, :1]), on_line)
    images = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    picture = ds.trajectory_picture([(0, images[:3]), (1, images[:3])], images)
    assert picture.shape == (14 + 3 * 10 * 4, 3 * 10 * 4)
    rgb = images.expand(6, 3, 8, 8)  # colour frames get the same picture, in RGB
    colour = ds.trajectory_picture([(0, rgb[:3]), (1, rgb[:3])], rgb)
    assert torch.equal(colour, picture[..., None].expand(*picture.shape, 3))
    grid = ds.image_grid(-torch.ones(6, 1, 8, 8))  # 8 cells a row: the last 2 empty, white
    assert grid.shape == (40, 320) and (grid[:, 240:] == 255).all()
    assert (grid[4:36, 4:36] == 0).all()


def test_a_chain_shorter_than_the_default_steps_is_sampled_with_all_its_steps(tiny_runs):
    """F6: a ddpm run with T = 20 (below ancestral's default 250 steps) samples with all 20 steps
    of its chain by default instead of failing after training."""
    m = ds.load_run(tiny_runs / "cond")
    sched = ds.Schedule.from_betas(ds.linear_betas(20))
    m = m._replace(process=sched, config=replace(m.config, T=20, sample_steps=0))
    frames = []
    ds.draw_samples(m, 4, sampler="ancestral", frames=frames)
    assert frames[-1][0] == 20


def test_trajectory_frames_are_never_wider_than_the_starting_noise():
    """A frame with 2% of its points exploded (to 5 or 50) is drawn on the square of the
    starting noise, whatever the size of the outliers, so the rest stays readable."""
    g = torch.Generator().manual_seed(0)
    data, noise = torch.rand(2000, 2, generator=g) - 0.5, torch.randn(2000, 2, generator=g)
    far, farther = (torch.cat([data[:1960], torch.full((40, 2), v)]) for v in (5.0, 50.0))
    picture = ds.trajectory_picture([(0, noise), (5, far)], data)
    assert torch.equal(ds.trajectory_picture([(0, noise), (5, farther)], data), picture)


def test_your_own_images_with_labels_end_to_end(tmp_path, capsys):
    """A user's file of 17-level 8x8 images with labels in a .pt dict: held-out share set by
    --holdout, image defaults, levels detected, the absolute data path stored (the run works
    from another folder), samples clipped to [-1, 1], nll --data in bits per 17-level value."""
    k = torch.randint(0, 17, (200, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.save({"x": k / 8 - 1, "y": torch.arange(200) % 3}, tmp_path / "mine.pt")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ds.main(["train", "--data", "mine.pt", "--conditional", "--holdout", "0.25", "--steps",
                 "2", "--channels", "8", "--n-samples", "8", "--sample-steps", "3", "--T", "100",
                 "--out", "run"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "150 training and 50 held-out examples of shape (1, 8, 8), 17 levels" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "mine.pt") and config["levels"] == 17
    assert (config["batch_size"], config["lr"]) == (64, 5e-4)  # image defaults
    x = ds.draw_samples(ds.load_run(tmp_path / "run"), 16, steps=3, y=torch.arange(16) % 3)
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    ds.main(["nll", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "mine.pt"), "--n",
             "4", "--steps", "0"])
    out = capsys.readouterr().out
    assert "elbo bits/dim" in out and "17-level data: bits per 17-level value" in out
    assert "n=4" in out


# --- the README, verbatim ------------------------------------------------------------------------


def readme_commands(start=("python ",)):
    """The lines of the README's sh blocks that start with `start`, in order (make and torchrun
    lines are covered by the Makefile and the DDP test)."""
    blocks = re.findall(r"```sh\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(start)]


SMALL = {"train": ["--steps", "3", "--n-train", "200", "--n-samples", "16", "--sample-steps", "3",
                   "--batch-size", "16", "--channels", "8", "--width", "16", "--T", "20"],
         "sample": ["--n", "8", "--steps", "3"], "nll": ["--n", "8", "--steps", "2"]}


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Every README command, in order, in a folder holding only ddpm_score.py, with small step
    counts appended (later flags win) and without NumPy: (command, completed process) pairs.
    Commands on one run folder (runs/NAME, and a line with none joins the next one's) run in
    README order; different run folders run two at a time, one per core."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copy(HERE / "ddpm_score.py", root / "ddpm_score.py")
    env, lines, chains, waiting = env_without_numpy(tmp_path_factory.mktemp("env")), [], {}, []
    for i, line in enumerate(readme_commands()):
        argv = shlex.split(line)
        argv[0] = sys.executable
        if argv[1] == "ddpm_score.py":
            argv += SMALL[argv[2]] if "--inpaint" not in argv else ["--n", "2", "--steps", "3"]
        lines.append((line, argv))
        match, waiting = re.search(r"runs/\w+", line), waiting + [i]
        folder = match.group() if match else "runs/default" if argv[1] == "ddpm_score.py" else ""
        if folder:
            chains[folder], waiting = chains.get(folder, []) + waiting, []
    assert not waiting, lines[waiting[0]][0]

    def run(chain):
        return [(i, subprocess.run(lines[i][1], cwd=root, env=env, capture_output=True,
                                   text=True, timeout=120)) for i in chain]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(pair for chain in pool.map(run, chains.values()) for pair in chain)
    return root, [(lines[i][0], done[i]) for i in range(len(lines))]


def test_every_example_of_the_help_is_a_readme_command():
    examples = [line.split("  #")[0].strip() for line in ds.main.__doc__.splitlines()]
    readme = readme_commands(("python ", "torchrun "))
    assert all(line in readme for line in examples if line.startswith(("python", "torchrun")))


def test_every_readme_command_runs_verbatim_without_warnings(readme_runs):
    root, done = readme_runs
    assert len(done) >= 8
    for line, proc in done:
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, (line, proc.stderr)
    run = root / "runs" / "default"
    assert {"ckpt.pt", "config.json", "loss.csv", "samples.png"} <= {p.name for p in run.iterdir()}
    assert read_png(run / "samples.png")[:3] == (2 * 320 + 6, 320, 1)  # samples | held-out data
    trains = [p for line, p in done if " train" in line and "--classifier" not in line]
    assert all("MMD^2" in p.stdout and "sampling (" in p.stderr for p in trains)
    nlls = [p for line, p in done if " nll " in line]
    assert nlls and all("nll network calls" in p.stderr and "bits/dim" in p.stdout for p in nlls)
