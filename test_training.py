"""Tests of the program around the math: training lowers the loss and yields samples close to the
data for every method, the command line works end to end (also from a lone copy of the file),
checkpoints round-trip and resume exactly, EMA and DDP behave, and bad input gets a clear error.

Kept small: the whole file runs in well under 90 s on 2 CPU cores.
"""
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ddpm_score as ds

HERE = Path(__file__).resolve().parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

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
    config = ds.TrainConfig(data="moons", steps=600, batch_size=128, lr=3e-3, lr_decay=True,
                            width=64, depth=2, ema=0.98, n_train=5000, n_samples=0, log_every=50,
                            ckpt_every=10**6, out=str(out), device="cpu")
    return replace(config, **changes)


def cli(*args, cwd, timeout=120):
    """Run `python ddpm_score.py ARGS` in a subprocess, one thread, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "ddpm_score.py", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


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


def quality(net, config, process, sampler="", steps=0, n=500):
    """(MMD^2 of n samples to held-out data, MMD^2 of n prior draws to held-out data)."""
    x_test = ds.get_data(config).x_test
    h = ds.mmd_bandwidths(x_test)
    x = ds.draw_samples(net, config, process, (2,), n, sampler=sampler, steps=steps, seed=1)
    prior = ds.METHODS[config.method].prior(process, (n, 2), ds.rng(2), "cpu")
    return ds.mmd2_unbiased(x, x_test[:n], h), ds.mmd2_unbiased(prior, x_test[:n], h)


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
    mmd2, prior_mmd2 = quality(result.ema, config, result.process, *QUICK_SAMPLERS[method])
    assert mmd2 < prior_mmd2 / 4, (mmd2, prior_mmd2)


@CUDA
@pytest.mark.parametrize("method", sorted(ds.METHODS))
def test_cuda_bf16_training_lowers_the_loss_and_samples_approach_the_data(tmp_path, method):
    """The same on CUDA under bf16 autocast (sampling in float32 with the EMA weights)."""
    config = small_config(tmp_path, method=method, device="cuda", amp=True)
    result = ds.train(config)
    losses = [row[1] for row in ds.load_checkpoint(result.paths["ckpt.pt"])["loss_log"].tolist()]
    assert losses[-1] < 0.85 * losses[0], losses
    net = result.ema.cpu()
    mmd2, prior_mmd2 = quality(net, config, result.process, *QUICK_SAMPLERS[method])
    assert mmd2 < prior_mmd2 / 4, (mmd2, prior_mmd2)


def test_image_data_trains_the_unet_and_pictures_a_grid(tmp_path):
    """A few UNet steps on the built-in shapes with class labels: finite loss, a 2x8 grid of
    16x16 images shown 4x with 1-pixel borders, and samples of the data's shape."""
    config = small_config(tmp_path, data="shapes", steps=3, batch_size=8, channels=8,
                          conditional=True, n_train=64, n_samples=16, sample_steps=3)
    result = ds.train(config)
    assert math.isfinite(result.loss)
    width, height, channels, _ = read_png(result.paths["samples.png"])
    assert (width, height, channels) == (8 * 18 * 4, 2 * 18 * 4, 1)
    run = ds.load_run(tmp_path)
    assert run.shape == (1, 16, 16) and run.num_classes == 4


def test_ema_with_decay_0_equals_the_live_model(tmp_path):
    result = ds.train(small_config(tmp_path, steps=20, ema=0.0, ema_warmup=0))
    for (name, live), ema in zip(result.net.state_dict().items(), result.ema.state_dict().values()):
        assert torch.equal(live, ema), name


def test_ema_averages_after_its_warm_up(tmp_path):
    """decay 0.9: after the warm-up the EMA lags the live weights (and is not a copy)."""
    result = ds.train(small_config(tmp_path, steps=30, ema=0.9, ema_warmup=10))
    live, ema = result.net.inp.weight, result.ema.inp.weight
    assert not torch.equal(live, ema) and torch.allclose(live, ema, atol=0.1)


# --- checkpoints and resuming --------------------------------------------------------------------


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
    """N steps, then N more with --resume, equals 2N straight (constant lr: the schedule does
    not depend on the total)."""
    config = small_config(tmp_path / "a", steps=40, ckpt_every=7, log_every=10, lr_decay=False)
    straight = ds.train(config)
    ds.train(replace(config, steps=20, out=str(tmp_path / "b")))
    resumed = ds.train(replace(config, out=str(tmp_path / "b"), resume=True))
    a, b = same_weights(straight.paths["ckpt.pt"], resumed.paths["ckpt.pt"])
    assert int(b["step"]) == 40
    assert torch.equal(a["loss_log"][:, :2], b["loss_log"][:, :2])


