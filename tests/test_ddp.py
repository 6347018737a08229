"""`torchrun --nproc_per_node 2 -m fastddpm train` on the CPU (gloo): DistributedDataParallel,
a noise stream per rank, losses averaged across ranks, and an exact resume."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastddpm import DiffusionLoss, TrainStep
from fastddpm.app import TrainConfig, load_checkpoint, model_from_checkpoint
from fastddpm.app.data import BatchSampler, load_images, train_test_split
from fastddpm.app.run import ema_decay_at

WORLD = 2
ARGS = ["--steps", "2", "--batch-size", "8", "--timesteps", "20", "--warmup", "4", "--num-samples", "4",
        "--sample-steps", "4", "--elbo-timesteps", "3", "--test-fraction", "0.25", "--checkpoint-every", "1",
        "--no-progress"]


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "fastddpm", "train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_npy(tmp_path_factory):
    from sklearn.datasets import load_digits
    path = tmp_path_factory.mktemp("data") / "digits40.npy"
    np.save(path, np.round(load_digits().images[:40] * (255 / 16)).astype(np.uint8))
    return str(path)


def test_two_processes_average_the_loss_and_the_gradients_and_resume(tmp_path, data_npy):
    out = tmp_path / "run"
    first = torchrun("--data", data_npy, "--out", str(out), *ARGS)
    assert "2 process(es) on cpu" in first.stdout
    at_two = load_checkpoint(str(out))
    assert at_two["world_size"] == WORLD and at_two["step"] == 2 and len(at_two["rng"]) == WORLD
    assert not torch.equal(at_two["rng"][0]["cpu"], at_two["rng"][1]["cpu"])  # a noise stream per rank

    # Step 3 of both ranks replayed in this process from the step-2 checkpoint: each rank's
    # batch slice and RNG state, the mean of their losses, one optimizer step on its gradient.
    config = TrainConfig(**at_two["config"])
    model, schedule, _ = model_from_checkpoint(at_two, ema=False)
    model.train()
    trainer = TrainStep(model, DiffusionLoss(schedule), lr=config.lr, ema_decay=config.ema_decay,
                        grad_clip=config.grad_clip, warmup_steps=config.warmup)
    trainer.optimizer.load_state_dict(at_two["optimizer"])
    trainer.ema_model.load_state_dict(at_two["ema"])
    trainer.num_steps = 2
    trainer.ema_decay = ema_decay_at(2, config.ema_decay)
    images, _ = load_images(data_npy)
    train_images = train_test_split(images, None, config.test_fraction, seed=config.seed)[0]
    loss_fn = DiffusionLoss(schedule)

    def mean_of_rank_losses(network, unused_x0):
        losses = []
        for rank in range(WORLD):
            torch.set_rng_state(at_two["rng"][rank]["cpu"])
            sampler = BatchSampler(train_images.shape[0], config.batch_size, rank=rank, world_size=WORLD,
                                   seed=config.seed)
            losses.append(loss_fn(network, train_images[sampler.indices(2)]))
        assert not torch.equal(losses[0], losses[1])
        return sum(losses) / WORLD

    trainer.loss_fn = mean_of_rank_losses
    expected_loss = trainer.step(train_images[:1]).item()

    torchrun("--data", data_npy, "--out", str(out), "--resume", *ARGS[:1], "3", *ARGS[2:])
    at_three = load_checkpoint(str(out))
    assert at_three["step"] == 3 and at_three["loss_history"][:2] == at_two["loss_history"]
    assert at_three["loss_history"][2] == pytest.approx(expected_loss, rel=1e-5)
    # Summation order differs across processes, and Adam's normalised step turns a near-zero
    # gradient's rounding into a visible update: 1e-5 is 1.3% of this step's size (lr 7.5e-4).
    for name, value in model.state_dict().items():
        torch.testing.assert_close(at_three["model"][name], value, rtol=0, atol=1e-5, msg=name)
    for name, value in trainer.ema_model.state_dict().items():
        torch.testing.assert_close(at_three["ema"][name], value, rtol=0, atol=1e-5, msg=name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["test_bpd"]["images"] == 10  # every test image, once
