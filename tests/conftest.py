import pytest

# The end-to-end files take minutes each; the others, seconds. `make test` runs two xdist workers,
# a file at a time each (--dist loadfile, --no-loadscope-reorder: files in the order below), so
# the two longest start at once, the third when the faster of those is done, the rest fill in.
LONG = ("test_sweep.py", "test_faults.py", "test_service.py")


def pytest_collection_modifyitems(items):
    files = list(dict.fromkeys(item.path.name for item in items))
    short = [f for f in files if f not in LONG]
    order = [f for f in LONG[:2] if f in files] + short[:2] + [f for f in LONG[2:] if f in files] + short[2:]
    items.sort(key=lambda item: order.index(item.path.name))  # stable: tests keep their order in a file

import os
import tempfile
from pathlib import Path

# Flows run in this process (the `measured` store) talk to a temporary Prefect server of their own.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="qsweep-test-prefect-"))

from tasks.demo_model import make_demo_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random-init llama in HF layout, with a locally trained tokenizer."""
    return make_demo_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def quantized_model(tiny_model, tmp_path_factory):
    """The tiny model quantized with q4, in mlx-lm's layout."""
    from tasks.quantize import quantize
    from tasks.recipes import get_recipe

    out = tmp_path_factory.mktemp("q4")
    quantize(tiny_model, get_recipe("q4"), out)
    return out


def naive_tokens(model, ctx, cont):
    """The continuation's log-likelihood and greedy flag from one plain forward pass of context + continuation:
    what the packed, batched scorers must agree with."""
    import mlx.core as mx
    import mlx.nn as nn

    seq = ctx + cont
    logprobs = nn.log_softmax(model(mx.array(seq)[None])[0].astype(mx.float32), axis=-1)
    scored = logprobs[len(ctx) - 1: len(seq) - 1]
    target = mx.array(cont)
    total = mx.take_along_axis(scored, target[:, None], axis=-1).sum().item()
    return total, bool(mx.all(mx.argmax(scored, axis=-1) == target).item())


MEASURED_RECIPES = ("bf16", "q4", "qx86-hi")


def test_cell(model: str, resolved: dict, recipe, export_to: Path, **publish):
    """A cell as flows/cells.plan_cells plans it, with small settings: the parameters come from the specs."""
    from flows.cells import Cell
    from tasks.download import key_params
    from tasks.offline_tasks import plan_tasks
    from tasks.specs import BenchmarkSpec, FidelitySpec, SmokeSpec

    fidelity = {**FidelitySpec(window=64, windows=2).model_dump(exclude={"enabled"}), "backend": "fp32"}
    bench = {**BenchmarkSpec(tasks=["qsweep_demo_mc"], limit=8, batch_size=8).model_dump(exclude={"data"}),
             "backend": "native", "plan": plan_tasks(["qsweep_demo_mc"])}
    params = {"download": key_params(resolved), "quantize": recipe.params(),
              "smoke": {**SmokeSpec(prompt="Say hello.", max_tokens=8).model_dump(), "backend": "native"},
              "benchmark": bench, "reference": fidelity, "fidelity": fidelity,
              "publish": publish_params(model, resolved, recipe, **publish)}
    return Cell(model, recipe.name, resolved, params, export_to=str(export_to))


test_cell.__test__ = False  # a helper, not a test


def measure_cell(store, model: str, resolved: dict, recipe, run_id: str = "test") -> dict:
    """One cell through the real cell flow (Prefect, the stage registry, the metric history);
    returns its artifacts by stage."""
    from flows.cell import cell

    planned = test_cell(model, resolved, recipe, store.root / "published" / f"{model}-{recipe.name}-mlx")
    return cell(store=str(store.root), run_id=run_id, cell=planned)


def publish_params(model: str, resolved: dict, recipe, **change) -> dict:
    """The publish settings a sweep prepares for a cell (flows/cells.plan_cells)."""
    from tasks import download

    return {"model": model, "recipe": recipe.params(), "recipe_description": recipe.description,
            "source": download.key_params(resolved), "repo_id": None, "private": True, "license": None,
            "gates": {}, "notes": [], "compare_with": [], **change}


@pytest.fixture(scope="session")
def measured(tiny_model, tmp_path_factory):
    """A store where the tiny model went through bf16, q4 and qx86-hi, with its metric history and
    the comparisons against bf16: (store, {recipe: refs by stage}, resolved source)."""
    from flows.compare import record_comparisons
    from storage.workspace import open_store
    from tasks.download import resolve_source
    from tasks.recipes import BUILTINS

    store = open_store(tmp_path_factory.mktemp("measured"))
    resolved = resolve_source(str(tiny_model))
    refs = {name: measure_cell(store, "tiny", resolved, BUILTINS[name]) for name in MEASURED_RECIPES}
    record_comparisons(str(store.root), "bf16")
    return store, refs, resolved


def pytest_sessionfinish(session):
    """Stop the temporary Prefect server of in-process flows while pytest still holds the streams its
    goodbye is logged to (at exit they are closed, and logging prints a traceback instead)."""
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
