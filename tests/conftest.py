"""Test-session settings.

The suite is thousands of tiny tensor operations; on a 2-core CI machine intra-op
threading costs more than it gains for them, so tests run single-threaded.
"""

import torch

torch.set_num_threads(1)
