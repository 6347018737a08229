"""What a trained model is judged by: its samples, its bits/dim (negative ELBO) on held-out
images, and how far its samples lie from the training set."""
import math

import torch

from .. import elbo_bpd, sample
from .distributed import sum_over_ranks


def draw_samples(model, count, image_shape, schedule, *, method, steps, eta, prediction, variance, seed, device,
                 progress=True, batch_size=500, clip_denoised=None):
    """`count` samples in [-1, 1], float32 on the CPU (`sample`'s defaults for everything else)."""
    generator = torch.Generator(device).manual_seed(seed)
    batches = []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            shape = (min(batch_size, count - start), *image_shape)
            batches.append(sample(model, shape, schedule, method=method, steps=steps, eta=eta, prediction=prediction,
                                  variance=variance, clip_denoised=clip_denoised, generator=generator,
                                  progress=progress).float().cpu())
    return torch.cat(batches).clamp(-1, 1)


def evaluate_bpd(model, images, schedule, *, prediction, variance, timesteps, seed, env=None, progress=True,
                 batch_size=256):
    """Mean negative ELBO in bits/dim of `images` (`elbo_bpd`'s defaults for everything else);
    under torchrun `images` is this rank's share and the means are over every rank's."""
    device = images.device
    generator = torch.Generator(device).manual_seed(seed)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, prior, decoder (t = 0), count
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        result = elbo_bpd(model, batch, schedule, prediction=prediction, variance=variance, timesteps=timesteps,
                          progress=progress, generator=generator)
        decoder = result["vb"][:, 0]  # column 0 is t = 0 for the full loop and the K-sample estimate
        sums += torch.stack([result["total_bpd"].double().sum(), result["prior_bpd"].double().sum(),
                             decoder.double().sum(), torch.tensor(float(batch.shape[0]), device=device)])
    if env is not None:
        sum_over_ranks(sums, env)
    count = max(sums[3].item(), 1.0)
    return {"total_bpd": sums[0].item() / count, "prior_bpd": sums[1].item() / count,
            "decoder_bpd": sums[2].item() / count, "images": int(sums[3].item())}


def nearest_distances(images, reference):
    """Per image, the RMS pixel distance to its nearest image of `reference`."""
    reference = reference.flatten(1).double()
    return torch.cdist(images.flatten(1).double(), reference).min(1).values / math.sqrt(reference.shape[1])


def nearest_neighbour_stats(samples, train_images, test_images, limit=10000):
    """How far samples lie from the training set, next to how far real held-out images lie.

    Samples as close to their nearest training image as real test images are lie on the data's
    manifold; a large fraction of near copies (closer than half the test images' median
    distance) warns of memorisation. Large data sets: the first `limit` images of each split.
    """
    train_images, test_images = train_images[:limit], test_images[:max(1, limit // 10)]
    sample_distance = nearest_distances(samples, train_images)
    stats = {"samples_mean_rms_distance": round(sample_distance.mean().item(), 4)}
    if test_images.shape[0] > 0:
        test_distance = nearest_distances(test_images, train_images)
        stats["real_test_mean_rms_distance"] = round(test_distance.mean().item(), 4)
        stats["samples_near_copies_fraction"] = round(
            (sample_distance < 0.5 * test_distance.median()).double().mean().item(), 4)
    return stats
