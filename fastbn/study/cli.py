"""`python -m fastbn study`: the command line of `fastbn.study.run`."""
import argparse
import sys

from fastbn.study import data as study_data
from fastbn.study import experiments, models

DESCRIPTION = """The small-batch study (docs/study.md): train a small CNN on MNIST with each
norm at batch sizes from 2 up, sweep BatchNorm's normalization batch, compare its evaluation
statistics (EMA, PreciseBN, batch statistics), SyncBatchNorm over 2 processes, and the time
per epoch of fastbn's layers against torch's. Writes results.csv, results.json, PNG plots
and report.md into --output. The full study takes under an hour on 2 cores, --quick a few
minutes."""


def _list(kind):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if kind is int:
            try:
                return tuple(int(item) for item in items)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers, got {text!r}") from None
        return tuple(items)
    return parse


def parser():
    defaults = experiments.StudyConfig()
    p = argparse.ArgumentParser(prog="fastbn study", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true",
                   help="a few cells, 1 seed, 1 epoch (minutes) instead of the full study")
    p.add_argument("--output", default="fastbn-study",
                   help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="skip the cells already cached in OUTPUT/cells with the same settings")
    p.add_argument("--experiments", type=_list(str),
                   help=f"comma-separated, of {', '.join(experiments.EXPERIMENTS)} "
                   "(default: all)")
    p.add_argument("--norms", type=_list(str),
                   help=f"comma-separated, of {', '.join(models.NORMS)} "
                   f"(default: {','.join(defaults.norms)})")
    p.add_argument("--batch-sizes", type=_list(int),
                   help="the sweep's batch sizes (default: "
                   f"{','.join(map(str, defaults.batch_sizes))})")
    p.add_argument("--ghost-sizes", type=_list(int),
                   help="the normalization batch sizes of the normalization-batch sweep "
                   f"(default: {','.join(map(str, defaults.ghost_sizes))})")
    p.add_argument("--scale-out-batch-sizes", type=_list(int),
                   help="per-process batch sizes of the 2-process runs (default: "
                   f"{','.join(map(str, defaults.scale_out_batch_sizes))})")
    p.add_argument("--seeds", type=_list(int),
                   help=f"comma-separated seeds (default: {','.join(map(str, defaults.seeds))})")
    p.add_argument("--dataset", help=f"one of {', '.join(study_data.DATASETS)} "
                   f"(default: {defaults.dataset})")
    p.add_argument("--model", help=f"one of {', '.join(models.MODELS)} "
                   f"(default: {defaults.model})")
    p.add_argument("--epochs", type=int, help=f"(default: {defaults.epochs})")
    p.add_argument("--threads", type=int,
                   help=f"threads of torch and fastbn per process (default: {defaults.threads})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# command-line option -> StudyConfig field
FIELDS = {"experiments": "experiments", "norms": "norms", "batch_sizes": "batch_sizes",
          "ghost_sizes": "ghost_sizes", "scale_out_batch_sizes": "scale_out_batch_sizes",
          "seeds": "seeds", "dataset": "dataset", "model": "model", "epochs": "epochs",
          "threads": "threads"}


def main(argv=None):
    from fastbn.study.runner import make_config, prepare_output, run_study

    p = parser()
    args = p.parse_args(argv)
    settings = {field: getattr(args, option) for option, field in FIELDS.items()
                if getattr(args, option) is not None}
    # Bad options are usage errors, found before anything runs; an error later is not.
    try:
        config = make_config(args.quick, **settings)
        prepare_output(args.output)
    except ValueError as exc:
        p.error(str(exc))
    result = run_study(config, args.output, resume=args.resume, progress=not args.no_progress)
    print(f"{len(result.ran)} cells run, {len(result.cached)} from the cache, "
          f"{result.elapsed_s / 60:.1f} minutes; report: {result.output}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
