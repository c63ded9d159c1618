"""The study's experiments as cells (one training run, one data-parallel run, one cost
measurement), the grid of a full and a quick study, and running the cells with a cache.

Each experiment isolates one cause:

1. ``sweep``: the batch size, with the learning rate scaled to it (Wu & He's protocol),
   for every norm: how much each loses as the batch shrinks.
2. ``norm_batch``: the normalization batch alone: a fixed SGD batch, BatchNorm statistics
   over ghost batches of 1 to the whole batch (Wu & Johnson 2021).
3. evaluation statistics: every BatchNorm-family run of 1, 2 and 4 is evaluated with its
   EMA statistics, PreciseBN and batch statistics (`training.evaluate`); no cells of its own.
4. ``scale_out``: 2 processes with a batch b each, SyncBatchNorm (statistics over 2b)
   against local BatchNorm (statistics over b, the same SGD batch 2b) and single-process
   BatchNorm at b and at 2b: does syncing recover the larger batch, at what cost per step.
5. ``cost``: time per epoch of each norm, fastbn's layers against torch's (or the
   plain-torch versions), alternated in the same process.

A cell is keyed by every setting it depends on (`cell_key`); its rows are written to
``<output>/cells/<key>.json`` as soon as it finishes, so a resumed study skips it and an
interrupted one loses at most the cell it was running.
"""
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from fastbn.study import data as study_data
from fastbn.study import models, training

# Bumped when the protocol changes, so that cached cells of an older one are not reused.
STUDY_VERSION = 1
EXPERIMENTS = ("sweep", "norm_batch", "scale_out", "cost")
COST_MIN_STEPS = 10
IMPLEMENTATIONS = models.IMPLEMENTATIONS


@dataclass(frozen=True)
class Run:
    """One training run: every setting its numbers depend on.

    ``batch_size`` is the SGD batch (over all processes); each of ``processes`` processes
    takes ``batch_size // processes`` images of it.
    """

    dataset: str
    model: str
    norm: str
    batch_size: int
    seed: int
    epochs: int
    threads: int
    base_lr: float
    warmup_fraction: float
    momentum: float
    weight_decay: float
    groups: int
    virtual_batch_size: Optional[int] = None
    processes: int = 1
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    version: int = STUDY_VERSION

    @property
    def lr(self):
        return self.base_lr * self.batch_size / training.LR_REFERENCE_BATCH

    @property
    def experiment(self):
        return "scale_out" if self.processes > 1 else "train"

    def settings(self):
        return dict(dataclasses.asdict(self), experiment=self.experiment, lr=self.lr,
                    norm_batch_size=(training.norm_batch_size(self)
                                     if self.norm in models.BATCH_NORMS else None))


@dataclass(frozen=True)
class CostCell:
    """The time per epoch of one norm at one batch size: fastbn's layers against torch's,
    `rounds` alternated rounds of `steps` training steps each."""

    dataset: str
    model: str
    norm: str
    batch_size: int
    threads: int
    rounds: int
    steps: int
    groups: int
    virtual_batch_size: Optional[int] = None
    train_size: Optional[int] = None
    seed: int = 0
    version: int = STUDY_VERSION

    experiment = "cost"

    def settings(self):
        return dict(dataclasses.asdict(self), experiment=self.experiment)


def cell_key(cell):
    """A name for the cell's cache file: the experiment and a hash of every setting."""
    text = json.dumps(cell.settings(), sort_keys=True)
    return f"{cell.experiment}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass
