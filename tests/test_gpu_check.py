"""scripts/gpu_check.sh plumbing on CPU (its dry mode), its summaries, and the CPU stand-ins of the
benchmark scripts it runs, without a GPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_decode_step  # noqa: E402
import bench_search_floor  # noqa: E402
from gpu_check_summary import RESULTS, results, summary, write  # noqa: E402
from cards import card_bytes_per_s, card_slug  # noqa: E402
from shapes import BY_NAME, JANUS_PRO_1B, build_model  # noqa: E402

RESULT_KEYS = ["card", "commit", "date", "search_10m_b1_x_floor", "search_10m_b16_x_floor", "search_1m_b16_x_floor",
               "search_peak_extra_mb_b16", "daid_10m_overlapped_overhead_b16", "faid_overhead_b16",
               "faid_overlapped_overhead_b16", "plain_vs_hf_generate_per_image", "ivfpq_100m_b16_ms", "gpu_check_wall_s", "compiled_suite"]


def test_dry_run_returns_few_files(tmp_path):
    """--dry on CPU: the CUDA build is skipped and recorded, the search benchmark runs its CPU cases and
    the tests stage one test, and $OUT ends with the archive, both summaries and the Triton cache part."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_STAGES": "search build tests",
           "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "summary.json").read_text())
    day = result["env"]["date"][:10]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["gpu_check.tar.gz", "summary.json", f"gpu-summary-cpu-{day}.json", "triton_cache.tgz.00"])
    assert result["ok"] and result["env"]["dry"] is True
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["search", "build", "tests"]
    assert stages["build"]["skipped"] == "dry run: needs CUDA"
    assert stages["tests"]["rc"] == 0 and stages["search"]["rc"] == 0 and not stages["tests"]["timed_out"]
    assert sum(s["limit_s"] for s in stages.values()) <= 300
    assert result["tests"]["tests"] == 1 and result["tests"]["failures"] == 0
    searches = [r for r in result["benchmarks"] if r["stage"] == "search"]
    assert [r["name"] for r in searches] == ["test_search_floor[cpu-b1-db20k]", "test_search_floor[cpu-b4-db100k]"]
    assert all(r["ms"] > 0 and "unavailable" in r["plan"] or "launches" in r["plan"] for r in searches)
    issue = json.loads((out / f"gpu-summary-cpu-{day}.json").read_text())
    assert list(issue) == RESULT_KEYS and issue["compiled_suite"] == {"passed": 1, "failed": 0}
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        archived = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "stages.jsonl", "tests.log", "tests.xml", "search.log", "search.jsonl"} <= archived


def test_stage_limits_fit_five_minutes():
    """The full (non-dry) stage list's limits add up to at most 280 s: with start-up and packing, 300 s."""
    text = (ROOT / "scripts/gpu_check.sh").read_text()
    limits = {}
    for line in text.splitlines():
        if line.startswith(("stage ", "bench ")):
            name, limit = line.split()[1:3]
            limits[name] = int(limit)
    assert list(limits) == ["decode-step", "search", "ivfpq", "generate", "build", "tests"]
    assert sum(limits.values()) <= 280, limits


def _work(tmp_path, stages, rows_by_stage, tests_xml=None, env=None):
    (tmp_path / "env.json").write_text(json.dumps(env or {"gpu": "NVIDIA H100 80GB HBM3", "dry": False,
                                                          "git_commit": "abc", "date": "2026-12-07T01:02:03"}))
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    for stage, rows in rows_by_stage.items():
        (tmp_path / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if tests_xml is not None:
        (tmp_path / "tests.xml").write_text(tests_xml)


def test_summary_reads_cut_off_stages(tmp_path):
    """A stage killed by its limit is not ok; a JSONL line cut off mid-write is ignored; pytest-benchmark
    rows are read from their extra_info."""
    stages = [{"stage": "tests", "limit_s": 55, "rc": 0, "seconds": 50, "timed_out": False},
              {"stage": "ivfpq", "limit_s": 25, "rc": 124, "seconds": 25, "timed_out": True}]
    row = {"name": "test_gpu_ivfpq[N100M-nlist800-triton-nprobe32]",
           "extra_info": {"median_s": 2e-3, "iqr_s": 1e-5, "nprobe": 32, "ratio_to_torch": 0.5, "gpu": "x"}}
    _work(tmp_path, stages, {})
    (tmp_path / "ivfpq.jsonl").write_text(json.dumps(row) + "\n" + '{"name": "test_gpu_ivfpq[cut')
    result = summary(tmp_path, 200.0)
    assert result["ok"] is False and result["tests"] is None and result["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert result["benchmarks"] == [{"stage": "ivfpq", "name": row["name"], "nprobe": 32, "median_s": 2e-3,
                                     "iqr_s": 1e-5, "ratio_to_torch": 0.5}]
    assert results(result)["ivfpq_100m_b16_ms"] == pytest.approx(2.0)


