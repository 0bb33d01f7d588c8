"""The whole GPU benchmark script (fastnce/bench/gpu.py main()) on the CPU, at toy sizes.

A session gets a GPU rarely and for minutes: a slip in the script's own Python (a typo in a
branch, a key, a file name) must show here, in CI, not there. The flow runs with DEVICE =
"cpu", the triton backend under the interpreter, tiny cases and thresholds lowered so that
every skip branch is taken; the GPU-only parts (CUDA events, memory statistics) are the few
lines behind gpu._on_gpu().
"""
import json
import os

import pytest
import torch

from fastnce.bench import gpu as bench
from fastnce.ops import triton_lse


@pytest.fixture
def cpu_bench(monkeypatch):
    if triton_lse.unavailable_reason("cpu", torch.float32) is not None:
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "CASES", {
        "simclr-16k": dict(kind="ntxent", N=12, D=16),
        "clip-32k": dict(kind="clip", N=40, D=24),
        "clip-1m": dict(kind="clip", N=48, D=24),  # past both thresholds below
        "siglip-32k": dict(kind="siglip", N=20, D=24),
    })
    monkeypatch.setattr(bench, "_INFCL_MAX_N", 44)
    monkeypatch.setattr(bench, "_CUDA_MAX_N", 44)
    monkeypatch.setattr(triton_lse, "_plans", {})
    return bench


def test_gpu_bench_main_runs_end_to_end_on_the_cpu(cpu_bench, tmp_path, capsys):
    rc = cpu_bench.main(["--out", str(tmp_path), "--impls", "fastnce-triton,fastnce-cuda,eager,inf-cl",
                         "--check-size", "40", "--gemm-size", "64", "--budget", "0.01",
                         "--infcl-wheel", str(tmp_path / "no-such.whl"),
                         "--cases", "simclr-16k,clip-32k,clip-1m,siglip-32k"])
    assert rc == 0
    jsons = sorted(tmp_path.glob("gpu-cpu-smoke-test-*.json"))
    (meta_file,) = [p for p in jsons if p.name.endswith("-meta.json")]
    (records_file,) = [p for p in jsons if p != meta_file]
    records = json.loads(records_file.read_text())
    measured = {(r["case"], r["impl"]) for r in records}
    assert measured == {(c, i) for c in ("simclr-16k", "clip-32k", "clip-1m", "siglip-32k")
                        for i in ("fastnce-triton", "eager")}
    for r in records:
        assert set(r) == {"case", "impl", "dtype", "ms", "peak_mib", "card"} and r["ms"] > 0
        assert r["card"] == "cpu-smoke-test" and r["dtype"] == "bf16"

    meta = json.loads(meta_file.read_text())
    assert meta["device"] == "CPU (smoke test)" and "bf16_matmul_64_tflops" in meta
    notes = {(n["case"], n["impl"]): n["note"] for n in meta["not_measured"]}
    assert notes[("clip-32k", "fastnce-cuda")].startswith("unavailable: ")
    assert notes[("simclr-16k", "inf-cl")] == "skipped: Inf-CL cannot mask the diagonal"
    assert notes[("clip-32k", "inf-cl")].startswith("skipped: inf_cl not importable")
    assert notes[("siglip-32k", "inf-cl")] == "skipped: Inf-CL has no sigmoid loss"
    assert "no kernel for the sigmoid primitive" in notes[("siglip-32k", "fastnce-cuda")]
    # the cases asked for plans (symmetric forward and backward, non-symmetric backward); on the CPU none is timed
    assert meta["triton_plans"] == {}
    assert "not measured" in meta["cuda_forward_rows_ms"]["clip-32k"]

    checks = meta["checks"]
    labels = {(c["backend"], c["dtype"], c["symmetric"], c["bias"]) for c in checks}
    for dt in ("bfloat16", "float16", "float32"):  # every plan of the triton backend
        assert {("triton/atomic", dt, False, True), ("triton/two-pass", dt, False, True), ("triton", dt, True, True),
                ("triton/rows/mirror", dt, True, False), ("triton/half/half", dt, True, False),
                ("triton/4", dt, False, False)} <= labels
    assert ("triton", "bfloat16", False, True) in {(c["backend"], c["dtype"], c["symmetric"], c["bias"])
                                                   for c in checks if c["D"] == 512}  # CLIP's shape class
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    # the fused impl was timed on every case before the first baseline
    order = [r["impl"] for r in records]
    assert order.index("eager") > max(i for i, impl in enumerate(order) if impl == "fastnce-triton")

    out = capsys.readouterr().out
    assert "correctness: " in out and "wrote " in out and "fastnce-triton" in out


