"""Launching sweeps: local runs resume (finished runs are skipped), the SLURM script of a small
grid matches the stored one byte for byte and runs under stub srun/torchrun, and the report
(results, fit.json, scaling.png) comes out of a sweep of a fake trainer that follows a known law.

The trainer is tests/data/sweeps/fake_train.py (the summary.json contract, no model), so these
tests do not depend on the real one.
"""

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prior.sweeps import CollectError, RunFailed, SweepError, load_sweep, render_sbatch, run_local
from megatron_prior.sweeps.collect import collect

DATA = Path(__file__).resolve().parent / "data" / "sweeps"
ROOT = Path(__file__).resolve().parents[1]
GOLDEN_OUTPUT_DIR = "/scratch/sweeps/small"


def _run_sweep_module():
    spec = importlib.util.spec_from_file_location("run_sweep", ROOT / "examples" / "sweeps" / "run_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_sweep(tmp_path, **overrides):
    raw = {
        "name": "fake",
        "model": "ulvlm",
        "sizes": [{"name": "xs", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
                  {"name": "s", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
                  {"name": "m", "num_layers": 4, "hidden_size": 96, "num_attention_heads": 4}],
        "token_budgets": [102400, 204800, 409600, 819200],
        "losses": ["ntp", "prior"],
        "seeds": [1],
        "seq_length": 64,
        "global_batch_size": 16,
        "train_args": {"lr": 0.002},
        "trainer": [str(DATA / "fake_train.py")],
        "eval": {"command": f"{{python}} {DATA / 'fake_eval.py'} {{run_dir}} {{eval_json}}"},
    }
    raw.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The fake trainer's call log: one JSON line per training run started."""
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(path))
    monkeypatch.delenv("FAKE_TRAIN_FAIL", raising=False)
    monkeypatch.delenv("FAKE_TRAIN_NOISE", raising=False)

    def read():
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return read


def test_resume_skips_finished_runs(tmp_path, calls, capsys):
    spec = load_sweep(_fake_sweep(tmp_path))
    out = tmp_path / "out"
    first = run_local(spec, out, max_runs=5, stream=sys.stdout)
    assert len(first.trained) == 5 and len(first.pending) == 19 and not first.finished
    assert [c["run"] for c in calls()] == [r.name for r in spec.runs()[:5]]

    # An interrupted run: a checkpoint but no summary.json. It resumes with --load.
    interrupted = spec.runs()[5]
    (out / "runs" / interrupted.name / "checkpoints").mkdir(parents=True)
    (out / "runs" / interrupted.name / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("50")
    capsys.readouterr()
    second = run_local(spec, out, stream=sys.stdout)
    printed = capsys.readouterr().out
    assert second.finished == [r.name for r in spec.runs()[:5]]
    assert len(second.trained) == 19 and not second.pending
    for name in second.finished:
        assert f"skip {name}: summary.json exists (finished)" in printed
    names = [c["run"] for c in calls()]
    assert names == [r.name for r in spec.runs()]  # each run trained exactly once
    loads = {c["run"]: c["load"] for c in calls()}
    assert loads[interrupted.name] == str(out / "runs" / interrupted.name / "checkpoints")
    assert all(v is None for k, v in loads.items() if k != interrupted.name)
    assert all((out / "runs" / r.name / "eval.json").exists() for r in spec.runs())

    third = run_local(spec, out, stream=sys.stdout)
    assert len(third.finished) == 24 and not third.trained and len(calls()) == 24


def test_end_to_end_report_recovers_the_fake_law(tmp_path, calls, capsys):
    sweep = _fake_sweep(tmp_path, fit_kinds=["grounded"])
    out = tmp_path / "out"
    assert _run_sweep_module().main([str(sweep), "--output-dir", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "| m | " in printed and "Chinchilla prior" in printed
    fit = json.loads((out / "fit.json").read_text())
    # fake_train.py: beta 0.30 (ntp) and 0.36 (prior), alpha 0.45, no noise.
    assert fit["reference_size"] == "m"
    for size in ("xs", "s", "m"):
        assert fit["per_size"][size]["ntp"]["beta"] == pytest.approx(0.30, rel=1e-4)
        assert fit["per_size"][size]["prior"]["beta"] == pytest.approx(0.36, rel=1e-4)
        assert fit["comparison"][size]["ci_overlap"] is False
    assert fit["ntp"]["extrapolation_error"] < 1e-5
    assert fit["chinchilla"]["ntp"]["alpha"] == pytest.approx(0.45, rel=1e-3)
    # fake_train.py: grounded CE = 1.5 x the loss, so the same exponents and 1.5 x E.
    grounded = fit["by_kind"]["grounded"]
    assert grounded["y"] == "eval_ce_grounded" and fit["y"] == "eval_ce" and fit["x"] == "loss_tokens"
    for size in ("xs", "s", "m"):
        for loss, beta in (("ntp", 0.30), ("prior", 0.36)):
            assert grounded["per_size"][size][loss]["beta"] == pytest.approx(beta, rel=1e-4)
            assert grounded["per_size"][size][loss]["E"] == pytest.approx(1.5 * fit["per_size"][size][loss]["E"],
                                                                          rel=1e-3)
    assert (out / "scaling_grounded.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Fits: held-out CE of the grounded tokens" in (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 24 and results[0]["heldout"]["probe_accuracy"] is not None
    assert results[0]["validation"]["ce_grounded"] > results[0]["validation"]["ce_template"]
    # D is the loss tokens (3/4 of the text positions in fake_train.py), not the positions.
    assert [r["loss_tokens"] for r in results[:2]] == [102400 * 3 // 4] * 2
    assert results[0]["padding_positions"] == 102400 // 4 and results[0]["image_positions"] == 20 * 102400 // 64
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| xs_ntp_D102400_seed1 |" in (out / "results.md").read_text()
    # --collect-only refits without training anything.
    assert _run_sweep_module().main([str(sweep), "--output-dir", str(out), "--collect-only",
                                     "--bootstrap", "50"]) == 0
    assert len(calls()) == 24
    # A kind the runs did not measure is refused by name.
    capsys.readouterr()
    sweep = _fake_sweep(tmp_path, fit_kinds=["objects"])
    assert _run_sweep_module().main([str(sweep), "--output-dir", str(out), "--collect-only"]) == 1
    assert ("run xs_ntp_D102400_seed1: its summary.json has no eval_ce_objects (it has eval_ for: ce, ce_grounded, "
            "ce_template)") in capsys.readouterr().err


def test_exponent_panel_draws_an_interval_that_excludes_the_estimate():
    """A percentile bootstrap interval can lie wholly on one side of the point estimate (here
    above it for NTP, below for PRIOR): the panel draws it from its own ends and the estimate as
    a marker (matplotlib refuses such an interval as asymmetric yerr around the point)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_prior.sweeps.plots import _plot_exponents

    fit = {"per_size": {"s": {"ntp": {"beta": 0.30, "beta_ci": [0.31, 0.42]},
                              "prior": {"beta": 0.50, "beta_ci": [0.20, 0.45]}},
                        "m": {"ntp": {"beta": 0.33, "beta_ci": None},
                              "prior": {"error": "no fit with B > 0"}}}}
    fig, ax = plt.subplots()
    try:
        _plot_exponents(ax, fit, ["ntp", "prior"], ["s", "m"])
        bars = [np.asarray(c.get_segments()) for c in ax.collections]
        markers = {line.get_label(): line.get_xydata() for line in ax.lines if not line.get_label().startswith("_")}
    finally:
        plt.close(fig)
    # Each bar: one vertical segment per fitted size, [[x, lo], [x, hi]].
    np.testing.assert_allclose(bars[0], [[[-0.2, 0.31], [-0.2, 0.42]], [[0.8, 0.33], [0.8, 0.33]]])
    np.testing.assert_allclose(bars[1], [[[0.2, 0.20], [0.2, 0.45]]])
    np.testing.assert_allclose(markers["NTP"], [[-0.2, 0.30], [0.8, 0.33]])
    np.testing.assert_allclose(markers["PRIOR"], [[0.2, 0.50]])


def test_dry_run_changes_nothing(tmp_path, calls, capsys):
    out = tmp_path / "out"
    assert _run_sweep_module().main([str(_fake_sweep(tmp_path)), "--output-dir", str(out),
                                     "--dry-run", "--max-runs", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if "fake_train.py" in line]
    assert len(commands) == 3 and "--train-iters 100 --loss ntp --seed 1" in commands[0]
    assert sum("then:" in line and "fake_eval.py" in line for line in printed) == 3
    assert not out.exists() and not calls()


def test_changed_flags_are_refused_on_resume(tmp_path, calls):
    out = tmp_path / "out"
    run_local(load_sweep(_fake_sweep(tmp_path)), out, max_runs=1, stream=sys.stdout)
    changed = load_sweep(_fake_sweep(tmp_path, train_args={"lr": 0.001}))
    with pytest.raises(SweepError, match=r"other training flags .* \(differing: 0\.001 0\.002\)"):
        run_local(changed, out, stream=sys.stdout)


def test_failed_run_reports_its_log(tmp_path, calls, monkeypatch):
    spec = load_sweep(_fake_sweep(tmp_path))
    monkeypatch.setenv("FAKE_TRAIN_FAIL", spec.runs()[2].name)
    with pytest.raises(RunFailed) as err:
        run_local(spec, tmp_path / "out", stream=sys.stdout)
    message = str(err.value)
    assert f"training run {spec.runs()[2].name} failed (exit 3)" in message
    assert "simulated out-of-memory" in message and "train.log" in message
    assert len(calls()) == 3


def test_collect_refuses_inconsistent_summaries(tmp_path, calls):
    spec = load_sweep(_fake_sweep(tmp_path))
    out = tmp_path / "out"
    run_local(spec, out, max_runs=2, stream=sys.stdout)
    summary = out / "runs" / spec.runs()[1].name / "summary.json"
    data = json.loads(summary.read_text())
    summary.write_text(json.dumps({**data, "loss": "ntp"}))
    with pytest.raises(CollectError, match=r"summary\.json: 'loss' is 'ntp', the sweep grid says 'prior'"):
        collect(spec, out)
    summary.write_text(json.dumps({**data, "eval_ce": None}))
    with pytest.raises(CollectError, match="'eval_ce' is missing or null .*--eval-iters"):
        collect(spec, out)
    # A summary of a trainer that counted positions, not loss tokens, is not a D.
    summary.write_text(json.dumps({k: v for k, v in data.items() if k != "loss_tokens"}))
    with pytest.raises(CollectError, match="'loss_tokens' is missing or null"):
        collect(spec, out)
    summary.write_text(json.dumps(data))
    results, missing = collect(spec, out)
    assert len(results) == 2 and len(missing) == 22
    assert _run_sweep_module().main([str(_fake_sweep(tmp_path)), "--output-dir", str(out),
                                     "--collect-only"]) == 1  # unfinished: refuses to fit


# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_matches_golden_file(capsys):
    spec = load_sweep(DATA / "small.yaml")
    script = render_sbatch(spec, spec.runs(), GOLDEN_OUTPUT_DIR)
    golden = DATA / "small.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script.encode() == golden.read_bytes()
    assert subprocess.run(["bash", "-n", str(golden)]).returncode == 0
    # The command line prints the same script with --dry-run, and touches nothing.
    assert _run_sweep_module().main([str(DATA / "small.yaml"), "--slurm", "--dry-run",
                                     "--output-dir", GOLDEN_OUTPUT_DIR]) == 0
    assert capsys.readouterr().out.encode() == golden.read_bytes()
    assert not Path(GOLDEN_OUTPUT_DIR).exists()


def test_slurm_needs_a_slurm_section(tmp_path):
    spec = load_sweep(_fake_sweep(tmp_path))
    with pytest.raises(SweepError, match="--slurm needs a 'slurm' section"):
        render_sbatch(spec, spec.runs(), tmp_path)


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_array_task_runs_under_stub_srun_and_torchrun(tmp_path, calls):
    """Execute array tasks of a generated script with srun/scontrol/torchrun replaced by stubs
    that check the flags SLURM and torchrun would get, then run the fake trainer."""
    sweep = _fake_sweep(tmp_path, slurm={"nodes": 1, "gpus_per_node": 2, "time": "10",
                                         "torchrun": str(tmp_path / "bin" / "torchrun")})
    spec = load_sweep(sweep)
    out = tmp_path / "out"
    script = tmp_path / "sweep.sbatch"
    script.write_text(render_sbatch(spec, spec.runs(), out))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", '[[ "$*" == "show hostnames node[1]" ]]; echo node1\n')
    # srun: one task per node (here one node), with its node id set as SLURM would.
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    # torchrun: check the rendezvous flags, then run the trainer as a single process.
    _stub(bin_dir, "torchrun",
          '[[ "$1" == --nnodes=1 && "$2" == --node-rank=0 && "$3" == --nproc-per-node=2 ]]\n'
          '[[ "$4" == --master-addr=node1 && "$5" == --master-port=20077 ]]\n'
          f'shift 5\nexec {sys.executable} "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1")
    outputs = []
    for task in ("0", "0", "1"):  # task 0 twice: the resubmitted task skips its finished run
        proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": task},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    assert "summary.json exists (finished)" in outputs[1]
    assert "skip" not in outputs[0] and "skip" not in outputs[2]
    assert [c["run"] for c in calls()] == [spec.runs()[0].name, spec.runs()[1].name]
    for run in spec.runs()[:2]:
        assert (out / "runs" / run.name / "summary.json").exists()
        assert (out / "runs" / run.name / "eval.json").exists()
        assert "fake trainer:" in (out / "runs" / run.name / "train.log").read_text()
    bad = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "99"},
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "array task 99: no such run (the sweep has 24)" in bad.stderr
