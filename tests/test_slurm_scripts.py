"""The SLURM launchers and the sweep's job-array script: the commands they would run (DRY_RUN=1,
or stubs for sbatch, srun and torchrun), with every argument intact through the shells; the log
directory exists before sbatch is called; the optional pyxis container flags. And the GPU check
script's commands, which parse on this CPU machine as they must on the GPU one."""

import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prior.sweeps import load_sweep, render_sbatch
from megatron_prior.training.arguments import build_parser, validate_args

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
LAUNCHERS = ["pretrain_reference_lm.sh", "pretrain_lvlm_prior.sh"]


def _env(**extra: str) -> dict:
    """This environment outside any SLURM job (as on a login node), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONTAINER_", "DRY_RUN"))}
    return {**env, **extra}


def _srun_line(script: str, env: dict) -> list[str]:
    """The srun command a launcher would run, as argv."""
    out = subprocess.run(["bash", str(EXAMPLES / script)], env=_env(**env, DRY_RUN="1"),
                         capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def _dry_run(script: str, env: dict) -> tuple[list[str], int]:
    """(trainer argv, world size) of the command a launcher would srun."""
    task = _srun_line(script, env)[-1]  # what each node's bash -c runs
    argv = shlex.split(task.replace("${SLURM_NODEID}", "0"))
    launcher = argv[argv.index("torch.distributed.run"):argv.index("megatron_prior.train")]
    world = int(launcher[launcher.index("--nproc-per-node") + 1]) * int(launcher[launcher.index("--nnodes") + 1])
    return argv[argv.index("megatron_prior.train") + 1:], world


@pytest.mark.parametrize("script,env", [
    ("pretrain_reference_lm.sh", {}),
    ("pretrain_lvlm_prior.sh", {}),
    ("pretrain_lvlm_prior.sh", {"MODEL": "ulvlm", "LOSS": "ntp", "TP": "1", "PP": "2", "NNODES": "2"}),
], ids=["reference", "hlvlm-prior", "ulvlm-ntp-pp2-2nodes"])
def test_launcher_commands_are_valid_trainer_commands(tiny_corpus, tmp_path, script, env):
    spaced = tmp_path / "a dir with spaces"
    spaced.mkdir()
    tokenizer = shutil.copy(tiny_corpus["tokenizer"], spaced / "tok.model")
    checkpoints = str(tmp_path / "it's checkpoints")
    env = {"DATA_PATH": tiny_corpus["data"], "TOKENIZER_MODEL": str(tokenizer), "CHECKPOINT_DIR": checkpoints,
           "MODEL_SIZE": "125m", **env}
    argv, world = _dry_run(script, env)
    args = validate_args(build_parser().parse_args(argv), world_size=world)
    assert args.tokenizer_model == str(tokenizer) and args.save == args.load == checkpoints
    assert args.data_path == [tiny_corpus["data"]] and args.num_workers == 2
    if "NNODES" in env:
        assert world == 16 and args.pipeline_model_parallel_size == 2 and args.data_parallel_size == 8


def _stub(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# A stand-in sbatch: fails unless the directory of every --output exists when it is called,
# then records its working directory and arguments, one per line.
SBATCH = """for a in "$@"; do
  if [[ "$a" == --output=* && ! -d "$(dirname "${a#--output=}")" ]]; then echo "no dir for $a" >&2; exit 3; fi
done
printf '%s\\n' "$PWD" "$@" > "$SBATCH_CALL"
"""


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_makes_its_log_dir_then_submits_itself(tmp_path, script):
    # SLURM opens --output before the job starts and does not create its directory.
    directive = [line for line in (EXAMPLES / script).read_text().splitlines() if line.startswith("#SBATCH --output=")]
    assert directive == ["#SBATCH --output=%x-%j.out"]  # a plain sbatch writes to the submit dir, which exists
    _stub(tmp_path / "bin", "sbatch", SBATCH)
    logs = tmp_path / "new logs" / "deeper"
    call = tmp_path / "sbatch_call.txt"
    proc = subprocess.run(["bash", str(EXAMPLES / script), "-N", "4", "--partition=gpu"], cwd=tmp_path,
                          env=_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", LOG_DIR=str(logs),
                                   SBATCH_CALL=str(call)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Submitted from the repository (the job finds it as SLURM_SUBMIT_DIR), by absolute path.
    assert call.read_text().splitlines() == [str(REPO), f"--output={logs}/%x-%j.out", "-N", "4", "--partition=gpu",
                                             str(EXAMPLES / script)]


def test_launcher_without_sbatch_says_where_to_run(tmp_path):
    path = "/usr/bin:/bin"
    if shutil.which("sbatch", path=path):
        pytest.skip("sbatch is installed here")
    proc = subprocess.run(["bash", str(EXAMPLES / LAUNCHERS[0])], env=_env(PATH=path, LOG_DIR=str(tmp_path / "l")),
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == ("sbatch is not on PATH: run this on a SLURM login node (DRY_RUN=1 prints the "
                           "commands)\n")
    assert not (tmp_path / "l").exists()


def test_launcher_dry_run_prints_the_submission_first():
    out = subprocess.run(["bash", str(EXAMPLES / LAUNCHERS[1]), "--qos=high"], env=_env(DRY_RUN="1"),
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == (f"cd {REPO} && mkdir -p {REPO}/logs && sbatch --output={REPO}/logs/%x-%j.out "
                                   f"--qos=high {EXAMPLES / LAUNCHERS[1]}")


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_container_flags(script):
    paths = {"DATA_PATH": "0.7 /data/a/train_document 0.3 /data/b/train_document",
             "TOKENIZER_MODEL": "/tok/tokenizer.model", "CHECKPOINT_DIR": "/ckpt/run"}
    plain = _srun_line(script, paths)
    assert not [a for a in plain if a.startswith("--container")]
    srun = _srun_line(script, {**paths, "CONTAINER_IMAGE": "nvcr.io#team/prior:1"})
    # The repository, tokenizer, checkpoint and data directories, each at its own path.
    mounts = f"{REPO}:{REPO},/tok:/tok,/ckpt/run:/ckpt/run,/data/a:/data/a,/data/b:/data/b"
    assert srun[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--container-image=nvcr.io#team/prior:1", f"--container-mounts={mounts}"]
    assert srun[5:] == plain[3:]
    srun = _srun_line(script, {**paths, "CONTAINER_IMAGE": "img", "CONTAINER_MOUNTS": "/scratch:/scratch"})
    assert srun[3:5] == ["--container-image=img", "--container-mounts=/scratch:/scratch"]


def _sweep_script(tmp_path: Path) -> tuple[Path, Path]:
    """A six-run sweep's array script and its output directory; its evaluation command only
    writes eval.json."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny", "model": "gpt", "sizes": ["tiny"], "token_budgets": [4096, 8192, 16384],
        "losses": ["ntp", "prior"], "seeds": [1], "seq_length": 32, "global_batch_size": 8,
        "data": {"data-path": "/data/caps/train_document", "tokenizer-model": "/tok/tok.model"},
        "eval": {"command": "touch {eval_json}"},
        "slurm": {"nodes": 1, "gpus_per_node": 2, "time": "10", "torchrun": str(tmp_path / "bin" / "torchrun")},
    }))
    spec = load_sweep(sweep)
    out = tmp_path / "out"
    script = tmp_path / "tiny.sbatch"
    script.write_text(render_sbatch(spec, spec.runs(), out))
    return script, out


