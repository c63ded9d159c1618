"""The scale-out experiment's data-parallel runs: processes spawned on this machine,
joined by gloo through a file in the study's output directory (a store no other run
shares), DistributedDataParallel over the study's network with fastbn.nn.SyncBatchNorm
("sync": statistics over every process's images) or local BatchNorm ("batchnorm": each
process its own).

One set of processes runs every data-parallel cell of a study in turn: starting them
(importing torch and loading the data in each) took 20 to 30 s on the 2-core VM, as long
as a cell itself. Process 0 writes each cell's row to a file as soon as the cell is
done; the study's process picks the files up while it waits (`run_cells`), so an
interrupted study keeps every finished cell.

Each process takes its part of every global batch (`training.train`), so the images of
a step are those of the single-process run at the global batch size: a SyncBatchNorm run
computes what that run computes, up to rounding (the gradient is averaged over processes
instead of over the batch at once), and a local-BatchNorm run differs from it only in the
normalization batch.

Process 0 evaluates a copy of the trained network whose SyncBatchNorm layers are plain
BatchNorm with their parameters and statistics (`fastbn.nn.swap_norm`): the evaluation
makes no collective call, which the other process, already training the next cell, would
not answer. The EMA statistics are process 0's; PreciseBN and batch statistics use
batches of the global batch for SyncBatchNorm and of the per-process batch for local
BatchNorm.
"""
import copy
import dataclasses
import json
import os
from datetime import timedelta

WAIT_S = 0.5


def _result_file(directory, run):
    from fastbn.study.experiments import cell_key

    return os.path.join(directory, cell_key(run) + ".result.json")


def _worker(rank, runs, init_file, directory):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import fastbn.nn
    from fastbn.study import data as study_data
    from fastbn.study import models, training
    from fastbn.study.experiments import Run

    runs = [Run(**fields) for fields in runs]
    world_size = runs[0].processes
    training.set_threads(runs[0].threads)
    # A process that fails makes the other's collectives time out instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(minutes=10))
    datasets = {}
    try:
        for run in runs:
            source = (run.dataset, run.train_size, run.test_size)
            if source not in datasets:
                datasets[source] = study_data.load(*source)
            dataset = datasets[source]
            training.seed_everything(run.seed)
            model = models.build_for(run, dataset.image_size[0])
            metrics = training.train(model, run, dataset, rank, world_size,
                                     DistributedDataParallel(model))
            if rank == 0:
                local = fastbn.nn.swap_norm(copy.deepcopy(model), "batchnorm") \
                    if run.norm == "sync" else model
                metrics.update(training.evaluate(local, run, dataset))
                path = _result_file(directory, run)
                with open(path + ".tmp", "w") as file:
                    json.dump(dict(run.settings(), **metrics), file)
                os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


def run_cells(runs, directory, starting=None):
    """Run the data-parallel `runs` (all with the same number of processes and threads)
    in one set of spawned processes; yield (run, row) as each finishes. `starting(run)`
    is called as each begins."""
    import torch.multiprocessing as mp

    if not runs:
        return
    # Absolute: in file://docs/study/... the first name would be read as a host.
    init_file = os.path.abspath(os.path.join(directory, "scale_out.init"))
    results = [_result_file(directory, run) for run in runs]
    for path in [init_file] + results:
        if os.path.exists(path):  # a stale store would hold a finished group's keys
            os.remove(path)
    context = mp.start_processes(_worker, args=([dataclasses.asdict(r) for r in runs],
                                                init_file, directory),
                                 nprocs=runs[0].processes, start_method="spawn", join=False)
    try:
        done = 0
        finished = False
        if starting is not None:
            starting(runs[0])
        while done < len(runs):
            if os.path.exists(results[done]):
                with open(results[done]) as file:
                    row = json.load(file)
                os.remove(results[done])
                done += 1
                if starting is not None and done < len(runs):
                    starting(runs[done])
                yield runs[done - 1], row
            elif finished:
                raise RuntimeError(f"the scale-out processes ended without a result for "
                                   f"{runs[done]}")
            else:
                finished = context.join(timeout=WAIT_S)  # raises if a process failed
    finally:  # also when the study stops early (an exception, an interrupt)
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join()
        if os.path.exists(init_file):
            os.remove(init_file)
