"""scripts/daid_sweep.py: its cached-hits sweep (one search per batch and k) scores exactly as image_nll."""

import importlib.util
from pathlib import Path

import torch

from arrag_kernels.config import DAiDConfig
from arrag_kernels.eval.nll import image_nll
from arrag_kernels.models import tiny_prompt_ids

_spec = importlib.util.spec_from_file_location("daid_sweep", Path(__file__).parents[1] / "scripts" / "daid_sweep.py")
daid_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(daid_sweep)


def test_cached_hits_sweep_equals_image_nll(tiny_model, tiny_db):
    prompts = tiny_prompt_ids(3, length=7, seed=5)
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2))
    cells = [(0.5, 0.02, "nearest", 4), (0.3, 0.6, "sum", 4), (0.5, 0.05, "sum", 16), (0.2, 1.2, "nearest", 16)]
    got = daid_sweep.sweep_nll(tiny_model, tiny_db, prompts, tokens, {None: cells, 5.0: cells[2:]}, batch_size=2)
    for scale, cs in ((None, cells), (5.0, cells[2:])):
        plain = image_nll(tiny_model, prompts, tokens, guidance_scale=scale)
        torch.testing.assert_close(got[scale]["plain"], plain.nll, rtol=0, atol=0)
        for lam, tau, dedup, k in cs:
            want = image_nll(tiny_model, prompts, tokens, tiny_db, DAiDConfig(lam=lam, tau=tau, k=k, dedup=dedup),
                             guidance_scale=scale, batch_size=2)
            assert not torch.equal(want.nll, plain.nll)  # the merge changes the scores
            torch.testing.assert_close(got[scale][(lam, tau, dedup, k)], want.nll, rtol=0, atol=0)
