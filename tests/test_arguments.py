"""The trainer refuses bad flags before any work, with one line that names the flag: numeric
flags outside their domain (one table, megatron_prior.training.arguments.DOMAINS), a --split
megatron-core cannot read, an LVLM on text-only data, a file that is not a tokenizer."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_prior.data import WeightedDatasetWriter
from megatron_prior.tokenizer import load_tokenizer
from megatron_prior.training.arguments import build_parser, parse_args

PROG = "python -m megatron_prior.train"


@pytest.fixture
def base_argv(tiny_corpus) -> list:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", tiny_corpus["data"], "--tokenizer-model", tiny_corpus["tokenizer"]]


@pytest.fixture
def text_only(tiny_corpus, tmp_path) -> str:
    """The corpus's tokens without its image store (what a reference LM trains on)."""
    prefix = str(tmp_path / "text")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_corpus["data"] + ext, prefix + ext)
    return prefix


@pytest.fixture
def not_a_tokenizer(tmp_path) -> str:
    path = tmp_path / "captions.model"
    path.write_text('{"caption": "a red square"}\n')
    return str(path)


def _refused(argv: list, capsys) -> str:
    """The one line the trainer prints before exiting with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, world_size=1)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: error: "), err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--seq-length", "0"], "--seq-length must be >= 1, got 0"),  # was SIGFPE in megatron-core's helper
    (["--seq-length", "-8"], "--seq-length must be >= 1, got -8"),
    (["--hidden-size", "-32"], "--hidden-size must be >= 1, got -32"),
    (["--num-attention-heads", "0"], "--num-attention-heads must be >= 1, got 0"),  # was ZeroDivisionError
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),  # was ZeroDivisionError
    (["--prior-alpha", "nan"], "--prior-alpha must be finite and >= 0, got nan"),  # was plain NTP, silently
    (["--prior-alpha", "inf"], "--prior-alpha must be finite and >= 0, got inf"),
    (["--prior-alpha", "-1"], "--prior-alpha must be finite and >= 0, got -1.0"),
    (["--exit-interval", "-1"], "--exit-interval must be >= 1, got -1"),  # was: stop after 1 iteration, exit 0
    (["--exit-interval", "0"], "--exit-interval must be >= 1, got 0"),  # was: ignored
    (["--num-layers", "0"], "--num-layers must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be finite and >= 0, got nan"),
    (["--lr", "-1"], "--lr must be finite and >= 0, got -1.0"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is larger than --lr 0.01"),
    (["--lr-warmup-iters", "2"], "--lr-warmup-iters 2 must be smaller than --lr-decay-iters 2 (default: --train-iters)"),
    (["--split", "0,0,0"], "--split '0,0,0' leaves no training data (its first share is 0)"),
    (["--split", "a,b"], "--split 'a,b': give up to three non-negative numbers train,valid,test"),
    (["--split", "1e-3,1"], "--split '1e-3,1': give up to three non-negative numbers"),
    (["--split", "90,0,10"], "--split '90,0,10' leaves no validation data for --eval-iters 10"),
    (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
    (["--hidden-dropout", "1"], "--hidden-dropout must be finite and in [0, 1), got 1.0"),
    (["--attention-dropout", "-0.1"], "--attention-dropout must be finite and in [0, 1), got -0.1"),
    (["--adam-beta2", "1"], "--adam-beta2 must be finite and in [0, 1), got 1.0"),
    (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--clip-grad", "-1"], "--clip-grad must be finite and >= 0, got -1.0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--init-method-std", "0"], "--init-method-std must be finite and > 0, got 0.0"),
    (["--exit-duration-in-mins", "0", "--save", "@TMP"], "--exit-duration-in-mins must be finite and > 0, got 0.0"),
    (["--exit-duration-in-mins", "10"], "--exit-duration-in-mins needs --save (the checkpoint to resume from)"),
    (["--exit-signal-handler"], "--exit-signal-handler needs --save (the checkpoint to resume from)"),
    (["--model", "ulvlm", "--data-path", "@TEXT"],
     "--model ulvlm trains on captions with images, but --data-path @TEXT has no image store (@TEXT.images missing)"),
    (["--model", "hlvlm", "--data-path", "@TEXT"], "--model hlvlm trains on captions with images, but --data-path @TEXT"),
    (["--tokenizer-model", "@NOTSP"],
     "--tokenizer-model @NOTSP: not a tokenizer this trainer can use (a SentencePiece .model from "
     "tools/train_tokenizer.py or a HuggingFace tokenizer.json): INTERNAL: could not parse ModelProto from @NOTSP"),
])
def test_bad_flag_is_refused_in_one_line_naming_it(base_argv, text_only, not_a_tokenizer, tmp_path, capsys,
                                                   flags, message):
    places = {"@TEXT": text_only, "@NOTSP": not_a_tokenizer, "@TMP": str(tmp_path)}
    for mark, value in places.items():
        flags = [f.replace(mark, value) for f in flags]
        message = message.replace(mark, value)
    assert message in _refused([*base_argv, *flags], capsys)


def test_every_numeric_flag_has_a_domain():
    from megatron_prior.training.arguments import DOMAINS

    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert numeric == set(DOMAINS), (numeric ^ set(DOMAINS))


def test_the_defaults_are_inside_their_domains(base_argv):
    args = parse_args(base_argv, world_size=1)
    assert args.split == "969,30,1" and args.seq_length == 128


def test_the_command_line_refuses_seq_length_0_without_a_traceback(base_argv):
    """Through ``python -m``: today's main crashed here with SIGFPE (exit -8) in megatron-core."""
    proc = subprocess.run([sys.executable, "-m", "megatron_prior.train", *base_argv, "--seq-length", "0"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr == f"{PROG}: error: --seq-length must be >= 1, got 0 (--help lists the flags)\n"
    assert proc.stdout == ""


def test_megatrons_defaults(base_argv):
    args = parse_args(base_argv, world_size=1)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.999, 1e-8)
    assert (args.hidden_dropout, args.attention_dropout) == (0.1, 0.1)
    assert args.mask_eod is False  # EOD trained on unless --eod-mask-loss
    assert parse_args([*base_argv, "--eod-mask-loss"], world_size=1).mask_eod is True
    assert args.transformer_impl == "local" and args.attention_backend == "auto"  # no TE on this machine
    assert (args.use_distributed_optimizer, args.sequence_parallel, args.context_parallel_size) == (False, False, 1)


def test_lr_has_no_default(base_argv, capsys):
    argv = [a for i, a in enumerate(base_argv) if "--lr" not in (a, base_argv[i - 1])]
    assert "--lr is required (Megatron has no default learning rate)" in _refused(argv, capsys)


def test_train_samples_give_whole_iterations(base_argv, capsys):
    argv = [a for i, a in enumerate(base_argv) if "--train-iters" not in (a, base_argv[i - 1])]
    args = parse_args([*argv, "--train-samples", "21", "--micro-batch-size", "4"], world_size=1)
    assert (args.train_iters, args.lr_decay_iters) == (5, 5)
    assert "give one of --train-iters and --train-samples" in _refused([*base_argv, "--train-samples", "8"], capsys)
    assert "give one of --train-iters and --train-samples" in _refused(argv, capsys)
    assert ("--train-samples 3 is less than one iteration of --global-batch-size 4"
            in _refused([*argv, "--train-samples", "3", "--micro-batch-size", "4"], capsys))


def test_bare_prefixes_are_an_equal_blend(base_argv, tiny_corpus, capsys):
    prefix = tiny_corpus["data"]
    args = parse_args([*base_argv, "--data-path", prefix, prefix], world_size=1)
    assert args.data_path == [prefix, prefix]
    assert ("--data-path: a weighted blend needs weight/prefix pairs, got 3 items"
            in _refused([*base_argv, "--data-path", "0.5", prefix, "0.5"], capsys))


def test_tokenizer_type_must_match_the_file(base_argv, tiny_corpus, capsys):
    assert parse_args([*base_argv, "--tokenizer-type", "SentencePieceTokenizer"], world_size=1)
    assert (f"--tokenizer-type HuggingFaceTokenizer: --tokenizer-model {tiny_corpus['tokenizer']} is a "
            "SentencePieceTokenizer file" in _refused([*base_argv, "--tokenizer-type", "HuggingFaceTokenizer"], capsys))


def test_transformer_engine_is_the_default_where_it_imports(base_argv, monkeypatch):
    from megatron_prior.training import arguments

    monkeypatch.setattr(arguments, "have_transformer_engine", lambda: True)
    assert parse_args(base_argv, world_size=1).transformer_impl == "transformer_engine"
    assert parse_args([*base_argv, "--transformer-impl", "local"], world_size=1).transformer_impl == "local"


def test_image_size_and_aspect_default_to_the_stores_and_raw_pixels_refuse_others(base_argv, tiny_corpus,
                                                                                  tmp_path, capsys):
    """--image-size/--image-aspect: unset, the stores' (the model and the batches take them); an
    encoded store takes any; a raw store only its own (named with the flag); text models none."""
    ulvlm = [*base_argv, "--model", "ulvlm", "--patch-size", "4"]
    args = parse_args(ulvlm, world_size=1)
    assert (args.image_size, args.image_aspect) == (16, "pad")  # the tiny corpus's encoded store
    args = parse_args([*ulvlm, "--image-size", "24", "--image-aspect", "crop"], world_size=1)
    assert (args.image_size, args.image_aspect) == (24, "crop")
    assert "image size 18 (--image-size) is not divisible by --patch-size 4" in _refused(
        [*ulvlm, "--image-size", "18"], capsys)
    assert "--image-aspect applies to the vision-language models (--model hlvlm or ulvlm), not to --model gpt" in \
        _refused([*base_argv, "--image-aspect", "crop"], capsys)
    raw = str(tmp_path / "raw")
    tok = load_tokenizer(tiny_corpus["tokenizer"])
    with WeightedDatasetWriter(raw, np.uint16, image_size=(16, 16), image_store="raw", image_aspect="pad") as writer:
        writer.add_document(np.array([5, tok.eod]), np.full(2, -1.0, np.float32), image=np.zeros((16, 16, 3), np.uint8))
        writer.finalize(tok.fingerprint, {"type": "unigram"})
    on_raw = [*ulvlm, "--data-path", raw]
    assert parse_args([*on_raw, "--image-size", "16", "--image-aspect", "pad"], world_size=1).image_size == 16
    fixed = (f"{raw}.images is a raw image store: its pixels were fitted to 16x16 (pad) when it was preprocessed, so "
             "it cannot be read at")
    assert f"error: --image-size 24: {fixed} 24x24 (pad); preprocess it again with --image-store encoded" in \
        _refused([*on_raw, "--image-size", "24"], capsys)
    assert f"error: --image-size 20, --image-aspect crop: {fixed} 20x20 (crop)" in _refused(
        [*on_raw, "--image-size", "20", "--image-aspect", "crop"], capsys)
    assert "--data-path: the blended image stores hold images of different sizes [(12, 12), (16, 16)]: give " \
           "--image-size N" in _refused([*ulvlm, "--data-path", tiny_corpus["data"], _store(tmp_path, tok, 12)], capsys)


def _store(tmp_path, tok, side: int) -> str:
    """A one-caption dataset with an encoded store of ``side``-pixel images."""
    prefix, png = str(tmp_path / f"encoded{side}"), io.BytesIO()
    Image.new("RGB", (side, side)).save(png, "PNG")
    with WeightedDatasetWriter(prefix, np.uint16, image_size=(side, side), image_store="encoded") as writer:
        writer.add_document(np.array([5, tok.eod]), np.full(2, -1.0, np.float32), image=png.getvalue())
        writer.finalize(tok.fingerprint, {"type": "unigram"})
    return prefix


@pytest.mark.parametrize("flags,world,message", [
    (["--transformer-impl", "transformer_engine"], 1,
     "--transformer-impl transformer_engine: Transformer Engine does not import here"),
    (["--attention-backend", "flash"], 1,
     "--attention-backend flash is a Transformer Engine kernel: it needs --transformer-impl transformer_engine"),
    (["--fp8-format", "hybrid", "--bf16"], 1, "--fp8-format hybrid needs --transformer-impl transformer_engine, and "
     "Transformer Engine does not import here"),
    (["--overlap-param-gather", "--overlap-grad-reduce"], 2, "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], 2, "--overlap-param-gather needs --overlap-grad-reduce"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2,
     "--sequence-parallel needs --transformer-impl transformer_engine: megatron-core's local layers use torch's "
     "LayerNorm, which does not support sequence parallelism"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--model", "ulvlm"], 2,
     "--sequence-parallel is supported for --model gpt only (--model ulvlm does not split its image + text sequence)"),
    (["--context-parallel-size", "2"], 2, "--context-parallel-size > 1 is not supported yet"),
    (["--context-parallel-size", "2"], 3, "world size 3 is not divisible by --tensor-model-parallel-size 1 x "
     "--pipeline-model-parallel-size 1 x --context-parallel-size 2"),
    (["--recompute-granularity", "full"], 1,
     "--recompute-granularity full needs --recompute-method (uniform or block) and --recompute-num-layers"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"], 1,
     "--recompute-num-layers 3 is more than the 2 layers of a pipeline stage"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"], 1,
     "--recompute-method needs --recompute-granularity full (got selective)"),
    (["--recompute-num-layers", "1"], 1, "--recompute-num-layers needs --recompute-granularity full "
     "(got no recomputation)"),
])
def test_scale_flags_are_refused_as_megatron_does(base_argv, capsys, flags, world, message):
    with pytest.raises(SystemExit):
        parse_args([*base_argv, *flags], world_size=world)
    assert message in capsys.readouterr().err


def test_help_explains_every_flag():
    """``python -m megatron_prior.train --help`` says what each flag does, not only its name."""
    from megatron_prior.training.arguments import build_parser

    parser = build_parser()
    silent = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert silent == []
    assert len(parser._actions) > 60  # the parser's flags, not an empty one