def test_sweep_script_run_with_bash_makes_its_log_dir_then_submits_itself(tmp_path):
    script, out = _sweep_script(tmp_path)
    _stub(tmp_path / "bin", "sbatch", SBATCH)
    call = tmp_path / "sbatch_call.txt"
    proc = subprocess.run(["bash", str(script), "--qos=high"], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SBATCH_CALL=str(call)))
    assert proc.returncode == 0, proc.stderr
    assert (out / "slurm" / "logs").is_dir()
    assert call.read_text().splitlines() == [str(tmp_path), "--qos=high", str(script)]
    assert f"#SBATCH --output={out}/slurm/logs/%x-%A_%a.out" in script.read_text().splitlines()


@pytest.mark.parametrize("container", [False, True], ids=["plain", "container"])
def test_sweep_array_task_container_flags(tmp_path, container):
    script, out = _sweep_script(tmp_path)
    calls = tmp_path / "srun_calls"
    calls.mkdir()
    # srun records its arguments, drops its options and runs the rest as node 0; torchrun
    # writes the run's summary.json where --log-dir says.
    _stub(tmp_path / "bin", "srun", 'printf "%s\\n" "$@" > "$(mktemp "$SRUN_CALLS/call.XXXXXX")"\n'
                                    'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    _stub(tmp_path / "bin", "scontrol", "echo node1\n")
    _stub(tmp_path / "bin", "torchrun", 'while [[ "$1" != --log-dir ]]; do shift; done\n'
                                        'echo "{}" > "$2/summary.json"\n')
    env = _env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SRUN_CALLS=str(calls), SLURM_JOB_ID="77",
               SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_SUBMIT_DIR=str(tmp_path))
    if container:
        env["CONTAINER_IMAGE"] = "nvcr.io#team/prior:1"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = out / "runs" / load_sweep(tmp_path / "sweep.yaml").runs()[1].name
    assert (run / "summary.json").exists() and (run / "eval.json").exists()
    srun = sorted((p.read_text().splitlines() for p in calls.iterdir()), key=len, reverse=True)
    if not container:
        # Training through srun; the evaluation on the batch node itself, as before.
        assert len(srun) == 1 and srun[0][:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
        return
    flags = ["--container-image=nvcr.io#team/prior:1", f"--container-workdir={tmp_path}",
             f"--container-mounts={tmp_path}:{tmp_path},{out}:{out},/data/caps:/data/caps,/tok:/tok"]
    training, evaluation = srun
    assert training[:5] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", *flags] and training[5] == "bash"
    assert evaluation[:5] == ["--nodes=1", "--ntasks=1", *flags] and evaluation[5:7] == ["bash", "-c"]


def _bench_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check_dry_run(wheels: Path) -> list[str]:
    return subprocess.run(["bash", str(EXAMPLES / "gpu_check.sh")],
                          env=_env(DRY_RUN="1", PYTHON=sys.executable, WHEELS=str(wheels)),
                          capture_output=True, text=True, check=True).stdout.splitlines()


def test_gpu_check_installs_carried_wheels_without_an_index(tmp_path):
    assert _gpu_check_dry_run(tmp_path)[0] == f"wheels: SKIPPED (no {tmp_path}/*.whl: using what " \
                                              f"{sys.executable} has installed)"
    wheel = tmp_path / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.touch()
    assert shlex.split(_gpu_check_dry_run(tmp_path)[0]) == [
        sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path), str(wheel)]


