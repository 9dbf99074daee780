"""JAX's persistent compilation cache for the ``fedjax-sim`` commands.

A run compiles its round step, its evaluators and its model's initialization; the next run of
the same configuration compiles the same programs again. JAX can keep compiled programs on disk
(``jax_compilation_cache_dir``; an entry's key hashes the program, the jax and XLA versions,
the flags and the device, so a stale entry never matches), and then a repeated run's first round
costs a cache read instead of a compilation.

``fedjax-sim run``/``demo``/``sweep``/``analytics`` turn it on (the Python API leaves JAX's
settings to you), in ``FEDJAX_SIM_COMPILATION_CACHE`` when that is set to a folder, else in
``<user cache folder>/fedjax_sim/jax``; ``FEDJAX_SIM_COMPILATION_CACHE=off`` turns it off, and a
cache folder you set yourself (``jax_compilation_cache_dir``, ``JAX_COMPILATION_CACHE_DIR``) is
left as it is. Programs that compile in under `MIN_COMPILE_SECONDS` are not stored.
"""

from __future__ import annotations

import os
from pathlib import Path

MIN_COMPILE_SECONDS = 0.3
OFF = ("off", "0", "false", "no")


def enable_compilation_cache() -> Path | None:
    """Turns JAX's persistent compilation cache on (see the module docstring); returns its
    folder, or None when it is off."""
    import jax

    setting = os.environ.get("FEDJAX_SIM_COMPILATION_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own choice
        return Path(jax.config.jax_compilation_cache_dir)
    if setting:
        folder = Path(setting).expanduser()
    else:
        import platformdirs

        folder = Path(platformdirs.user_cache_dir("fedjax_sim")) / "jax"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
