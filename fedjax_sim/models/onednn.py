"""2-D convolutions by oneDNN on XLA:CPU: `onednn_conv`, a drop-in for `canonical_conv`.

Why: XLA:CPU runs convolutions with Eigen's kernels. On the EMNIST CNN's second convolution
(``[20, 26, 26, 32] -> [20, 24, 24, 64]``, 3x3) they reach 50-90% of the machine's f32 matmul
peak, and the weight gradient (a convolution with a 24x24 window) far less, while Intel's oneDNN
(the library PyTorch's CPU convolutions use) runs all three at about the peak
(`benchmarks/cnn_step.py --onednn-python`). This module calls oneDNN's convolution primitives
from inside the jitted round as XLA FFI custom calls (`jax.ffi`), in the activations' own NHWC
layout, with a `custom_vjp` whose gradients are oneDNN's backward-data and backward-weights
primitives. Nothing leaves the compiled program: no host round trip, no Python per call.

Where it comes from: oneDNN is the ``onednn-cpu-gomp`` wheel (``libdnnl.so``, GNU OpenMP) and
its headers ``onednn-devel-cpu-gomp`` (the ``onednn`` extra: ``pip install -e '.[onednn]'``; the
``test`` extra has it too). The custom calls are ``_onednn_conv.cc``, compiled on first use with
the system's C++ compiler (``$CXX``, default ``g++``; 5-10 s) against jaxlib's FFI headers
into ``$FEDJAX_SIM_ONEDNN_CACHE`` (default ``<user cache folder>/fedjax_sim/onednn``), one
library per source, jaxlib, oneDNN version and compiler command, reused afterwards.
`available` says whether that worked; `unavailable_reason` says why not.

What it supports: float32 NHWC/HWIO convolutions as `canonical_conv` does (any strides,
'SAME'/'VALID'/explicit padding up to ``kernel - 1``, no dilation, one group) on the CPU.
Everything else, and every other backend (`jax.lax.platform_dependent`), falls back to
`canonical_conv`. Under `jax.vmap` (the ``vmap`` client map) each mapped element is one custom
call (``vmap_method="sequential"``).

Threads: oneDNN runs each call on its own OpenMP team (all cores by default, ``OMP_NUM_THREADS``
to change). With one XLA:CPU device per core (``execution.num_devices: auto``) the devices call
it at once and their teams share the cores: that layout gains nothing from oneDNN here.

Results: the same convolution as XLA's up to float32 rounding (a different summation order:
relative differences of about 1e-6, tested against `lax.conv_general_dilated` and its autodiff
gradients).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.models.conv import _NHWC, canonical_conv, nhwc_geometry

_SOURCE = pathlib.Path(__file__).with_name("_onednn_conv.cc")
_TARGETS = {
    "fedjax_sim_onednn_conv_forward": "FedjaxOnednnConvForward",
    "fedjax_sim_onednn_conv_backward_data": "FedjaxOnednnConvBackwardData",
    "fedjax_sim_onednn_conv_backward_weights": "FedjaxOnednnConvBackwardWeights",
}


def _onednn_prefix() -> pathlib.Path | None:
    """The installation prefix whose ``lib/libdnnl.so`` and ``include/oneapi/dnnl`` exist."""
    candidates = [sys.prefix, sysconfig.get_paths()["data"], os.environ.get("DNNLROOT")]
    for prefix in candidates:
        if prefix and (pathlib.Path(prefix) / "include/oneapi/dnnl/dnnl.hpp").is_file() and \
                (pathlib.Path(prefix) / "lib/libdnnl.so").exists():
            return pathlib.Path(prefix)
    return None


def _cache_dir() -> pathlib.Path:
    if os.environ.get("FEDJAX_SIM_ONEDNN_CACHE"):
        return pathlib.Path(os.environ["FEDJAX_SIM_ONEDNN_CACHE"]).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("fedjax_sim")) / "onednn"


@functools.cache
def _load() -> tuple[bool, str]:
    """Compiles (once per source, jaxlib and oneDNN) and registers the custom calls."""
    prefix = _onednn_prefix()
    if prefix is None:
        return False, ("oneDNN is not installed (pip install onednn-cpu-gomp "
                       "onednn-devel-cpu-gomp, or fedjax_sim's 'onednn' extra)")
    import jaxlib

    compiler = os.environ.get("CXX", "g++")
    flags = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
             f"-I{prefix / 'include'}", f"-L{prefix / 'lib'}", "-ldnnl",
             f"-Wl,-rpath,{prefix / 'lib'}"]
    version = (prefix / "include/oneapi/dnnl/dnnl_version.h").read_bytes()
    digest = hashlib.sha256(_SOURCE.read_bytes() + jaxlib.__version__.encode() + version
                            + " ".join(flags).encode()).hexdigest()[:16]
    library = _cache_dir() / f"onednn_conv_{digest}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        command = [*flags[:1], str(_SOURCE), "-o", str(partial), *flags[1:]]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            return False, f"cannot run the C++ compiler {compiler!r}: {error}"
        if done.returncode != 0:
            return False, f"compiling {_SOURCE.name} failed: {done.stderr.strip()[-2000:]}"
        os.replace(partial, library)
    try:
        lib = ctypes.cdll.LoadLibrary(str(library))
    except OSError as error:
        return False, f"cannot load {library}: {error}"
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return True, ""


def available() -> bool:
    """Whether oneDNN's convolutions can run here (compiling them on the first call)."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `available` is False ('' when it is True)."""
    return _load()[1]