def test_gpu_check_commands_parse_here(tmp_path):
    """Every benchmark command of examples/gpu_check.sh passes its script's own parser, and the
    trainer flags it builds pass the trainer's, so no option renamed since breaks the GPU run."""
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "gpu_check.sh")]).returncode == 0
    commands = [shlex.split(line) for line in _gpu_check_dry_run(tmp_path) if line.startswith(sys.executable + " ")]
    assert [c[1:3] for c in commands[:2]] == [["setup.py", "build_ext"], ["-m", "pytest"]]
    assert (REPO / commands[1][-1]).is_file()
    benches = [c[1:] for c in commands if c[1].startswith("benchmarks/")]
    assert [b[0] for b in benches][:4] == ["benchmarks/bench_train.py", "benchmarks/bench_loss.py",
                                           "benchmarks/bench_train.py", "benchmarks/bench_train.py"]
    from megatron_prior.training.arguments import build_parser

    for path, *argv in benches:
        opts = _bench_module(path).parse_args(argv)
        if path.endswith("bench_train.py"):
            for arch in opts.archs.split(","):
                for loss in opts.losses:
                    build_parser().parse_args(_bench_module(path).trainer_argv(
                        {"data": "/data/prefix", "tokenizer": "/data/tok.model"}, arch, loss, opts))
    # The Llama-shaped GPT: its shape flags reach the trainer.
    gpt = _bench_module(benches[0][0]).parse_args(benches[0][1:])
    args = build_parser().parse_args(_bench_module(benches[0][0]).trainer_argv({"data": "d", "tokenizer": "t"},
                                                                                "gpt", "prior", gpt))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.ffn_hidden_size, args.normalization,
            args.untie_embeddings_and_output_weights, args.bf16) == (16, 2048, 32, 8192, "RMSNorm", True, True)
    assert "--variants" in benches[1] and benches[1][benches[1].index("--variants") + 1:] == list("abdef")
