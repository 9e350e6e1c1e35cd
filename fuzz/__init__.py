"""Coverage-guided fuzzing (atheris) of every reader of untrusted files: ``make fuzz``.

One target per module (``fuzz/fuzz_*.py``); each reads one fuzz input as one or more files
and must end in its module's own error type or succeed. ``fuzz/run.py`` makes the seed
corpus with the real writers and runs the targets one after the other through
``fuzz/driver.py``.
"""
