#!/usr/bin/env python
"""Run a scaling-law sweep (model sizes x token budgets x {ntp, prior} x seeds) and fit it.

Locally, the grid's runs train one after the other (``python -m megatron_prior.train``), each
logging to its own directory; a run whose summary.json exists is skipped, so an interrupted
sweep continues where it stopped. When every run is done the results are collected and
fitted: results.md (table), fit.json (exponents, CIs, R^2, extrapolation error) and
scaling.png (loss vs tokens per size, NTP and PRIOR side by side) in the output directory.

With --slurm the grid becomes one SLURM job array (one array task per run) that is submitted
with sbatch; --dry-run prints that script instead. When the array has finished, rerun with
--collect-only to fit and plot.

Examples:
  python examples/sweeps/run_sweep.py examples/sweeps/cpu_default.yaml
  python examples/sweeps/run_sweep.py examples/sweeps/cluster_example.yaml --slurm --dry-run
  python examples/sweeps/run_sweep.py SWEEP.yaml --output-dir /scratch/sw --collect-only
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megatron_prior.sweeps import (CollectError, FitError, RunFailed, SweepError, analyze,
                                   load_sweep, render_sbatch, run_local, submit)
from megatron_prior.files import atomic_write_json, atomic_write_text
from megatron_prior.sweeps.rundirs import RUN_RECORD, SUMMARY, check_run_record, check_runs, run_dir, run_record
from megatron_prior.sweeps.report import fit_markdown


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="the sweep file (.yaml/.yml/.json)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where runs and reports go (default: the sweep's output_dir, else "
                        "sweep_output/NAME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run (locally: the commands; with --slurm: the sbatch "
                        "script) and change nothing; the trainer's check of each run at its "
                        "world size and data files waits for the real launch")
    p.add_argument("--slurm", action="store_true",
                   help="submit the unfinished runs as one SLURM job array instead of running "
                        "them here (needs the sweep's slurm section)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="replace the sweep file's seeds, e.g. to add a seed to a finished sweep (runs "
                        "already done under the same flags are skipped)")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="start at most N of the unfinished runs (finished ones never count)")
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: collect, fit and plot the finished sweep")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap samples for the exponents' confidence intervals (default 1000)")
    p.add_argument("--fit-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    return p


def _report(spec, output_dir: Path, args) -> None:
    out = analyze(spec, output_dir, n_bootstrap=args.bootstrap, seed=args.fit_seed)
    print(fit_markdown(out["fit"]))
    for line in out["errors"]:
        print(f"warning: no fit for {line}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in out["paths"]))


def _slurm(spec, output_dir: Path, args) -> None:
    pending = []
    for run in spec.runs():
        rdir = run_dir(output_dir, run)
        check_run_record(spec, run, rdir)
        if (rdir / SUMMARY).exists():
            print(f"skip {run.name}: {SUMMARY} exists (finished)", file=sys.stderr)
        else:
            pending.append(run)
    if args.max_runs is not None:
        pending = pending[:args.max_runs]
    if not pending:
        print("every run is finished; nothing to submit. Fit with --collect-only.", file=sys.stderr)
        return
    script = render_sbatch(spec, pending, output_dir)
    if args.dry_run:
        sys.stdout.write(script)
        return
    check_runs(spec, pending, output_dir, world_size=spec.slurm.nodes * spec.slurm.gpus_per_node)
    path = output_dir / "slurm" / f"{spec.name}.sbatch"
    (output_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, script)
    for run in pending:
        atomic_write_json(run_dir(output_dir, run) / RUN_RECORD, run_record(spec, run), sort_keys=False)
    job = submit(path)
    again = shlex.join([sys.executable, sys.argv[0], str(args.sweep), "--output-dir",
                        str(output_dir), "--collect-only"])
    print(f"submitted job array {job}: {len(pending)} run(s), script {path}\n"
          f"when it has finished: {again}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:
        _parser().error("--max-runs must be >= 1")
    try:
        spec = load_sweep(args.sweep, {"seeds": args.seeds} if args.seeds else None)
        # Absolute, because SLURM tasks and the trainer may run from another directory.
        output_dir = (args.output_dir or Path(spec.output_dir or f"sweep_output/{spec.name}")).absolute()
        if args.collect_only:
            _report(spec, output_dir, args)
        elif args.slurm:
            _slurm(spec, output_dir, args)
        else:
            report = run_local(spec, output_dir, max_runs=args.max_runs, dry_run=args.dry_run)
            if args.dry_run:
                return 0
            if report.pending:
                print(f"{len(report.pending)} run(s) left (--max-runs); rerun the same command "
                      "to continue", file=sys.stderr)
                return 0
            _report(spec, output_dir, args)
    except (SweepError, RunFailed, CollectError, FitError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
