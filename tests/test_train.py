"""`fastddpm train` end to end on tiny runs: outputs, exact resume, interrupts, NaN losses, bad data."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from fastddpm import DiffusionLoss, TrainStep
from fastddpm.app import (CheckpointError, DataError, NonFiniteLossError, TrainConfig, TrainingInterrupted,
                          load_checkpoint, train)
from fastddpm.app.data import BatchSampler, images_from_array, load_images, train_test_split
from fastddpm.app.digits import digit_recognisability
from fastddpm.app.model import build_model
from fastddpm.app.stop import StopFlag


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory):
    """48 real digits as a uint8 (N, H, W) .npy: a small real data set for quick runs."""
    from sklearn.datasets import load_digits
    images = np.round(load_digits().images[:48] * (255 / 16)).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "digits48.npy"
    np.save(path, images)
    return str(path)


def tiny_config(out, data, **overrides):
    settings = dict(data=data, out=str(out), steps=5, batch_size=8, timesteps=20, warmup=3, log_every=1,
                    checkpoint_every=2, num_samples=4, sample_steps=5, elbo_timesteps=3, test_fraction=0.25, threads=1)
    return TrainConfig(**{**settings, **overrides})


def quiet_train(config, **kwargs):
    return train(config, progress=False, print_fn=lambda *args, **kw: None, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_npy):
    """The checkpoint of a 5-step run that nothing stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    quiet_train(tiny_config(out, digits_npy))
    return load_checkpoint(str(out))


def assert_same_state(a, b):
    """Bit-identical weights, EMA, optimizer state, step and loss history."""
    assert a["step"] == b["step"]
    assert a["loss_history"] == b["loss_history"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name, value in state_a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[index][name])), f"adam {index}.{name}"
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_run_writes_checkpoint_samples_loss_curve_and_metrics(tmp_path):
    from matplotlib.image import imread
    config = tiny_config(tmp_path / "run", "digits", steps=3, test_fraction=0.05)
    metrics = quiet_train(config)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "samples.png", "loss.png", "metrics.json"):
        assert (run / name).is_file(), name
    assert imread(run / "samples.png").ndim == 3 and imread(run / "loss.png").ndim == 3
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    state = load_checkpoint(str(run))
    assert state["step"] == 3 and len(state["loss_history"]) == 3
    assert all(math.isfinite(value) for value in state["loss_history"])
    assert metrics["test_images"] == 90 and metrics["test_bpd"]["images"] == 90
    bpd = metrics["test_bpd"]
    assert math.isfinite(bpd["total_bpd"]) and bpd["total_bpd"] > bpd["prior_bpd"] > 0
    recognised = metrics["recognisability"]
    assert sum(recognised["sample_class_counts"]) == config.num_samples
    assert recognised["classifier_test_accuracy"] > 0.85  # the classifier itself knows the real digits
    # Noise after 3 steps is no digit: the recognisability check must say so.
    assert recognised["samples_recognisable_fraction"] < recognised["real_test_recognisable_fraction"]


def test_recognisability_accepts_real_digits_and_rejects_noise():
    images, labels = load_images("digits")
    train_images, test_images, train_labels, test_labels = train_test_split(images, labels, 0.1, seed=0)
    real = digit_recognisability(test_images, train_images, train_labels, test_images, test_labels)
    assert real["samples_recognisable_fraction"] > 0.8
    noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = digit_recognisability(noise, train_images, train_labels, test_images, test_labels)
    assert fake["samples_recognisable_fraction"] == 0.0


def test_resume_continues_exactly(tmp_path, digits_npy, uninterrupted):
    out = tmp_path / "run"
    quiet_train(tiny_config(out, digits_npy, steps=2))
    assert load_checkpoint(str(out))["step"] == 2
    quiet_train(tiny_config(out, digits_npy, steps=5), resume=True)
    assert_same_state(load_checkpoint(str(out)), uninterrupted)


