"""The trainer refuses bad flags before any work, with one line that names the flag: numeric
flags outside their domain (one table, megatron_prior.training.arguments.DOMAINS), a --split
megatron-core cannot read, an LVLM on text-only data, a file that is not a tokenizer."""

import os
import shutil
import subprocess
import sys

import pytest

from megatron_prior.training.arguments import build_parser, parse_args

PROG = "python -m megatron_prior.train"


@pytest.fixture
def base_argv(tiny_corpus) -> list:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "2",
            "--data-path", tiny_corpus["data"], "--tokenizer-model", tiny_corpus["tokenizer"]]


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
