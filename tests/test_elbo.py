"""The bound in practice (fastddpm/elbo.py): the importance sampler of t, and elbo_bpd's full
loop and stratified estimate, against improved-diffusion's algorithms and closed forms."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastddpm
from fastddpm import NoiseSchedule
from fastddpm import reference as R
from fastddpm.resample import LossSecondMomentSampler
from fastddpm.elbo import (collapsed_strata_stderr, elbo_bpd, stratified_timesteps,
                           stratum_edges)

# -- the importance sampler ---------------------------------------------------------------------


class DequeSampler:
    """improved-diffusion's LossSecondMomentResampler, re-stated: per t a list of the last H
    losses; p ∝ sqrt(mean L²) once every list is full, mixed with `uniform_prob` of uniform."""

    def __init__(self, T, H, uniform_prob):
        self.T, self.H, self.uniform_prob = T, H, uniform_prob
        self.history = [[] for _ in range(T)]
        self.counts = [0] * T

    def update(self, t, losses):
        for step, loss in zip(t.tolist(), losses.tolist()):
            self.history[step] = (self.history[step] + [loss])[-self.H:]
            self.counts[step] += 1

    def probabilities(self):
        if any(len(h) < self.H for h in self.history):
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = torch.tensor([math.sqrt(sum(x * x for x in h) / self.H) for h in self.history], dtype=torch.float64)
        return p / p.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.T


def random_batches(T, count, generator):
    """Batches of varied sizes, with repeated t (more than H = 3 times in some batches)."""
    for index in range(count):
        size = 1 + index % 9
        t = torch.randint(0, T, (size,), generator=generator)
        if index % 4 == 0:
            t[: size // 2 + 1] = index % T  # one t many times
        yield t, torch.rand(size, generator=generator, dtype=torch.float64) * (1 + t)


def test_sampler_is_uniform_until_every_t_has_a_full_history():
    sampler = LossSecondMomentSampler(6, history_per_term=3)
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    for step in range(6):
        sampler.update(torch.tensor([step, step]), torch.tensor([1.0, 2.0 + step]))
        assert torch.equal(sampler.probabilities(), uniform) and not sampler.warmed_up()
    t, weights = sampler.sample(1000, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(6)) and torch.allclose(weights, torch.ones(1000))
    sampler.update(torch.arange(6), torch.ones(6))
    assert sampler.warmed_up() and not torch.equal(sampler.probabilities(), uniform)


def test_sampler_history_and_probabilities_match_improved_diffusion():
    T, H = 7, 3
    sampler, expected = LossSecondMomentSampler(T, history_per_term=H, uniform_prob=0.01), DequeSampler(T, H, 0.01)
    generator = torch.Generator().manual_seed(1)
    for t, losses in random_batches(T, 40, generator):
        sampler.update(t, losses)
        expected.update(t, losses)
        torch.testing.assert_close(sampler.probabilities(), expected.probabilities(), rtol=1e-12, atol=0)
    assert sampler.warmed_up()
    for step in range(T):  # the ring buffer holds the last H losses of each t (in some rotation)
        assert sorted(sampler.loss_history[step].tolist()) == sorted(expected.history[step])
    # p ∝ sqrt(E[L²]): larger losses at larger t (random_batches scales them by 1 + t)
    assert sampler.probabilities()[-1] > 2 * sampler.probabilities()[0]


def test_sampler_weights_are_unbiased():
    T = 5
    sampler = LossSecondMomentSampler(T, history_per_term=2, uniform_prob=0.05)
    sampler.update(torch.arange(T).repeat(2), torch.tensor([0.1, 1.0, 3.0, 0.5, 8.0]).repeat(2))
    loss_of_t = torch.tensor([0.3, 2.0, 1.0, 0.2, 5.0], dtype=torch.float64)
    probs = sampler.probabilities()
    # exactly: sum_t p_t · 1 / (T p_t) · L_t is the uniform mean
    torch.testing.assert_close((probs / (T * probs) * loss_of_t).sum(), loss_of_t.mean())
    t, weights = sampler.sample(200_000, generator=torch.Generator().manual_seed(2))
    weighted = weights.double() * loss_of_t[t]
    assert abs(weighted.mean() - loss_of_t.mean()) < 4 * weighted.std() / math.sqrt(t.numel())
    frequencies = torch.bincount(t, minlength=T).double() / t.numel()
    assert (frequencies - probs).abs().max() < 0.005


def test_sampler_state_stays_on_its_device_with_no_host_sync():
    """On the meta device no value can be read: update and sample never synchronise."""
    sampler = LossSecondMomentSampler(NoiseSchedule.linear(20), device="meta")
    t = torch.randint(0, 20, (16,)).to("meta")
    sampler.update(t, torch.rand(16, device="meta"))
    drawn, weights = sampler.sample(8)
    assert drawn.device.type == weights.device.type == sampler.loss_history.device.type == "meta"
    assert sampler.loss_counts.device.type == "meta"


def test_sampler_state_dict_round_trip():
    sampler = LossSecondMomentSampler(4, history_per_term=2)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.arange(8.0))
    copy = LossSecondMomentSampler(4, history_per_term=2)
    copy.load_state_dict(sampler.state_dict())
    assert torch.equal(copy.probabilities(), sampler.probabilities())


def _distributed_worker(rank, world_size, init_file, out_folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = LossSecondMomentSampler(5, history_per_term=2)
        for step in range(3):
            # each rank its own batch, of its own size
            size = 2 + rank + step
            t = (torch.arange(size) * (rank + 1) + step) % 5
            sampler.update(t, (t + 1).double() * (rank + 1) + step)
        torch.save(sampler.state_dict(), os.path.join(out_folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sampler_gathers_every_ranks_losses(tmp_path):
    """Two gloo processes on CPU: both keep the history of all ranks' losses, as one process
    updating with the concatenation in rank order would."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    single = DequeSampler(5, 2, 0.001)
    for step in range(3):
        for rank in range(2):
            size = 2 + rank + step
            t = (torch.arange(size) * (rank + 1) + step) % 5
            single.update(t, (t + 1).double() * (rank + 1) + step)
    for state in states:
        assert state["loss_counts"].tolist() == single.counts
        for step in range(5):  # the last H losses (zeros where fewer were recorded), in some rotation
            padded = single.history[step] + [0.0] * (2 - len(single.history[step]))
            assert sorted(state["loss_history"][step].tolist()) == sorted(padded)
    assert torch.equal(states[0]["loss_history"], states[1]["loss_history"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: LossSecondMomentSampler(2.5), TypeError, "schedule_or_T"),
    (lambda: LossSecondMomentSampler(10, history_per_term=0), ValueError, "history_per_term"),
    (lambda: LossSecondMomentSampler(10, uniform_prob=1.5), ValueError, "uniform_prob"),
    (lambda: LossSecondMomentSampler(10).sample(0), ValueError, "batch_size"),
    (lambda: LossSecondMomentSampler(10).sample(4, generator=3), TypeError, "generator"),
    (lambda: LossSecondMomentSampler(10).update(torch.tensor([1, 2]), torch.rand(3)), ValueError, "same shape"),
    (lambda: LossSecondMomentSampler(10).update(torch.tensor([1.0]), torch.rand(1)), TypeError, "int64"),
])
def test_sampler_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- elbo_bpd -------------------------------------------------------------------------------------

