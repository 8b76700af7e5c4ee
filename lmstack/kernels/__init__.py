"""lmstack's C++ CPU kernels, their build-once cache and their Python wrappers (eager references beside them).

    from lmstack.kernels import use_skinny_linears_
    use_skinny_linears_(model)     # decoding streams weights at the memory bandwidth; same tokens

- ``build``: compile once per machine into a verified cache (``load_cpu_kernels``).
- ``skinny_linear``: ``SkinnyLinear`` (nn.Linear for 1-8 rows) and ``use_skinny_linears_``.
- ``fused_step``: a whole decoding step of a Decoder as one C++ call, and when it applies.
"""

from lmstack.kernels.build import load_cpu_kernels
from lmstack.kernels.skinny_linear import MAX_ROWS, SkinnyLinear, use_skinny_linears_
from lmstack.nn.memory import move_to_hugepages_

__all__ = ["MAX_ROWS", "SkinnyLinear", "load_cpu_kernels", "move_to_hugepages_", "use_skinny_linears_"]
