"""Test set-up shared by every test module.

Triton kernels run on the CPU through the interpreter, which must be switched on before any
``@triton.jit`` function is defined, so this happens here, before arrag_kernels is imported.
On a CUDA machine the kernels are compiled instead (the interpreter is broken there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from arrag_kernels.models import tiny_janus  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_model():
    """8 x 8 grid, 512 codes, 2 layers, hidden 64: generates an image in ~0.1 s on CPU."""
    return tiny_janus(seed=0)


@pytest.fixture(scope="session")
def tiny_images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(24, 3, 32, 32, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def tiny_db(tiny_model, tiny_images):
    """A flat database of the first 4 tiny images (4 x 42 = 168 entries); tests must not modify it."""
    import arrag_kernels as ak

    return ak.PatchDatabase.build(tiny_images[:4], tiny_model, progress=False)
