"""A query and two rows whose exact similarities (1 and 1 + 2^-24) differ by half a float32 step: a float32
product rounds the second to 1 as well (to even), and which of the two then comes first is up to the BLAS
kernel the CPU picks."""

import numpy as np

QUERY = np.array([[1.0, 2.0**-24]], dtype=np.float32)
ROWS = np.array([[1.0, 0.0], [1.0 - 2.0**-24, 2.0]], dtype=np.float32)  # row 1 is the nearer
