"""The GPU image installs the package with --no-deps, so its pip line must name every requirement
that NGC's PyTorch image does not already carry."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# In nvcr.io/nvidia/pytorch (the Dockerfile's base) already; reinstalling torch would replace its CUDA build.
IN_BASE_IMAGE = {"torch", "numpy", "matplotlib", "pillow", "tensorboard"}


def _requirement_names(source: str) -> set:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {re.match(r"[A-Za-z0-9_.-]+", ast.literal_eval(e)).group().lower()
                    for e in node.value.elts}
    raise AssertionError("setup.py has no install_requires")


def test_the_image_installs_every_requirement_and_copies_what_gpu_check_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pip_lines = " ".join(re.findall(r"pip install[^\n]*", dockerfile.replace("\\\n", " "))).lower()
    missing = sorted(name for name in _requirement_names((ROOT / "setup.py").read_text()) - IN_BASE_IMAGE
                     if not re.search(rf'(^|[\s"]){re.escape(name)}([\s"=<>]|$)', pip_lines))
    assert not missing, f"Dockerfile installs with --no-deps but does not install {missing}"
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M))
    # examples/gpu_check.sh runs these inside the image.
    assert {"megatron_prior", "csrc", "tools", "examples", "tests", "benchmarks"} <= copied, copied