SMALL = NoiseSchedule.cosine(12)


class TinyModel(nn.Module):
    """A fixed random conv net with a timestep and an optional class input: output channels
    `out_scale` times the input's (2 for learned_range)."""

    def __init__(self, channels=3, out_scale=1, classes=0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, out_scale * channels, 3, padding=1)
        with torch.no_grad():
            for parameter in self.conv.parameters():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        self.label = nn.Embedding(classes, out_scale * channels) if classes else None

    def forward(self, x, t, y=None):
        out = self.conv(x) + 0.01 * t.float().reshape(-1, 1, 1, 1)
        if self.label is not None:
            out = out + self.label(y)[:, :, None, None]
        return out


def images(shape, seed=0):
    """Data on the 256-value grid of the decoder, the edges ±1 included."""
    k = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return 2 * k.float() / 255 - 1


@pytest.mark.parametrize("variance, prediction", [("fixed_small", "eps"), ("learned_range", "v"),
                                                  ("fixed_large", "x0")])
def test_full_loop_is_improved_diffusions_calc_bpd_loop(triton_backend, variance, prediction):
    """t from T-1 down to 0, a fresh eps for each (drawn in that order from the generator), the
    vb term and the MSEs at every t (column t), total = prior + sum of the vb terms; x0_hat
    clipped by default, as calc_bpd_loop."""
    x0 = images((2, 3, 4, 5))
    model = TinyModel(out_scale=2 if variance == "learned_range" else 1)
    options = dict(prediction=prediction, variance=variance)
    result = elbo_bpd(model, x0, SMALL, generator=torch.Generator().manual_seed(5), progress=False, **options)
    options["clip_denoised"] = True
    generator = torch.Generator().manual_seed(5)
    for step in reversed(range(SMALL.num_timesteps)):
        t = torch.full((2,), step)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = R.q_sample(x0, t, noise, SMALL)
        output = model(x_t, t).double()
        vb = R.vb_terms_bpd(output, x0.double(), x_t.double(), t, SMALL, **options)
        x0_hat, eps_hat = R.x0_eps_from_output(R.split_model_output(output, x_t, variance)[0], x_t.double(), t, SMALL,
                                               prediction, clip_denoised=True)
        torch.testing.assert_close(result["vb"][:, step].double(), vb, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["mse"][:, step].double(), (eps_hat - noise).square().flatten(1).mean(1),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["xstart_mse"][:, step].double(), (x0_hat - x0).square().flatten(1).mean(1),
                                   rtol=1e-4, atol=1e-6)
    prior = R.prior_bpd(x0.double(), SMALL)
    torch.testing.assert_close(result["prior_bpd"].double(), prior)
    torch.testing.assert_close(result["total_bpd"], result["prior_bpd"] + result["vb"].sum(1))
    assert result["vb"].shape == result["mse"].shape == (2, SMALL.num_timesteps)