def test_learned_variance_with_importance_sampled_t_resumes_exactly(tmp_path, digits_npy):
    options = dict(variance="learned_range", timestep_sampler="loss-second-moment", prediction="v", steps=4)
    quiet_train(tiny_config(tmp_path / "whole", digits_npy, **options))
    quiet_train(tiny_config(tmp_path / "parts", digits_npy, **{**options, "steps": 2}))
    metrics = quiet_train(tiny_config(tmp_path / "parts", digits_npy, **options), resume=True)
    whole, parts = load_checkpoint(str(tmp_path / "whole")), load_checkpoint(str(tmp_path / "parts"))
    assert whole["unet_config"]["learn_sigma"] and math.isfinite(metrics["test_bpd"]["total_bpd"])
    assert_same_state(parts, whole)
    for name, value in whole["timestep_sampler"].items():
        assert torch.equal(parts["timestep_sampler"][name], value)
    assert int(whole["timestep_sampler"]["loss_counts"].sum()) == 4 * 8  # every sample's loss recorded


def test_sigint_saves_a_checkpoint_and_resume_matches(tmp_path, digits_npy, uninterrupted, monkeypatch):
    original_step = TrainStep.step
    calls = []

    def step_then_interrupt(self, x0, **kwargs):
        loss = original_step(self, x0, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(TrainStep, "step", step_then_interrupt)
    out = tmp_path / "run"
    # Whatever the run found (a background job or nohup inherits SIGINT ignored) is restored.
    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3"):
        quiet_train(tiny_config(out, digits_npy, log_every=4, checkpoint_every=4))
    assert {sig: signal.getsignal(sig) for sig in found} == found
    assert load_checkpoint(str(out))["step"] == 3
    monkeypatch.setattr(TrainStep, "step", original_step)
    quiet_train(tiny_config(out, digits_npy), resume=True)
    assert_same_state(load_checkpoint(str(out)), uninterrupted)


@pytest.mark.parametrize("found", [signal.SIG_IGN, signal.default_int_handler])
def test_stop_flag_catches_sigint_and_restores_the_handler_it_found(found):
    """Ignored (a background job, nohup) or Python's default: a stop request while the run lasts,
    the handler found afterwards; a second SIGINT interrupts as usual."""
    before = signal.signal(signal.SIGINT, found)
    try:
        with StopFlag().installed() as stop:
            assert signal.getsignal(signal.SIGINT) not in (found, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is found
    finally:
        signal.signal(signal.SIGINT, before)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, digits_npy, monkeypatch):
    original_forward = DiffusionLoss.forward
    calls = []

    def forward_nan_from_step_3(self, model, x0, **kwargs):
        calls.append(1)
        loss = original_forward(self, model, x0, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(DiffusionLoss, "forward", forward_nan_from_step_3)
    out = tmp_path / "run"
    # Losses are checked every 4 steps, so the NaN of step 3 is found with step 4's: it must still name 3.
    with pytest.raises(NonFiniteLossError, match="became nan at step 3") as caught:
        quiet_train(tiny_config(out, digits_npy, steps=8, log_every=4, checkpoint_every=2))
    assert caught.value.step == 3 and caught.value.checkpoint == str(out / "checkpoint.pt")
    state = load_checkpoint(str(out))
    assert state["step"] == 2 and len(state["loss_history"]) == 2
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_a_finished_run_is_not_overwritten_and_resume_keeps_its_settings(tmp_path, digits_npy):
    out = tmp_path / "run"
    quiet_train(tiny_config(out, digits_npy, steps=1))
    with pytest.raises(CheckpointError, match="already holds a run"):
        quiet_train(tiny_config(out, digits_npy, steps=1))
    with pytest.raises(ValueError, match="--lr 0.5 differs from the run being resumed"):
        quiet_train(tiny_config(out, digits_npy, steps=2, lr=0.5), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        quiet_train(tiny_config(tmp_path / "elsewhere", digits_npy), resume=True)


def test_bad_checkpoints_give_clear_errors(tmp_path, uninterrupted):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(garbage))
    whole = tmp_path / "whole.pt"
    torch.save(uninterrupted, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a fastddpm checkpoint"):
        load_checkpoint(str(foreign))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="--prediction must be one of"):
        TrainConfig(prediction="score").validate()
    with pytest.raises(ValueError, match="--sample-steps must lie in"):
        TrainConfig(timesteps=10, sample_steps=20).validate()
    with pytest.raises(ValueError, match="--variance must be one of"):
        TrainConfig(variance="learned").validate()
    with pytest.raises(ValueError, match="cannot run with --compile"):
        TrainConfig(timestep_sampler="loss-second-moment", compile=True).validate()
    TrainConfig().validate()


# -- data ------------------------------------------------------------------------------------


def save_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def test_image_folder_loads_scaled_and_promotes_grey_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (8, 6), dtype=np.uint8)
    colour = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", grey)
    save_png(tmp_path / "b.png", colour)
    (tmp_path / "notes.txt").write_text("not an image")
    images, labels = load_images(str(tmp_path))
    assert labels is None and images.shape == (2, 3, 8, 6) and images.dtype == torch.float32
    expected_grey = torch.from_numpy(grey.astype(np.float32) / 127.5 - 1)
    for channel in range(3):
        assert torch.equal(images[0, channel], expected_grey)
    assert torch.equal(images[1], torch.from_numpy(colour.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1))
    (tmp_path / "b.png").unlink()
    assert load_images(str(tmp_path))[0].shape == (1, 1, 8, 6)


def test_bad_image_folders(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_images(str(tmp_path))
    save_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "b.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(DataError, match="one size.*'a.png' is 8x8 and 'b.png' is 10x8"):
        load_images(str(tmp_path))
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image 'b.png'"):
        load_images(str(tmp_path))
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(str(tmp_path / "nowhere"))


def test_npy_arrays_are_checked(tmp_path):
    def saved(array):
        path = tmp_path / "data.npy"
        np.save(path, array)
        return str(path)

    images = load_images(saved(np.array([[[0, 255]]], dtype=np.uint8)))[0]
    assert images.shape == (1, 1, 1, 2) and images.flatten().tolist() == [-1.0, 1.0]
    floats = np.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
    assert torch.equal(load_images(saved(floats))[0], torch.from_numpy(floats.astype(np.float32)))
    with pytest.raises(DataError, match=r"expected shape \(N, H, W\) or \(N, C, H, W\), got \(5, 4\)"):
        load_images(saved(np.zeros((5, 4), np.uint8)))
    with pytest.raises(DataError, match="dtype must be uint8 .* got int32"):
        load_images(saved(np.zeros((2, 4, 4), np.int32)))
    with pytest.raises(DataError, match=r"must lie in \[-1, 1\], got values from 0 to 255"):
        load_images(saved(np.linspace(0, 255, 32).reshape(2, 4, 4)))
    with pytest.raises(DataError, match="1 NaN or infinite"):
        load_images(saved(np.where(np.arange(32).reshape(2, 4, 4) == 5, np.nan, 0.0)))
    with pytest.raises(DataError, match="looks channels-last"):
        load_images(saved(np.zeros((2, 8, 8, 3), np.uint8)))
    with pytest.raises(DataError, match="holds no images"):
        images_from_array(np.zeros((0, 8, 8), np.uint8))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_images(str(tmp_path / "broken.npy"))


def test_nan_data_stops_training_before_it_starts(tmp_path):
    data = tmp_path / "nan.npy"
    np.save(data, np.where(np.arange(8 * 64).reshape(8, 8, 8) == 7, np.nan, 0.5))
    with pytest.raises(DataError, match="NaN"):
        quiet_train(tiny_config(tmp_path / "run", str(data)))


def test_batch_sampler_splits_every_batch_across_ranks_and_covers_each_epoch():
    samplers = [BatchSampler(30, 8, rank=rank, world_size=2, seed=3) for rank in range(2)]
    assert samplers[0].steps_per_epoch == 3 and samplers[0].batch == 4
    epoch = []
    for step in range(3):
        parts = [sampler.indices(step).tolist() for sampler in samplers]
        assert not set(parts[0]) & set(parts[1])
        epoch += parts[0] + parts[1]
    assert len(set(epoch)) == 24  # no index twice within an epoch
    assert samplers[0].indices(3).tolist() != samplers[0].indices(0).tolist()  # a fresh permutation
    assert BatchSampler(30, 8, seed=3).indices(4).tolist() == BatchSampler(30, 8, seed=3).indices(4).tolist()
    small = BatchSampler(5, 8, world_size=2)
    assert small.batch == 2 and small.global_batch == 4
    with pytest.raises(DataError, match="divisible by the 3 processes"):
        BatchSampler(30, 8, world_size=3)


def test_model_follows_the_images_and_keeps_attention_depths():
    model = build_model(TrainConfig(preset="tiny"), (3, 16, 16))
    assert model.config["in_channels"] == 3 and model.config["attention_resolutions"] == (8,)
    assert model(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible by 2; the images are 7x8"):
        build_model(TrainConfig(preset="tiny"), (1, 7, 8))
