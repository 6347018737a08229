"""Sample quality: the Fréchet distance, its feature space on the real digits, and `fastddpm quality`."""
import json

import numpy as np
import pytest
import torch

from fastddpm.app.data import load_images, train_test_split
from fastddpm.app.digits import DigitJudge, digit_recognisability
from fastddpm.app.quality import FeatureSpace, frechet_distance, gaussian_stats
from fastddpm.app.sweep import plan_of
from fastddpm.cli import main


def random_gaussian(rng, dim):
    """A mean and a full-rank covariance with no structure the distance could exploit."""
    root = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), root @ root.T / dim + 0.1 * np.eye(dim)


def scipy_distance(mu1, sigma1, mu2, sigma2):
    """FID's formula as pytorch-fid computes it: scipy's sqrtm of the product."""
    from scipy.linalg import sqrtm
    cross = sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * cross))


@pytest.fixture(scope="module")
def digits_split():
    images, labels = load_images("digits")
    return train_test_split(images, labels, 0.1, seed=0)


def test_identical_gaussians_are_at_distance_zero():
    mu, sigma = random_gaussian(np.random.default_rng(0), 7)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10)


def test_diagonal_gaussians_follow_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    var1, var2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dim", [1, 3, 32])
def test_full_covariances_match_scipy_and_are_symmetric(dim):
    rng = np.random.default_rng(dim)
    (mu1, sigma1), (mu2, sigma2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
    forward = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert forward > 0
    assert forward == pytest.approx(scipy_distance(mu1, sigma1, mu2, sigma2), rel=1e-8)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(forward, rel=1e-10)


def test_a_shift_adds_its_squared_length():
    rng = np.random.default_rng(3)
    (mu1, sigma1), (mu2, sigma2) = random_gaussian(rng, 4), random_gaussian(rng, 4)
    direction = rng.standard_normal(4)
    base = frechet_distance(mu1, sigma1, mu2, sigma2)
    shifts = (0.5, 1.0, 2.0)
    grown = [frechet_distance(mu1 + c * direction, sigma1, mu2, sigma2) - base for c in shifts]
    # |mu1 + c d - mu2|² - |mu1 - mu2|²: the covariances' term is unchanged
    expected = [2 * c * (mu1 - mu2) @ direction + c * c * (direction @ direction) for c in shifts]
    assert grown == pytest.approx(expected, rel=1e-9)
    # from identical sets, any shift only adds
    far = [frechet_distance(mu1 + c * direction, sigma1, mu1, sigma1) for c in (0.0, 0.5, 1.0, 2.0)]
    assert far[0] == pytest.approx(0.0, abs=1e-10) and far[1] < far[2] < far[3]


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="must be"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.ones((1, 3)))


