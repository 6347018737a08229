"""How recognisable sampled digits are, judged by a scikit-learn classifier of the real digits
(scikit-learn is imported only when it runs)."""
import numpy as np
import torch

from .evaluate import nearest_distances
from .quality import pixels

CONFIDENT = 0.9  # a sample counts as a recognisable digit if the classifier gives it this probability


class DigitJudge:
    """The recognisability check, fitted once on the real digits; `judge(samples)` scores a set.

    A sample passes as a digit if a logistic regression trained on the real digits assigns it a
    class with probability >= CONFIDENT, and it lies no farther from the training set than 95% of
    the real test digits do (a classifier alone is confident on noise too)."""

    def __init__(self, train_images, train_labels, test_images, test_labels):
        from sklearn.linear_model import LogisticRegression

        self.train_images = train_images
        with _one_blas_thread():
            self.classifier = LogisticRegression(max_iter=2000, C=10.0).fit(pixels(train_images), train_labels.numpy())
            test_probability = self.classifier.predict_proba(pixels(test_images))
        test_distance = nearest_distances(test_images, train_images)
        self.distance_limit = torch.quantile(test_distance, 0.95).item()
        test_confident = test_probability.max(1) >= CONFIDENT
        self.real_test = {
            "classifier_test_accuracy": round(float((test_probability.argmax(1) == test_labels.numpy()).mean()), 4),
            "real_test_confident_fraction": round(float(test_confident.mean()), 4),
            "real_test_recognisable_fraction": round(
                float((test_confident & (test_distance <= self.distance_limit).numpy()).mean()), 4),
        }

    def __call__(self, samples):
        with _one_blas_thread():
            probability = self.classifier.predict_proba(pixels(samples))
        confident = probability.max(1) >= CONFIDENT
        close = (nearest_distances(samples, self.train_images) <= self.distance_limit).numpy()
        return {
            "classifier": "LogisticRegression(C=10) on the train split, pixels in [0, 1]",
            "confidence_threshold": CONFIDENT,
            "distance_limit": round(self.distance_limit, 4),
            **self.real_test,
            "samples_confident_fraction": round(float(confident.mean()), 4),
            "samples_close_fraction": round(float(close.mean()), 4),
            "samples_recognisable_fraction": round(float((confident & close).mean()), 4),
            "sample_class_counts": np.bincount(probability.argmax(1), minlength=10).tolist(),
        }


def digit_recognisability(samples, train_images, train_labels, test_images, test_labels):
    """The recognisability check of `samples` (DigitJudge's dict), fitted for this one set."""
    return DigitJudge(train_images, train_labels, test_images, test_labels)(samples)


def _one_blas_thread():
    """This small fit is fast alone and crawls when BLAS threads fight over busy cores."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1)
