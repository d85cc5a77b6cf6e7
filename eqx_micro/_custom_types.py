from typing import Any, TypeAlias

import numpy as np
from jaxtyping import Array, ArrayLike, Int


# A static size (a Python or NumPy integer).
StaticInt: TypeAlias = int | np.integer
# A number of microbatches that may be known only at run time.
MicrobatchCount: TypeAlias = int | Int[Array, ""]
# A microbatch index inside the loop: traced in the loop, concrete outside it.
MicrobatchIndex: TypeAlias = int | Int[ArrayLike, ""]
# An axis specification for one argument: an int, `None`, or a PyTree prefix of them.
AxisSpec: TypeAlias = Any
DType: TypeAlias = Any
