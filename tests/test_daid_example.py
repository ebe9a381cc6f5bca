"""examples/llamagen_daid.py: DAiD added to a standalone LlamaGen-style loop through the public API."""

import importlib.util
from pathlib import Path

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.retrieval.query import Retriever

_spec = importlib.util.spec_from_file_location(
    "llamagen_daid", Path(__file__).resolve().parents[1] / "examples" / "llamagen_daid.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = example.TinyClassGPT(codebook_size=64, grid=(5, 6)).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 8, generator=g), torch.randint(0, 64, (20, 5, 6), generator=g)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_lam_zero_keeps_the_loops_tokens(parts, backend):
    model, codebook, train = parts
    labels = torch.tensor([0, 3, 7])
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=2)
    plain = example.sample(model, labels, **kw)
    with ak.use_backend(backend):
        ours = example.sample(model, labels, daid=example.DAiD(train, codebook, lam=0.0, k=8), **kw)
    assert torch.equal(ours, plain) and not torch.equal(plain[0], plain[1])


def test_lam_one_draws_retrieved_tokens(parts):
    model, codebook, train = parts
    daid = example.DAiD(train, codebook, lam=1.0, k=4)
    tokens = example.sample(model, torch.tensor([1, 2]), top_k=10, daid=daid)
    meta = daid.db.meta
    steps = ak.ops.retrieval_positions(meta.grid, meta.layout).nonzero().flatten().tolist()
    retriever = Retriever(daid.db, 4, daid.codebook)  # the library's query of the example's database
    for step in steps:
        prefix = tokens.clone()
        prefix[:, step:] = -1
        _, hits, _ = retriever.retrieve(prefix, step)
        for b in range(2):
            assert tokens[b, step].item() in hits[b].tolist(), f"image {b} step {step}"
    assert len(steps) == 4 * 4


def test_main_runs(capsys):
    example.main()
    assert "tokens changed by DAiD" in capsys.readouterr().out
