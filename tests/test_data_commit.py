"""A dataset is committed as one set: a write stopped between its renames never opens as a mix of
two datasets, and the temporary files of a killed writer are removed by the next write."""

import logging
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from megatron_prior.data import FormatError, WeightedIndexedDataset
from megatron_prior.data.formats import all_files
from megatron_prior.data.writer import WeightedDatasetWriter

FP = "sha256:tok"
H, W = 4, 3


def _content(seed, n, lengths_seed=0):
    """Documents of ``n`` lengths drawn from ``lengths_seed`` (so two seeds can share every
    size and index byte) with tokens, log-probs, kinds and images drawn from ``seed``."""
    lengths = np.random.default_rng(lengths_seed).integers(1, 12, n)
    rng = np.random.default_rng(seed + 100)
    return [(rng.integers(0, 500, k), -rng.exponential(1.0, k).astype(np.float32),
             rng.integers(0, 4, k).astype(np.uint8), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            for k in lengths]


def _write(prefix, docs, images=True):
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=True, image_size=(H, W) if images else None) as w:
        for tokens, lp, kinds, image in docs:
            w.add_document(tokens, lp, kinds, image if images else None)
        w.finalize(FP, {"type": "unigram"})


def _read(prefix):
    """Everything a caption dataset would read, as plain lists."""
    ds = WeightedIndexedDataset(str(prefix))
    images = ds.open_images() if ds.has_images else None
    return [(ds[i][0].tolist(), ds[i][1].tolist(), ds.kinds[i].tolist(), images[i].tolist() if images else None)
            for i in range(len(ds))]


def _as_read(docs, images=True):
    return [(t.tolist(), lp.tolist(), k.tolist(), im.tolist() if images else None) for t, lp, k, im in docs]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("b_docs,b_images,refusal,opens_as_b", [
    # Same sizes everywhere: only the content hashes tell A from B. The metadata is renamed
    # first, so from then on A's token file is refused by B's hashes until B's is in place;
    # the last rename left is that of the token index, byte-identical in A and B.
    (_content(1, 9), True, r"/T\.bin: content differs from what .*/T\.logprobs\.json binds", [7]),
    (_content(1, 14, 7), True, "", []),  # other sizes: refused by whichever check sees it first
    (_content(1, 9), False, "", [6]),  # B has no images: A's are removed as leftovers
], ids=["same-shape", "other-shape", "no-images"])
def test_a_write_stopped_between_renames_never_opens_as_a_mix(tmp_path, monkeypatch, b_docs, b_images, refusal,
                                                              opens_as_b):
    a_docs = _content(0, 9)
    real_replace = os.replace
    renames = 8 if b_images else 7  # the metadata, tokens/logprobs/kinds .bin and .idx (, images)
    opened = []
    for done in range(renames):
        prefix = tmp_path / f"k{done}" / "T"
        _write(prefix, a_docs)
        finals = set(all_files(str(prefix)))
        count = [0]

        def replace(src, dst, finals=finals, count=count, done=done):
            if str(dst) in finals:
                if count[0] == done:
                    raise _Crash(f"stopped after {done} renames")
                count[0] += 1
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(_Crash):
            _write(prefix, b_docs, images=b_images)
        monkeypatch.setattr(os, "replace", real_replace)
        assert not [f for f in os.listdir(prefix.parent) if ".tmp-" in f]  # the writer cleaned up
        if done == 0:
            assert _read(prefix) == _as_read(a_docs)
            continue
        try:
            got = _read(prefix)
        except FormatError as err:
            assert re.search(refusal, str(err)), err
            continue
        # What opens is one whole dataset, never A's captions with B's images.
        assert got == _as_read(b_docs, b_images), f"a mix after {done} renames"
        opened.append(done)
    assert opened == opens_as_b
    _write(tmp_path / "k3" / "T", b_docs, images=b_images)  # a rerun repairs the set
    assert _read(tmp_path / "k3" / "T") == _as_read(b_docs, b_images)


_KILLED_WRITER = r"""
import os, sys
import numpy as np
from megatron_prior.data.writer import WeightedDatasetWriter

w = WeightedDatasetWriter(sys.argv[1], np.uint16, with_kinds=True, image_size=(4, 3))
w.add_document(np.arange(5), np.full(5, -1.0, np.float32), np.zeros(5, np.uint8), np.zeros((4, 3, 3), np.uint8))
w.builder.data_file.flush()
os._exit(9)  # as SIGKILL or an OOM kill would: no cleanup runs
"""


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path, caplog):
    prefix = str(tmp_path / "T")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, prefix], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    left = sorted(os.listdir(tmp_path))
    host = socket.gethostname()
    assert left and all(f".tmp-{host}-" in f for f in left), left
    # Another host's temporary file (its writer may be alive on a shared file system) and a live
    # local process's are left alone.
    keep = ["T.bin.tmp-otherhost-1", f"T.bin.tmp-{host}-{os.getppid()}"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="megatron_prior.files"):
        _write(prefix, _content(0, 3))
    removed = sorted(r.getMessage() for r in caplog.records)
    assert removed == sorted(f"removed {tmp_path / f}, left by an interrupted writer (process "
                             f"{f.rsplit('-', 1)[1].split('.')[0]} is gone)" for f in left)
    assert sorted(f for f in os.listdir(tmp_path) if ".tmp-" in f) == sorted(keep)
    assert len(_read(prefix)) == 3


def test_a_writer_that_fails_removes_its_temporary_files(tmp_path):
    with pytest.raises(ValueError, match="an image must be given for every document"):
        with WeightedDatasetWriter(str(tmp_path / "T"), np.uint16, image_size=(H, W)) as w:
            w.add_document(np.arange(3), np.full(3, -1.0, np.float32))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="2 images for 1 documents"):
        w = WeightedDatasetWriter(str(tmp_path / "T"), np.uint16, image_size=(H, W))
        w.add_document(np.arange(3), np.full(3, -1.0, np.float32), image=np.zeros((H, W, 3), np.uint8))
        w.images.add(np.zeros((H, W, 3), np.uint8))
        w.finalize(FP, {"type": "unigram"})  # not in a with block: finalize cleans up by itself
    assert os.listdir(tmp_path) == []
