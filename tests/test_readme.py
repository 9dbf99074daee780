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