def test_feature_space_ranks_real_digits_above_noise_and_blur(digits_split):
    train_images, test_images = digits_split[:2]
    space = FeatureSpace(train_images)
    assert space.components == 32 and "PCA(32)" in space.description
    assert space.distance(train_images) == pytest.approx(0.0, abs=1e-9)
    real = space.distance(test_images)
    noise = torch.rand(test_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(test_images, 3, stride=1, padding=1, count_include_pad=False)
    assert 0 < real < space.distance(blurred) < space.distance(noise)
    compared = space.compare(train_images[:400], test_images)  # 400 real images against 180: both at 180
    assert compared["compared_at"] == test_images.shape[0] == compared["real_test_images"]
    assert compared["real_test_distance_at_size"] == compared["real_test_distance"] == round(real, 4)
    # two disjoint sets of 180 training images, averaged: the bias of 180 images, as the test split has
    assert compared["samples_distance_at_size"] == pytest.approx(
        (space.distance(train_images[:180]) + space.distance(train_images[180:360])) / 2, abs=1e-4)
    assert compared["samples_distance"] < compared["samples_distance_at_size"]  # more images, less bias


def test_a_fitted_judge_scores_as_the_one_shot_check(digits_split):
    train_images, test_images, train_labels, test_labels = digits_split
    judge = DigitJudge(train_images, train_labels, test_images, test_labels)
    for images in (test_images[:60], train_images[:60]):
        assert judge(images) == digit_recognisability(images, train_images, train_labels, test_images, test_labels)


def test_plan_adds_the_ddpm_baselines_once():
    assert plan_of(["ddim", "ddpm"], [5, 100], [100, 1000]) == [
        ("ddim", 5), ("ddim", 100), ("ddpm", 5), ("ddpm", 100), ("ddpm", 1000)]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 3-step run on the digits (T = 20): its samples are noise, which is all these tests need."""
    out = tmp_path_factory.mktemp("quality") / "run"
    assert main(["train", "--out", str(out), "--steps", "3", "--batch-size", "8", "--timesteps", "20", "--warmup",
                 "1", "--num-samples", "6", "--sample-steps", "4", "--elbo-timesteps", "3", "--test-fraction", "0.05",
                 "--threads", "1", "--no-progress"]) == 0
    return out


def test_train_reports_the_frechet_distance(digits_run):
    frechet = json.loads((digits_run / "metrics.json").read_text())["frechet"]
    assert frechet["samples"] == frechet["compared_at"] == 6 and frechet["real_test_images"] == 90
    # noise after 3 steps is far from the digits; the real test split is not
    assert frechet["samples_distance_at_size"] > 2 * frechet["real_test_distance_at_size"] > 0


def test_quality_writes_rows_table_and_plot(digits_run, tmp_path, capsys):
    from matplotlib.image import imread
    out = tmp_path / "quality"
    assert main(["quality", str(digits_run), "--methods", "ddim", "heun", "dpm++2m", "--steps", "2", "3",
                 "--ddpm-steps", "20", "--num-samples", "12", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    assert "heun 3 steps: 5 model calls" in capsys.readouterr().out
    result = json.loads((out / "quality.json").read_text())
    rows = result["rows"]
    assert [(r["method"], r["steps"], r["model_calls"]) for r in rows] == [
        ("ddim", 2, 2), ("ddim", 3, 3), ("heun", 2, 3), ("heun", 3, 5), ("dpm++2m", 2, 2), ("dpm++2m", 3, 3),
        ("ddpm", 20, 20)]
    assert result["num_samples"] == result["compared_at"] == 12 and result["reference"]["images"] == 90
    for row in rows:
        # 12 samples against 90 test images: compared at 12, the samples whole
        assert row["seconds"] > 0 and row["frechet_distance_at_size"] == row["frechet_distance"] > 0
        assert 0 <= row["recognisable_fraction"] < result["reference"]["recognisable_fraction"]
    table = (out / "quality.md").read_text().splitlines()
    assert len(table) == 3 + len(rows) and table[3].startswith("| ddim | 2 | 2 |")
    assert imread(out / "quality.png").ndim == 3


def test_clip_denoised_on_clips_the_solvers_as_ddim_already_is(digits_run, tmp_path):
    rows = {}
    for clip in ("auto", "on"):
        assert main(["quality", str(digits_run), "--methods", "ddim", "dpm++2m", "--steps", "3", "--ddpm-steps",
                     "--num-samples", "8", "--clip-denoised", clip, "--threads", "1", "--no-progress",
                     "--out", str(tmp_path / clip)]) == 0
        result = json.loads((tmp_path / clip / "quality.json").read_text())
        assert result["clip_denoised"] == {"auto": None, "on": True}[clip]
        rows[clip] = {row["method"]: row["frechet_distance"] for row in result["rows"]}
    assert rows["on"]["ddim"] == rows["auto"]["ddim"]
    assert rows["on"]["dpm++2m"] != rows["auto"]["dpm++2m"]


def test_quality_refuses_steps_beyond_the_schedule(digits_run, tmp_path, capsys):
    assert main(["quality", str(digits_run), "--methods", "ddim", "--steps", "21", "--ddpm-steps", "--no-progress",
                 "--out", str(tmp_path)]) == 1
    assert "ddim at 21 steps: steps must lie in [1, T=20]" in capsys.readouterr().err
