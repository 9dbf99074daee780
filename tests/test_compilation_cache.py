"""`fedjax_sim.compilation_cache`: where the commands keep JAX's compiled programs."""

import json
import subprocess
import sys

import pytest

PROBE = ("import json, jax; from fedjax_sim.compilation_cache import enable_compilation_cache; "
         "folder = enable_compilation_cache(); print(json.dumps([str(folder) if folder else None, "
         "jax.config.jax_compilation_cache_dir]))")


def _probe(env_value, monkeypatch, tmp_path, extra=None):
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", env_value)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default folder lands under it
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for key, value in (extra or {}).items():
        monkeypatch.setenv(key, value)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", ["off", "0"])
def test_off_leaves_jax_without_a_cache(value, monkeypatch, tmp_path):
    assert _probe(value, monkeypatch, tmp_path) == [None, None]


def test_a_folder_in_the_variable_is_used(monkeypatch, tmp_path):
    folder = str(tmp_path / "cache")
    assert _probe(folder, monkeypatch, tmp_path) == [folder, folder]


def test_default_is_the_user_cache_folder(monkeypatch, tmp_path):
    folder, configured = _probe("", monkeypatch, tmp_path)
    assert folder == configured and folder.startswith(str(tmp_path))
    assert folder.endswith("fedjax_sim/jax")


def test_a_users_own_jax_cache_folder_is_kept(monkeypatch, tmp_path):
    own = str(tmp_path / "mine")
    assert _probe("", monkeypatch, tmp_path, {"JAX_COMPILATION_CACHE_DIR": own}) == [own, own]


def test_a_repeated_run_reads_its_programs_from_the_cache(tmp_path, monkeypatch):
    """Two runs of the same tiny demo with a fresh cache folder: the first writes the round
    step's program there, the second finds it (same entries, nothing new written)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", str(cache))
    command = [sys.executable, "-m", "fedjax_sim.cli", "demo", "rounds=1", "cohort.size=2",
               "client.local_steps=1", "model.hidden=8", "eval.every=1000",
               "eval.max_examples=50", "log.progress=false", "log.plot=false"]
    subprocess.run([*command, "--workdir", str(tmp_path / "a")], check=True,
                   capture_output=True)
    first = sorted(p.name for p in cache.iterdir())
    assert first  # programs that took long enough to compile were stored
    subprocess.run([*command, "--workdir", str(tmp_path / "b")], check=True,
                   capture_output=True)
    assert sorted(p.name for p in cache.iterdir()) == first
