"""XLA:CPU flags that must be set before JAX starts its backend.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` keeps XLA:CPU from routing
each convolution through its YNN fusion path, which measured 1.5x slower for the EMNIST CNN's
training step here (0.69 s -> 0.44 s per round). A user's own setting of that option wins;
``FEDJAX_SIM_KEEP_XLA_FLAGS=1`` turns this off.
"""

import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def configure() -> None:
    if os.environ.get("FEDJAX_SIM_KEEP_XLA_FLAGS"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONV_FLAG}".strip()
