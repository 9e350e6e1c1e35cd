"""Inputs the fuzz harness (``fuzz/``, ``make fuzz``) found, each refused now with its module's
error, and a check that every fuzz target still accepts its seed corpus (so the harness
cannot rot while nobody runs it). Runs without atheris."""

import io
import json
import struct
import tracemalloc
from pathlib import Path

import pytest

from fuzz.common import ABSENT, SEP, TARGETS, load_target, pack, unpack
from fuzz.driver import Findings, guarded, signature
from megatron_prior.checkpoint import TRACKER, CheckpointError, read_metadata, read_model_config, resolve_iteration
from megatron_prior.data.images import load_image
from megatron_prior.training.checkpointing import TRAIN_STATE, read_train_state

DATA = Path(__file__).parent / "data" / "fuzz"


# --- found by the fuzzer -------------------------------------------------------------------

def test_png_with_a_broken_chunk_is_a_value_error():
    """records target: PIL raised SyntaxError from convert(), past load_image's handlers (and
    past preprocessing's, which turn OSError/ValueError into a bad record)."""
    with pytest.raises(ValueError) as err:
        load_image(str(DATA / "broken_png_chunk.png"), 8, 8)
    assert str(err.value) == "damaged image file (SyntaxError: broken PNG file (chunk b'\\x7f%\\xecz'))"


def test_tracker_that_is_not_utf8(tmp_path):
    """checkpoint target: UnicodeDecodeError from reading the tracker as text."""
    (tmp_path / TRACKER).write_bytes(b"2\n\x00--fuzz-\x8a\xcd\x9e\x8dt--\x00\n\x00\x00\x06i")
    with pytest.raises(CheckpointError) as err:
        resolve_iteration(tmp_path)
    assert str(err.value) == (f"{tmp_path / TRACKER}: expected an iteration number, found "
                              "b'2\\n\\x00--fuzz-\\x8a\\xcd\\x9e\\x8dt--\\x00\\n\\x00\\x00\\x06i'")


@pytest.mark.parametrize("text", ["²".encode(), b"1" * 5000])
def test_tracker_digits_int_refuses(tmp_path, text):
    """str.isdigit admitted both; int() then raised ValueError (not a digit / digit limit)."""
    (tmp_path / TRACKER).write_bytes(text)
    with pytest.raises(CheckpointError) as err:
        resolve_iteration(tmp_path)
    assert str(err.value) == f"{tmp_path / TRACKER}: expected an iteration number, found {text[:40]!r}"


def _checkpoint(tmp_path: Path, metadata: bytes) -> Path:
    """The storage files of the seed checkpoint the fuzzer mutated (only their sizes matter)."""
    for name, size in (("__0_0.distcp", 46767), ("__0_1.distcp", 42100)):
        (tmp_path / name).write_bytes(bytes(size))
    (tmp_path / ".metadata").write_bytes(metadata)
    return tmp_path


def test_metadata_entry_without_an_offset(tmp_path):
    """checkpoint target: unpickling builds the admitted dataclasses without __init__, so a
    _StorageInfo may lack fields; reading them raised AttributeError."""
    ckpt = _checkpoint(tmp_path, (DATA / "metadata_entry_without_offset.pickle").read_bytes())
    with pytest.raises(CheckpointError) as err:
        read_metadata(ckpt)
    assert str(err.value) == (f"{ckpt / '.metadata'}: entry embedding.word_embeddings.weight has offset None, "
                              "length 5673")


