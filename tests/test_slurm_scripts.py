"""The SLURM launchers (DRY_RUN=1) produce commands whose trainer flags the trainer accepts,
with every argument intact through the two shells (srun's bash -c, then torchrun)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_prior.training.arguments import build_parser, validate_args

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _dry_run(script: str, env: dict) -> tuple[list[str], int]:
    """(trainer argv, world size) of the command a launcher would srun."""
    out = subprocess.run(["bash", str(EXAMPLES / script)], env={**os.environ, **env, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("srun ")]
    task = shlex.split(line)[-1]  # what each node's bash -c runs
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
