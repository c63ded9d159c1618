"""`run`: a study's cells in order, each cached as it finishes, then the report."""
import dataclasses
import os
import time
from dataclasses import dataclass, field

from fastbn.study import data as study_data
from fastbn.study import experiments, report

CELLS_DIRECTORY = "cells"


@dataclass
class StudyResult:
    """What `run` did.

    Attributes
    ----------
    rows : list of dict
        One per run (every setting and metric), as in results.csv.
    ran, cached : list of str
        The keys of the cells computed now and of those read from the cache.
    output : str
        The output directory.
    elapsed_s : float
    """

    rows: list
    ran: list = field(default_factory=list)
    cached: list = field(default_factory=list)
    output: str = ""
    elapsed_s: float = 0.0


def prepare_output(output):
    """Create the output directory (and its cache directory); an existing path that is
    not a directory is an error."""
    output = os.fspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"the output path {output!r} exists and is not a directory")
    os.makedirs(os.path.join(output, CELLS_DIRECTORY), exist_ok=True)
    return output


def _progress_bar(total_s, shown):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # The total is the cells' estimated seconds, so the ETA weighs a cell at batch 2
    # (thousands of steps) more than one at batch 64.
    return tqdm(total=round(total_s, 1), desc="study", disable=not shown,
                bar_format="{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {desc}")


def run_study(config, output, resume=False, progress=True):
    """Run every cell of `config` not already cached (with `resume`), write the outputs.

    Parameters
    ----------
    config : experiments.StudyConfig
    output : str or path
        The directory of results.csv, results.json, the plots and report.md; cells are
        cached in its ``cells/`` subdirectory.
    resume : bool
        Reuse the cached cells whose settings match (every setting is in the key);
        without it every cell runs again and replaces its cache file.
    progress : bool
        Show a progress bar with an ETA (tqdm), weighted by each cell's estimated cost.

    Returns
    -------
    StudyResult
    """
    config.validate()
    output = prepare_output(output)
    cells_directory = os.path.join(output, CELLS_DIRECTORY)
    start = time.perf_counter()
    dataset = study_data.load(config.dataset, config.train_size, config.test_size)
    n_train, n_test = dataset.train_x.shape[0], dataset.test_x.shape[0]
    cells = experiments.plan(config)
    result = StudyResult(rows=[], output=output)
    stored = {}
    if resume:
        for cell in cells:
            rows = experiments.read_cell(cells_directory, cell)
            if rows is not None:
                stored[cell] = rows
    to_run = [cell for cell in cells if cell not in stored]
    estimates = {cell: experiments.estimate_ms(cell, n_train, n_test) / 1e3 for cell in to_run}
    bar = _progress_bar(sum(estimates.values()), progress)
    if progress and stored:
        print(f"resuming: {len(stored)} of {len(cells)} cells cached in {cells_directory}")
    started = {}

    def starting(cell):
        started[cell] = time.perf_counter()
        if bar is not None:
            bar.set_description_str(f"cell {len(started)}/{len(to_run)}: {_label(cell)}")

    try:
        for cell, rows in experiments.run_cells(to_run, dataset, cells_directory, starting):
            cell_time = time.perf_counter() - started[cell]
            rows = [dict(row, cell=experiments.cell_key(cell), cell_time_s=cell_time)
                    for row in rows]
            experiments.write_cell(cells_directory, cell, rows)
            stored[cell] = rows
            result.ran.append(experiments.cell_key(cell))
            if bar is not None:
                bar.update(round(estimates[cell], 1))
    finally:
        if bar is not None:
            bar.close()
    result.cached = [experiments.cell_key(cell) for cell in cells
                     if experiments.cell_key(cell) not in result.ran]
    result.rows = [row for cell in cells for row in stored[cell]]
    result.elapsed_s = time.perf_counter() - start
    report.write(output, config, result.rows, elapsed_s=result.elapsed_s,
                 cells_ran=len(result.ran), cells_cached=len(result.cached))
    return result


def _label(cell):
    settings = cell.settings()
    text = f"{cell.experiment} {settings['norm']} b={settings['batch_size']}"
    if settings.get("virtual_batch_size"):
        text += f" k={settings['virtual_batch_size']}"
    if "processes" in settings and settings["processes"] > 1:
        text += f" x{settings['processes']} processes"
    return text + (f" seed {settings['seed']}" if cell.experiment != "cost" else "")


def run(output="fastbn-study", *, quick=False, resume=False, progress=True, **settings):
    """The small-batch study (docs/study.md): train, evaluate and time the study's
    networks with each norm, write results.csv, results.json, PNG plots and report.md.

    Parameters
    ----------
    output : str or path
        The output directory (created; an existing file is an error).
    quick : bool
        The quick study (a few cells, one seed, one epoch) instead of the full one.
    resume : bool
        Skip the cells already cached in ``output/cells`` with the same settings.
    progress : bool
        Show a progress bar with an ETA.
    **settings
        Any field of `experiments.StudyConfig` (``norms``, ``batch_sizes``, ``seeds``,
        ``dataset``, ``model``, ``epochs``, ``threads``, ``experiments``, ...), applied
        on top of the full or quick defaults.

    Returns
    -------
    StudyResult

    Raises
    ------
    ValueError
        A setting the study cannot run (an unknown norm, dataset or experiment, a batch
        size below 1, an output path that is a file, ...): the message names it.
    """
    return run_study(make_config(quick, **settings), output, resume=resume,
                     progress=progress)


def make_config(quick=False, **settings):
    """The full (or quick) study's `experiments.StudyConfig` with `settings` applied,
    validated (ValueError for a setting the study cannot run)."""
    names = {f.name for f in dataclasses.fields(experiments.StudyConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown study settings {unknown}; the settings are "
                        f"{', '.join(sorted(names))}")
    settings = {key: tuple(value) if isinstance(value, list) else value
                for key, value in settings.items()}
    config = (experiments.StudyConfig.quick(**settings) if quick
              else experiments.StudyConfig(**settings))
    return config.validate()