def test_backends_and_batched_timesteps_agree(triton_backend):
    x0 = images((2, 3, 4, 4), seed=1)
    model = TinyModel(out_scale=2, classes=4)
    y = torch.tensor([1, 3])
    options = dict(variance="learned_range", clip_denoised=True, progress=False, model_kwargs={"y": y})
    base = elbo_bpd(model, x0, SMALL, generator=torch.Generator().manual_seed(0), **options)
    for batch_timesteps in (True, 5):  # class labels tiled with the batch
        batched = elbo_bpd(model, x0, SMALL, generator=torch.Generator().manual_seed(0),
                           batch_timesteps=batch_timesteps, **options)
        for key in base:
            torch.testing.assert_close(batched[key], base[key], rtol=1e-6, atol=1e-7)
    fastddpm.set_backend("reference")
    reference = elbo_bpd(model, x0, SMALL, generator=torch.Generator().manual_seed(0), **options)
    for key in ("mse", "xstart_mse", "prior_bpd"):
        torch.testing.assert_close(reference[key], base[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reference["vb"][:, 1:], base["vb"][:, 1:], rtol=1e-4, atol=1e-6)
    # The decoder (t = 0): the float32 reference takes differences of erf values near 1, good to
    # ~1e-3 relative (and run to run, as torch's vectorised erf follows memory alignment); the
    # kernel's decoder is checked against float64 and exact tail probabilities in test_vlb.py.
    torch.testing.assert_close(reference["vb"][:, 0], base["vb"][:, 0], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(reference["total_bpd"], base["total_bpd"], rtol=1e-2, atol=1e-4)


def test_dynamic_thresholding_and_float64(triton_backend):
    x0 = images((2, 3, 4, 4), seed=2)
    model = TinyModel()
    for dtype in (torch.float32, torch.float64):
        result = elbo_bpd(model.to(dtype), x0.to(dtype), SMALL, clip_denoised="dynamic", timesteps=4, progress=False,
                          generator=torch.Generator().manual_seed(0))
        assert result["total_bpd"].dtype == dtype and bool(torch.isfinite(result["total_bpd"]).all())


def test_stratified_timesteps_cover_every_t_uniformly_within_strata():
    T, K = 100, 10
    for strata in ("log", "equal"):
        edges = stratum_edges(T, K, strata)
        assert edges[0] == 1 and edges[-1] == T and bool((edges[1:] > edges[:-1]).all())
        t, sizes = stratified_timesteps(T, K, 20_000, strata=strata, generator=torch.Generator().manual_seed(0))
        assert sizes.sum() == T and bool((t[:, 0] == 0).all())
        starts = torch.cat([torch.zeros(1, dtype=torch.long), edges[:-1]])
        assert bool(((t >= starts) & (t < starts + sizes.long())).all())
        # uniform inside each stratum: every t equally likely, so E[n_j L(t_j)] = sum of L over stratum j
        for column in range(1, K):
            counts = torch.bincount(t[:, column] - starts[column], minlength=int(sizes[column])).double()
            expected = t.shape[0] / sizes[column]
            assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    assert stratum_edges(100, 10).tolist() == [1, 2, 3, 5, 8, 13, 22, 36, 60, 100]


def test_collapsed_strata_standard_error():
    # pairs (1, 3) and (2, 6): 2 ((1-2)² + (3-2)²) + 2 ((2-4)² + (6-4)²) = 4 + 16
    assert collapsed_strata_stderr(torch.tensor([[1.0, 3.0, 2.0, 6.0]])).item() == pytest.approx(math.sqrt(20))
    # an odd count: the last three together, 3/2 ((1-3)² + 0 + (5-3)²) = 12
    assert collapsed_strata_stderr(torch.tensor([[1.0, 3.0, 5.0]])).item() == pytest.approx(math.sqrt(12))
    assert math.isnan(collapsed_strata_stderr(torch.tensor([[1.0]])).item())


# -- the closed form: quantised Gaussian data --------------------------------------------------

MEAN, STD = 0.1, 0.25
GRID = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1  # the decoder's 256 values on [-1, 1]


def quantised_gaussian():
    """P(k) of N(MEAN, STD²) quantised to the decoder's bins: [x_k - 1/255, x_k + 1/255], the
    end bins open to ±infinity, exactly the discretisation the decoder's likelihood uses."""
    upper = torch.special.ndtr((GRID + 1 / 255 - MEAN) / STD)
    lower = torch.special.ndtr((GRID - 1 / 255 - MEAN) / STD)
    upper[-1], lower[0] = 1.0, 0.0
    return upper - lower


class GaussianOptimal(nn.Module):
    """The exact reverse process of Gaussian data N(m, s²): with ab = ab[t],
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s² + 1 - ab) (linear), and
    Var[x_{t-1} | x_t] = posterior variance + coef1² Var[x0 | x_t], Var[x0 | x_t] = s² (1 - ab) /
    (ab s² + 1 - ab), as a learned_range output. The quantised data is treated as Gaussian:
    STD = 0.25 is 32 bins wide, so its moments differ from the Gaussian's by ~1e-4 (Sheppard)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t, t):
        def at(table):
            return table[t].reshape(-1, 1, 1, 1).to(x_t.dtype)

        s = self.schedule
        ab = at(s.alphas_cumprod)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * MEAN) / (ab * STD ** 2 + 1 - ab)
        x0_variance = STD ** 2 * (1 - ab) / (ab * STD ** 2 + 1 - ab)
        log_var = torch.log(at(s.posterior_variance) + at(s.posterior_mean_coef1) ** 2 * x0_variance)
        low, high = at(s.posterior_log_variance_clipped), at(s.log_betas)
        return torch.cat([eps, (2 * (log_var - low) / (high - low) - 1).expand_as(eps)], dim=1)


def test_bound_of_quantised_gaussian_data_is_just_above_its_entropy(reference_backend):
    """Gaussian data quantised to the decoder's 256 bins, under its exact optimal model: the
    bound is an upper bound on the model's NLL, itself >= the data's entropy, and with the
    exact reverse moments it is tight up to the non-Gaussianity of q(x_{t-1} | x_t) near t = 0
    (measured: 0.005 ± 0.002 bits/dim at T = 200, -0.001 ± 0.002 at T = 100, 60 x 8192 pixels).

    The gap is measured per image against the data's exact -log2 P(x) (a control variate for
    the sample's own likelihood), so its noise is that of the eps draws, ~0.009 bits/dim here:
    its standard error is estimated from the 32 images. Failing modes this catches: any term
    off by a percent (the KL terms sum to ~3 bits/dim, the decoder ~4, so 0.03), a wrong
    decoder edge or bin width, a missing term (the bound falls below the entropy).

    The reference backend keeps 32k pixels x 100 steps fast on a CPU; the kernels compute the
    same loop (test_backends_and_batched_timesteps_agree)."""
    P = quantised_gaussian()
    entropy = -(P * P.log2()).sum().item()
    # the closed form of the continuous approximation, a check on P: h(N) + log2(255 / 2)
    assert entropy == pytest.approx(0.5 * math.log2(2 * math.pi * math.e * STD ** 2) + math.log2(127.5), abs=1e-3)
    schedule = NoiseSchedule.linear(100, rescale_with_T=True)
    generator = torch.Generator().manual_seed(0)
    batch = 32
    index = torch.multinomial(P.float(), batch * 32 * 32, replacement=True, generator=generator)
    x0 = GRID[index].float().reshape(batch, 1, 32, 32)
    data_nll = (-P.log2())[index].reshape(batch, -1).mean(1)
    model = GaussianOptimal(schedule)
    full = elbo_bpd(model, x0, schedule, variance="learned_range", batch_timesteps=10, progress=False,
                    generator=generator)
    gap = full["total_bpd"].double() - data_nll
    stderr = gap.std() / math.sqrt(batch)
    assert -4 * stderr < gap.mean() < 0.03, (gap.mean(), stderr)
    assert abs(full["total_bpd"].mean() - entropy) < 0.05
    # the K = 10 estimate (log strata) agrees with the full loop within a few standard errors
    # (the full loop's own noise, 10x smaller, is neglected)
    estimate = elbo_bpd(model, x0, schedule, variance="learned_range", timesteps=10, batch_timesteps=True,
                        progress=False, generator=generator)
    difference = (estimate["total_bpd"] - full["total_bpd"]).double().mean()
    assert abs(difference) < 4 * estimate["total_bpd_stderr"].double().square().sum().sqrt() / batch
    assert estimate["vb"].shape == estimate["t"].shape == (batch, 10)


def test_progress_bar(triton_backend, capsys):
    elbo_bpd(TinyModel(), images((1, 3, 4, 4)), SMALL, timesteps=3, generator=torch.Generator().manual_seed(0))
    assert "bits/dim" in capsys.readouterr().err


def _constant_output(x_t, t):
    return torch.zeros_like(x_t[:, :1])


@pytest.mark.parametrize("call, error, match", [
    (lambda x0: elbo_bpd("model", x0, SMALL), TypeError, "model must be callable"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, timesteps=1), ValueError, "timesteps must be"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, timesteps=13), ValueError, "timesteps must be"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, timesteps=True), ValueError, "timesteps must be"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, batch_timesteps=0), ValueError, "batch_timesteps"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, strata="uniform"), ValueError, "strata must be one of"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, model_kwargs=[1]), TypeError, "model_kwargs"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, tanh_cdf=None), TypeError, "tanh_cdf"),
    (lambda x0: elbo_bpd(TinyModel(), x0, SMALL, variance="learned"), ValueError, "variance must be one of"),
    (lambda x0: elbo_bpd(_constant_output, x0, SMALL, progress=False), ValueError, "model_output must have shape"),
    (lambda x0: elbo_bpd(TinyModel(), x0, "schedule"), TypeError, "schedule must be"),
])
def test_elbo_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(images((2, 3, 4, 4)))
