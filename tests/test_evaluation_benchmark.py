"""benchmarks/fid.py end to end at its smallest size (slow: it builds and compiles the full InceptionV3)."""
import json

import jax
import pytest


@pytest.mark.slow
def test_fid_benchmark_reports_consistent_figures(tmp_path):
    from benchmarks import fid

    out = tmp_path / "fid.json"
    r = fid.main(["--num-samples", "6", "--batch-size", "2", "--image-size", "8", "--output", str(out)])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(r))
    command = "python -m benchmarks.fid --num-samples 6 --batch-size 2 --image-size 8 --output " + str(out)
    assert r["meta"]["command"] == command
    assert (r["num_samples"], r["batch_size"], r["protocol"], r["devices"]) == (6, 2, "tf", jax.device_count())
    assert r["images_per_s_total"] == pytest.approx(6 / r["wall_s"])
    assert r["images_per_s_steady"] == pytest.approx(2 / r["median_batch_s"])
    assert r["first_batch_s"] >= r["median_batch_s"] > 0  # the first batch compiles
    assert 0 <= r["fid_noise_vs_noise"] < 1.0 and r["max_rss_mib"] > 0
