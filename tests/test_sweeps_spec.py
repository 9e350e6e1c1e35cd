"""Sweep files: a good one expands into the expected grid and flags; bad ones are refused with
a message naming the file and the key, or the run and the trainer's own message about its flag."""

import copy
import importlib.util
import io
import json
import shlex
from pathlib import Path

import pytest
import yaml

from megatron_prior.sweeps import SweepError, load_sweep, run_local

TRAINER = "python -m megatron_prior.train"
RUN0 = "run xs_ntp_D1024_seed1 (size xs, budget 1024 tokens, loss ntp, seed 1)"

BASE = {
    "name": "t",
    "model": "ulvlm",
    "sizes": [{"name": "xs", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
              {"name": "tiny", "preset": "tiny"}],
    "token_budgets": [1024, "2e3", 4096.0],
    "losses": ["ntp", "prior"],
    "seeds": [1, 2],
    "seq_length": 16,
    "global_batch_size": 8,
    "data": {"data-path": "d/train_text_document", "tokenizer-model": "d/tok model.model",
             "split": "95,5,0"},
    "train_args": {"lr": 1e-3, "bf16": True, "fused-linear-ce": False, "micro-batch-size": 4},
    "eval": {"command": "{python} ev.py --load {load} --tok {data[tokenizer-model]} --out {eval_json}"},
}


def _write(tmp_path, raw, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(raw) if name.endswith(".json") else yaml.safe_dump(raw, sort_keys=False))
    return path


def test_grid_order_names_and_iterations(tmp_path):
    spec = load_sweep(_write(tmp_path, BASE))
    runs = spec.runs()
    assert len(runs) == 2 * 3 * 2 * 2
    # 128 tokens per iteration: 1024 -> 8 iterations, 2e3 -> 15 (1920 tokens), 4096 -> 32.
    assert [r.train_iters for r in runs[:6]] == [8, 8, 15, 15, 32, 32]
    assert [r.tokens for r in runs[:6]] == [1024, 1024, 1920, 1920, 4096, 4096]
    assert [r.loss for r in runs[:4]] == ["ntp", "prior", "ntp", "prior"]
    assert runs[0].name == "xs_ntp_D1024_seed1"
    assert runs[6].name == "tiny_ntp_D1024_seed1" and runs[12].seed == 2
    assert len({r.name for r in runs}) == len(runs)


def test_flags_switches_lists_and_eval_quoting(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["data"]["data-path"] = [0.7, "a/x", 0.3, "b/y"]
    spec = load_sweep(_write(tmp_path, raw))
    run = spec.runs()[7]  # tiny, prior, 1024 tokens, seed 1
    assert spec.run_flags(run) == [
        "--model-size", "tiny", "--train-iters", "8", "--loss", "prior", "--seed", "1",
        "--model", "ulvlm", "--seq-length", "16", "--global-batch-size", "8",
        "--data-path", "0.7", "a/x", "0.3", "b/y", "--tokenizer-model", "d/tok model.model",
        "--split", "95,5,0", "--lr", "0.001", "--bf16", "--micro-batch-size", "4"]
    cmd = spec.eval_command_for(run, "/o/run dir", "/o/run dir/checkpoints", "py")
    assert shlex.split(cmd) == ["py", "ev.py", "--load", "/o/run dir/checkpoints", "--tok",
                                "d/tok model.model", "--out", "/o/run dir/eval.json"]


def test_json_and_yaml_agree(tmp_path):
    a = load_sweep(_write(tmp_path, BASE, "s.yaml"))
    b = load_sweep(_write(tmp_path, BASE, "s.json"))
    assert [a.run_flags(r) for r in a.runs()] == [b.run_flags(r) for r in b.runs()]


def _mutate(path, value):
    def apply(raw):
        *head, last = path
        node = raw
        for k in head:
            node = node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return apply


_DELETE = object()
BAD = [
    (_mutate(["token_budget"], [1]), "token_budget: unknown key (did you mean 'token_budgets'?)"),
    (_mutate(["token_budgets", 1], -2048), "token_budgets[1]: a token budget must be positive"),
    (_mutate(["token_budgets", 0], 100), "token_budgets[0]: 100 tokens is less than one global batch"),
    (_mutate(["token_budgets", 1], 1100), "gives the same --train-iters (8) as token_budgets[0]"),
    (_mutate(["token_budgets"], [1024, 2048]), "token_budgets: has 2 budget(s)"),
    (_mutate(["token_budgets"], []), "token_budgets: is empty"),
    (_mutate(["sizes"], []), "sizes: is empty"),
    (_mutate(["losses"], []), "losses: is empty"),
    (_mutate(["losses", 1], "focal"), "losses[1]: unknown loss 'focal'"),
    (_mutate(["losses", 1], "ntp"), "losses[1]: duplicate loss 'ntp'"),
    (_mutate(["seeds", 1], 1), "seeds[1]: duplicate seed 1"),
    (_mutate(["seq_length"], 0), "seq_length: must be >= 1"),
    (_mutate(["model"], "vit"), "model: unknown model 'vit'"),
    (_mutate(["sizes", 1], {"name": "xs", "preset": "mini"}), "sizes[1].name: duplicate size name 'xs'"),
    (_mutate(["sizes", 0, "hidden_size"], 64), "sizes[1]: duplicate size: 'tiny' is the same model as 'xs'"),
    (_mutate(["sizes", 0], {"name": "a", "num_layers": 2, "hidden_size": 30,
                            "num_attention_heads": 4}), "sizes[0].num_attention_heads: 4 heads do not divide"),
    (_mutate(["sizes", 0, "preset"], "tiny"), "give either a preset or an explicit shape"),
    (_mutate(["sizes", 1, "preset"], "huge"), "run tiny_ntp_D1024_seed1 (size tiny, budget 1024 tokens, loss ntp, "
                                              f"seed 1): {TRAINER}: argument --model-size: invalid choice: 'huge'"),
    (_mutate(["sizes", 0, "name"], "x_s"), "use '-' or '.' instead of '_'"),
    (_mutate(["sizes", 0, "layers"], 2), "sizes[0].layers: unknown key"),
    (_mutate(["train_args", "train-iters"], 5), "train_args.train-iters: is set per run by the sweep grid"),
    (_mutate(["train_args", "micro_batch_size"], 4), "write 'micro-batch-size'"),
    (_mutate(["train_args", "learning-rate"], 0.1),
     f"train_args.learning-rate: {TRAINER}: unrecognized arguments: --learning-rate 0.1"),
    # false leaves a switch out of the argv, but a misspelt one is still refused.
    (_mutate(["train_args", "fused-linear-cee"], False), f"train_args.fused-linear-cee: {TRAINER}: unrecognized"),
    # An abbreviation of a grid flag would override the grid: names must be exact.
    (_mutate(["train_args", "train-iter"], 5),
     f"train_args.train-iter: {TRAINER}: unrecognized arguments: --train-iter 5"),
    (_mutate(["train_args", "bf16"], 1), f"train_args.bf16: {TRAINER}: unrecognized arguments: 1"),
    (_mutate(["train_args", "lr"], True), f"train_args.lr: {TRAINER}: argument --lr: expected one argument"),
    (_mutate(["train_args", "lr-decay-style"], "cosinus"),
     f"train_args.lr-decay-style: {TRAINER}: argument --lr-decay-style: invalid choice: 'cosinus'"),
    (_mutate(["train_args", "micro-batch-size"], 4.5),
     f"train_args.micro-batch-size: {TRAINER}: argument --micro-batch-size: invalid int value: '4.5'"),
    (_mutate(["train_args", "eval-iters"], 0), "train_args.eval-iters: 0 turns evaluation off"),
    (_mutate(["train_args", "split"], "1,1,0"), "train_args.split: is also set under data"),
    (_mutate(["train_args", "lr"], None), "train_args.lr: must be a string, number"),
    (_mutate(["eval", "command"], "x --load {checkpoint}"), "unknown placeholder {checkpoint}"),
    (_mutate(["eval", "command"], "x {data[vocab]}"), "placeholder {data[vocab]} names no flag"),
    (_mutate(["eval", "command"], "x {run_dir"), "eval.command: bad template"),
    (_mutate(["slurm"], {"nodes": 1, "gpus_per_node": 8, "time": "2 hours"}), "slurm.time: '2 hours'"),
    (_mutate(["slurm"], {"gpus_per_node": 8, "time": "1:00:00"}), "slurm.nodes: missing (required)"),
    (_mutate(["slurm"], {"nodes": 1, "gpus_per_node": 0, "time": "10"}), "slurm.gpus_per_node: must be >= 1"),
    (_mutate(["trainer"], []), "trainer: must be a non-empty list"),
    (_mutate(["trainer"], ["python", "train.py"]),
     "trainer: starts with '-m' or a Python script (NAME.py), got 'python'"),
    (_mutate(["fit_kinds"], "grounded"), "fit_kinds: must be a list of token kinds, got str"),
    (_mutate(["fit_kinds"], ["grounded", "grounded"]), "fit_kinds[1]: duplicate kind 'grounded'"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_bad_sweeps_are_refused_naming_file_and_key(tmp_path, mutate, message):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_repeated_yaml_key_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False) + "seeds: [3]\n")
    with pytest.raises(SweepError, match=r"s\.yaml: repeated key 'seeds' \(line \d+\)"):
        load_sweep(path)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(SweepError, match="cannot read the sweep file"):
        load_sweep(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SweepError, match="must hold a mapping at top level"):
        load_sweep(tmp_path / "list.yaml")
    (tmp_path / "s.toml").write_text("")
    with pytest.raises(SweepError, match="unknown extension"):
        load_sweep(tmp_path / "s.toml")


def test_shipped_example_sweeps_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
    cpu = load_sweep(root / "cpu_default.yaml")
    assert len(cpu.runs()) == 24
    assert sum(r.train_iters for r in cpu.runs()) == 3 * 2 * (50 + 100 + 200 + 400)
    assert cpu.eval_command is not None
    assert load_sweep(root / "cluster_example.yaml").slurm.gpus_per_node == 8


def test_environment_variables_in_strings(tmp_path, monkeypatch):
    raw = copy.deepcopy(BASE)
    raw["data"]["data-path"] = "${SWEEP_DATA}/train_text_document"
    raw["data"]["tokenizer-model"] = "${SWEEP_TOK:-d/default.model}"
    raw["eval"]["command"] = "{python} ev.py --load {load} --price $$5 --held ${SWEEP_DATA}/heldout --out {eval_json}"
    monkeypatch.setenv("SWEEP_DATA", "/scratch/demo")
    monkeypatch.delenv("SWEEP_TOK", raising=False)
    spec = load_sweep(_write(tmp_path, raw))
    flags = spec.run_flags(spec.runs()[0])
    assert flags[flags.index("--data-path") + 1] == "/scratch/demo/train_text_document"
    assert flags[flags.index("--tokenizer-model") + 1] == "d/default.model"
    assert "--price $5 --held /scratch/demo/heldout" in spec.eval_command
    monkeypatch.delenv("SWEEP_DATA")
    with pytest.raises(SweepError, match=r"sweep.yaml: data.data-path: environment variable SWEEP_DATA is not set"):
        load_sweep(_write(tmp_path, raw))


def test_overrides_replace_keys_before_validation(tmp_path):
    path = _write(tmp_path, copy.deepcopy(BASE))
    spec = load_sweep(path, {"seeds": [7, 1]})
    assert spec.seeds == (7, 1) and {r.seed for r in spec.runs()} == {7, 1}
    with pytest.raises(SweepError, match="seeds\\[1\\]: duplicate seed 7"):
        load_sweep(path, {"seeds": [7, 7]})


def _run_sweep_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "run_sweep.py"
    spec = importlib.util.spec_from_file_location("run_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mutate,message", [
    (_mutate(["train_args", "tensor-model-parallel-size"], 2),
     "world size 1 is not divisible by --tensor-model-parallel-size 2"),
    (_mutate(["data", "data-path"], _DELETE), "--data-path is required"),
])
def test_trainer_validates_every_run_before_the_first_starts(tmp_path, mutate, message):
    """validate_args (flag combinations at the run's world size, data files) runs when the sweep
    is launched, for every unfinished run, before any of them trains."""
    raw = copy.deepcopy(BASE)
    mutate(raw)
    path = _write(tmp_path, raw)
    spec = load_sweep(path)  # the parser accepts each flag; the combination is the trainer's call
    with pytest.raises(SweepError) as err:
        run_local(spec, tmp_path / "out", stream=io.StringIO())
    assert str(err.value).startswith(f"{path}: {RUN0}: {TRAINER}: {message}")
    assert not (tmp_path / "out").exists()


def test_slurm_launch_is_refused_before_anything_is_written(tmp_path, capsys):
    """At the cluster's world size (2 nodes x 8 GPUs here) and its data paths, before sbatch."""
    sweep = Path(__file__).resolve().parent / "data" / "sweeps" / "small.yaml"
    out = tmp_path / "out"
    assert _run_sweep_module().main([str(sweep), "--slurm", "--output-dir", str(out)]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: {sweep}: run xs_ntp_D983040_seed1234 (size xs, budget 1000000 tokens, loss ntp, seed 1234): "
        f"{TRAINER}: --tokenizer-model /data/tokenizer.model: no such file")
    assert not out.exists()
