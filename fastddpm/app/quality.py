"""Sample quality as a Fréchet distance in a fixed feature space, the way FID measures it in
Inception features: here the top principal components of the real training images (scikit-learn's
PCA, imported only when fitted), fitted once per run.

    FD = |mu_1 - mu_2|² + tr(S_1 + S_2 - 2 (S_1^½ S_2 S_1^½)^½)

(Dowson & Landau 1982; Heusel et al. 2017, "GANs trained by a two time-scale update rule").
The estimate from n images is biased upwards by about 1/n (the means' and covariances' sampling
noise), so a set is compared with the real test split at one size: both cut into sets of
n = min(their sizes) images, the distances of those sets averaged.
"""
import numpy as np

COMPONENTS = 32  # 97% of the digits' pixel variance


def pixels(images):
    """(N, C·H·W) float64 pixels in [0, 1] of images in [-1, 1]."""
    return ((images.double().clamp(-1, 1) + 1) / 2).flatten(1).numpy()


def gaussian_stats(features):
    """Mean and covariance (unbiased) of the rows of `features` (N, D), N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S_1 S_2)^½) is taken as tr((S_1^½ S_2 S_1^½)^½): a symmetric PSD matrix, so both roots are
    eigendecompositions (no complex parts, as scipy's sqrtm of S_1 S_2 may give); float64."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"the means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} "
                         "must be (D,) and (D, D) of one D")
    root1 = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross
    return float(max(distance, 0.0))  # rounding can leave -1e-16 for identical statistics


def _psd_sqrt(matrix):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


class FeatureSpace:
    """The principal components of the real training images, fitted once; `distance(images)` is
    the Fréchet distance of a set of images to the whole training split in them."""

    def __init__(self, train_images, components=COMPONENTS, limit=10000):
        from sklearn.decomposition import PCA

        train = pixels(train_images[:limit])
        self.components = min(components, *train.shape)
        self.pca = PCA(self.components, random_state=0).fit(train)  # exact for small data, seeded for large
        self.train_stats = gaussian_stats(self.pca.transform(train))
        self.description = (f"PCA({self.components}) of the train split's pixels in [0, 1] "
                            f"({self.pca.explained_variance_ratio_.sum():.0%} of their variance)")

    def features(self, images):
        return self.pca.transform(pixels(images))

    def distance(self, images):
        return frechet_distance(*gaussian_stats(self.features(images)), *self.train_stats)

    def mean_distance(self, images, size):
        """The mean distance of the consecutive disjoint sets of `size` images of `images`."""
        sets = range(0, images.shape[0] - size + 1, size)
        return float(np.mean([self.distance(images[start:start + size]) for start in sets]))

    def compare(self, samples, test_images):
        """The samples' distance to the training split beside the real test split's, whole and at one size."""
        size = min(samples.shape[0], test_images.shape[0])
        return {"samples": int(samples.shape[0]), "real_test_images": int(test_images.shape[0]),
                "samples_distance": round(self.distance(samples), 4),
                "real_test_distance": round(self.distance(test_images), 4),
                "compared_at": size,
                "samples_distance_at_size": round(self.mean_distance(samples, size), 4),
                "real_test_distance_at_size": round(self.mean_distance(test_images, size), 4),
                "features": self.description}
