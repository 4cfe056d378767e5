"""sensitivity and `qsweep search`: measured costs, a found recipe that checks, quantizes, loads and is measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.recipes import load_recipe
from tasks.sensitivity import CHECK, PROBE, all_formats, measure
from tasks.specs import format_name

REPO = Path(__file__).resolve().parent.parent
PARAMS = {"calibration": "qsweep:data/calibration.txt", "window": 64, "windows": 4, "check_every": 2,
          "formats": all_formats() + [None], "backend": "fp32"}


@pytest.fixture(scope="module")
def table(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sensitivity")
    return measure(tiny_model, PARAMS, out), out


def test_each_module_is_measured_in_its_probe_format_and_the_rest_predicted(table):
    info, out = table
    rows = info["sensitivity"]
    assert json.loads((out / "sensitivity.json").read_text())["rows"] == rows
    by_path = {}
    for r in rows:
        by_path.setdefault(r["path"], {})[r["format"]] = r
    assert "model.embed_tokens" in by_path and any(p.endswith("mlp.down_proj") for p in by_path)
    for path, formats in by_path.items():
        probe = formats[format_name(PROBE)]
        assert probe["measured_kl"] >= 0 and probe["predicted_kl"] == pytest.approx(probe["measured_kl"], rel=1e-9)
        # fewer bits cost more, as measured through the module's output error
        assert formats["q2g64"]["predicted_kl"] >= formats["q4g64"]["predicted_kl"] >= formats["q8g64"]["predicted_kl"]


def test_the_estimate_ranks_a_second_format_as_measurement_does(table):
    info, _ = table
    check = info["summary"]["check"]
    assert check["format"] == format_name(CHECK) and check["modules"] >= 5
    assert check["spearman"] > 0.8, check  # printed in the found recipe's header and in bench/RESULTS.md
    assert info["summary"]["resumed_from_layer"]  # passes start at the module's layer, checked against a full one


def test_qsweep_search_finds_checks_quantizes_and_measures(tmp_path):
    store, out = tmp_path / "store", tmp_path / "found"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "search", "demo://tiny-llama", "--bpw", "4.5", "--bpw", "1.5",
                           "--tasks", "qsweep_demo_mc", "--limit", "4", "--store", str(store), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the unreachable budget's cell failed
    # refused with both ends of what the model can reach; the other budget went on
    assert "search budget 1.5 bits per weight is out of reach" in done.stdout and "to 16.000" in done.stdout
    recipe = load_recipe(out / "auto-4.5.yaml")  # `qsweep recipes check` reads it the same way
    header = (out / "auto-4.5.yaml").read_text().splitlines()[:5]
    assert any("calibration text: qsweep:data/calibration.txt" in line for line in header)
    from storage.metrics import MetricStore
    from tasks.plan import plan_for

    base = next((store / "artifacts" / "download").iterdir())
    assert 4.0 < plan_for(recipe, base).bits_per_weight() <= 4.5  # within the budget, and uses it
    db = MetricStore(store / "metrics.duckdb")
    _, key = db.query("SELECT key FROM stages WHERE recipe = 'auto-4.5' AND stage = 'quantize' AND status = 'done'")
    model_dir = store / "artifacts" / "quantize" / key[0][0]  # exported too, unless its quality gates held it back
    assert (model_dir / "recipe.yaml").read_text() == (out / "auto-4.5.yaml").read_text()
    from mlx_lm import load

    load(str(model_dir))  # mlx_lm opens it
    _, kl = db.query("SELECT value FROM latest_metrics WHERE recipe = 'auto-4.5' AND metric = 'kl_mean'")
    assert kl and kl[0][0] >= 0  # measured by its fidelity stage, on the fidelity corpus
    _, rows = db.query("SELECT count(*), count(measured_kl) FROM sensitivity")
    assert rows[0][0] > rows[0][1] > 0
    check = subprocess.run([sys.executable, "-m", "flows.cli", "recipes", "check", str(out / "auto-4.5.yaml")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "ok (auto-4.5)" in check.stdout


def test_a_measured_kl_is_the_kl_a_user_would_compute(tiny_model):
    """Probe.kl against a plain float64 KL of the full model's next-token distributions, the module swapped in."""
    import mlx.core as mx
    import numpy as np

    from tasks.fidelity import windows
    from tasks.loading import load_as
    from tasks.plan import model_modules
    from tasks.sensitivity import Probe, qdq

    model, tokenizer = load_as(tiny_model, "fp32")
    found = dict(model.named_modules())
    units = [(p, found[p]) for p, _, _, _ in model_modules(tiny_model)[0]]
    tokens = windows(tokenizer, {"corpus": "qsweep:data/calibration.txt", "window": 64, "windows": 3})
    probe = Probe(model, tokens, units)
    first = tokens.shape[1] // 8

    def logp(m):
        z = np.array(m(mx.array(tokens))[:, first:-1].astype(mx.float32), dtype=np.float64)
        return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)

    base = logp(model)
    for path in ("model.layers.1.self_attn.v_proj", "model.layers.3.mlp.down_proj", "model.embed_tokens"):
        module = dict(units)[path]
        original = module.weight
        module.weight = qdq(original, PROBE, mx.bfloat16)
        quant = logp(model)
        module.weight = original
        expected = (np.exp(base) * (base - quant)).sum(-1).mean()
        assert probe.kl(path, PROBE, mx.bfloat16) == pytest.approx(expected, rel=1e-3), path
