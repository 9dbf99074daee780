"""`fedjax_sim.compilation_cache`: where the commands keep JAX's compiled programs."""

import subprocess
import sys

import jax
import pytest

from fedjax_sim.compilation_cache import MIN_COMPILE_SECONDS, enable_compilation_cache


@pytest.fixture
def no_cache_configured(monkeypatch, tmp_path):
    """JAX's cache settings cleared for the test (the suite's own restored after it); the
    default folder lands under ``tmp_path``."""
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_off_leaves_jax_without_a_cache(value, monkeypatch, no_cache_configured):
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", value)
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_folder_in_the_variable_is_used(monkeypatch, tmp_path, no_cache_configured):
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", str(tmp_path / "cache"))
    assert enable_compilation_cache() == tmp_path / "cache"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == MIN_COMPILE_SECONDS


def test_default_is_the_user_cache_folder(monkeypatch, tmp_path, no_cache_configured):
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", "")
    folder = enable_compilation_cache()
    assert str(folder) == jax.config.jax_compilation_cache_dir
    assert str(folder).startswith(str(tmp_path)) and folder.parts[-2:] == ("fedjax_sim", "jax")


def test_a_folder_set_in_jax_is_kept(monkeypatch, tmp_path, no_cache_configured):
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert enable_compilation_cache() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_a_repeated_run_reads_its_programs_from_the_cache(tmp_path, monkeypatch):
    """Two runs of the same tiny demo with a fresh cache folder: the first writes the round
    step's program there, the second finds it (its entry is not written again). Programs whose
    compile time is near the cache's threshold (MIN_COMPILE_SECONDS) may be stored by either
    run, so only the round step's entry is compared."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", str(cache))
    command = [sys.executable, "-m", "fedjax_sim.cli", "demo", "rounds=1", "cohort.size=2",
               "client.local_steps=1", "model.hidden=8", "eval.every=1000",
               "eval.max_examples=50", "log.progress=false", "log.plot=false"]
    subprocess.run([*command, "--workdir", str(tmp_path / "a")], check=True,
                   capture_output=True)
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    rounds = sorted(name for name in first if name.startswith("jit_round_fn"))
    assert len(rounds) == 1  # the round step took long enough to compile to be stored
    subprocess.run([*command, "--workdir", str(tmp_path / "b")], check=True,
                   capture_output=True)
    second = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(name for name in second if name.startswith("jit_round_fn")) == rounds
    assert all(second[name] == first[name] for name in first)  # nothing rewritten
