"""The README's analytics example runs as written and prints what its comments say."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_analytics_example(monkeypatch):
    monkeypatch.delenv("FEDJAX_SIM_DATA", raising=False)  # the packaged plays (same bytes)
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("<!-- readme-analytics"):],
                     re.S).group(1)
    printed = []
    namespace = {"print": lambda *args: printed.append(args)}
    exec(compile(code, str(README), "exec"), namespace)
    [(average,), (value, epsilon, stddev)] = printed
    role_means = namespace["role_means"]
    assert role_means.shape == (1390,)
    assert float(average) == pytest.approx(float(np.mean(role_means.astype(np.float64))),
                                           rel=1e-6)
    assert float(average) == pytest.approx(37.24, abs=0.005)  # the comment's number
    assert epsilon == pytest.approx(1.0, abs=1e-3)
    assert stddev == pytest.approx(namespace["z"] * 60.0 / 1390)
    assert abs(float(value) - float(average)) < 5 * stddev
