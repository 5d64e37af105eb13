"""The benchmark suite (benchmarks/run.py) end to end on its smallest path: a tiny MLP on 2-D data."""
import json
import os
import statistics

import jax
import pytest

from benchmarks import run as bench_run
from benchmarks.common import peak_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config", os.path.join(REPO, "configs", "toy2d.py"),
    "--config.model.hidden=256", "--config.training.batch_size=64",
    "--repeats", "5", "--steps-per-repeat", "1", "--compile-repeats", "0",
    "--sampler-steps", "4", "--stall-steps", "3",
]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--output", str(out / "r.json"), "--markdown", str(out / "r.md")]
    returned = bench_run.main(argv)
    with open(out / "r.json") as f:
        saved = json.load(f)
    with open(out / "r.md") as f:
        text = f.read()
    return returned, saved, text


@pytest.mark.slow  # benchmarks.run --quick end to end: ~20 s
def test_suite_records_every_figure_with_consistent_values(result):
    returned, r, text = result
    assert json.loads(json.dumps(returned)) == r  # the file is what main() returned

    # the run is described: date, versions, devices, the exact command
    m = r["meta"]
    assert m["date"].startswith("20") and m["jax"] == jax.__version__
    assert m["device_kind"] == jax.devices()[0].device_kind and m["device_count"] == jax.device_count()
    assert "--config.model.hidden=256" in m["command"] and m["command"].startswith("python -m benchmarks.run")
    c = r["config"]
    assert (c["model"], c["batch_size"], c["data_shape"]) == ("mlp", 64, [2])

    # train step: images/s and FLOP/s follow from the median step time and XLA's FLOP count
    t = r["train_step"]
    assert t["step_time_s"] == pytest.approx(statistics.median(t["step_times_s"]))
    assert len(t["step_times_s"]) == 5 and t["step_time_s"] > 0
    assert t["images_per_s"] == pytest.approx(64 / t["step_time_s"])
    assert t["flop_per_s"] == pytest.approx(t["flops_per_step"] / t["step_time_s"])
    assert t["xla_flops_per_step"] == pytest.approx(t["xla_flops_per_step_per_device"] * jax.device_count())
    # an MLP train step's matrix products cost 6 FLOPs per weight per example (2 forward, 4 backward;
    # Kaplan et al. 2020), less the input layer's gradient with respect to the data (2 per weight of it)
    assert 5.5 <= t["flops_per_step"] / (64 * c["params"]) <= 6.0
    # XLA also counts the elementwise work, so its figure is a little larger for this loop-free step
    assert 1.0 <= t["xla_flops_per_step"] / t["flops_per_step"] <= 1.3
    assert t["compile_s"] > 0 and t["compile_s"] == t["first_compile_s"] and t["compile_includes_warmup"]
    assert t["mfu"] is None if peak_flops(m["device_kind"]) is None else 0 < t["mfu"] < 1

    # memory: on CPU the compiled step's own sizes; the state (params, EMA, Adam mu and nu) is an argument
    mem = r["memory"]
    sizes = mem["memory_analysis"]
    assert sizes["argument_bytes"] >= 4 * 4 * c["params"]
    if m["platform"] == "cpu":
        assert "memory_analysis" in mem["source"]
        assert mem["peak_bytes"] == (sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"]
                                     + sizes["temp_bytes"])
    assert mem["peak_bytes"] > 0

    # samplers: DDPM, DDIM and Heun with NFE as each algorithm makes them. The efficiency's size is a
    # wall-clock figure (the benchmark's job, not a test's: on a loaded CI machine it ranged to 1.76).
    eff = {row["sampler"]: row for row in r["samplers"]["efficiency"]}
    assert set(eff) == {"ddpm", "ddim", "heun"}
    assert (eff["ddpm"]["nfe"], eff["ddim"]["nfe"], eff["heun"]["nfe"]) == (4, 4, 7)
    for row in eff.values():
        assert 0 < row["efficiency"] < float("inf") and 0 < row["efficiency_cpu"] < float("inf"), row
        assert row["nfe_time_s"] > 0 and row["time_s"] > 0
    comp = r["samplers"]["compile"]
    assert comp["sampler"] == "ddim" and set(comp["compile_s"]) == {"10", "1000"}
    assert min(comp["compile_s"].values()) > 0 and comp["ratio"] > 0
    runs = comp["runs_s"]
    assert comp["ratio"] == pytest.approx(statistics.median(x["1000"] / x["10"] for x in runs))

    # diffax's compiler options against XLA's defaults: per-round ratios of interleaved windows
    plain = r["versus_plain_xla"]
    if m["platform"] == "cpu":
        assert plain["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
        assert len(plain["rounds"]) == 5
        for x in plain["rounds"]:
            assert x["speedup"] == pytest.approx(x["plain_s"] / x["diffax_s"])
        assert plain["speedup"] == pytest.approx(statistics.median(x["speedup"] for x in plain["rounds"]))
        assert f"{plain['speedup']:.2f}x" in text
    else:
        assert plain is None

    # input stall: the trainer's data_wait_fraction, median over windows
    i = r["input"]
    assert 0 <= i["wait_fraction"] <= 1 and len(i["windows"]) == 5
    assert i["wait_fraction"] == pytest.approx(statistics.median(w["wait_fraction"] for w in i["windows"]))
    assert i["images_per_s"] > 0 and i["source"] == "toy2d:8gaussians" and i["fallback"] is None

    # the markdown table carries the same numbers
    assert "| figure | value |" in text and m["command"] in text
    assert f"{t['images_per_s']:.1f}" in text and f"{100 * i['wait_fraction']:.2f}%" in text


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5p") == peak_flops("TPU v5") == 459e12
    assert peak_flops("cpu") is None


def test_matmul_flops_counts_a_scan_body_length_times_and_convolutions_in_closed_form():
    from jax import lax

    from benchmarks.common import matmul_flops, xla_flops

    w, x = jax.numpy.ones((10, 64, 32)), jax.numpy.ones((16, 64))
    chain = lambda w, x: lax.scan(lambda h, wi: (jax.numpy.tanh(h @ wi) @ wi.T, None), x, w)[0].sum()  # noqa: E731
    assert matmul_flops(chain, w, x) == 10 * 2 * (2 * 16 * 64 * 32)
    # gradient with respect to w: per matmul the forward and the weight gradient (the input
    # gradient of the first step's h is needed too, as h is carried)
    assert matmul_flops(jax.grad(chain), w, x) == 3 * matmul_flops(chain, w, x)
    # XLA's cost analysis counts the loop body once: the reason the benchmark counts jaxpr FLOPs
    assert xla_flops(jax.jit(chain).lower(w, x).compile()) < 0.2 * matmul_flops(chain, w, x)

    img, k = jax.numpy.ones((2, 9, 9, 3)), jax.numpy.ones((3, 3, 3, 5))
    conv = lambda img, k: lax.conv_general_dilated(img, k, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
    assert matmul_flops(conv, img, k) == 2 * (2 * 5 * 5 * 5) * (3 * 3 * 3)  # outputs x kernel taps x C_in
