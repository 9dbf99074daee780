"""The README's Python example runs as written (with fewer rounds)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    text = README.read_text()
    marker = text.index("<!-- readme-example")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    assert "range(30)" in code
    exec(compile(code.replace("range(30)", "range(2)"), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "accuracy" in out and "train/loss" in out


def test_readme_names_the_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -n 2 tests"
    assert test_command in text and test_command in ci
    assert ".venv/bin/pip install -e . && .venv/bin/fedjax-sim demo" in text


def _block(marker: str) -> str:
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)


def test_readme_new_algorithm_example_runs_and_learns(capsys):
    code = _block("<!-- readme-new-algorithm")
    assert "range(20)" in code
    namespace: dict = {}
    exec(compile(code.replace("range(20)", "range(3)"), str(README), "exec"), namespace)
    metrics = namespace["metrics"]
    assert int(metrics["train/clients"]) == 10 and float(metrics["train/loss"]) < 4.5


def test_readme_federated_example_prints_what_it_says(capsys):
    exec(compile(_block("<!-- readme-federated"), str(README), "exec"), {})
    assert capsys.readouterr().out.split("\n")[:2] == [
        "({float32}@CLIENTS -> float32@SERVER)", "69.53334"]
