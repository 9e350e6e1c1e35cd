"""Run one fuzz target under atheris (libFuzzer), or replay inputs without it.

    python -m fuzz.driver TARGET --corpus-root DIR --findings DIR [libFuzzer flags] [corpus dirs]
    python -m fuzz.driver TARGET --corpus-root DIR --replay FILE...

``--corpus-root`` is a folder ``fuzz.seeds.Corpus.create`` made. An input that ends in the
target's own error type (``ERRORS``) or succeeds is fine; any other exception is a finding:
recorded once per signature (type and innermost frame of this repository) in
``FINDINGS/findings.jsonl`` with the input beside it, and fuzzing goes on. A native crash,
an input running past libFuzzer's ``-timeout`` or past ``-rss_limit_mb`` stops the process,
and libFuzzer writes that input under its ``-artifact_prefix``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import traceback
from typing import Callable

from fuzz.common import INSTRUMENT, load_target

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signature(err: BaseException) -> str:
    """``Type at file:line`` of the innermost frame in this repository (where a fix goes)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_REPO + os.sep)  # ("<frozen codecs>" is no path)
            and "site-packages" not in f.filename]  # a virtual environment inside the repository
    frame = (ours or frames)[-1]
    where = os.path.relpath(frame.filename, _REPO) if ours else frame.filename
    return f"{type(err).__name__} at {where}:{frame.lineno}"


class Findings:
    """Distinct wrong exceptions of one target, each with the first input that raised it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.seen: set[str] = set()

    def add(self, err: Exception, data: bytes) -> None:
        sig = signature(err)
        if sig in self.seen:
            return
        self.seen.add(sig)
        name = "finding-" + hashlib.sha1(sig.encode()).hexdigest()[:12]
        with open(os.path.join(self.folder, name), "wb") as f:
            f.write(data)
        entry = {"signature": sig, "message": str(err)[:300], "input": name}
        with open(os.path.join(self.folder, "findings.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"\n== NEW FINDING: {sig}: {entry['message']}\n"
              + "".join(traceback.format_exception(err)[-6:]), file=sys.stderr, flush=True)


def guarded(fn: Callable[[bytes], None], errors: tuple, findings: Findings) -> Callable[[bytes], None]:
    def one_input(data: bytes) -> None:
        try:
            fn(data)
        except errors:
            pass
        except Exception as err:  # noqa: BLE001 - anything else is what the fuzzer looks for
            findings.add(err, data)
    return one_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--corpus-root", required=True, help="folder made by fuzz.seeds.Corpus.create")
    parser.add_argument("--findings", help="folder for findings.jsonl and the inputs that raised")
    parser.add_argument("--workdir", help="scratch folder for the files of each input (default: a new one)")
    parser.add_argument("--replay", nargs="+", help="run these inputs once each, without atheris")
    args, libfuzzer_args = parser.parse_known_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"fuzz-{args.target}-")
    os.makedirs(workdir, exist_ok=True)

    if args.replay:
        from fuzz.seeds import Corpus

        target = load_target(args.target)
        one = target.prepare(Corpus.load(args.corpus_root), workdir)
        for path in args.replay:
            with open(path, "rb") as f:
                data = f.read()
            try:
                one(data)
                print(f"{path}: accepted")
            except target.ERRORS as err:
                print(f"{path}: refused: {err}")
        return

    import atheris

    # Heavy dependencies first, uninstrumented; then the target, whose imports of this package
    # (and of what the target names in INSTRUMENT) are instrumented for coverage.
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["megatron_prior", *INSTRUMENT.get(args.target, ())]):
        target = load_target(args.target)
        from fuzz.seeds import Corpus

    findings = Findings(args.findings or os.path.join(workdir, "findings"))
    one = target.prepare(Corpus.load(args.corpus_root), workdir)
    atheris.Setup([sys.argv[0], *libfuzzer_args], guarded(one, target.ERRORS, findings))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