def onednn_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` computed by oneDNN on the CPU (see the module docstring).

    Same signature and result (up to float32 rounding) as `canonical_conv`, which it falls back
    to for anything but a float32 NHWC/HWIO convolution it supports, on other backends, and when
    oneDNN is not `available`.

    Example:
      >>> conv = flax.linen.Conv(32, (3, 3), conv_general_dilated=onednn_conv)
    """
    fallback = functools.partial(
        canonical_conv, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
    geometry = None
    if out_sharding is None and lhs.dtype == rhs.dtype == jnp.float32:
        geometry = _reached(lhs.shape, rhs.shape, nhwc_geometry(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, preferred_element_type))
    if geometry is None or not available():
        return fallback()
    strides, pads = geometry
    return lax.platform_dependent(
        lhs, rhs,
        cpu=lambda x, w: _conv(x, w, strides, pads),
        default=lambda x, w: canonical_conv(x, w, strides, pads, dimension_numbers=_NHWC,
                                            precision=precision))


def _reached(lhs_shape, rhs_shape, geometry):
    """``geometry`` (`nhwc_geometry`'s, or None) with each high padding cut to what the last
    window reaches, oneDNN's rule (the rows past it are never read: the same convolution);
    None where a dimension has no window or input rows past its last window."""
    if geometry is None:
        return None
    strides, pads = geometry
    reached = []
    for (lo, hi), k, n, s in zip(pads, rhs_shape[:2], lhs_shape[1:3], strides, strict=True):
        out = (n + lo + hi - k) // s + 1
        high = (out - 1) * s + k - n - lo
        if out < 1 or high < 0:
            return None
        reached.append((lo, high))
    return strides, tuple(reached)


def _attributes(strides, pads) -> dict:
    return {"sh": np.int64(strides[0]), "sw": np.int64(strides[1]),
            "ph0": np.int64(pads[0][0]), "pw0": np.int64(pads[1][0]),
            "ph1": np.int64(pads[0][1]), "pw1": np.int64(pads[1][1])}


def _output_shape(lhs_shape, rhs_shape, strides, pads):
    out = [(n + lo + hi - k) // s + 1
           for (lo, hi), k, n, s in zip(pads, rhs_shape[:2], lhs_shape[1:3], strides, strict=True)]
    return (lhs_shape[0], *out, rhs_shape[3])


def _call(target, out_shape, *operands, attributes):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(*operands, **attributes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(lhs, rhs, strides, pads):
    attributes = _attributes(strides, pads)
    return _call("fedjax_sim_onednn_conv_forward",
                 _output_shape(lhs.shape, rhs.shape, strides, pads), lhs, rhs,
                 attributes=attributes)


def _conv_fwd(lhs, rhs, strides, pads):
    return _conv(lhs, rhs, strides, pads), (lhs, rhs)


def _conv_bwd(strides, pads, residuals, out_grad):
    lhs, rhs = residuals
    attributes = _attributes(strides, pads)
    lhs_grad = _call("fedjax_sim_onednn_conv_backward_data", lhs.shape, out_grad, rhs,
                     attributes=attributes)
    rhs_grad = _call("fedjax_sim_onednn_conv_backward_weights", rhs.shape, lhs, out_grad,
                     attributes=attributes)
    return lhs_grad, rhs_grad


_conv.defvjp(_conv_fwd, _conv_bwd)
