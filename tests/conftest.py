# ruff: noqa: I001  (the import order sets XLA flags before JAX starts)
"""Test-wide set-up: 8 fake CPU devices (sharding tests) before JAX starts; the real-data gate."""

import os

# XLA:CPU's legacy fusion emitters: the suite is mostly compilation of small programs, and they
# compile its kernels (threefry draws above all) faster (trial runs) than the default MLIR fusion
# emitters, with the same bits (the CNN, logistic and char-LSTM rounds compared bit for bit)
# but slower LSTM kernels at run time, so only the tests use them (subprocesses inherit this).
# FEDJAX_SIM_TEST_FUSION_EMITTERS=default keeps XLA's default.
_FAST_COMPILE = ("" if os.environ.get("FEDJAX_SIM_TEST_FUSION_EMITTERS") == "default"
                 else " --xla_cpu_use_fusion_emitters=false")
# LLVM at -O1 instead of XLA's default level 3: it compiles faster. Unlike the emitters this
# changes results by rounding: every test compares against a reference
# within a tolerance or two programs compiled under the same flags, `tests/test_fusion_emitters.py`
# compiles its rounds at level 3 (`helpers.USERS_BACKEND_OPT`, what users run) and bounds the
# level-1 difference.
# And one LLVM module a program, not split for parallel code generation: the suite's two
# workers already keep both cores busy (same bits). `benchmarks/suite_time.py` times the suite
# with and without both (README, Tests).
# FEDJAX_SIM_TEST_BACKEND_OPT=default keeps XLA's defaults for both.
_FAST_LLVM = ("" if os.environ.get("FEDJAX_SIM_TEST_BACKEND_OPT") == "default"
              else " --xla_backend_optimization_level=1 --xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _FAST_COMPILE
    + _FAST_LLVM
).strip()

import pytest  # noqa: E402

# helpers imports fedjax_sim, which adds the XLA:CPU conv flag before jax initializes
from helpers import MISSING_DATA, SHARED_DATA, require_shared_data  # noqa: E402

import fedjax_sim  # noqa: E402,F401

import jax  # noqa: E402  (after fedjax_sim: its XLA flags come first)

# Tests build the same small programs again and again (the same round on tiny data under
# several algorithms, aggregators and checks): JAX's persistent compilation cache compiles each
# once per run (keys hash the program, jax version and flags, so a stale entry never matches).
# FEDJAX_SIM_TEST_JAX_CACHE=off turns it off.
_CACHE = os.environ.get("FEDJAX_SIM_TEST_JAX_CACHE",
                        os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
# Commands the tests start as subprocesses use the same folder (never the user's cache).
os.environ["FEDJAX_SIM_COMPILATION_CACHE"] = "off" if _CACHE == "off" else os.path.abspath(_CACHE)
if _CACHE != "off":
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shared_data(*paths): needs these files under the real-data folder "
        "(helpers.needs_shared_data); skips without them, fails under CI=true")


@pytest.hookimpl(tryfirst=True)  # before fixtures are set up
def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        require_shared_data(*mark.args)


def pytest_terminal_summary(terminalreporter):
    """Says loudly, at the end, how many tests did not run for want of real data."""
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if MISSING_DATA in str(report.longrepr)]
    if skipped:
        terminalreporter.section("real data missing", sep="!", red=True, bold=True)
        terminalreporter.line(
            f"{len(skipped)} tests did not run: their data is not in {SHARED_DATA}. Set "
            f"FEDJAX_SIM_DATA to the data folder (or put it at ../shared/data beside the "
            f"repository); under CI=true these tests fail instead.", red=True)
