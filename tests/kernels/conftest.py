"""Kernel tests run the Triton kernels through the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before biglearn_kernels.triton_attention is imported (it picks
interpreter or GPU mode at import); conftest files load before the tests of this folder.
With CUDA present the same tests run the compiled kernels instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
