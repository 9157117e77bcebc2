"""Suite-wide setup. On a machine without CUDA, Triton kernels run through Triton's interpreter.

``TRITON_INTERPRET`` is read by ``triton.jit`` when a function is decorated, so it must be set
before any test module (of any tier) imports ``rayfleet.kernels`` and with it the Triton modules:
this root conftest is loaded before every test module is collected.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
