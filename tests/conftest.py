"""Parallel runs (``python -m pytest -n auto``, pytest-xdist): each worker computes on one thread, and so do the
commands and notebook kernels it starts, so that the workers share the cores instead of oversubscribing them."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is first imported, here or in a subprocess
    import torch

    torch.set_num_threads(1)
