"""Stand-in for the demo's evaluation: reads the run's summary, writes eval.json."""

import json
import sys
from pathlib import Path

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = json.loads((run_dir / "summary.json").read_text())
acc = 1.0 - 0.1 * summary["eval_ce"]
out.write_text(json.dumps({"probe_accuracy": acc, "heldout_ce_grounded": summary["eval_ce_grounded"]}))
