"""The benchmark commands run end to end on tiny sizes (fastnce-bench memory / gradcheck)."""
import csv
import json

import pytest

from fastnce.bench import __main__ as cli
from fastnce.bench import gradcheck, memory


def test_memory_bench_writes_results(tmp_path):
    # one size: every point is a fresh child process (a few seconds each, mostly imports)
    rc = memory.main(["--sizes", "32", "--dim", "8", "--out", str(tmp_path), "--quiet",
                      "--repeats", "1", "--name", "tiny"])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["tiny.csv", "tiny.json", "tiny.png"]
    data = json.loads((tmp_path / "tiny.json").read_text())
    meta, records = data["meta"], data["records"]
    assert meta["loss"] == "nt_xent" and meta["dim"] == 8 and meta["device"] == "cpu"
    assert {"date", "command", "machine", "impls"} <= set(meta)
    impls = meta["impls"]
    assert impls[0] == memory.EAGER and "torch" in impls and "triton" not in impls
    assert len(records) == len(impls)
    for r in records:
        assert set(memory.FIELDS) - {"error"} <= set(r) | {"rel_diff_loss", "rel_diff_grad", "match",
                                                         "mem_vs_eager", "time_vs_eager"}
        assert r["status"] == "ok", r
        assert r["rows"] == r["cols"] == 2 * r["N"]
        assert r["peak_mib"] >= 0 and r["time_s"] > 0 and r["time_runs"] == 1
    for r in records:
        if r["impl"] != memory.EAGER:
            assert r["match"] is True and r["rel_diff_loss"] < 1e-5 and r["rel_diff_grad"] < 1e-4
            assert r["mem_vs_eager"] is not None and r["time_vs_eager"] is not None
    by = {(r["impl"], r["N"]): r for r in records}
    assert abs(by[("torch", 32)]["loss_value"] - by[(memory.EAGER, 32)]["loss_value"]) < 1e-4
    with open(tmp_path / "tiny.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) and set(rows[0]) == set(memory.FIELDS)


def test_memory_bench_other_losses_in_table():
    recs = [dict(N=8, impl="eager", status="ok", peak_mib=1.0, time_s=0.1),
            dict(N=8, impl="torch", status="ok", peak_mib=0.5, time_s=0.2, mem_vs_eager=0.5, match=True)]
    table = memory.format_table(recs)
    assert "torch" in table and "eager" in table
    for loss in memory.LOSSES:  # every loss builds and runs both ways at a tiny size
        inputs = memory.make_inputs(loss, 4, 3, "float64", "cpu", negatives=5 if loss == "info_nce" else 0)
        a = memory.make_loss_fn(loss, memory.EAGER, inputs)()
        b = memory.make_loss_fn(loss, "torch", inputs)()
        assert abs(a.item() - b.item()) < 1e-10, loss


def test_gradcheck_passes_on_tiny_shapes(capsys):
    rc = gradcheck.main(["--device", "cpu", "--backends", "torch", "--quick", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 failed" in out


def test_cli_dispatch(capsys):
    assert cli.main(["--help"]) == 0
    assert "memory" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2


@pytest.mark.parametrize("argv,words", [
    (["memory", "--device", "bogus"], "expected a torch device"),
    (["memory", "--dim", "-4"], "expected a positive integer"),
    (["memory", "--threads", "0"], "expected a positive integer"),
    (["memory", "--time-budget", "nan"], "expected a positive finite number"),
    (["memory", "--negatives", "-3"], "expected an integer >= 0"),
    (["memory", "--sizes", "8,x"], "sizes must be positive integers"),
    (["memory", "--name", "../elsewhere"], "expected a file name without a directory"),
    (["memory", "--backends", "bogus"], "backend must be one of"),
    (["memory", "--backends", "cuda"], "backend='cuda' is unavailable"),
    (["gradcheck", "--device", "bogus"], "expected a torch device"),
    (["gradcheck", "--backends", "bogus"], "backend must be one of"),
])
def test_cli_bad_arguments_are_clean_errors(argv, words, capsys):
    """A user's mistake gets its reason and a non-zero exit, not a traceback (a fuzzer found
    tracebacks for a bad device or backend, and bad numbers measured every point as an error
    and exited 0)."""
    from fastnce.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", "/nonexistent-never-written"] if argv[0] == "memory" else argv)
    assert exit_info.value.code != 0
    assert words in str(exit_info.value.code) + capsys.readouterr().err
