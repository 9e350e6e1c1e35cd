"""A scaling-law sweep file (YAML or JSON): load it, refuse what cannot run, expand the grid.

The grid is model sizes x token budgets x losses x seeds. Every run gets the same data and
fixed training flags; the grid supplies the flags that vary (model size, ``--train-iters``,
``--loss``, ``--seed``) and the output paths, so a sweep file may not set those itself.
Errors name the file and the key (``sizes[1].hidden_size``) because a sweep is usually
written once and launched on a cluster, where a late failure costs a queue wait.

File layout (see ``examples/sweeps/*.yaml``)::

    name: demo                       # used in run and job names
    model: ulvlm                     # --model
    sizes:                           # presets (--model-size) or explicit shapes
      - {name: xs, preset: tiny}
      - {name: s, num_layers: 2, hidden_size: 64, num_attention_heads: 4}
    token_budgets: [1e5, 2e5, 4e5]   # training tokens -> --train-iters
    losses: [ntp, prior]
    seeds: [1234]
    seq_length: 64
    global_batch_size: 16
    data: {data-path: ..., tokenizer-model: ...}     # passed through as --flag value
    train_args: {lr: 1e-3, micro-batch-size: 8}      # passed through as --flag value
    eval: {command: "{python} -m ... --load {load} --output {eval_json}"}
    fit_kinds: [grounded]            # also fit the held-out CE of these token kinds
    slurm: {partition: gpu, nodes: 1, gpus_per_node: 8, time: "01:00:00", account: proj}

String values may name environment variables as ``${NAME}`` or ``${NAME:-default}`` (the shell's
forms), so one file serves several data locations (``make sweep`` sets ``DEMO_OUTPUT``); ``$$``
is a literal ``$``. A variable that is unset and has no default is refused by name.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import yaml

from megatron_prior.loss import LOSSES
from megatron_prior.models.arch import ARCHS
from megatron_prior.models.config import PRESETS
from megatron_prior.training.arguments import ArgumentError, build_parser, validate_args

DEFAULT_TRAINER = ("-m", "megatron_prior.train")
TRAINER_NAME = "python -m megatron_prior.train"

# Flags the grid sets per run; a sweep file setting them would silently fight the grid.
GRID_FLAGS = frozenset({
    "model", "model-size", "num-layers", "hidden-size", "num-attention-heads",
    "ffn-hidden-size", "seq-length", "global-batch-size", "train-iters", "loss", "seed",
    "save", "load", "log-dir",
})

# Placeholders an evaluation command template may use (``{data[flag]}`` reads a data flag).
EVAL_PLACEHOLDERS = ("run_dir", "load", "eval_json", "python", "model", "size", "loss",
                     "seed", "tokens", "train_iters", "seq_length", "data")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FLAG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSize:
    """One model size: a ``--model-size`` preset, or an explicit shape."""

    name: str
    preset: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None

    def flags(self) -> list[str]:
        if self.preset is not None:
            return ["--model-size", self.preset]
        out = ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
               "--num-attention-heads", str(self.num_attention_heads)]
        if self.ffn_hidden_size is not None:
            out += ["--ffn-hidden-size", str(self.ffn_hidden_size)]
        return out

    def shape(self) -> tuple:
        """(layers, hidden, heads, ffn) with a preset resolved and the trainer's default ffn
        (4 x hidden) filled in, so two spellings of one model compare equal; a preset the
        trainer does not know stays its name."""
        if self.preset is not None and self.preset not in PRESETS:
            return (self.preset,)
        shape = PRESETS[self.preset] if self.preset is not None else dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size)
        return (shape["num_layers"], shape["hidden_size"], shape["num_attention_heads"],
                shape.get("ffn_hidden_size") or 4 * shape["hidden_size"])


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str]
    account: Optional[str]
    nodes: int
    gpus_per_node: int
    time: str
    job_name: Optional[str] = None
    max_concurrent: Optional[int] = None
    setup: tuple[str, ...] = ()
    sbatch_extra: tuple[str, ...] = ()
    torchrun: str = "torchrun"
    python: str = "python"


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    size: ModelSize
    loss: str
    seed: int
    budget: int       # the token budget as written in the sweep file
    train_iters: int
    tokens: int       # train_iters * global_batch_size * seq_length (the budget, rounded down)

    @property
    def name(self) -> str:
        return f"{self.size.name}_{self.loss}_D{self.tokens}_seed{self.seed}"

    @property
    def label(self) -> str:
        """The run as messages name it: its directory name and its place in the grid."""
        return (f"run {self.name} (size {self.size.name}, budget {self.budget} tokens, "
                f"loss {self.loss}, seed {self.seed})")


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    model: str
    sizes: tuple[ModelSize, ...]
    token_budgets: tuple[int, ...]
    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    seq_length: int
    global_batch_size: int
    data: dict[str, Any]
    train_args: dict[str, Any]
    trainer: tuple[str, ...] = DEFAULT_TRAINER
    local_nproc_per_node: int = 1
    eval_command: Optional[str] = None
    slurm: Optional[SlurmConfig] = None
    output_dir: Optional[str] = None
    fit_kinds: tuple[str, ...] = ()

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    def runs(self) -> list[Run]:
        """The grid, ordered so that each NTP run is followed by its paired PRIOR run."""
        runs = []
        for seed in self.seeds:
            for size in self.sizes:
                for budget in self.token_budgets:
                    iters = budget // self.tokens_per_iteration
                    for loss in self.losses:
                        runs.append(Run(size, loss, seed, budget, iters,
                                        iters * self.tokens_per_iteration))
        return runs

    def common_flags(self) -> list[str]:
        """The flags every run shares: model, sequence and batch shape, data and fixed flags."""
        return (["--model", self.model, "--seq-length", str(self.seq_length),
                 "--global-batch-size", str(self.global_batch_size)]
                + flags_from_mapping(self.data) + flags_from_mapping(self.train_args))

    def grid_flags(self, run: Run) -> list[str]:
        """The flags that vary across the grid: size, iterations, loss, seed."""
        return [*run.size.flags(), "--train-iters", str(run.train_iters), "--loss", run.loss,
                "--seed", str(run.seed)]

    def run_flags(self, run: Run) -> list[str]:
        """The training flags of one run, without its output paths (they depend on the run dir)."""
        return self.grid_flags(run) + self.common_flags()

    def trainer_args(self, run: Run, extra: Sequence[str] = (),
                     world_size: Optional[int] = None) -> argparse.Namespace:
        """The trainer's own parse of the run's flags plus ``extra``; with ``world_size``, also
        its ``validate_args`` (flag combinations at that world size, data files). A refusal
        raises SweepError naming the file, the run and the trainer's message (which names the
        flag). Meaningful for the default trainer only."""
        try:
            args = trainer_parser().parse_args([*self.run_flags(run), *extra])
            return args if world_size is None else validate_args(args, world_size)
        except ArgumentError as err:
            raise SweepError(f"{self.path}: {run.label}: {TRAINER_NAME}: {err}") from None

    def eval_command_for(self, run: Run, run_dir: str, load: str, python: str) -> Optional[str]:
        """The evaluation shell command of one run (placeholders filled, values shell-quoted)."""
        if self.eval_command is None:
            return None
        return self.eval_command.format_map(_eval_values(self, run, run_dir, load, python))


def trainer_parser() -> argparse.ArgumentParser:
    """The trainer's parser, raising ArgumentError instead of exiting. Flag names must be
    exact: an abbreviation of a grid flag (``train-iter``) would otherwise override the grid."""
    parser = build_parser()
    parser.allow_abbrev = False

    def refuse(message: str) -> NoReturn:
        raise ArgumentError(message)

    parser.error = refuse  # argparse's documented override point; the sweep reports, not exits
    return parser


def flags_from_mapping(mapping: dict[str, Any]) -> list[str]:
    """``{flag: value}`` -> argv: ``true`` is a bare switch, ``false`` leaves it out, lists spread."""
    out: list[str] = []
    for flag, value in mapping.items():
        if value is True:
            out.append(f"--{flag}")
        elif value is False:
            continue
        elif isinstance(value, list):
            out += [f"--{flag}", *(_scalar_text(v) for v in value)]
        else:
            out += [f"--{flag}", _scalar_text(value)]
    return out


def _scalar_text(value: Any) -> str:
    # repr keeps floats exact (1e-05 round-trips); str would too, but be explicit about it.
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a sweep with a repeated key is a mistake."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise SweepError(f"repeated key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def _json_unique(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise SweepError(f"repeated key {key!r}")
        out[key] = value
    return out


def load_sweep(path: str | Path, overrides: Optional[dict] = None) -> SweepSpec:
    """Read and validate a sweep file (``.yaml``/``.yml`` or ``.json``); top-level keys in
    ``overrides`` replace the file's before validation (run_sweep.py's ``--seeds``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepError(f"{path}: cannot read the sweep file: {err}") from err
    try:
        if path.suffix == ".json":
            raw = json.loads(text, object_pairs_hook=_json_unique)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
        else:
            raise SweepError("unknown extension: use .yaml, .yml or .json")
    except SweepError as err:
        raise SweepError(f"{path}: {err}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SweepError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    raw = expand_environment(raw, path)
    if overrides and isinstance(raw, dict):
        raw.update(overrides)
    return parse_sweep(raw, path)


_ENV_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def expand_environment(value: Any, path: Path, key: str = "") -> Any:
    """``value`` with ``${NAME}`` / ``${NAME:-default}`` in its strings replaced from the environment."""
    if isinstance(value, dict):
        return {k: expand_environment(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_environment(v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "$"
        if os.environ.get(name):
            return os.environ[name]
        if default is None:
            raise SweepError(f"{path}: {key}: environment variable {name} is not set (write ${{{name}:-default}} "
                             "to give a default)")
        return default

    return _ENV_REFERENCE.sub(substitute, value)


class _Checker:
    """Validation helpers that prefix every message with the file and key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str):
        raise SweepError(f"{self.path}: {key}: {problem}")

    def mapping(self, value, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(f"{key}.{k}" if key else str(k),
                          f"unknown key{hint}; allowed: {', '.join(allowed)}")
        for k in required:
            if k not in value:
                self.fail(f"{key}.{k}" if key else k, "missing (required)")
        return value

    def integer(self, value, key: str, minimum: Optional[int] = None) -> int:
        if isinstance(value, bool):
            self.fail(key, f"must be an integer, got {value!r}")
        if isinstance(value, str):
            # PyYAML reads 1e6 (no dot) as a string; budgets are naturally written that way.
            try:
                value = float(value)
            except ValueError:
                self.fail(key, f"must be an integer, got {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                self.fail(key, f"must be a whole number, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            self.fail(key, f"must be an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def string(self, value, key: str, pattern: Optional[re.Pattern] = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            self.fail(key, f"{value!r} must match {pattern.pattern}")
        return value

    def nonempty_list(self, value, key: str) -> list:
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {type(value).__name__}")
        if not value:
            self.fail(key, "is empty: the grid would have no runs")
        return value

    def flag_mapping(self, value, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping of training flags, got {type(value).__name__}")
        for flag, v in value.items():
            fkey = f"{key}.{flag}"
            if not isinstance(flag, str) or not _FLAG_RE.match(flag):
                hint = f" (write {flag.replace('_', '-')!r})" if isinstance(flag, str) else ""
                self.fail(fkey, "flag names are Megatron-style, lower case with hyphens and "
                                f"without the leading '--'{hint}")
            if flag in GRID_FLAGS:
                self.fail(fkey, "is set per run by the sweep grid (sizes, token_budgets, losses, "
                                "seeds, seq_length, global_batch_size, output paths); remove it")
            items = v if isinstance(v, list) else [v]
            if isinstance(v, list) and not v:
                self.fail(fkey, "an empty list passes no value")
            for item in items:
                if item is None or isinstance(item, (dict, list)) or (isinstance(item, bool) and isinstance(v, list)):
                    self.fail(fkey, f"must be a string, number, true/false or a list of "
                                    f"strings/numbers, got {item!r}")
        return dict(value)


_TOP_KEYS = ("name", "model", "sizes", "token_budgets", "losses", "seeds", "seq_length",
             "global_batch_size", "data", "train_args", "trainer", "local", "eval", "slurm",
             "output_dir", "fit_kinds")
_SIZE_KEYS = ("name", "preset", "num_layers", "hidden_size", "num_attention_heads",
              "ffn_hidden_size")
_SLURM_KEYS = ("partition", "account", "nodes", "gpus_per_node", "time", "job_name",
               "max_concurrent", "setup", "sbatch_extra", "torchrun", "python")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")


def parse_sweep(raw: Any, path: Path | str = "<sweep>") -> SweepSpec:
    """Validate an already-parsed sweep mapping (``path`` only names it in messages)."""
    path = Path(path)
    c = _Checker(path)
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the sweep file must hold a mapping at top level")
    c.mapping(raw, "", _TOP_KEYS, required=("name", "model", "sizes", "token_budgets", "losses",
                                            "seeds", "seq_length", "global_batch_size"))
    name = c.string(raw["name"], "name", _NAME_RE)
    model = c.string(raw["model"], "model")
    if model not in ARCHS:
        c.fail("model", f"unknown model {model!r}; known: {', '.join(ARCHS)}")
    seq_length = c.integer(raw["seq_length"], "seq_length", 1)
    gbs = c.integer(raw["global_batch_size"], "global_batch_size", 1)

    sizes = tuple(_parse_size(c, item, f"sizes[{i}]")
                  for i, item in enumerate(c.nonempty_list(raw["sizes"], "sizes")))
    for i, size in enumerate(sizes):
        for j in range(i):
            if sizes[j].name == size.name:
                c.fail(f"sizes[{i}].name", f"duplicate size name {size.name!r} (also sizes[{j}])")
            if sizes[j].shape() == size.shape():
                c.fail(f"sizes[{i}]", f"duplicate size: {size.name!r} is the same model as "
                                      f"{sizes[j].name!r} (layers, hidden, heads, ffn = {size.shape()})")

    tokens_per_iter = gbs * seq_length
    budgets = []
    for i, item in enumerate(c.nonempty_list(raw["token_budgets"], "token_budgets")):
        key = f"token_budgets[{i}]"
        budget = c.integer(item, key)
        if budget <= 0:
            c.fail(key, f"a token budget must be positive, got {budget}")
        if budget < tokens_per_iter:
            c.fail(key, f"{budget} tokens is less than one global batch (global_batch_size "
                        f"{gbs} x seq_length {seq_length} = {tokens_per_iter} tokens)")
        for j, other in enumerate(budgets):
            if other // tokens_per_iter == budget // tokens_per_iter:
                c.fail(key, f"{budget} tokens gives the same --train-iters "
                            f"({budget // tokens_per_iter}) as token_budgets[{j}] = {other}")
        budgets.append(budget)
    if len(budgets) < 3:
        c.fail("token_budgets", f"has {len(budgets)} budget(s); L(D) = E + B * D**-beta has three "
                                "parameters, so a fit needs at least 3 budgets (4 to also measure "
                                "the extrapolation error)")
    budgets.sort()

    losses = []
    for i, item in enumerate(c.nonempty_list(raw["losses"], "losses")):
        if item not in LOSSES:
            c.fail(f"losses[{i}]", f"unknown loss {item!r}; known: {', '.join(LOSSES)}")
        if item in losses:
            c.fail(f"losses[{i}]", f"duplicate loss {item!r}")
        losses.append(item)

    seeds = []
    for i, item in enumerate(c.nonempty_list(raw["seeds"], "seeds")):
        seed = c.integer(item, f"seeds[{i}]", 0)
        if seed in seeds:
            c.fail(f"seeds[{i}]", f"duplicate seed {seed}")
        seeds.append(seed)

    data = c.flag_mapping(raw.get("data"), "data")
    train_args = c.flag_mapping(raw.get("train_args"), "train_args")
    for flag in data.keys() & train_args.keys():
        c.fail(f"train_args.{flag}", "is also set under data; set it once")

    trainer = DEFAULT_TRAINER
    if "trainer" in raw:
        value = raw["trainer"]
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v for v in value)):
            c.fail("trainer", "must be a non-empty list of strings: what follows python/torchrun, "
                              "e.g. ['-m', 'megatron_prior.train'] or ['path/to/script.py']")
        trainer = tuple(value)
    if not (trainer[0] == "-m" or trainer[0].endswith(".py")):
        c.fail("trainer", f"starts with '-m' or a Python script (NAME.py), got {trainer[0]!r}")
    if trainer == DEFAULT_TRAINER:
        _check_trainer_flags(c, data, train_args)
    if train_args.get("eval-iters") == 0:
        c.fail("train_args.eval-iters", "0 turns evaluation off, but the fits need each run's "
                                        "held-out loss (summary.json eval_ce)")

    nproc = 1
    if "local" in raw:
        local = c.mapping(raw["local"], "local", ("nproc_per_node",))
        if "nproc_per_node" in local:
            nproc = c.integer(local["nproc_per_node"], "local.nproc_per_node", 1)

    eval_command = None
    if "eval" in raw:
        ev = c.mapping(raw["eval"], "eval", ("command",), required=("command",))
        eval_command = c.string(ev["command"], "eval.command")
        _check_eval_template(c, eval_command, data)

    slurm = _parse_slurm(c, raw["slurm"]) if "slurm" in raw else None
    output_dir = c.string(raw["output_dir"], "output_dir") if "output_dir" in raw else None
    fit_kinds: list[str] = []
    if not isinstance(raw.get("fit_kinds", []), list):
        c.fail("fit_kinds", f"must be a list of token kinds, got {type(raw['fit_kinds']).__name__}")
    for i, item in enumerate(raw.get("fit_kinds", [])):
        kind = c.string(item, f"fit_kinds[{i}]", _NAME_RE)
        if kind in fit_kinds:
            c.fail(f"fit_kinds[{i}]", f"duplicate kind {kind!r}")
        fit_kinds.append(kind)

    spec = SweepSpec(path=path, name=name, model=model, sizes=sizes, token_budgets=tuple(budgets),
                     losses=tuple(losses), seeds=tuple(seeds), seq_length=seq_length,
                     global_batch_size=gbs, data=data, train_args=train_args, trainer=trainer,
                     local_nproc_per_node=nproc, eval_command=eval_command, slurm=slurm,
                     output_dir=output_dir, fit_kinds=tuple(fit_kinds))
    if trainer == DEFAULT_TRAINER:
        # Every run's argv through the trainer's parser (presets, grid flags with the file's).
        # Its validate_args waits for the machine that runs them (rundirs.check_runs): it
        # reads the data files and the world size.
        for run in spec.runs():
            spec.trainer_args(run)
    return spec


def _parse_size(c: _Checker, item: Any, key: str) -> ModelSize:
    if isinstance(item, str):  # shorthand: a bare preset name
        c.string(item, key, _NAME_RE)
        return ModelSize(name=item, preset=item)
    c.mapping(item, key, _SIZE_KEYS, required=("name",))
    name = c.string(item["name"], f"{key}.name", _NAME_RE)
    if "_" in name:
        # Run names join size, loss, budget and seed with '_'; keep them splittable.
        c.fail(f"{key}.name", f"{name!r}: use '-' or '.' instead of '_' in size names")
    shape_keys = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
                  if k in item]
    if "preset" in item:
        if shape_keys:
            c.fail(f"{key}.{shape_keys[0]}", "give either a preset or an explicit shape, not both")
        return ModelSize(name=name, preset=c.string(item["preset"], f"{key}.preset", _NAME_RE))
    for k in ("num_layers", "hidden_size", "num_attention_heads"):
        if k not in item:
            c.fail(f"{key}.{k}", "missing: a size needs a preset or num_layers, hidden_size and "
                                 "num_attention_heads")
    layers = c.integer(item["num_layers"], f"{key}.num_layers", 1)
    hidden = c.integer(item["hidden_size"], f"{key}.hidden_size", 1)
    heads = c.integer(item["num_attention_heads"], f"{key}.num_attention_heads", 1)
    if hidden % heads:
        c.fail(f"{key}.num_attention_heads", f"{heads} heads do not divide hidden_size {hidden}")
    ffn = (c.integer(item["ffn_hidden_size"], f"{key}.ffn_hidden_size", 1)
           if "ffn_hidden_size" in item else None)
    return ModelSize(name=name, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     ffn_hidden_size=ffn)


def _check_trainer_flags(c: _Checker, data: dict, train_args: dict) -> None:
    """Each file flag alone through the trainer's parser, so its message names the key (in a
    whole argv, ``bf16: 1`` would be refused as a stray ``1``)."""
    parser = trainer_parser()
    for section, mapping in (("data", data), ("train_args", train_args)):
        for flag, value in mapping.items():
            # false leaves a switch out of the argv; check it as written true, so a misspelt
            # or valued flag is refused all the same.
            try:
                parser.parse_args(flags_from_mapping({flag: True if value is False else value}))
            except ArgumentError as err:
                c.fail(f"{section}.{flag}", f"{TRAINER_NAME}: {err}")


def _parse_slurm(c: _Checker, value: Any) -> SlurmConfig:
    s = c.mapping(value, "slurm", _SLURM_KEYS, required=("nodes", "gpus_per_node", "time"))
    opt = {k: c.string(s[k], f"slurm.{k}") for k in ("partition", "account", "job_name") if k in s}
    time = c.string(s["time"], "slurm.time")
    if not _TIME_RE.match(time):
        c.fail("slurm.time", f"{time!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    lists = {}
    for k in ("setup", "sbatch_extra"):
        v = s.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            c.fail(f"slurm.{k}", "must be a list of non-empty strings")
        lists[k] = tuple(v)
    for i, line in enumerate(lists["sbatch_extra"]):
        if not line.startswith("--"):
            c.fail(f"slurm.sbatch_extra[{i}]", f"{line!r} must be an sbatch option such as "
                                               "'--exclusive' or '--qos=high'")
    return SlurmConfig(
        partition=opt.get("partition"), account=opt.get("account"),
        nodes=c.integer(s["nodes"], "slurm.nodes", 1),
        gpus_per_node=c.integer(s["gpus_per_node"], "slurm.gpus_per_node", 1),
        time=time, job_name=opt.get("job_name"),
        max_concurrent=(c.integer(s["max_concurrent"], "slurm.max_concurrent", 1)
                        if "max_concurrent" in s else None),
        setup=lists["setup"], sbatch_extra=lists["sbatch_extra"],
        torchrun=c.string(s.get("torchrun", "torchrun"), "slurm.torchrun"),
        python=c.string(s.get("python", "python"), "slurm.python"))


# ----------------------------------------------------------------------------- eval template


def _quote(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(shlex.quote(_scalar_text(v)) for v in value)
    return shlex.quote(_scalar_text(value))


class _QuotedData(dict):
    def __missing__(self, key):
        raise KeyError(f"data[{key}]")


def _eval_values(spec: SweepSpec, run: Run, run_dir: str, load: str, python: str) -> dict:
    values = dict(run_dir=run_dir, load=load, eval_json=f"{run_dir}/eval.json", python=python,
                  model=spec.model, size=run.size.name, loss=run.loss, seed=run.seed,
                  tokens=run.tokens, train_iters=run.train_iters, seq_length=spec.seq_length)
    quoted = {k: _quote(v) for k, v in values.items()}
    quoted["python"] = python  # may legitimately be a command with arguments ("srun python")
    quoted["data"] = _QuotedData({k: _quote(v) for k, v in spec.data.items()})
    return quoted


def _check_eval_template(c: _Checker, template: str, data: dict) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        c.fail("eval.command", f"bad template: {err} (write literal braces as {{{{ and }}}})")
    for f in fields:
        base = re.split(r"[.\[]", f, maxsplit=1)[0]
        if base not in EVAL_PLACEHOLDERS:
            c.fail("eval.command", f"unknown placeholder {{{f}}}; known: "
                                   + ", ".join("{%s}" % p for p in EVAL_PLACEHOLDERS[:-1])
                                   + ", {data[FLAG]}")
    dummy = dict.fromkeys(EVAL_PLACEHOLDERS[:-1], "x")
    dummy["data"] = _QuotedData(dict.fromkeys(data, "x"))
    try:
        template.format_map(dummy)
    except KeyError as err:
        c.fail("eval.command", f"placeholder {{{err.args[0]}}} names no flag set under 'data'")
    except (IndexError, ValueError, AttributeError) as err:
        c.fail("eval.command", f"bad template: {err}")
