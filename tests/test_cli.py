"""The `fastddpm` command: train, sample, elbo, bench, verify, and their error messages."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastddpm.verify
from fastddpm.benchmarks import harness
from fastddpm.benchmarks import suite as bench
from fastddpm.cli import main

TINY_TRAIN = ["--steps", "2", "--batch-size", "8", "--timesteps", "20", "--warmup", "1", "--num-samples", "4",
              "--sample-steps", "4", "--elbo-timesteps", "3", "--test-fraction", "0.25", "--threads", "1",
              "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two busy cores crawl (they spin-wait on each other); the runs here are tiny."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_npy(tmp_path_factory):
    from sklearn.datasets import load_digits
    path = tmp_path_factory.mktemp("data") / "digits40.npy"
    np.save(path, np.round(load_digits().images[:40] * (255 / 16)).astype(np.uint8))
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_npy):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", data_npy, "--out", str(out), *TINY_TRAIN]) == 0
    return str(out)


def test_train_writes_the_run_folder(run_dir):
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "loss.png", "metrics.json", "samples.png"]
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["steps"] == 2 and metrics["test_images"] == 10


def test_sample_writes_a_grid_or_an_array_reproducibly(run_dir, tmp_path):
    from matplotlib.image import imread
    png = tmp_path / "grid.png"
    assert main(["sample", run_dir, "--method", "ddim", "--steps", "4", "--num", "6", "--out", str(png),
                 "--no-progress"]) == 0
    assert imread(png).ndim == 3
    arrays = []
    for seed, method in (("1", "ddim"), ("1", "ddim"), ("2", "ddim"), ("1", "ddpm")):
        path = tmp_path / f"samples_{len(arrays)}.npy"
        assert main(["sample", os.path.join(run_dir, "checkpoint.pt"), "--method", method, "--num", "3",
                     "--seed", seed, "--out", str(path), "--no-progress"]
                    + (["--steps", "4", "--eta", "0.5"] if method == "ddim" else ["--steps", "none"])) == 0
        arrays.append(np.load(path))
    assert arrays[0].shape == (3, 1, 8, 8) and np.abs(arrays[0]).max() <= 1
    assert np.array_equal(arrays[0], arrays[1])  # the seed fixes the samples
    assert not np.array_equal(arrays[0], arrays[2])
    assert not np.array_equal(arrays[0], arrays[3])


def test_elbo_prints_bits_per_dim(run_dir, data_npy, capsys):
    assert main(["elbo", run_dir, "--timesteps", "3", "--no-progress"]) == 0
    assert "the test split of" in capsys.readouterr().out
    assert main(["elbo", run_dir, "--data", data_npy, "--timesteps", "4", "--limit", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    bpd = float(out.split(": ")[1].split(" bits/dim")[0])
    assert np.isfinite(bpd) and bpd > 0 and "5 images" in out


@pytest.mark.parametrize("argv, message", [
    (["sample", "{tmp}/missing"], "no checkpoint at"),
    (["sample", "{tmp}/corrupt.pt"], "not a readable checkpoint"),
    (["elbo", "{tmp}/corrupt.pt"], "not a readable checkpoint"),
    (["sample", "{run}", "--steps", "50"], "--steps must lie in [1, T=20]"),
    (["elbo", "{run}", "--timesteps", "1"], "--timesteps must lie in [2, T=20]"),
    (["elbo", "{run}", "--data", "{tmp}/rgb.npy"], "has 3 channel(s); the model was trained on 1"),
    (["train", "--data", "{tmp}/empty", "--out", "{tmp}/r1"], "holds no images"),
    (["train", "--data", "{tmp}/rgb.npy", "--out", "{tmp}/r2", "--steps", "0"], "--steps must be an integer >= 1"),
    (["train", "--data", "{tmp}/wrong.npy", "--out", "{tmp}/r3"], "dtype must be uint8"),
    (["train", "--data", "{tmp}/rgb.npy", "--out", "{run}"], "already holds a run"),
])
def test_errors_are_one_clear_line(argv, message, run_dir, tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02 garbage")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 8, 8), np.uint8))
    np.save(tmp_path / "wrong.npy", np.zeros((4, 8, 8), np.int64))
    argv = [arg.format(tmp=tmp_path, run=run_dir) for arg in argv]
    assert main(argv + ["--no-progress"] * (argv[0] != "bench")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm {argv[0]}: error: ") and message in err and err.count("\n") == 1


def test_python_dash_m_fastddpm_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fastddpm", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "sample", "elbo", "bench", "verify"):
        assert command in result.stdout


def test_verify_reexecs_under_the_interpreter_on_cpu(monkeypatch):
    calls = []

    class Exec(Exception):
        pass

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise Exec

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(Exec):
        main(["verify", "--device", "cpu"])
    path, argv, env = calls[0]
    assert path == sys.executable and argv == [sys.executable, "-m", "fastddpm", "verify", "--device", "cpu"]
    assert env["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("passed, status", [(True, 0), (False, 1)])
def test_verify_exit_status_follows_the_result(passed, status, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = {}

    def fake_verify(device=None, **kwargs):
        seen["device"] = device
        return passed

    monkeypatch.setattr(fastddpm.verify, "verify", fake_verify)
    assert main(["verify", "--device", "cpu"]) == status
    assert seen["device"] == "cpu"
    assert ("error" in capsys.readouterr().err) == (not passed)


def fake_rows(device="cpu"):
    """Rows of the loss benchmark (times, eager baseline) and of the train step (throughput, diffusers baseline)."""
    common = dict(mode="full", metric="time", unit="ms", dtype="float32", device=device, torch="x", triton="y",
                  time="now")
    loss = [dict(common, op="loss_step_simple", shape="8x3x32x32", provider="eager", p50=2.0, p20=1.9, p80=2.1),
            dict(common, op="loss_step_simple", shape="8x3x32x32", provider="fastddpm", p50=0.5, p20=0.4, p80=0.6),
            dict(common, op="loss_step_simple", shape="8x3x32x32", provider="compile", p50=1.0, p20=0.9, p80=1.1),
            dict(common, op="loss_step_simple", shape="8x3x32x32", provider="eager", metric="bytes", unit="B",
                 p50=1e6, p20=1e6, p80=1e6)]
    train_step = [dict(common, op="train_step_tiny", shape="8x1x8x8", provider=provider, metric="throughput",
                       unit="images/s", p50=rate, p20=0.9 * rate, p80=1.1 * rate)
                  for provider, rate in (("diffusers", 100.0), ("fastddpm", 150.0))]
    return loss, train_step


def test_bench_table_json_and_plot(monkeypatch, tmp_path, capsys):
    from matplotlib.image import imread
    loss, train_step = fake_rows()
    by_name = {"loss": loss, "train_step": train_step}
    monkeypatch.setattr(bench, "run_benchmark", lambda name, device: by_name[name])
    json_path, plot_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "speedup.png"
    assert main(["bench", "--only", "loss", "train_step", "--json", str(json_path), "--plot", str(plot_path)]) == 0
    table = capsys.readouterr().out
    assert "4.00x" in table and "2.00x" in table and "1.50x" in table  # 2/0.5, 2/1, 150/100
    written = json.loads(json_path.read_text())
    assert len(written) == 6 and {row["op"] for row in written} == {"loss_step_simple", "train_step_tiny"}
    assert imread(plot_path).ndim == 3
    ratios = {(op, provider): value for op, *_, provider, baseline, value in harness.speedups(written)}
    assert ratios == {("loss_step_simple", "fastddpm"): 4.0, ("loss_step_simple", "compile"): 2.0,
                      ("train_step_tiny", "fastddpm"): 1.5}


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--only", "nothing"]) == 1
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_runs_a_real_benchmark_module(monkeypatch):
    """The import path fastddpm.benchmarks.bench_loss and its run() signature, on a tiny size."""
    monkeypatch.setitem(bench.CPU_OPTIONS, "loss", dict(sizes=((2, 3, 8, 8),), dtypes=(torch.float32,),
                                                        weightings=("simple",), providers=("fastddpm", "eager"),
                                                        reps=2))
    rows = bench.run_benchmark("loss", "cpu")
    assert {row["provider"] for row in rows} == {"fastddpm", "eager"}
    assert all(set(bench_field for bench_field in ("op", "metric", "unit", "p50")) <= set(row) for row in rows)
    assert any(entry[5] == "fastddpm" for entry in harness.speedups(rows))


# -- the command line's polish: threads, paths, errors, help, defaults, method vocabulary ------


@pytest.mark.parametrize("command", ["sample", "elbo"])
def test_sample_and_elbo_run_on_the_threads_given(command, run_dir, tmp_path, monkeypatch):
    import fastddpm.cli as cli
    from fastddpm.app.distributed import default_threads

    seen = []
    name = {"sample": "draw_samples", "elbo": "evaluate_bpd"}[command]
    original = getattr(cli, name)
    monkeypatch.setattr(cli, name, lambda *args, **kwargs: seen.append(torch.get_num_threads())
                        or original(*args, **kwargs))
    extra = (["--steps", "2", "--num", "2", "--out", str(tmp_path / "s.npy")] if command == "sample"
             else ["--timesteps", "2", "--limit", "2"])
    torch.set_num_threads(3)
    assert main([command, run_dir, "--threads", "2", "--no-progress", *extra]) == 0
    assert main([command, run_dir, "--no-progress", *extra]) == 0
    assert seen == [2, default_threads()] and torch.get_num_threads() == 3  # restored
    torch.set_num_threads(1)


def test_every_computing_command_takes_threads():
    from fastddpm.cli import _build_parser

    parser = _build_parser()
    for command in (["train"], ["sample", "run"], ["elbo", "run"], ["bench"], ["verify"]):
        assert parser.parse_args([*command, "--threads", "3"]).threads == 3


def test_a_run_finds_its_data_from_another_folder(tmp_path, data_npy, monkeypatch, capsys):
    import shutil
    (tmp_path / "project").mkdir()
    shutil.copy(data_npy, tmp_path / "project" / "digits.npy")
    monkeypatch.chdir(tmp_path / "project")
    assert main(["train", "--data", "digits.npy", "--out", "runs/a", *TINY_TRAIN, "--steps", "1"]) == 0
    state = torch.load(tmp_path / "project" / "runs" / "a" / "checkpoint.pt", weights_only=True)
    assert state["config"]["data"] == str(tmp_path / "project" / "digits.npy")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["elbo", "project/runs/a", "--timesteps", "2", "--no-progress"]) == 0
    assert f"the test split of {tmp_path / 'project' / 'digits.npy'}" in capsys.readouterr().out
    # resuming from the new folder with the same data named otherwise is the same run
    assert main(["train", "--data", "project/digits.npy", "--out", "project/runs/a", "--resume",
                 *TINY_TRAIN]) == 0


def test_a_foreign_or_garbage_checkpoint_is_one_clean_line(tmp_path, capsys):
    import fractions
    import pickle
    import warnings
    pickle.dump({"weights": fractions.Fraction(1, 3)}, open(tmp_path / "foreign.pt", "wb"), protocol=4)
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02 garbage")
    for name in ("foreign.pt", "garbage.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's warning about the pickle protocol stays inside
            assert main(["sample", str(tmp_path / name), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err == (f"fastddpm sample: error: {tmp_path / name} is not a readable checkpoint (truncated or "
                       "corrupt, or not written by `fastddpm train`)\n")


def test_sample_prints_the_path_it_wrote(run_dir, tmp_path, capsys):
    assert main(["sample", run_dir, "--steps", "2", "--num", "2", "--out", str(tmp_path / "grid"),
                 "--no-progress"]) == 0
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "grid").exists()
    assert capsys.readouterr().out.rstrip().endswith(f"to {tmp_path / 'grid.png'}")


def test_train_help_lists_the_presets_and_one_default_per_option(capsys):
    import dataclasses

    from fastddpm.app import TrainConfig
    from fastddpm.unet import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "{" + ",".join(sorted(PRESETS)) + "}" in text
    # one block per option: the line naming its flag, then its help's wrapped lines
    blocks, flag = {}, None
    for line in text.split("options:")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = ""
        if flag:
            blocks[flag] += " " + line.strip()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name != "compile":
            assert blocks[flag].count("(default:") == 1, blocks[flag]
    assert all(block.count("default") <= 1 for block in blocks.values())


def test_the_commands_use_the_api_defaults(run_dir, data_npy, tmp_path, capsys):
    """`fastddpm elbo` and `fastddpm sample` give what elbo_bpd and sample give with their defaults."""
    from fastddpm import elbo_bpd, sample
    from fastddpm.app import load_checkpoint, model_from_checkpoint
    from fastddpm.app.data import load_images

    model, schedule, config = model_from_checkpoint(load_checkpoint(run_dir))
    images = load_images(data_npy)[0][:6]
    assert main(["elbo", run_dir, "--data", data_npy, "--limit", "6", "--timesteps", "5", "--seed", "4",
                 "--no-progress"]) == 0
    printed = float(capsys.readouterr().out.split(": ")[1].split(" bits/dim")[0])
    with torch.no_grad():
        expected = elbo_bpd(model, images, schedule, prediction=config.prediction, variance=config.variance,
                            timesteps=5, progress=False, generator=torch.Generator().manual_seed(4))
    assert printed == pytest.approx(expected["total_bpd"].mean().item(), abs=1e-4)

    out = tmp_path / "s.npy"
    assert main(["sample", run_dir, "--num", "3", "--steps", "4", "--seed", "2", "--out", str(out),
                 "--no-progress"]) == 0
    with torch.no_grad():
        expected = sample(model, (3, 1, 8, 8), schedule, steps=4, prediction=config.prediction,
                          variance=config.variance, progress=False, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(np.load(out), expected.clamp(-1, 1).numpy())


def test_methods_come_from_the_options_vocabulary(monkeypatch):
    from fastddpm import options
    from fastddpm.app import TrainConfig
    from fastddpm.cli import _build_parser

    monkeypatch.setattr(options, "METHODS", (*options.METHODS, "plms"))
    parser = _build_parser()
    assert parser.parse_args(["sample", "run", "--method", "plms"]).method == "plms"
    assert parser.parse_args(["train", "--sample-method", "plms"]).sample_method == "plms"
    TrainConfig(sample_method="plms").validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "run", "--method", "lms"])
    with pytest.raises(ValueError, match="--sample-method must be one of ddpm, ddim, dpm\\+\\+2m.*plms"):
        TrainConfig(sample_method="lms").validate()
