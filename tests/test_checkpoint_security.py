"""A crafted checkpoint cannot run code on any path that loads one.

The checkpoint is the one issue 11 describes: a real checkpoint, a ``torch.save``'d pickle
whose ``__reduce__`` calls ``os.system`` appended to a ``.distcp`` file, every byte entry's
storage metadata (``*._extra_state``, megatron-core 0.19's ``common_state``) pointed at it,
and ``.metadata`` re-pickled with nothing but allow-listed classes. megatron-core's own
``dist_checkpointing.load`` runs the payload (checked first, so the exploit is known to be
live); every load path of this package refuses it with a ``CheckpointError`` naming the file,
and each command-line tool reports that as one line on stderr with a non-zero exit.
"""

import io
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_prior.checkpoint import CheckpointError, checkpoint_dir, load_weights, read_metadata, read_model_config
from megatron_prior.testing import run_on_ranks
from tests.test_training import _argv, _train

pytestmark = pytest.mark.slow  # trains two GPT iterations, then starts each tool once
ROOT = Path(__file__).resolve().parent.parent
REFUSAL = ("refusing to load a pickled object that is not tensors and plain data "
           "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def craft(load_dir: Path, marker: Path) -> Path:
    """Turn the checkpoint in ``load_dir`` into the issue's exploit; returns the .distcp file
    that now holds the payload."""
    ckpt = checkpoint_dir(load_dir)
    metadata = read_metadata(ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    payload = io.BytesIO()
    torch.save([_Payload(str(marker))], payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    entries = [info for index, info in metadata.storage_data.items()
               if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)]
    assert entries, "a megatron checkpoint always has byte entries (_extra_state)"
    for info in entries:
        info.relative_path, info.offset, info.length = shard.name, offset, len(payload.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    read_metadata(ckpt)  # still only allow-listed classes: the metadata check alone lets it through
    return shard


def _save_hlvlm(load_dir: str, argv: list) -> None:
    """The H-LVLM the trainer builds from ``argv``, saved untrained (model part only): enough
    for --vit-load and evaluation, and no forward pass (megatron-core 0.19's LLaVAModel needs
    CUDA in its forward)."""
    from megatron_prior import parallel
    from megatron_prior.checkpoint import model_state, save
    from megatron_prior.models.builder import build_model
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.loop import model_config_from_args

    args = parse_args(argv)
    parallel.initialize(seed=args.seed)
    cfg = model_config_from_args(args, load_tokenizer(args.tokenizer_model))
    save(load_dir, 2, model_state([build_model(cfg)]), cfg)


@pytest.fixture(scope="module")
def crafted(tiny_corpus, tmp_path_factory) -> dict:
    """Clean runs (a trained GPT: optimizer, RNG, train state; an H-LVLM) and crafted copies."""
    root = tmp_path_factory.mktemp("crafted")
    runs = {"gpt": root / "gpt", "hlvlm": root / "hlvlm"}
    run_on_ranks(_train, 1, _argv(tiny_corpus, "gpt", str(runs["gpt"]), "--save", str(runs["gpt"]), iters=2))
    run_on_ranks(_save_hlvlm, 1, str(runs["hlvlm"]), _argv(tiny_corpus, "hlvlm", str(root / "unused"), iters=2))
    out = {"root": root, "marker": root / "PAYLOAD_RAN", "corpus": tiny_corpus}
    for name, run in runs.items():
        shutil.copytree(run, root / f"crafted_{name}")
        out[name] = (root / f"crafted_{name}", craft(root / f"crafted_{name}", out["marker"]))
    out["live"] = root / "crafted_live"
    shutil.copytree(runs["gpt"], out["live"])
    craft(out["live"], root / "LIVE_PAYLOAD_RAN")
    # megatron-core 0.16's common.pt (0.19 reads one too when present) replaced by the payload.
    shutil.copytree(runs["gpt"], root / "crafted_common_pt")
    common_pt = checkpoint_dir(root / "crafted_common_pt") / "common.pt"
    torch.save(_Payload(str(out["marker"])), common_pt)
    out["common.pt"] = (root / "crafted_common_pt", common_pt)
    return out


def _megatron_load(load_dir: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model

    parallel.initialize()
    ckpt = checkpoint_dir(load_dir)
    model = build_model(read_model_config(ckpt))
    try:
        dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    except BaseException:  # noqa: BLE001 - on 0.19 the merge fails, after the payload ran
        pass


def test_the_crafted_checkpoint_runs_code_in_megatrons_own_loader(crafted):
    run_on_ranks(_megatron_load, 1, str(crafted["live"]))
    assert (crafted["root"] / "LIVE_PAYLOAD_RAN").exists()


def _load_each(crafted: dict) -> dict:
    """Every in-process load path on the crafted checkpoints: (exception type, message)."""
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.pretrained import load_inference_model
    from megatron_prior.models.vision_encoder import load_vision_encoder
    from megatron_prior.scoring import load_reference
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.checkpointing import load_checkpoint

    parallel.initialize()
    hlvlm, gpt = crafted["hlvlm"][0], crafted["gpt"][0]
    gpt_cfg, hlvlm_cfg = read_model_config(checkpoint_dir(gpt)), read_model_config(checkpoint_dir(hlvlm))
    tok = load_tokenizer(crafted["corpus"]["tokenizer"])
    paths = {
        "--load": lambda: load_checkpoint(gpt, [build_model(gpt_cfg)], gpt_cfg),
        "--vit-load": lambda: load_vision_encoder(build_model(hlvlm_cfg), hlvlm),
        "--reference-load": lambda: load_reference("gpt", str(gpt), tok),
        "eval": lambda: load_inference_model(hlvlm),
        "common.pt": lambda: load_inference_model(crafted["common.pt"][0]),
    }
    out = {}
    for name, load in paths.items():
        try:
            load()
            out[name] = None
        except Exception as err:  # noqa: BLE001 - the test asserts the type
            out[name] = (type(err).__name__, str(err))
    return out


def test_every_load_path_refuses_it_with_checkpoint_error(crafted):
    (results,) = run_on_ranks(_load_each, 1, crafted)
    for name in ("--load", "--vit-load", "--reference-load", "eval"):
        payload_file = crafted["gpt" if name in ("--load", "--reference-load") else "hlvlm"][1]
        kind, message = results[name]
        assert kind == "CheckpointError", (name, results[name])
        assert re.fullmatch(re.escape(str(payload_file)) + r" \(entry [\w.]+/shard[\d_]+\): " + re.escape(REFUSAL),
                            message), (name, message)
    assert results["common.pt"] == ("CheckpointError", f"{crafted['common.pt'][1]}: {REFUSAL}")
    assert not crafted["marker"].exists(), "the payload ran"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _assert_one_line_refusal(result: subprocess.CompletedProcess, prefix: str, payload_file: Path,
                             marker: Path) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if str(payload_file) in line]
    assert len(lines) == 1, result.stderr[-4000:]
    assert re.fullmatch(re.escape(prefix + str(payload_file)) + r" \(entry [\w.]+/shard[\d_]+\): " + re.escape(REFUSAL),
                        lines[0]), lines[0]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("path", ["--load", "--vit-load", "--reference-load", "eval"])
def test_each_command_reports_one_line_and_fails(crafted, tmp_path, path):
    corpus, (hlvlm, hlvlm_file), (gpt, gpt_file) = crafted["corpus"], crafted["hlvlm"], crafted["gpt"]
    out = str(tmp_path / "out")
    if path == "--load":
        result = _cli("-m", "megatron_prior.train", *_argv(corpus, "gpt", out, "--load", str(gpt), iters=4))
        prefix, payload_file = "python -m megatron_prior.train: error: ", gpt_file
    elif path == "--vit-load":
        result = _cli("-m", "megatron_prior.train", *_argv(corpus, "hlvlm", out, "--vit-load", str(hlvlm), iters=2))
        prefix, payload_file = "python -m megatron_prior.train: error: ", hlvlm_file
    elif path == "--reference-load":
        result = _cli("tools/preprocess_with_weights.py", "--input", os.path.join(corpus["dir"], "gen/train.jsonl"),
                      "--json-keys", "caption", "--tokenizer-model", corpus["tokenizer"], "--append-eod",
                      "--output-prefix", out, "--reference-type", "gpt", "--reference-load", str(gpt))
        prefix, payload_file = "error: ", gpt_file
    else:
        result = _cli("-m", "megatron_prior.eval.run", "--load", str(hlvlm), "--tokenizer-model", corpus["tokenizer"],
                      "--probe", os.path.join(corpus["dir"], "gen/probe.jsonl"), "--output", out + ".json")
        prefix, payload_file = "megatron_prior.eval.run: --load ", hlvlm_file
    _assert_one_line_refusal(result, prefix, payload_file, crafted["marker"])
    assert not os.path.exists(out + ".json") and not list(tmp_path.glob("out_caption_document*"))


def test_entries_outside_the_checkpoint_are_refused(crafted, tmp_path):
    dst = tmp_path / "outside"
    shutil.copytree(crafted["root"] / "gpt", dst)
    ckpt = checkpoint_dir(dst)
    metadata = read_metadata(ckpt)
    index, info = next(iter(metadata.storage_data.items()))
    info.relative_path = "../../secret.distcp"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError) as err:
        checkpoint_dir(dst)
    assert str(err.value) == (f"{ckpt / '.metadata'}: entry {index.fqn} points outside the checkpoint "
                              "('../../secret.distcp')")


class _ExtraState(torch.nn.Module):
    """Records what set_extra_state receives (Transformer Engine would pickle.loads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.received = "never called"

    def get_extra_state(self):
        return None

    def set_extra_state(self, state) -> None:
        self.received = state


@pytest.mark.parametrize("extra", [torch.frombuffer(bytearray(pickle.dumps(_Payload("/nonexistent/x"))),
                                                    dtype=torch.uint8),
                                   io.BytesIO(b"pickled")], ids=["te-tensor", "te-bytesio"])
def test_pickled_extra_state_never_reaches_a_module(extra, tmp_path, caplog):
    module = _ExtraState()
    load_weights(module, {"weight": torch.ones(2), "_extra_state": extra}, tmp_path)
    assert module.received is None and torch.equal(module.weight.data, torch.ones(2))
    assert f"{tmp_path}: not restoring the Transformer Engine FP8 state of 1 modules" in caplog.text
