"""The top-k oracle itself: it accepts every correct result (ids swapped among equal distances, the
(k+1)-th tied with the k-th) and rejects each kind of wrong one."""

import pytest
import torch

from .oracles import FLT_MAX, admissible, assert_topk, candidate_distances, exact_distances, recall, tie_order

# one query, keys at squared distances 0, 1, 1, 4, 9 from it (ids 1 and 2 tie; so do the k = 2 boundary ids)
KEYS = torch.tensor([[0.0], [1.0], [-1.0], [2.0], [3.0]])
QUERY = torch.zeros(1, 1)
TRUTH = exact_distances(QUERY, KEYS)


def _result(dist, ids):
    return torch.tensor([dist], dtype=torch.float32), torch.tensor([ids])


@pytest.mark.parametrize("dist,ids", [([0, 1, 1], [0, 1, 2]), ([0, 1, 1], [0, 2, 1]), ([0, 1], [0, 2])],
                         ids=["id-order", "tie-swapped", "kth-tie"])
def test_accepts_correct_results(dist, ids):
    assert_topk(*_result(dist, ids), TRUTH, atol=0, rtol=0)


@pytest.mark.parametrize("dist,ids,message", [
    ([0, 1, 4], [0, 1, 3], "differ from the true k smallest"),  # skipped a nearer id
    ([0, 1, 1], [0, 1, 3], "not at their reported distance"),  # right distances, wrong id
    ([0, 1, 1], [0, 1, 1], "twice"),
    ([0, 1, 1], [0, 1, 7], "outside"),
    ([0, 1, 1.001], [0, 1, 2], "differ from the true k smallest"),
    ([0, 1, 1], [0, 1, -1], "padding"),
], ids=["skipped-nearer", "wrong-id", "duplicate", "out-of-range", "distance-error", "bogus-padding"])
def test_rejects_wrong_results(dist, ids, message):
    with pytest.raises(AssertionError, match=message):
        assert_topk(*_result(dist, ids), TRUTH, atol=1e-6, rtol=0)


def test_unwritten_nan_output_fails():
    """A NaN-poisoned distance the kernel forgot to write is an error, never a match."""
    dist, ids = _result([0, 1, float("nan")], [0, 1, 2])
    with pytest.raises(AssertionError, match="differ from the true k smallest"):
        assert_topk(dist, ids, TRUTH, atol=1e-3, rtol=1e-3)


def test_candidate_tables_and_padding():
    """An approximate search's truth: only its candidates (ids 3 and 0 here); beyond them, padding."""
    truth = candidate_distances(torch.tensor([[4.0, 0.0, 5.0]]), torch.tensor([[3, 0, -1]]), 5)
    assert truth[0, 1].isnan() and truth[0, 3] == 4.0
    assert_topk(*_result([0, 4, FLT_MAX], [0, 3, -1]), truth, atol=0, rtol=0)
    with pytest.raises(AssertionError, match="padding"):
        assert_topk(*_result([0, 4, 4], [0, 3, 3]), truth, atol=0, rtol=0)
    assert [t.tolist() for t in tie_order(truth, 3)] == [[[0.0, 4.0, FLT_MAX]], [[0, 3, -1]]]


def test_tie_aware_recall():
    assert admissible(TRUTH, 2)[0].tolist() == [True, True, True, False, False]  # id 2 ties with the 2nd
    assert recall(torch.tensor([[0, 2]]), TRUTH) == 1.0
    assert recall(torch.tensor([[0, 3]]), TRUTH) == 0.5
    assert recall(torch.tensor([[0, -1]]), TRUTH) == 0.5
