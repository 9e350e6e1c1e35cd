"""``make fuzz``: make the seed corpus with the real writers, fuzz every target in turn.

    python -m fuzz.run [--seconds 600] [--targets index,records] [--out build/fuzz]

``--seconds`` (``FUZZ_SECONDS``) is the fuzzing time, split evenly over the targets (making
the seeds and starting each target's process come on top: 2-5 minutes on 2 busy cores).
Each target runs as its own process (``fuzz.driver``), one at a time; one that stops early
(a native crash, an input past ``--input-timeout``, memory past ``--rss-limit-mb``) is
started again for the rest of its time. The corpus each target grows is kept in ``OUT/corpus/TARGET`` and resumed by the next
run; a run's findings (each with the input that raised it) and logs are in
``OUT/runs/TIME/TARGET``. Prints executions, coverage and findings per target; exits 1 if
anything was found. Replay an input: ``python -m fuzz.driver TARGET --corpus-root DIR
--replay FILE`` (``--corpus-root`` keeps the seed corpus of a run: ``--corpus-root DIR`` here
makes it there once, then reuses it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from fuzz.common import SEP, TARGETS, load_target

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")
# libFuzzer's names for an input that stopped the process.
_ARTIFACTS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


@dataclass
class Outcome:
    target: str
    executions: int = 0
    coverage: int = 0
    features: int = 0
    runs: int = 0
    findings: list = field(default_factory=list)  # "signature: message (input)"


def _write_seeds(name: str, corpus, folder: str) -> int:
    os.makedirs(folder, exist_ok=True)
    seeds = load_target(name).seeds(corpus)
    for i, data in enumerate(seeds):
        with open(os.path.join(folder, f"seed-{i}"), "wb") as f:
            f.write(data)
    return len(seeds)


def _fuzz_target(name: str, seconds: float, corpus_root: str, out: str, run_dir: str, seeds: str, args) -> Outcome:
    outcome = Outcome(name)
    corpus_dir = os.path.join(out, "corpus", name)
    findings = os.path.join(run_dir, name)
    os.makedirs(corpus_dir, exist_ok=True)
    os.makedirs(findings)
    log_path = os.path.join(run_dir, f"{name}.log")
    dictionary = os.path.join(run_dir, "separator.dict")
    with open(dictionary, "w") as f:
        f.write('sep="' + "".join(f"\\x{b:02x}" for b in SEP) + '"\n')
    deadline = time.monotonic() + seconds
    with open(log_path, "w") as log:
        while (left := int(deadline - time.monotonic())) >= 5 and outcome.runs < args.max_restarts:
            workdir = tempfile.mkdtemp(prefix=f"fuzz-{name}-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                       else None)
            cmd = [sys.executable, "-m", "fuzz.driver", name, "--corpus-root", corpus_root, "--findings", findings,
                   "--workdir", workdir, f"-max_total_time={left}", f"-timeout={args.input_timeout}",
                   f"-rss_limit_mb={args.rss_limit_mb}", f"-artifact_prefix={findings}/", f"-dict={dictionary}",
                   "-print_final_stats=1", corpus_dir, seeds]
            outcome.runs += 1
            try:
                proc = subprocess.run(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", timeout=left + 60 + args.input_timeout)
                text = proc.stdout
            except subprocess.TimeoutExpired as err:  # libFuzzer's own limits did not stop it
                text = (err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or "")
                outcome.findings.append(f"process hung past its deadline (see {log_path})")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            log.write(text)
            executed = [int(m.group(1)) for line in text.splitlines() if (m := _EXECUTED.match(line))]
            status = [m for line in text.splitlines() if (m := _STATUS.match(line))]
            outcome.executions += executed[-1] if executed else (int(status[-1].group(1)) if status else 0)
            if status:
                outcome.coverage = max(outcome.coverage, int(status[-1].group(2)))
                outcome.features = max(outcome.features, int(status[-1].group(3)))
    findings_log = os.path.join(findings, "findings.jsonl")
    if os.path.exists(findings_log):
        with open(findings_log) as f:
            entries = {e["signature"]: e for e in map(json.loads, f)}  # each process of a restart records anew
        outcome.findings += [f"{e['signature']}: {e['message']} ({os.path.join(findings, e['input'])})"
                             for e in entries.values()]
    for artifact in sorted(glob.glob(os.path.join(findings, "*"))):
        if os.path.basename(artifact).startswith(_ARTIFACTS):
            outcome.findings.append(f"{os.path.basename(artifact).split('-')[0]}: process stopped ({artifact}; "
                                    f"log {log_path})")
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 600)),
                        help="fuzzing time of all targets together (default: $FUZZ_SECONDS or 600)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated (default: {','.join(TARGETS)})")
    parser.add_argument("--out", default=os.path.join(_REPO, "build", "fuzz"),
                        help="OUT/corpus/TARGET grows from run to run; OUT/runs/TIME/TARGET holds a run's findings "
                             "and log (default: build/fuzz)")
    parser.add_argument("--input-timeout", type=int, default=10, help="seconds one input may take (a hang past it)")
    parser.add_argument("--rss-limit-mb", type=int, default=4096)
    parser.add_argument("--max-restarts", type=int, default=5, help="process starts per target at most")
    parser.add_argument("--corpus-root", help="make the seed corpus's files here, or reuse those made here before "
                                              "(default: a temporary folder)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    for name in targets:
        load_target(name)  # an unknown name fails here, before the minute of seed making
    if args.seconds < 5 * len(targets):
        parser.error(f"--seconds {args.seconds:g} leaves under 5 s per target")
    from fuzz.seeds import Corpus

    run_dir = os.path.join(args.out, "runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir)
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        start = time.monotonic()
        root = args.corpus_root or tmp
        os.makedirs(root, exist_ok=True)
        made = os.path.exists(os.path.join(root, "corpus.json"))
        corpus = Corpus.load(root) if made else Corpus.create(root)
        counts = {name: _write_seeds(name, corpus, os.path.join(tmp, "seeds", name)) for name in targets}
        print(f"seed corpus {'reused from ' + root if made else 'made by the real writers'} in "
              f"{time.monotonic() - start:.0f} s: "
              + ", ".join(f"{n} {name}" for name, n in counts.items()), flush=True)
        outcomes = []
        for i, name in enumerate(targets):
            seconds = args.seconds / len(targets)
            print(f"fuzzing {name} for {seconds:.0f} s ...", flush=True)
            outcomes.append(_fuzz_target(name, seconds, root, args.out, run_dir, os.path.join(tmp, "seeds", name),
                                         args))
            o = outcomes[-1]
            print(f"  {o.executions} executions, cov {o.coverage}, ft {o.features}, {len(o.findings)} findings",
                  flush=True)
    print(f"\n{'target':<12}{'executions':>12}{'cov':>8}{'ft':>8}{'findings':>10}")
    for o in outcomes:
        print(f"{o.target:<12}{o.executions:>12}{o.coverage:>8}{o.features:>8}{len(o.findings):>10}")
    found = [(o.target, f) for o in outcomes for f in o.findings]
    for target, finding in found:
        print(f"{target}: {finding}")
    print(f"findings and logs of this run under {run_dir}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
