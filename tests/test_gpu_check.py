"""bench/gpu_check.sh, the prepared device check for a GPU machine: its arguments, and one real run of its
measurements on the CPU (--device cpu, the tiny model, one recipe), reusing this venv (--no-install)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
OPTIONS = ["--device", "--venv", "--no-install", "--extra", "--wheels", "--model", "--recipes", "--task", "--limit",
           "--peak-gbs", "--out", "--help"]
COLUMNS = ["device", "recipe", "quantize s", "GB/s", "of peak", "qsweep req/s", "mlx_lm.evaluate req/s",
           "ratio", "answers identical", "smoke tok/s"]


def gpu_check(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # this test's venv, as it is: nothing installed
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_names_every_option():
    done = gpu_check("--help")
    assert done.returncode == 0, done.stderr
    for option in OPTIONS:
        assert option in done.stdout
    assert "H200 4800" in done.stdout  # the peak bandwidths it knows


@pytest.mark.parametrize("args, names", [
    (["--device", "tpu"], ["--device", "'tpu'", "gpu, cpu"]),
    (["--recipes", "q4,q9"], ["--recipes", "'q9'", "q4", "mxfp4", "qx65-hi"]),
    (["--recipes", "q4,,q8"], ["--recipes", "q4,,q8"]),
    (["--limit", "0"], ["--limit", "'0'"]),
    (["--peak-gbs", "fast"], ["--peak-gbs", "'fast'", "positive number"]),
    (["--frobnicate"], ["--frobnicate", "--device", "--recipes"]),
    (["--model"], ["--model", "needs a value"]),
    (["--model", "--device", "cpu"], ["--model", "needs a value"]),
    (["--extra", "rocm"], ["--extra", "'rocm'", "cuda, cuda13, cpu"]),
    (["--wheels", "/no/such/folder"], ["--wheels", "not a folder"]),
])
def test_bad_arguments_are_one_line_and_exit_2(args, names):
    # nothing is installed or measured: the arguments are checked first (--no-install guards against a slip)
    done = gpu_check("--no-install", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    for name in names:
        assert name in done.stderr


def test_peak_bandwidth_is_required_for_an_unknown_device():
    # The CPU's name is in no table of GPU bandwidths: the check cannot say what fraction of peak it reached.
    done = gpu_check("--no-install", "--venv", sys.prefix, "--device", "cpu", "--model", "demo://tiny-llama")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()
    assert len(last) == 1 and "--peak-gbs is required" in last[0] and "H200" in last[0], done.stderr


def test_gpu_is_refused_where_mlx_sees_none():
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        pytest.skip("mlx sees a GPU here")
    done = gpu_check("--no-install", "--venv", sys.prefix, "--model", "demo://tiny-llama", "--peak-gbs", "50")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlx sees no GPU" in lines[0] and "--device cpu" in lines[0], done.stderr


def test_a_cpu_run_fills_every_column(tmp_path):
    out = tmp_path / "gpu_check-cpu.md"
    start = time.monotonic()
    done = gpu_check("--no-install", "--venv", sys.prefix, "--device", "cpu", "--model", "demo://tiny-llama",
                     "--recipes", "q4", "--limit", "4", "--peak-gbs", "50", "--out", "results.md", cwd=tmp_path)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 120
    out = tmp_path / "results.md"  # relative to where it was started
    text = out.read_text()
    assert done.stdout.rstrip().endswith(text.rstrip())  # the table closes what it prints
    table = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    header, rows = [c.strip() for c in table[0]], [[c.strip() for c in row] for row in table[2:]]
    assert header == COLUMNS and len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["device"] == "cpu: " + __import__("mlx.core").core.device_info()["device_name"]
    assert row["recipe"] == "q4"
    for column in ("quantize s", "GB/s", "qsweep req/s", "mlx_lm.evaluate req/s", "smoke tok/s"):
        assert float(row[column]) > 0, (column, row)
    assert float(row["of peak"].rstrip("%")) >= 0 and row["ratio"].endswith("x") and float(row["ratio"][:-1]) > 0
    assert row["answers identical"] == "yes (4)" or row["answers identical"].startswith("NO: ")
    assert "4 questions" in text and "peak bandwidth: 50 GB/s" in text and "arc_easy" in text
