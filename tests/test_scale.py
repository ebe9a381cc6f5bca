"""A database of the official layout built in parts by separate processes, merged on disk and kept as
shards, searched with the hits of a one-piece index; every process's peak memory measured
(tests/scale_build.py runs the steps).

The default suite runs the small version (40K entries, 4 parts); ``pytest -m scale tests/test_scale.py``
runs 50M entries in 16 parts (nlist 1024; see the README "Scale" passage for its time; 3 GB of disk), which the
README's "Scale" passage reports.
"""

import pytest

pytest.importorskip("faiss")

from tests import scale_build as sb  # noqa: E402


def test_small_scale_pipeline(tmp_path):
    stats = sb.run(sb.SMALL, tmp_path)
    sb.check_hits(sb.SMALL, tmp_path)
    assert {f"part-{r}" for r in range(sb.SMALL.parts)} <= set(stats)
    assert sum(stats[f"part-{r}"]["entries"] for r in range(sb.SMALL.parts)) == sb.SMALL.entries
    assert all(s["peak_rss_bytes"] > 0 and s["seconds"] > 0 for s in sb.bounded_steps(stats).values())


@pytest.mark.scale
def test_50m_entries_in_16_parts(tmp_path):
    stats = sb.run(sb.LARGE, tmp_path)
    sb.check_hits(sb.LARGE, tmp_path)
    report = sb.memory_report(sb.LARGE, stats)
    assert report["over_bounds"] == {}, report