def test_gpu_bench_times_the_cuda_forward_with_rows_resident_and_streamed(cpu_bench, monkeypatch):
    import fastnce

    seen = []
    monkeypatch.setattr(fastnce.ops, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(fastnce.ops, "lse_forward", lambda *a, **kw: seen.append(
        (os.environ.get("FASTNCE_CUDA_FORWARD_ROWS"), kw["backend"], kw["col_lse"])))
    monkeypatch.setenv("FASTNCE_CUDA_FORWARD_ROWS", "auto")
    out = cpu_bench.time_cuda_forward_rows("clip-32k", 0.001)
    assert set(out) == {"resident", "streamed"} and all(isinstance(v, float) for v in out.values())
    assert {s[0] for s in seen} == {"resident", "streamed"} and {s[1:] for s in seen} == {("cuda", True)}
    assert os.environ["FASTNCE_CUDA_FORWARD_ROWS"] == "auto"  # the caller's setting is back


def test_gpu_bench_skips_the_cuda_backend_past_its_size(cpu_bench, tmp_path, monkeypatch):
    """The clip-1m branch that keeps fastnce-cuda out, with the backend reported available."""
    import fastnce.ops
    monkeypatch.setattr(fastnce.ops, "unavailable_reason", lambda *a: None)
    notes = []
    out = cpu_bench.bench_case("clip-1m", ["fastnce-cuda"], 0.01, "cpu", None, notes)
    assert out == [] and notes[0]["note"].startswith("skipped: the cuda backend is timed up to N = 44")


def test_gpu_bench_appends_a_second_run(cpu_bench, tmp_path, monkeypatch):
    """gpu_session.sh runs the cuda backend in a process of its own with --append: its checks,
    records and notes join the first run's files, which keep theirs."""
    common = ["--out", str(tmp_path), "--check-size", "24", "--budget", "0.01", "--cases", "clip-32k"]
    assert cpu_bench.main(common + ["--impls", "fastnce-triton", "--gemm-size", "64"]) == 0
    first = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert cpu_bench.main(common + ["--impls", "eager,fastnce-cuda", "--gemm-size", "0", "--append"]) == 0
    second = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(second) == set(first)
    (records_name,) = [n for n in second if not n.endswith("-meta.json")]
    meta_name = records_name.replace(".json", "-meta.json")
    assert [(r["case"], r["impl"]) for r in second[records_name]] == [("clip-32k", "fastnce-triton"),
                                                                      ("clip-32k", "eager")]
    assert second[meta_name]["checks"] == first[meta_name]["checks"]  # no cuda here: nothing added
    assert "bf16_matmul_64_tflops" in second[meta_name]  # the first run's rate stays
    assert [(n["case"], n["impl"]) for n in second[meta_name]["not_measured"]] == [("clip-32k", "fastnce-cuda")]


def test_gpu_bench_peak_counts_the_gradients(cpu_bench, monkeypatch):
    """measure() clears what the warm-up left (the gradients) before taking the baseline, so the
    peak includes the step's gradients, as the anchors' first-call measurement does."""
    events = []
    run = lambda: events.append("run")
    cpu_bench.measure(run, 0.0, max_reps=1, clear=lambda: events.append("clear"))
    assert events[:3] == ["run", "clear", "run"]


def test_gpu_bench_skips_the_warm_up_where_a_fused_impl_has_nothing_left_to_tune(cpu_bench, monkeypatch):
    """Past _TUNED_FROM_N rows the triton backend's autotune choices and plans no longer depend
    on N: once a fused impl has run such a case, a larger one of the same kind and D is timed
    without a warm-up step (at clip-1m, ~10 s of the one call's budget). Eager keeps its warm-up,
    and torch.compile (a new static shape compiles anew) is not a fused impl either."""
    monkeypatch.setattr(cpu_bench, "_TUNED_FROM_N", 40)
    monkeypatch.setattr(cpu_bench, "_tuned", set())
    real, warm_ups = cpu_bench.measure, []

    def spy(*a, warm_up=True, **kw):
        warm_ups.append(warm_up)
        return real(*a, warm_up=warm_up, **kw)
    monkeypatch.setattr(cpu_bench, "measure", spy)
    records = []
    for case in ("simclr-16k", "clip-32k", "clip-1m"):  # N = 12 (below the class), 40, 48
        for impl in ("fastnce-triton", "eager"):
            records += cpu_bench.bench_case(case, [impl], 0.001, "cpu", None, [])
    assert warm_ups == [True, True, True, True, False, True]
    assert [(r["case"], r["impl"]) for r in records if r["ms"] > 0] == [
        (c, i) for c in ("simclr-16k", "clip-32k", "clip-1m") for i in ("fastnce-triton", "eager")]
    events = []
    real(lambda: events.append("run"), 0.0, max_reps=1, clear=lambda: events.append("clear"), warm_up=False)
    assert "clear" not in events and len(events) == 4  # the peak run, then 3 timed runs


def test_gpu_bench_checks_probe_only_the_backends_asked_for(cpu_bench, monkeypatch):
    """The triton process must not load (or build) the cuda extension: run_checks asks only
    about the backends named."""
    from fastnce.ops import cuda_lse

    def probed(*a):
        raise AssertionError("the cuda backend was probed")
    monkeypatch.setattr(cuda_lse, "unavailable_reason", probed)
    monkeypatch.setattr(bench, "_CHECK_RUNS", {True: [(False, True, ())], False: []})
    monkeypatch.setattr(bench, "_CLIP_CHECK_D", 24)
    results = cpu_bench.run_checks(16, ["triton"])
    assert {r["backend"] for r in results} == {"triton"} and all(r["ok"] for r in results)
