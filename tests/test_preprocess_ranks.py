"""tools/preprocess_with_weights.py under several ranks writes, byte for byte, what one process writes;
a rank that fails stops every rank, and its parts are removed."""

import contextlib
import io
import json
import os

import pytest

from megatron_prior.preprocess import chunk_owner
from megatron_prior.testing import run_on_ranks
from megatron_prior.tokenizer import load_tokenizer
from tests.test_data_sources import run_tool, samples  # noqa: F401 - samples is a fixture
from tests.test_preprocess import _save_reference

pytestmark = pytest.mark.timeout(300)
FILES = (".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".images", ".logprobs.json")


def _tool_on_rank(argv: list[str]) -> int:
    from tools.preprocess_with_weights import main

    return main(argv)


@pytest.fixture(scope="module")
def reference(samples, tmp_path_factory):  # noqa: F811
    from megatron_prior import parallel

    ckpt = tmp_path_factory.mktemp("reference")
    parallel.initialize(seed=5)
    try:
        _save_reference(ckpt, load_tokenizer(samples["tok"]), window=6)
    finally:
        parallel.destroy()
    return str(ckpt)


def _same_output(one: str, two: str) -> None:
    for suffix in FILES:
        assert open(f"{one}_caption_document{suffix}", "rb").read() == \
            open(f"{two}_caption_document{suffix}", "rb").read(), suffix
    assert not os.path.exists(two + ".ranks")  # the ranks' own datasets are gone


def test_two_ranks_score_a_llava_file_like_one(samples, reference, tmp_path):  # noqa: F811
    """One input file: its chunks of 3 records go to the ranks in turn; a GPT reference scores
    each chunk on its rank; a bad record keeps its place in the log."""
    entries = json.loads(samples["llava"].read_text())
    entries.insert(4, {"id": "bad", "image": "missing.png", "conversations": [{"from": "gpt", "value": "a cube"}]})
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps(entries))
    args = ["--input", str(llava), "--image-root", str(samples["root"] / "images"), "--json-keys", "caption",
            "--tokenizer-model", samples["tok"], "--append-eod", "--image-size", "12", "--reference-type", "gpt",
            "--reference-load", reference, "--score-batch-tokens", "12", "--chunk-records", "3",
            "--skip-bad-records"]
    assert [chunk_owner(0, c, 1, 2) for c in range(3)] == [0, 1, 0]  # 9 records: rank 1 has the middle chunk
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_tool(*args, "--output-prefix", one)
    assert run_on_ranks(_tool_on_rank, 2, args + ["--output-prefix", two, "--workers", "2"]) == [0, 0]
    _same_output(one, two)
    assert open(one + "_bad_records.log").read() == open(two + "_bad_records.log").read()
    assert "record 4 (id 'bad')" in open(two + "_bad_records.log").read()


def test_two_ranks_take_whole_shards_with_unigram_counts_summed(samples, tmp_path):  # noqa: F811
    """Two shards, one per rank; the raw store's pixels travel through the merge too."""
    args = ["--input", samples["wds"], "--json-keys", "caption", "--tokenizer-model", samples["tok"],
            "--append-eod", "--image-size", "12", "--reference-type", "unigram", "--chunk-records", "2",
            "--image-store", "raw"]
    assert [chunk_owner(f, 0, 2, 2) for f in (0, 1)] == [0, 1]  # a shard each
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_tool(*args, "--output-prefix", one)
    assert run_on_ranks(_tool_on_rank, 2, args + ["--output-prefix", two]) == [0, 0]
    _same_output(one, two)


def test_a_rank_without_chunks(samples, tmp_path):  # noqa: F811
    """Fewer chunks than ranks (a small held-out set on many GPUs): the idle rank writes an
    empty dataset of its own, and the output is still the single process's."""
    args = ["--input", str(samples["llava"]), "--image-root", str(samples["root"] / "images"), "--json-keys",
            "caption", "--tokenizer-model", samples["tok"], "--append-eod", "--image-size", "12",
            "--reference-type", "unigram"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_tool(*args, "--output-prefix", one)
    assert run_on_ranks(_tool_on_rank, 2, args + ["--output-prefix", two]) == [0, 0]
    _same_output(one, two)


def _failing(argv: list[str], where: str, failing_rank: int) -> tuple[int, str]:
    """The tool on this rank, ``where`` raising on ``failing_rank``: (exit status, stderr)."""
    from megatron_prior import preprocess

    if int(os.environ["RANK"]) == failing_rank:
        if where == "process":
            def add_document(self, *args, **kwargs):
                raise OSError(28, "No space left on device")

            preprocess.WeightedDatasetWriter.add_document = add_document
        else:
            merge = preprocess._merge_ranks

            def _merge_ranks(*args, **kwargs):
                merge(*args, **kwargs)  # the whole output written to temporary files, not yet committed
                raise ValueError("damaged part")

            preprocess._merge_ranks = _merge_ranks
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = _tool_on_rank(argv)
    return status, err.getvalue()


@pytest.mark.parametrize("where,failing_rank,error", [
    ("process", 1, "OSError: [Errno 28] No space left on device"),
    ("merge", 0, "ValueError: damaged part"),
])
def test_a_failed_rank_stops_all_and_its_parts_are_removed(samples, tmp_path, where, failing_rank, error):  # noqa: F811
    """A rank's exception reaches every rank: all exit 1, rank 0 names the rank and the error,
    removes every rank's part ({prefix}.ranks/) and leaves the dataset already at the prefix as
    it was (here: one written before by a single process)."""
    args = ["--input", str(samples["llava"]), "--image-root", str(samples["root"] / "images"), "--json-keys",
            "caption", "--tokenizer-model", samples["tok"], "--append-eod", "--image-size", "12",
            "--reference-type", "unigram", "--chunk-records", "3"]
    prefix = str(tmp_path / "out")
    run_tool(*args, "--output-prefix", prefix)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    (status0, err0), (status1, err1) = run_on_ranks(_failing, 2, args + ["--output-prefix", prefix], where,
                                                    failing_rank)
    assert (status0, status1) == (1, 1)
    assert f"error: rank {failing_rank} of 2 failed: {error}\n" in err0
    assert f"removed the ranks' parts ({prefix}.ranks)" in err0
    assert f"rank {failing_rank}: Traceback" in (err0, err1)[failing_rank]
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