def test_metadata_memo_index_allocates_nothing(tmp_path):
    """checkpoint target (out-of-memory past 4 GB): one LONG_BINPUT opcode made the C unpickler
    allocate a memo array of 16 bytes per index up to the one it names, here 1.6 GB."""
    ckpt = _checkpoint(tmp_path, b"\x80\x04N" + b"r" + struct.pack("<I", 10**8) + b".")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as err:
            read_metadata(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == f"{ckpt / '.metadata'}: not torch.distributed.checkpoint metadata"
    assert peak < 1 << 20, peak


# --- the same contract, by reading the code the fuzzer reaches -----------------------------

def test_model_config_number_past_the_digit_limit(tmp_path):
    """json.loads' ValueError for a 5000-digit number was not among read_json's handlers."""
    (tmp_path / "model_config.json").write_text('{"num_layers": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError) as err:
        read_model_config(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'model_config.json'}: invalid JSON (Exceeds the limit (4300 digits) "
                              "for integer string conversion: value has 5000 digits)")


@pytest.mark.parametrize("state, problem", [
    ({"consumed_samples": 24}, "'iteration' None is not the iteration of iter_0000003"),
    ({"iteration": "3"}, "'iteration' '3' is not the iteration of iter_0000003"),
    ({"iteration": 4}, "'iteration' 4 is not the iteration of iter_0000003"),
    ({"iteration": 3, "consumed_samples": -1}, "'consumed_samples' -1 is not a natural number"),
    ({"iteration": 3, "consumed_samples": 2.5}, "'consumed_samples' 2.5 is not a natural number"),
    ({"iteration": 3, "scheduler": []}, "'scheduler' is a list, not an object or null"),
    ({"iteration": 3, "loss_tokens": -5}, "'loss_tokens' -5 is not a natural number or null"),
    ({"iteration": 3, "padding_positions": "12"}, "'padding_positions' '12' is not a natural number or null"),
])
def test_train_state_fields_a_resume_reads(tmp_path, state, problem):
    """train_state.json was returned unchecked; the resume then failed on int(state[...]) or
    in the scheduler with a traceback naming no file."""
    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    (ckpt / TRAIN_STATE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as err:
        read_train_state(ckpt)
    assert str(err.value) == f"{ckpt / TRAIN_STATE}: {problem}"


# --- the harness itself --------------------------------------------------------------------

def test_input_layout_round_trip():
    parts = [b"a" * 3, None, b"", b"tail"]
    assert unpack(pack(5, parts), 4) == (5, parts)
    assert unpack(b"", 2) == (0, [None, None])
    assert unpack(b"\x01x", 3) == (1, [b"x", None, None])
    assert unpack(b"\x00" + SEP.join([b"a", b"b", b"c"]), 2) == (0, [b"a", b"b" + SEP + b"c"])
    assert ABSENT not in SEP


def test_driver_records_only_other_exceptions(tmp_path):
    def one(data: bytes) -> None:
        if data == b"bad":
            raise CheckpointError("refused")
        if data == b"bug":
            io.BytesIO(b"\x80").read().decode()

    findings = Findings(str(tmp_path))
    run = guarded(one, (CheckpointError,), findings)
    for data in (b"ok", b"bad", b"bug", b"bug"):
        run(data)
    entries = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    assert [e["signature"] for e in entries] == [f"UnicodeDecodeError at tests/test_fuzz_regressions.py:"
                                                f"{one.__code__.co_firstlineno + 4}"]
    assert (tmp_path / entries[0]["input"]).read_bytes() == b"bug"


def test_signature_skips_frames_that_are_no_path():
    try:
        b"\x80".decode()
    except UnicodeDecodeError as err:
        assert signature(err).startswith("UnicodeDecodeError at tests/test_fuzz_regressions.py:")


@pytest.fixture(scope="module")
def fuzz_corpus(tiny_corpus, tmp_path_factory):
    from fuzz.seeds import Corpus

    return Corpus.create(str(tmp_path_factory.mktemp("fuzz_corpus")), tiny_corpus)


@pytest.mark.slow  # saves a checkpoint on a spawned rank
@pytest.mark.parametrize("name", TARGETS)
def test_every_target_accepts_its_seeds(fuzz_corpus, tmp_path, name):
    """A seed from the real writers must pass every check of its target (else the fuzzer
    starts from inputs that stop at the first check)."""
    target = load_target(name)
    seeds = target.seeds(fuzz_corpus)
    one = target.prepare(fuzz_corpus, str(tmp_path))
    assert seeds
    for data in seeds:
        one(data)
