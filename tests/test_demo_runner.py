"""The step runner (megatron_prior.runs) of the demo pipeline and the sweeps: dependency order,
skipping finished steps, rerunning what changed and what depends on it, cleaning stale outputs,
shell commands with their own logs, and failures that quote the log."""

import json

import pytest

from megatron_prior.runs import RunFailed, Step, StepRunner, resolve_command


def _copy(name, src, dst, deps=(), indent=2, clean=()):
    # json.tool (stdlib) as a tiny subprocess: reads src, writes dst.
    return Step(name, f"copy {src} to {dst}", [dst], ["-m", "json.tool", "--indent", str(indent), src, dst],
                deps=list(deps), clean=list(clean))


def _runner(tmp_path, **kw):
    lines = []
    return StepRunner(tmp_path, echo=lines.append, **kw), lines


def test_runs_in_dependency_order_then_skips(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    steps = [_copy("c", "b.json", "c.json", deps=["b"]), _copy("b", "a.json", "b.json")]
    runner, lines = _runner(tmp_path, jobs=2)
    first = runner.run(steps)
    assert [first[n].ran for n in ("b", "c")] == [True, True]
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    assert first["b"].cpu_seconds > 0
    assert [line.split("] ")[1].split()[0] for line in lines] == ["start", "done", "start", "done"]
    second = _runner(tmp_path)[0].run(steps)
    assert not any(r.ran for r in second.values())


def test_changed_command_reruns_the_step_and_its_dependents(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    _runner(tmp_path)[0].run([_copy("b", "a.json", "b.json"), _copy("c", "b.json", "c.json", deps=["b"]),
                              _copy("d", "a.json", "d.json")])
    again = _runner(tmp_path)[0].run([_copy("b", "a.json", "b.json", indent=4),
                                      _copy("c", "b.json", "c.json", deps=["b"]), _copy("d", "a.json", "d.json")])
    assert {n: r.ran for n, r in again.items()} == {"b": True, "c": True, "d": False}
    assert (tmp_path / "b.json").read_text().startswith('{\n    "x"')


def test_force_and_missing_outputs_rerun(tmp_path):
    (tmp_path / "a.json").write_text("[1]")
    steps = [_copy("b", "a.json", "b.json")]
    _runner(tmp_path)[0].run(steps)
    assert _runner(tmp_path, force=True)[0].run(steps)["b"].ran
    (tmp_path / "b.json").unlink()
    assert _runner(tmp_path)[0].run(steps)["b"].ran


def test_clean_removes_stale_outputs_before_running(tmp_path):
    (tmp_path / "a.json").write_text("[1]")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stale.txt").write_text("old")
    _runner(tmp_path)[0].run([_copy("b", "a.json", "run.json", clean=["run"])])
    assert not (tmp_path / "run").exists()


def test_failure_names_the_step_and_quotes_its_log(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    runner, _ = _runner(tmp_path)
    with pytest.raises(RunFailed,
                       match=r"copy bad.json to out.json failed \(exit 1\); the end of .*b\.log:(.|\n)*Expecting"):
        runner.run([_copy("b", "bad.json", "out.json"), _copy("c", "out.json", "c.json", deps=["b"])])
    assert not (tmp_path / "logs" / "b.stamp.json").exists() and not (tmp_path / "c.json").exists()


def test_in_process_steps_and_bad_graphs(tmp_path):
    calls = []
    runner, _ = _runner(tmp_path)
    runner.run([Step("f", "call f", [], func=lambda: calls.append(1), always=True)])
    runner.run([Step("f", "call f", [], func=lambda: calls.append(1), always=True)])
    assert calls == [1, 1]
    with pytest.raises(RunFailed, match=r"call g failed: boom"):
        runner.run([Step("g", "call g", [], func=lambda: (_ for _ in ()).throw(ValueError("boom")))])
    with pytest.raises(ValueError, match="unknown steps"):
        runner.run([_copy("b", "a.json", "b.json", deps=["zzz"])])
    with pytest.raises(ValueError, match="wait on each other"):
        runner.run([_copy("b", "a.json", "b.json", deps=["c"]), _copy("c", "a.json", "c.json", deps=["b"])])
    with pytest.raises(ValueError, match="exactly one of command and func"):
        Step("h", "h", [])
    with pytest.raises(ValueError, match=r"starts with '-m' or a Python script \(NAME.py\), got 'python'"):
        resolve_command(["python", "x.py"])


def test_shell_command_with_its_own_log_appends_each_attempt(tmp_path):
    step = Step("s", "shell step", ["out/x.txt"], "mkdir -p out && echo hi > out/x.txt && echo said hi",
                log="out/s.log")
    runner, lines = _runner(tmp_path, label="sweep t")
    assert runner.run([step])["s"].ran
    assert (tmp_path / "out" / "x.txt").read_text() == "hi\n"
    assert lines[0].startswith("[sweep t 00:0") and lines[0].endswith("] start  shell step")
    assert _runner(tmp_path, force=True)[0].run([step])["s"].ran
    assert (tmp_path / "out" / "s.log").read_text().splitlines() == [f"$ {step.command}", "said hi"] * 2
    assert not (tmp_path / "logs" / "s.log").exists() and (tmp_path / "logs" / "s.stamp.json").exists()


def test_step_that_succeeds_without_its_outputs_fails(tmp_path):
    runner, _ = _runner(tmp_path)
    with pytest.raises(RunFailed, match=r"quiet step succeeded but wrote no missing\.txt; the end of .*q\.log:\n  "
                                        r"\$ echo nothing\n  nothing$"):
        runner.run([Step("q", "quiet step", ["missing.txt"], "echo nothing")])
    assert not (tmp_path / "logs" / "q.stamp.json").exists()


def test_script_commands_get_the_interpreter(tmp_path):
    assert resolve_command(["x/train.py", "--a"], python="py") == ["py", "x/train.py", "--a"]
    assert resolve_command(["-m", "m", "--a"], python="py") == ["py", "-m", "m", "--a"]
    assert resolve_command(["tools/train_tokenizer.py"], python="py")[1].endswith("/tools/train_tokenizer.py")
    assert resolve_command("echo $HOME") == "echo $HOME"