class StudyConfig:
    """What a study runs. The defaults are the full study (see `quick` for the quick one
    and docs/study.md for how the grid was sized to run in under an hour on 2 cores).

    Attributes
    ----------
    experiments : tuple of str
        Some of `EXPERIMENTS`.
    dataset : str
        One of `data.DATASETS`.
    model : {"cnn", "mobilenet"}
    norms : tuple of str
        The batch-size sweep's norms (`models.NORMS`); also the cost experiment's.
    batch_sizes : tuple of int
        The sweep's (and the cost experiment's) batch sizes.
    ghost_size : int
        Ghost BatchNorm's virtual batch in the sweep (its cells at batch sizes up to it
        would be BatchNorm, and are not run).
    norm_batch_sgd_batch : int
        The fixed SGD batch of the normalization-batch sweep.
    ghost_sizes : tuple of int
        Its normalization (virtual) batch sizes.
    scale_out_batch_sizes : tuple of int
        The per-process batch of the 2-process runs.
    seeds : tuple of int
    epochs, threads : int
    base_lr : float
        The learning rate at batch 32 (scaled linearly with the batch).
    warmup_fraction, momentum, weight_decay : float
    groups : int
        GroupNorm's and EvoNorm-S0's.
    cost_rounds, cost_images : int
        The cost experiment's alternated rounds, and the images a round trains on (at
        least `COST_MIN_STEPS` steps): long enough at every batch size that the clock's
        and the scheduler's noise stay small against it.
    train_size, test_size : int or None
        Use only the first images of each part of the dataset (None: all).
    """

    experiments: tuple = EXPERIMENTS
    dataset: str = "mnist"
    model: str = "cnn"
    norms: tuple = ("batchnorm", "ghost", "renorm", "groupnorm", "layernorm", "frn",
                    "evonorm_s0", "none")
    batch_sizes: tuple = (2, 4, 8, 16, 32, 64)
    ghost_size: int = 8
    norm_batch_sgd_batch: int = 32
    ghost_sizes: tuple = (1, 2, 4, 8, 16, 32)
    scale_out_batch_sizes: tuple = (2,)
    seeds: tuple = (0, 1, 2)
    epochs: int = 3
    threads: int = 1
    base_lr: float = 0.1
    warmup_fraction: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    groups: int = models.GROUPS
    cost_rounds: int = 3
    cost_images: int = 256
    train_size: Optional[int] = None
    test_size: Optional[int] = None

    @classmethod
    def quick(cls, **overrides):
        """A few cells, one seed, one epoch: minutes on 2 cores."""
        settings = dict(norms=("batchnorm", "ghost", "groupnorm", "frn", "none"),
                        batch_sizes=(4, 16, 64), ghost_size=4, ghost_sizes=(1, 4, 32),
                        scale_out_batch_sizes=(8,), seeds=(0,), epochs=1, cost_rounds=2,
                        cost_images=256)
        settings.update(overrides)
        return cls(**settings)

    def validate(self):
        """Raise ValueError for a setting the study cannot run, naming it."""
        for name in self.experiments:
            if name not in EXPERIMENTS:
                raise ValueError(f"unknown experiment {name!r}; the experiments are "
                                 f"{', '.join(EXPERIMENTS)}")
        if not self.experiments:
            raise ValueError("no experiment to run")
        study_data.check_dataset(self.dataset)
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; the models are "
                             f"{', '.join(models.MODELS)}")
        for norm in self.norms:
            models.check_norm(norm)
        for name in ("batch_sizes", "ghost_sizes", "scale_out_batch_sizes"):
            values = getattr(self, name)
            _check_ints(name, values, 1)
            if not values:
                raise ValueError(f"{name} is empty")
        for name in ("ghost_size", "norm_batch_sgd_batch", "epochs", "threads", "groups",
                     "cost_rounds", "cost_images"):
            _check_ints(name, [getattr(self, name)], 1)
        _check_ints("seeds", self.seeds, 0)
        if not self.seeds:
            raise ValueError("seeds is empty")
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                _check_ints(name, [getattr(self, name)], 1)
        if max(self.ghost_sizes) > self.norm_batch_sgd_batch:
            raise ValueError(f"ghost_sizes must be at most the SGD batch "
                             f"norm_batch_sgd_batch={self.norm_batch_sgd_batch}, got "
                             f"{max(self.ghost_sizes)}")
        images = study_data.TRAIN_IMAGES[self.dataset]
        if self.train_size is not None:
            images = min(images, self.train_size)
        if self.largest_batch() > images:
            raise ValueError(f"batch size {self.largest_batch()} is larger than the {images} "
                             f"training images of {self.dataset!r}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        return self

    def largest_batch(self):
        sizes = []
        if {"sweep", "cost"} & set(self.experiments):
            sizes += self.batch_sizes
        if "norm_batch" in self.experiments:
            sizes.append(self.norm_batch_sgd_batch)
        if "scale_out" in self.experiments:
            sizes += [2 * b for b in self.scale_out_batch_sizes]
        return max(sizes)

    def run(self, norm, batch_size, seed, **settings):
        return Run(self.dataset, self.model, norm, batch_size, seed, self.epochs, self.threads,
                   self.base_lr, self.warmup_fraction, self.momentum, self.weight_decay,
                   self.groups, train_size=self.train_size, test_size=self.test_size,
                   **settings)


def _check_ints(name, values, lowest):
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be integers, got {value!r}")
        if value < lowest:
            if name.endswith("sizes"):
                raise ValueError(f"batch sizes must be >= {lowest}, got {value} ({name})")
            raise ValueError(f"{name} must be >= {lowest}, got {value}")


def sweep_cells(config):
    cells = []
    for norm in config.norms:
        for batch_size in config.batch_sizes:
            if norm == "ghost" and batch_size <= config.ghost_size:
                continue  # BatchNorm itself
            extra = {"virtual_batch_size": config.ghost_size} if norm == "ghost" else {}
            cells += [config.run(norm, batch_size, seed, **extra) for seed in config.seeds]
    return cells


def norm_batch_cells(config):
    return [config.run("ghost", config.norm_batch_sgd_batch, seed, virtual_batch_size=size)
            for size in config.ghost_sizes for seed in config.seeds]


def scale_out_cells(config):
    """Per per-process batch b: SyncBatchNorm and local BatchNorm on 2 processes (SGD
    batch 2b), and the single-process BatchNorm references at b and 2b (the sweep's cells
    when it has those batch sizes: the same settings, the same cache file)."""
    cells = []
    for b in config.scale_out_batch_sizes:
        for seed in config.seeds:
            cells += [config.run("batchnorm", b, seed), config.run("batchnorm", 2 * b, seed),
                      config.run("batchnorm", 2 * b, seed, processes=2),
                      config.run("sync", 2 * b, seed, processes=2)]
    return cells


def cost_cells(config):
    return [CostCell(config.dataset, config.model, norm, batch_size, config.threads,
                     config.cost_rounds, max(COST_MIN_STEPS, config.cost_images // batch_size),
                     config.groups,
                     virtual_batch_size=(min(config.ghost_size, batch_size)
                                         if norm == "ghost" else None),
                     train_size=config.train_size)
            for norm in config.norms for batch_size in config.batch_sizes]


def plan(config):
    """Every cell of the study, once each, in the order they run (the cost experiment
    first: its timings are the ones that load disturbs least at the start)."""
    builders = {"cost": cost_cells, "sweep": sweep_cells, "norm_batch": norm_batch_cells,
                "scale_out": scale_out_cells}
    cells, seen = [], set()
    for name in ("cost", "sweep", "norm_batch", "scale_out"):
        if name in config.experiments:
            for cell in builders[name](config):
                if cell not in seen:
                    seen.add(cell)
                    cells.append(cell)
    return cells


def estimate_ms(cell, train_size, test_size):
    """A rough cost of the cell in milliseconds, for the progress bar's ETA (fitted on
    the 2-core development VM under load: a training step of the small CNN takes about
    3.5 ms plus 0.4 ms per image, 1.4 times that with a BatchNorm-family layer; a
    data-parallel step about 4 times a single process's step at the per-process batch)."""
    def step_ms(batch, norm):
        return (3.5 + 0.4 * batch) * (1.4 if norm in models.BATCH_NORMS else 1.0)

    if isinstance(cell, CostCell):
        return 2 * cell.rounds * (cell.steps + 5) * step_ms(cell.batch_size, cell.norm)
    local = cell.batch_size // cell.processes
    steps = train_size // cell.batch_size
    total = cell.epochs * steps * step_ms(local, cell.norm) * (4 if cell.processes > 1 else 1)
    if cell.norm in models.BATCH_NORMS:  # PreciseBN's passes, the batch-statistics test
        total += steps * step_ms(local, "none") * 0.5 + test_size / local * (1 + 0.15 * local)
    return total


def read_cell(directory, cell):
    """The cached rows of `cell`, or None."""
    path = os.path.join(directory, cell_key(cell) + ".json")
    try:
        with open(path) as file:
            stored = json.load(file)
    except (OSError, ValueError):
        return None
    return stored["rows"] if stored.get("settings") == cell.settings() else None


def write_cell(directory, cell, rows):
    """Write the cell's rows atomically (a run interrupted mid-write leaves no partial
    file)."""
    path = os.path.join(directory, cell_key(cell) + ".json")
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump({"settings": cell.settings(), "rows": rows}, file, indent=1)
    os.replace(temporary, path)


def run_training_cell(run, dataset):
    training.set_threads(run.threads)
    training.seed_everything(run.seed)
    model = models.build_for(run, dataset.image_size[0])
    metrics = training.train(model, run, dataset)
    metrics.update(training.evaluate(model, run, dataset))
    return [dict(run.settings(), **metrics)]


def run_cost_cell(cell, dataset):
    """Time `cell.steps` training steps of the network with fastbn's and with torch's
    layers, alternated over `cell.rounds` rounds (after 5 untimed steps each; which one
    goes first alternates too); one row per implementation and round, the time per epoch
    scaled from the steps timed."""
    import time

    import torch
    from torch import nn

    training.set_threads(cell.threads)
    n = dataset.train_x.shape[0]
    order = study_data.epoch_order(n, cell.seed, 0)
    steps_per_epoch = n // cell.batch_size
    setups = {}
    for implementation in IMPLEMENTATIONS:
        training.seed_everything(cell.seed)
        model = models.build_for(cell, dataset.image_size[0], implementation)
        setups[implementation] = (model, torch.optim.SGD(model.parameters(), lr=0.01,
                                                         momentum=0.9))
    position = {implementation: 0 for implementation in IMPLEMENTATIONS}

    def steps(implementation, count):
        model, optimizer = setups[implementation]
        model.train()
        for _ in range(count):
            start = position[implementation] % steps_per_epoch * cell.batch_size
            chosen = order[start:start + cell.batch_size]
            position[implementation] += 1
            loss = nn.functional.cross_entropy(model(dataset.train_x[chosen]),
                                               dataset.train_y[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for implementation in IMPLEMENTATIONS:
        steps(implementation, 5)
    rows = []
    for repeat in range(cell.rounds):
        for implementation in IMPLEMENTATIONS[::1 if repeat % 2 == 0 else -1]:
            start = time.perf_counter()
            steps(implementation, cell.steps)
            per_step = (time.perf_counter() - start) / cell.steps
            rows.append(dict(cell.settings(), implementation=implementation, repeat=repeat,
                             time_per_step_ms=1e3 * per_step,
                             time_per_epoch_s=per_step * steps_per_epoch))
    return rows


def run_cell(cell, dataset):
    """The rows of one single-process cell (its runs), computed now."""
    if isinstance(cell, CostCell):
        return run_cost_cell(cell, dataset)
    return run_training_cell(cell, dataset)


def run_cells(cells, dataset, directory, starting=None):
    """Run `cells`; yield (cell, rows) as each finishes. The data-parallel ones run last,
    together, in one set of processes (`distributed.run_cells`). `starting(cell)` is
    called as each begins."""
    parallel = [cell for cell in cells if isinstance(cell, Run) and cell.processes > 1]
    for cell in cells:
        if cell not in parallel:
            if starting is not None:
                starting(cell)
            yield cell, run_cell(cell, dataset)
    if parallel:
        from fastbn.study import distributed

        for run, row in distributed.run_cells(parallel, directory, starting):
            yield run, [row]
