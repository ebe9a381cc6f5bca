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
import decode_step  # noqa: E402
import search_floor  # noqa: E402
from gpu_check_summary import RESULTS, results, summary, write  # noqa: E402
from shapes import JANUS_PRO_1B, build_model, card_bytes_per_s, card_slug  # noqa: E402

RESULT_KEYS = ["card", "commit", "date", "search_10m_b1_x_floor", "search_10m_b16_x_floor", "search_1m_b16_x_floor",
               "search_peak_extra_mb_b16", "daid_10m_overlapped_overhead_b16", "faid_overhead_b16",
               "plain_vs_hf_generate_per_image", "ivfpq_100m_b16_ms", "gpu_check_wall_s", "compiled_suite"]


def test_dry_run_returns_few_files(tmp_path):
    """--dry on CPU: the CUDA build is skipped and recorded, the search and tests stages run on their
    CPU stand-ins, and $OUT ends with the archive, both summaries and the Triton cache part."""
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
    assert [r["name"] for r in searches] == ["search-20k-b1", "search-20k-b4"] and all(r["ms"] > 0 for r in searches)
    issue = json.loads((out / f"gpu-summary-cpu-{day}.json").read_text())
    assert list(issue) == RESULT_KEYS and issue["compiled_suite"] == {"passed": 1, "failed": 0}
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        archived = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "stages.jsonl", "tests.log", "tests.xml", "search.log", "search.jsonl",
            "search-profile.txt"} <= archived


def test_stage_limits_fit_five_minutes():
    """The full (non-dry) stage list's limits add up to at most 280 s: with start-up and packing, 300 s."""
    text = (ROOT / "scripts/gpu_check.sh").read_text()
    limits = {}
    for line in text.splitlines():
        if line.startswith("stage ") and not line.startswith("stage()"):
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
    stages = [{"stage": "tests", "limit_s": 60, "rc": 0, "seconds": 50, "timed_out": False},
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
    rows = {
        "decode-step": [{"name": "b16-daid-10M-overlap", "overhead_vs_plain": 0.021},
                        {"name": "b16-faid", "overhead_vs_plain": 0.07},
                        {"name": "b1-faid", "overhead_vs_plain": 0.5}],
        "generate": [{"name": "b16-generate", "plain_vs_hf_generate_per_image": 0.2}],
        "search": [{"name": "search-10M-b1", "x_floor": 1.4}, {"name": "search-10M-b16", "x_floor": 1.3,
                                                               "peak_extra_bytes": 48 << 20},
                   {"name": "search-1M-b16", "x_floor": 2.5}],
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
                   "daid_10m_overlapped_overhead_b16": 0.021, "faid_overhead_b16": 0.07,
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


def test_decode_step_dry_rows(tmp_path):
    """decode_step.py's CPU stand-in: every variant's row, overheads against plain, in one file."""
    jsonl = tmp_path / "rows.jsonl"
    assert decode_step.main(["--dry", "--only", "step", "--batches", "1", "--rounds", "2", "--replays", "1",
                             "--jsonl", str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["plain", "plain-again", "daid-20k", "daid-20k-overlap", "daid-10k-overlap",
                                            "faid"]
    assert all(r["ms_per_step"] > 0 and r["batch"] == 1 for r in rows)
    assert "overhead_vs_plain" not in rows[0] and all("overhead_vs_plain" in r for r in rows[1:])
    assert [r["db_keys"] for r in rows] == [0, 0, 20_000, 20_000, 10_000, 20_000]


def test_decode_step_replays_one_fixed_step():
    """A parked variant's replay predicts the same cell every time, writing nowhere past it."""
    model = build_model(decode_step.TINY, "cpu")
    adapter = decode_step.get_adapter(model)
    embeds, mask = decode_step._embeds(adapter, model, 2, torch.device("cpu"))
    variant = decode_step.StepVariant("plain", adapter, embeds, mask, num_tokens=64, at=36, cuda_graph=False)
    variant.timed(3)
    tokens = variant.decoder.tokens
    assert (tokens[:, 36] >= 0).all() and (tokens[:, 37:] == -1).all()
    assert int(variant.decoder.step) == 37  # one step past the parked one, whatever the replays


def test_search_plan_hook():
    """Without ak.ops.knn_plan the row says so; with it, its dict is recorded."""
    plan = search_floor.search_plan(1000, 64, 4, torch.float16)
    if hasattr(search_floor.ak_ops, "knn_plan"):
        assert "launches" in plan
    else:
        assert "knn_plan" in plan["unavailable"]
