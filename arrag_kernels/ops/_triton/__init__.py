"""Triton backend of the ops: importing this package registers a "triton" implementation in each
op's dispatcher and the ``arrag_kernels::*_triton`` torch.library ops.

Raises ImportError when triton is missing; :mod:`arrag_kernels.ops` catches it, so the package
works without triton and a forced "triton" backend reports that it is not implemented.
"""

import triton  # noqa: F401  fail early, before any kernel module is half-imported

from . import daid, faid, ivfpq, knn, neighborhood  # noqa: F401,E402
