"""Config objects check their field types on construction and normalise valid numbers (issue 14:
each test pins a failure reported against an earlier version, named in its docstring)."""

import numpy as np
import pytest

import arrag_kernels as ak
from arrag_kernels.faid import FAiDConfig


@pytest.mark.parametrize("make, message", [
    (lambda: ak.DAiDConfig(k=2.5), "DAiDConfig.k: expected an int, got float 2.5"),
    (lambda: ak.DAiDConfig(k="16"), "DAiDConfig.k: expected an int, got str '16'"),
    (lambda: ak.DAiDConfig(lam="0.5"), "DAiDConfig.lam: expected a number, got str '0.5'"),
    (lambda: ak.DAiDConfig(tau=None), "DAiDConfig.tau: expected a number, got NoneType"),
    (lambda: FAiDConfig(hops=1.5), r"FAiDConfig.hops: expected an int, an iterable of ints or digits like '12', got 1.5"),
    (lambda: FAiDConfig(k=True), "FAiDConfig.k: expected an int, got bool"),
    (lambda: ak.KeyLayout(hops=[1, 2.0]), "hops: expected an int"),
], ids=["k-float", "k-str", "lam-str", "tau-none", "hops-float", "faid-k-bool", "layout-hops-float"])
def test_configs_check_types_on_construction(make, message):
    """Used to be accepted (failing 19 frames deep in generate) or to say "'float' object is not iterable"."""
    with pytest.raises(TypeError, match=message):
        make()


def test_configs_normalise_valid_numbers():
    cfg = ak.DAiDConfig(lam=np.float32(0.25), tau=1, k=np.int64(16))
    assert (cfg.lam, cfg.tau, cfg.k) == (0.25, 1.0, 16) and type(cfg.k) is int and type(cfg.lam) is float
    assert FAiDConfig(hops="12").hops == (1, 2) and FAiDConfig(hops=np.int64(2)).hops == (2,)