def test_results_format(tmp_path):
    """Every target of the issue's results format is read from its stage's row, in the right unit;
    rows that did not run give None."""
    stages = [{"stage": s, "limit_s": 10, "rc": 0, "seconds": 1, "timed_out": False}
              for s in ("decode-step", "generate", "search", "tests")]
    def row(name, **info):
        return {"name": name, "extra_info": info}

    rows = {
        "decode-step": [row("test_decode_step[b16-daid-10M-overlap]", overhead_vs_plain=0.021),
                        row("test_decode_step[b16-faid]", overhead_vs_plain=0.07),
                        row("test_decode_step[b16-faid-overlap]", overhead_vs_plain=0.06),
                        row("test_decode_step[b1-faid]", overhead_vs_plain=0.5)],
        "generate": [row("test_decode[janus-pro-1b-b16-cuda-graph-plain]", ratio_to_hf_generate=0.2)],
        "search": [row("test_search_floor[janus1b-b1-db10M]", x_floor=1.4),
                   row("test_search_floor[janus1b-b16-db10M]", x_floor=1.3, peak_extra_bytes=48 << 20),
                   row("test_search_floor[janus1b-b16-db1M]", x_floor=2.5)],
    }
    xml = ('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
           '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/>'
           '</testcase></testsuite></testsuites>')
    _work(tmp_path, stages, rows, xml)
    path = write(tmp_path, 280.0, tmp_path)
    assert path.name == "gpu-summary-h100-2026-12-07.json"
    out = json.loads(path.read_text())
    assert list(out) == RESULT_KEYS and set(RESULTS) <= set(out)
    assert out == {"card": "h100", "commit": "abc", "date": "2026-12-07", "search_10m_b1_x_floor": 1.4,
                   "search_10m_b16_x_floor": 1.3, "search_1m_b16_x_floor": 2.5, "search_peak_extra_mb_b16": 48.0,
                   "daid_10m_overlapped_overhead_b16": 0.021, "faid_overhead_b16": 0.07, "faid_overlapped_overhead_b16": 0.06,
                   "plain_vs_hf_generate_per_image": 0.2, "ivfpq_100m_b16_ms": None, "gpu_check_wall_s": 280.0,
                   "compiled_suite": {"passed": 2, "failed": 2}}
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True


def test_card_floors_by_device_name():
    assert card_bytes_per_s("NVIDIA H200") == 4.8e12 and card_slug("NVIDIA H200") == "h200"
    assert card_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12 and card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert card_bytes_per_s("NVIDIA H100 PCIe") == 2.0e12
    assert card_bytes_per_s("NVIDIA A100-SXM4-80GB") is None and card_slug(None) == "cpu"


def test_janus_pro_1b_shape_on_meta():
    """The benchmark model has Janus-Pro-1B's text model (16 heads x 128, FFN 5632, 24 layers) and image
    side (codebook 16384, 24 x 24); built with fill=False its parameters stay on the meta device."""
    model = build_model(JANUS_PRO_1B, "cpu", fill=False)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size) == (24, 2048, 16, 16, 128, 5632)
    layer = model.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (16 * 128, 2048) and layer.self_attn.k_proj.weight.shape == (2048, 2048)
    assert layer.mlp.gate_proj.weight.shape == (5632, 2048)
    assert model.config.vq_config.num_embeddings == 16384 and JANUS_PRO_1B.grid == 24
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in model.buffers())  # rotary frequencies are real


def test_parked_steps_replay_one_fixed_step():
    """Every variant's parked step (CPU: eager) predicts the same cell at each run, writing nowhere
    past it, and leaves its counters one step past the parked one."""
    model = build_model(bench_decode_step.TINY, "cpu")
    big = bench_decode_step.synthetic_db(model, 2000, "cpu")
    small = bench_decode_step.ak.PatchDatabase(big.keys[:1000], big.values[:1000], big.meta)
    steps = bench_decode_step.parked_steps(model, {"big": big, "small": small}, 2)
    assert list(steps) == list(bench_decode_step.VARIANTS)
    for name, step in steps.items():
        step.run(3)
        tokens, at = step.decoder.tokens, step.at
        assert (tokens[:, at] >= 0).all() and (tokens[:, at + 1:] == -1).all(), name
        assert int(step.decoder.step) == at + 1, name
    assert steps["faid"].decoder.faid is not None and steps["daid-20k-overlap"].decoder.daid is not None
    assert steps["plain"].decoder.daid is None and steps["plain"].decoder.faid is None


def test_search_plan_hook(monkeypatch):
    """Without ak.ops.knn_plan the row says why there is no plan; with it, the plan of the row's
    shape is recorded in JSON values."""
    shape = BY_NAME["janus1b-b16-db10M"]
    monkeypatch.delattr(bench_search_floor.ak_ops, "knn_plan", raising=False)
    assert "knn_plan" in bench_search_floor.search_plan(shape)["unavailable"]
    calls = []

    def fake_plan(n_keys, dim, k, batch, dtype, values=None):
        calls.append((n_keys, dim, k, batch, dtype, values))
        return {"launches": 4, "kernels": [{"name": "filter", "grid": (16, 132)}], "dtype": dtype}

    monkeypatch.setattr(bench_search_floor.ak_ops, "knn_plan", fake_plan, raising=False)
    plan = bench_search_floor.search_plan(shape)
    assert calls == [(10_000_000, 32, 2048, 16, torch.float16, torch.int64)]
    assert plan == {"launches": 4, "kernels": [{"name": "filter", "grid": [16, 132]}], "dtype": "torch.float16"}
    assert json.loads(json.dumps(plan)) == plan