def test_checkpoint_is_tensors_only_and_strips_a_ddp_prefix(tmp_path):
    result = ds.train(small_config(tmp_path, steps=5))
    state = torch.load(result.paths["ckpt.pt"], weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "ddp.pt")
    loaded = ds.load_checkpoint(tmp_path / "ddp.pt")
    assert loaded["model"].keys() == result.net.state_dict().keys()
    assert json.loads(result.paths["config.json"].read_text())["steps"] == 5


def test_ddp_two_gloo_processes_keep_identical_weights_and_write_one_checkpoint(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import ddpm_score as ds\n"
        f"config = ds.TrainConfig(steps=20, batch_size=64, width=32, depth=1, n_train=2000,\n"
        f'                        n_samples=0, out={str(tmp_path / "run")!r}, device="cpu")\n'
        "result = ds.train(config)\n"
        f"out = {str(tmp_path)!r} + '/rank' + os.environ['RANK'] + '.pt'\n"
        "torch.save(result.net.state_dict(), out)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt", "config.json",
                                                                  "loss.csv"]
    assert int(ds.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"]) == 20


# --- the command line ----------------------------------------------------------------------------


def test_cli_train_sample_nll_from_a_folder_holding_only_the_module(tmp_path):
    """The single-file promise: a copy of ddpm_score.py alone trains, samples and scores."""
    shutil.copy(HERE / "ddpm_score.py", tmp_path / "ddpm_score.py")
    done = cli("train", "--steps", 60, "--width", 32, "--depth", 1, "--n-train", 2000,
               "--n-samples", 300, "--sample-steps", 20, "--out", "runs/t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MMD^2" in done.stdout and "step 60/60" in done.stderr
    run = tmp_path / "runs" / "t"
    assert {"ckpt.pt", "config.json", "loss.csv", "samples.png"} <= {p.name for p in run.iterdir()}
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert int(state["step"]) == 60
    assert read_png(run / "samples.png")[:3] == (2 * 320 + 6, 320, 1)  # samples | data

    done = cli("sample", "--run", "runs/t", "--n", 100, "--steps", 10, "--trajectory",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_png(run / "samples_ancestral.png")[:3] == (320, 320, 1)
    assert read_png(run / "trajectory_ancestral.png")[:2] == (10 * 200 + 9 * 4, 200)
    samples = torch.load(run / "samples_ancestral.pt", weights_only=True)["x"]
    assert samples.shape == (100, 2) and torch.isfinite(samples).all()

    done = cli("nll", "--run", "runs/t", "--n", 20, "--steps", 10, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    values = {line.split()[0]: float(line.split()[2]) for line in done.stdout.splitlines()
              if "bits/dim" in line}
    assert values.keys() == {"elbo", "ode"} and all(map(math.isfinite, values.values()))


def test_ctrl_c_saves_a_checkpoint_and_resuming_it_equals_training_straight(tmp_path):
    """Ctrl-C at whatever step: exit code 130, one message, a checkpoint; --resume then ends with
    exactly the weights of an uninterrupted run (the cosine schedule included)."""
    shutil.copy(HERE / "ddpm_score.py", tmp_path / "ddpm_score.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--steps", "400", "--width", "32", "--depth", "1", "--batch-size", "64",
            "--log-every", "10", "--n-train", "2000", "--n-samples", "0", "--out", "r"]
    proc = subprocess.Popen([sys.executable, "ddpm_score.py", "train", *args], cwd=tmp_path,
                            env={**env, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait for the first progress line (other lines, e.g. a library's warning, may come first).
    lines = iter(proc.stderr.readline, "")
    assert any(line.startswith("step ") for line in lines), "training never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err
    stopped_at = int(ds.load_checkpoint(tmp_path / "r" / "ckpt.pt")["step"])
    assert 10 <= stopped_at < 400
    config = ds.TrainConfig(**json.loads((tmp_path / "r" / "config.json").read_text()))
    ds.train(replace(config, out=str(tmp_path / "r"), resume=True))
    ds.train(replace(config, out=str(tmp_path / "straight")))
    same_weights(tmp_path / "r" / "ckpt.pt", tmp_path / "straight" / "ckpt.pt")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, listed", [("--method", "ddim", "ddpm"),
                                                 ("--data", "mnist", "moons"),
                                                 ("--schedule", "quadratic", "cosine")])
def test_unknown_names_exit_2_listing_the_choices(capsys, flag, value, listed):
    with pytest.raises(SystemExit) as exit:
        ds.main(["train", flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "invalid choice" in err and listed in err


def test_library_rejects_unknown_names_with_the_choices():
    with pytest.raises(ValueError, match="moons"):
        ds.check_config(ds.TrainConfig(data="mnist"))
    with pytest.raises(ValueError, match="'ve'"):
        ds.check_config(ds.TrainConfig(method="edm"))


def one_line_error(capsys, argv):
    """Run main(argv); it must exit with code 2 after one line on stderr. Returns that line."""
    capsys.readouterr()  # forget earlier output
    with pytest.raises(SystemExit) as exit:
        ds.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    return err


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
    images = ds.load_data(tmp_path / "u.npy")
    assert images.shape == (12, 1, 4, 4) and images.min() == -1 and images.max() <= 1


@pytest.mark.parametrize("name, make, problem", [
    ("nan.pt", lambda p: torch.save(torch.tensor([[0.0, math.nan]] * 20), p), "non-finite"),
    ("rank.pt", lambda p: torch.save(torch.zeros(20), p), "expected shape"),
    ("range.pt", lambda p: torch.save(torch.full((20, 1, 4, 4), 3.0), p), "[-1, 1]"),
    ("scale.pt", lambda p: torch.save(torch.full((20, 2), 255.0), p), "standardize"),
    ("dict.pt", lambda p: torch.save({"x": torch.zeros(20, 2)}, p), "expected a tensor"),
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


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    config = small_config(tmp_path, steps=10)
    ds.train(config)
    ckpt = tmp_path / "ckpt.pt"
    before = ckpt.read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss") as error:
        ds.train(replace(config, steps=20, lr=1e30, lr_warmup=0, resume=True))
    assert "step 10" in str(error.value)
    assert ckpt.read_bytes() == before
    with pytest.raises(SystemExit) as exit:
        ds.main(["train", "--out", str(tmp_path), "--resume", "--steps", "20", "--lr", "1e30",
                 "--lr-warmup", "0"])
    assert exit.value.code == 1 and "non-finite" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


# --- controllable generation: conditional training, guidance, inpainting -------------------------
# The ring of 8 Gaussians (radius sqrt 2, std 0.1, y = the mode): the centres are 1.08 apart, so a
# sample of class k should lie nearest centre k. Shares are over 800 samples (100 per class), with
# 5 binomial standard errors SE = sqrt(p (1 - p) / 800) as the margin.

RING_CENTRES = math.sqrt(2) * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                           torch.sin(torch.arange(8) * math.pi / 4)], dim=1)


def share_in_class_mode(net, config, process, n_per_class=100):
    """The share of samples, n_per_class of each class (net called with y), nearest to the centre
    of their class's mode."""
    y = torch.arange(8 * n_per_class) % 8
    x = ds.draw_samples(net, config, process, (2,), len(y), sampler="ancestral", steps=200,
                        seed=1, y=y)
    return (torch.cdist(x, RING_CENTRES).argmin(dim=1) == y).float().mean().item()


def test_conditional_training_puts_each_class_in_its_mode(tmp_path):
    """conditional=True (label dropout 0.1), 600 steps. Measured over training seeds 0-4: 99.9% to
    100% in the class's mode, plain (w = 0) and with classifier-free guidance w = 1; bar 0.99 =
    0.999 - 5 SE (SE = 0.0011). The null label (the unconditional model the dropout trains) puts
    1/8 there (measured 0.12; bar 1/8 + 5 SE = 0.18): the labels do the work."""
    config = small_config(tmp_path, data="ring", conditional=True)
    result = ds.train(config)
    plain = share_in_class_mode(result.ema, config, result.process)
    cfg = share_in_class_mode(ds.cfg_net(result.ema, 1.0), config, result.process)
    null = share_in_class_mode(lambda x, c, y: result.ema(x, c), config, result.process)
    assert plain >= 0.99 and cfg >= 0.99 and null < 0.18, (plain, cfg, null)


def test_classifier_guidance_puts_each_class_in_its_mode(tmp_path):
    """An unconditional model and a classifier of the same config (600 steps each; cross-entropy
    on data noised by q(x_t | x0)) in RUN/classifier; guidance w = 2 through guided_score.
    Measured over seeds 0-4: 98.4% to 99.0% in the class's mode (w = 1: 90%, this short-trained
    classifier being under-confident at middle noise levels; 95% after 1,500 steps); bar 0.96 =
    0.984 - 5 SE (SE = 0.0044). Unguided (w = 0): 0.12, bar 0.18. The classifier's held-out
    accuracy on the least noisy tenth of ~200 noised examples: measured 96% to 99%; bar 0.89 =
    0.96 - 5 SE (SE = 0.014)."""
    config = small_config(tmp_path, data="ring")
    result = ds.train(config)
    classifier = ds.train(replace(config, classifier=True, out=str(tmp_path / "classifier")))
    assert classifier.quality["low_noise_accuracy"] >= 0.89, classifier.quality
    run = ds.load_run(tmp_path)
    loaded = ds.load_classifier(tmp_path, run).net  # the classifier's EMA, from its run folder
    shares = [share_in_class_mode(ds.guide_net(run.net, config, run.process, w, loaded), config,
                                  run.process) for w in (0.0, 2.0)]
    assert shares[0] < 0.18 and shares[1] >= 0.96, shares


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Runs of a few steps made with the command line: ring with --conditional; ring without,
    plus a classifier in RUN/classifier (which takes RUN's config as its defaults); shapes with
    ddpm and with vp."""
    root, threads = tmp_path_factory.mktemp("runs"), torch.get_num_threads()
    small = ["--steps", "20", "--width", "32", "--depth", "1", "--n-train", "1000",
             "--n-samples", "0", "--threads", "1"]
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


def test_cli_guided_sampling_writes_samples_of_the_class(tiny_runs, capsys):
    """sample --class K --guidance W: classifier-free on the conditional run, with the run's
    classifier on the unconditional one; the classifier took the run's config."""
    clf_config = json.loads((tiny_runs / "uncond" / "classifier" / "config.json").read_text())
    assert clf_config["classifier"] and not clf_config["conditional"]
    assert (clf_config["data"], clf_config["width"], clf_config["steps"]) == ("ring", 32, 10)
    assert ds.make_parser().parse_args(["train", "--cond"]).conditional  # the old flag
    for run, guide in (("cond", "cfg"), ("uncond", "classifier")):
        capsys.readouterr()
        ds.main(["sample", "--run", str(tiny_runs / run), "--class", "3", "--guidance", "1",
                 "--n", "50", "--steps", "10"])
        out = capsys.readouterr().out
        assert {"cfg": "classifier-free", "classifier": "classifier "}[guide] in out, out
        stem = tiny_runs / run / f"samples_ancestral_{guide}1_class3"
        saved = torch.load(f"{stem}.pt", weights_only=True)
        assert saved["x"].shape == (50, 2) and torch.isfinite(saved["x"]).all()
        assert torch.equal(saved["y"], torch.full((50,), 3))
        assert read_png(f"{stem}.png")[:3] == (320, 320, 1)


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
    ("uncond", ["--class", "-1"], "the run has 8 classes, 0..7"),
    ("cond", ["--guidance", "-1"], "guidance: the weight must be a number >= 0"),
    ("shapes", ["--guide", "classifier"], "has no classifier"),
    ("cond", ["--inpaint"], "inpainting needs images"),
    ("shapes", ["--inpaint", "--sampler", "ddim"], "cannot inpaint"),
    ("shapes", ["--inpaint", "--completions", "0"], "--completions >= 1"),
    ("uncond/classifier", [], "is a classifier"),
])
def test_cli_bad_guidance_and_inpainting_exit_2_naming_the_problem(tiny_runs, capsys, run, argv,
                                                                    problem):
    err = one_line_error(capsys, ["sample", "--run", str(tiny_runs / run), "--n", "8", *argv])
    assert problem in err, err


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


def test_library_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="images"):
        ds.inpainting_mask((4, 2), "right")
    with pytest.raises(ValueError, match="centre"):
        ds.inpainting_mask((4, 1, 8, 8), "left")
    sched = ds.Schedule.from_betas(ds.linear_betas(10))
    known = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ds.ddpm_sample(lambda x, t: x, sched, known, known=known,
                       mask=ds.inpainting_mask((2, 1, 4, 4), "right"))
