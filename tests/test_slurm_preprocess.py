"""examples/preprocess_with_weights.sh: the command it would srun is a valid multi-rank command of
tools/preprocess_with_weights.py (every argument intact through the shells), and its container
mounts cover the input, images, tokenizer, reference and output."""

import shlex

from tests.test_slurm_scripts import REPO, _srun_line
from tools.preprocess_with_weights import build_parser, validate_args

SCRIPT = "preprocess_with_weights.sh"


def _tool_argv(env: dict) -> tuple[list[str], int]:
    """(tool argv, world size) of the command each node's task runs."""
    task = _srun_line(SCRIPT, env)[-1]
    argv = shlex.split(task.replace("${SLURM_NODEID}", "0"))
    at = argv.index("tools/preprocess_with_weights.py")
    launcher = argv[argv.index("torch.distributed.run"):at]
    world = int(launcher[launcher.index("--nproc-per-node") + 1]) * int(launcher[launcher.index("--nnodes") + 1])
    return argv[at + 1:], world


def test_the_command_is_a_valid_preprocessing_command(tmp_path):
    spaced = tmp_path / "a dir with spaces"
    (spaced / "images").mkdir(parents=True)
    (spaced / "blip it's.json").write_text("[]")
    env = {"INPUT": str(spaced / "blip it's.json"), "IMAGE_ROOT": str(spaced / "images"),
           "TOKENIZER_MODEL": str(spaced / "tok.model"), "REFERENCE_LOAD": str(tmp_path / "ref"),
           "OUTPUT_PREFIX": str(spaced / "out" / "train"), "NNODES": "2", "IMAGE_ASPECT": "crop"}
    argv, world = _tool_argv(env)
    args = validate_args(build_parser(), build_parser().parse_args(argv))
    assert world == 16
    assert args.input == [env["INPUT"]] and args.input_format == "llava" and args.image_root == env["IMAGE_ROOT"]
    assert args.output_prefix == env["OUTPUT_PREFIX"] and args.reference_load == env["REFERENCE_LOAD"]
    assert (args.image_size, args.image_aspect, args.image_store, args.workers) == ((336, 336), "crop", "encoded", 6)
    # Shards name their images themselves: IMAGE_ROOT= leaves --image-root out.
    argv, _ = _tool_argv({**env, "INPUT": str(spaced / "shard-{000..009}.tar"), "IMAGE_ROOT": ""})
    assert "--image-root" not in argv and argv[argv.index("--input") + 1] == str(spaced / "shard-{000..009}.tar")


def test_container_mounts():
    env = {"INPUT": "/data/llava/blip.json", "IMAGE_ROOT": "/images", "TOKENIZER_MODEL": "/tok/tok.model",
           "REFERENCE_LOAD": "/ckpt/ref", "OUTPUT_PREFIX": "/out/llava/train", "CONTAINER_IMAGE": "img"}
    srun = _srun_line(SCRIPT, env)
    mounts = (f"{REPO}:{REPO},/data/llava:/data/llava,/tok:/tok,/ckpt/ref:/ckpt/ref,/out/llava:/out/llava,"
              "/images:/images")
    assert srun[3:5] == ["--container-image=img", f"--container-mounts={mounts}"]
