"""How recognisable sampled digits are, judged by a scikit-learn classifier of the real digits
(scikit-learn is imported only when it runs)."""
import numpy as np
import torch

from .evaluate import nearest_distances

CONFIDENT = 0.9  # a sample counts as a recognisable digit if the classifier gives it this probability


def digit_recognisability(samples, train_images, train_labels, test_images, test_labels):
    """The fraction of samples that pass as digits: a logistic regression trained on the real
    digits assigns them a class with probability >= CONFIDENT, and they lie no farther from the
    training set than 95% of the real test digits do (a classifier alone is confident on noise too)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def features(images):
        return ((images.double().clamp(-1, 1) + 1) / 2).flatten(1).numpy()

    # One BLAS thread: this small fit is fast alone and crawls when threads fight over busy cores.
    with threadpool_limits(1):
        classifier = LogisticRegression(max_iter=2000, C=10.0).fit(features(train_images), train_labels.numpy())
        test_probability = classifier.predict_proba(features(test_images))
        sample_probability = classifier.predict_proba(features(samples))
    test_distance = nearest_distances(test_images, train_images)
    sample_distance = nearest_distances(samples, train_images)
    distance_limit = torch.quantile(test_distance, 0.95).item()
    sample_confident = sample_probability.max(1) >= CONFIDENT
    sample_close = (sample_distance <= distance_limit).numpy()
    test_confident = test_probability.max(1) >= CONFIDENT
    return {
        "classifier": "LogisticRegression(C=10) on the train split, pixels in [0, 1]",
        "confidence_threshold": CONFIDENT,
        "distance_limit": round(distance_limit, 4),
        "classifier_test_accuracy": round(float((test_probability.argmax(1) == test_labels.numpy()).mean()), 4),
        "real_test_confident_fraction": round(float(test_confident.mean()), 4),
        "real_test_recognisable_fraction": round(
            float((test_confident & (test_distance <= distance_limit).numpy()).mean()), 4),
        "samples_confident_fraction": round(float(sample_confident.mean()), 4),
        "samples_close_fraction": round(float(sample_close.mean()), 4),
        "samples_recognisable_fraction": round(float((sample_confident & sample_close).mean()), 4),
        "sample_class_counts": np.bincount(sample_probability.argmax(1), minlength=10).tolist(),
    }
