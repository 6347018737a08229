"""Training data for `fastddpm train`: images as a float32 (N, C, H, W) tensor in [-1, 1].

Three sources, each checked with a clear error:
- "digits" (the default): scikit-learn's 1,797 handwritten digits, 8x8, values 0..16;
- a folder of images (PNG, JPEG, BMP, ...), grayscale or RGB, all of one size;
- an .npy file holding (N, H, W) or (N, C, H, W), uint8 in 0..255 or float in [-1, 1].
"""
import os

import numpy as np
import torch

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_MAX = 16.0  # load_digits values are integers 0..16


def load_digits_data():
    """scikit-learn's digits: images (1797, 1, 8, 8) float32 in [-1, 1] and labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataError("the default data set needs scikit-learn (pip install scikit-learn), "
                        "or pass --data FOLDER or --data FILE.npy") from error
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / DIGITS_MAX * 2.0 - 1.0)
    return images[:, None].contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def load_images(source):
    """(images, labels or None) from "digits", a folder of images or an .npy file."""
    if source == "digits":
        return load_digits_data()
    if os.path.isdir(source):
        return load_image_folder(source), None
    if not os.path.exists(source):
        raise DataError(f"--data {source!r}: no such file or folder (use 'digits', a folder of images or a .npy file)")
    if source.endswith(".npy"):
        return load_npy(source), None
    raise DataError(f"--data {source!r}: expected 'digits', a folder of images or a .npy file")


def load_image_folder(folder):
    """Every image file of `folder` (not recursive), sorted by name, as (N, C, H, W) in [-1, 1].

    Grayscale files give C = 1; if any file has colour, every image is converted to RGB.
    """
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(f"--data {folder!r}: the folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            arrays.append(_read_image(path))
        except Exception as error:  # PIL raises several unrelated types for unreadable files
            raise DataError(f"--data {folder!r}: cannot read image {name!r}: {error}") from error
    first_size = arrays[0].shape[:2]
    for name, array in zip(names, arrays):
        if array.shape[:2] != first_size:
            raise DataError(f"--data {folder!r}: images must all have one size, but {names[0]!r} is "
                            f"{first_size[1]}x{first_size[0]} and {name!r} is {array.shape[1]}x{array.shape[0]} "
                            "(width x height); resize them first")
    colour = any(array.shape[2] == 3 for array in arrays)
    if colour:
        arrays = [np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array for array in arrays]
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, C, H, W) uint8
    return torch.from_numpy(stacked.astype(np.float32) / 127.5 - 1.0).contiguous()


def _read_image(path):
    """uint8 (H, W, 1) for grayscale, (H, W, 3) otherwise (alpha dropped; palettes expanded)."""
    from PIL import Image  # Pillow ships with matplotlib

    with Image.open(path) as image:
        if image.mode in ("L", "LA", "1", "I;16", "I", "F"):
            array = np.asarray(image.convert("L"))[:, :, None]
        else:
            array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array, dtype=np.uint8)


def load_npy(path):
    """An .npy array (N, H, W) or (N, C, H, W), uint8 0..255 or float in [-1, 1], as float32 in [-1, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:
        raise DataError(f"--data {path!r}: not a readable .npy array: {error}") from error
    return images_from_array(array, f"--data {path!r}")


def images_from_array(array, name="images"):
    """Check and convert a numpy array of images to float32 (N, C, H, W) in [-1, 1]."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{name}: expected shape (N, H, W) or (N, C, H, W), got {array.shape}")
    if array.shape[0] == 0 or 0 in array.shape[2:]:
        raise DataError(f"{name}: holds no images (shape {array.shape})")
    if array.shape[1] > 4 and array.shape[3] in (1, 3, 4):
        raise DataError(f"{name}: shape {array.shape} looks channels-last (N, H, W, C); "
                        "transpose it to (N, C, H, W)")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).contiguous()
    if array.dtype.kind != "f":
        raise DataError(f"{name}: dtype must be uint8 (0..255) or float (in [-1, 1]), got {array.dtype}")
    if not np.isfinite(array).all():
        raise DataError(f"{name}: holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -1.0 or high > 1.0:
        raise DataError(f"{name}: float images must lie in [-1, 1], got values from {low:g} to {high:g} "
                        "(scale them, or save uint8 0..255)")
    return torch.from_numpy(array.astype(np.float32)).contiguous()


def train_test_split(images, labels=None, test_fraction=0.1, seed=0):
    """A fixed random split: (train images, test images, train labels, test labels)."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test fraction must lie in [0, 1), got {test_fraction}")
    count = images.shape[0]
    num_test = int(round(count * test_fraction))
    if test_fraction > 0 and count >= 2:
        num_test = min(max(num_test, 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    test, train = order[:num_test], order[num_test:]
    pick = (lambda x, index: None if x is None else x[index])
    return images[train], images[test], pick(labels, train), pick(labels, test)


class BatchSampler:
    """Random batches without replacement, a fresh permutation each epoch, split across ranks.

    Stateless: the indices of step k depend only on (seed, k), so a resumed run draws the
    very batches an uninterrupted one would. Each rank takes a disjoint slice of every
    global batch; the last incomplete global batch of an epoch is dropped. Each epoch's
    permutation is drawn on the CPU and copied to `device` once, so a step's indices are a
    slice of a device tensor (no host-to-device copy per step).
    """

    def __init__(self, num_items, global_batch, *, rank=0, world_size=1, seed=0, device="cpu"):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} must be divisible by the {world_size} processes")
        if num_items < world_size:
            raise DataError(f"{num_items} training images cannot be split across {world_size} processes")
        # A data set smaller than one batch: use all of it (a multiple of the process count) per step.
        self.global_batch = min(global_batch, num_items - num_items % world_size)
        self.batch = self.global_batch // world_size
        self.num_items, self.rank, self.seed, self.device = num_items, rank, seed, torch.device(device)
        self.steps_per_epoch = num_items // self.global_batch
        self._epoch, self._order = None, None

    def indices(self, step):
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = epoch
            self._order = torch.randperm(self.num_items, generator=generator).to(self.device)
        start = position * self.global_batch + self.rank * self.batch
        return self._order[start:start + self.batch]
