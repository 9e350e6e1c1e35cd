"""The package's layers, as its imports say: every ``import`` of every module (those inside
functions too) is read with ``ast`` and checked against the rules, so the layering stays true.

Bottom to top: ``files``, ``loss`` (the kernel layer: imports nothing else of the package),
``tokenizer``, ``compat``, ``parallel``; ``data`` (formats, datasets, packing); ``models.config``
and ``models.arch``; ``checkpoint`` (files + model config); ``models``; ``scoring``;
``preprocess``; ``training``; ``results``; ``eval``; ``sweeps`` and ``demo``; ``train`` and
``train_contrastive`` (the commands).
No module imports one above it, no two modules import each other (directly or round a longer
cycle), and imports sit at the top of modules unless an optional dependency is the reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_prior"
P = "megatron_prior."

# (importing modules, what they must not import, why). A prefix names a module and everything
# below it ("megatron_prior.models" is the package and its modules).
RULES: list[tuple[str, tuple[str, ...], str]] = [
    (P + "data", tuple(P + m for m in ("models", "scoring", "training", "eval", "demo", "sweeps", "preprocess",
                                       "checkpoint", "results")),
     "data/ holds formats, datasets and packing, below models, scoring and training"),
    (P + "loss", (P,), "loss/ is the kernel layer: it imports nothing else of the package"),
    (P + "checkpoint", (P,), "checkpoint sits below models and training: it imports only files and models.config"),
    (P + "models", tuple(P + m for m in ("training", "eval", "demo", "sweeps", "scoring", "preprocess", "results",
                                         "convert")),
     "models sit below scoring, training and everything above them"),
    (P + "scoring", tuple(P + m for m in ("training", "eval", "demo", "sweeps", "preprocess")),
     "scoring (a reference model over token streams) sits below the pipelines that use it"),
    (P + "training", tuple(P + m for m in ("eval", "demo", "sweeps", "preprocess", "scoring", "convert")),
     "training sits below evaluation, sweeps, the demo and preprocessing"),
    (P + "results", tuple(P + m for m in ("training", "eval", "demo", "sweeps", "models")),
     "results (a run's files) sits below the reports that read them"),
    (P + "eval", tuple(P + m for m in ("training", "demo", "sweeps", "preprocess")),
     "evaluation loads checkpoints through checkpoint and models, not through training"),
    (P + "sweeps", (P + "demo", P + "eval"), "sweeps and the demo do not import each other"),
    (P + "convert", tuple(P + m for m in ("training", "eval", "demo", "sweeps", "scoring", "preprocess", "results")),
     "convert (Hugging Face models in and out) sits on models and checkpoint; only the tools use it"),
    (P + "train_contrastive", tuple(P + m for m in ("train", "demo", "sweeps", "convert", "preprocess", "scoring")),
     "the contrastive trainer is a command beside train: on training's pieces, eval and models, under no pipeline"),
]
# What a rule's forbidden prefix P allows after all (the layer's own modules, checkpoint's two).
ALLOWED: dict[str, tuple[str, ...]] = {
    P + "loss": (P + "loss",),
    P + "checkpoint": (P + "files", P + "models.config"),
}
# Imports inside functions, each for an optional dependency (with a comment saying so).
LOCAL_IMPORTS: set[tuple[str, str]] = {
    (P + "models.gpt", "transformer_engine"),
    (P + "scoring", "transformers"),
    (P + "tokenizer", "transformers"),
    (P + "training.metrics", "torch.utils.tensorboard"),
    (P + "training.metrics", "wandb"),
}


@dataclass(frozen=True)
class Import:
    module: str        # the importing module
    target: str        # the module imported (a package's module where ``from pkg import mod``)
    line: int
    local: bool        # inside a function
    commented: bool    # a comment saying "optional" on its line or the two above


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package_module(name: str, root: Path) -> bool:
    where = root.parent / Path(*name.split("."))
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def module_imports(path: Path, root: Path = PACKAGE) -> list[Import]:
    """Every import statement of one module of the package at ``root``, ``if TYPE_CHECKING:``
    blocks left out (they never run)."""
    module, source = module_name(path, root), path.read_text()
    lines = source.splitlines()
    out: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                above = lines[max(0, child.lineno - 3):child.lineno]
                comments = [line.split("#", 1)[1] for line in above if "#" in line]
                commented = any("optional" in c.lower() for c in comments)
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                else:
                    base = _resolve(module, path.name == "__init__.py", child)
                    targets = [f"{base}.{a.name}" if _is_package_module(f"{base}.{a.name}", root) else base
                               for a in child.names]
                out.extend(Import(module, t, child.lineno, local, commented) for t in targets)
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def package_imports() -> list[Import]:
    """The import statements, plus the one import the source does not spell: ``megatron_prior.models``
    imports each module that registers an architecture, found by ``architecture_modules``."""
    from megatron_prior.models import architecture_modules

    found = [i for path in sorted(PACKAGE.rglob("*.py")) for i in module_imports(path)]
    return found + [Import(P + "models", P + "models." + name, 0, False, False) for name in architecture_modules()]


def _under(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def rule_violations(edges: list[tuple[str, str]]) -> list[str]:
    """``importer -> imported: why`` for every edge of the package graph that breaks a rule."""
    out = []
    for source, target in edges:
        if not _under(target, P):
            continue
        for layer, forbidden, why in RULES:
            if _under(source, layer) and any(_under(target, f) for f in forbidden) and not any(
                    _under(target, a) for a in ALLOWED.get(layer, (layer,))):
                out.append(f"{source} -> {target}: {why}")
    return out


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        if _under(target, P) and source != target:
            graph.setdefault(source, set()).add(target)
            graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _edges(imports: list[Import]) -> list[tuple[str, str]]:
    return [(i.module, i.target) for i in imports]


# --- the package as it is -----------------------------------------------------------------------

def test_the_parser_sees_the_package():
    imports = package_imports()
    edges = set(_edges(imports))
    # A few edges known to exist, read the three ways imports are written.
    assert (P + "training.loop", P + "models.builder") in edges                # from a.b import name
    assert (P + "train_contrastive", P + "models.contrastive") in edges         # from a import module
    assert {(P + "models", P + "models." + m) for m in ("gpt", "hlvlm", "ulvlm")} <= edges  # registrations
    assert (P + "sweeps.report", P + "sweeps.plots") in edges                  # relative import
    assert any(i.local and i.target == "wandb" for i in imports)               # inside a function


def test_no_import_breaks_a_layer_rule():
    assert rule_violations(_edges(package_imports())) == []


def test_no_import_cycles():
    assert cycles(_edges(package_imports())) == []


def test_imports_sit_at_the_top_unless_optional():
    local = [i for i in package_imports() if i.local]
    unexpected = [f"{i.module}:{i.line} imports {i.target}" for i in local
                  if (i.module, i.target) not in LOCAL_IMPORTS]
    assert unexpected == []
    uncommented = [f"{i.module}:{i.line}" for i in local if not i.commented]
    assert uncommented == [], "a function-local import must say it is for an optional dependency"
    assert {(i.module, i.target) for i in local} == LOCAL_IMPORTS, "an allowed local import is gone: drop it"


# --- the old edges come back: the rules catch each ---------------------------------------------

# The edges issue 12 found, each injected into the real graph.
OLD_EDGES = [
    ("data/ reached up into training", (P + "data.preprocess", P + "training.checkpointing"), "rule"),
    ("the vision encoder used training's private loader", (P + "models.vision_encoder", P + "training.checkpointing"),
     "rule"),
    ("checkpointing built models, models loaded through checkpointing",
     (P + "checkpoint", P + "models.builder"), "rule"),
    ("loss/ named token kinds from data/", (P + "loss.loss_func", P + "data.kinds"), "rule"),
    ("evaluation loaded through training", (P + "eval.run", P + "training.checkpointing"), "rule"),
    ("evaluation scored through training", (P + "eval.lvlm_scoring", P + "training.checkpointing"), "rule"),
    ("the demo report and pipeline imported each other", (P + "demo.report", P + "demo.pipeline"), "cycle"),
    ("models imported training back", (P + "models.builder", P + "training.loop"), "rule"),
]


@pytest.mark.parametrize("edge,kind", [e[1:] for e in OLD_EDGES], ids=[e[0] for e in OLD_EDGES])
def test_each_old_edge_is_caught(edge, kind):
    edges = _edges(package_imports())
    assert edge not in edges, "the old edge is back in the package"
    if kind == "rule":
        assert [v for v in rule_violations(edges + [edge]) if v.startswith(f"{edge[0]} -> {edge[1]}:")]
    else:
        assert any(set(edge) <= set(c) for c in cycles(edges + [edge]))


def test_a_hidden_function_local_import_is_caught(tmp_path):
    """demo/report.py imported demo/pipeline.py inside a function: the import is seen, marked
    local and uncommented, and closes the cycle."""
    root = tmp_path / "megatron_prior"
    (root / "demo").mkdir(parents=True)
    for name in ("__init__.py", "demo/__init__.py"):
        (root / name).write_text("")
    (root / "demo" / "pipeline.py").write_text("from megatron_prior.demo.report import write_demo_report\n")
    (root / "demo" / "report.py").write_text("import os\n\n\ndef write_demo_report():\n"
                                             "    from megatron_prior.demo import pipeline\n    return pipeline\n")
    imports = [i for path in sorted(root.rglob("*.py")) for i in module_imports(path, root)]
    (hidden,) = [i for i in imports if i.module == P + "demo.report" and i.target.startswith(P)]
    assert (hidden.target, hidden.line, hidden.local, hidden.commented) == (P + "demo.pipeline", 5, True, False)
    assert cycles(_edges(imports)) == [[P + "demo.pipeline", P + "demo.report"]]
