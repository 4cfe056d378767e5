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

from tasks.demo_model import make_demo_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random-init llama in HF layout, with a locally trained tokenizer."""
    return make_demo_model(tmp_path_factory.mktemp("models") / "tiny-llama")


MEASURED_RECIPES = ("bf16", "q4", "qx86-hi")


def measure_cell(store, history, model: str, resolved: dict, recipe, run_id: str = "test") -> dict:
    """One cell's measuring stages through the store, recorded in DuckDB as the cell flow records
    them (without Prefect, to stay fast); returns its artifacts by stage."""
    import json

    from tasks import benchmark, download, fidelity, quantize, smoke
    from tasks.offline_tasks import plan_tasks

    def stage(name, version, params, inputs, build):
        ref = store.produce(name, version, params, inputs, build)
        history.record_stage(run_id, model, recipe.name, name, ref.key, "done", ref.reused, 0.1)
        info = store.manifest(ref)["info"]
        history.record_metrics(run_id, model, recipe.name, name, ref.key, info.get("metrics", []))
        samples = store.path(ref) / "samples.jsonl"
        if samples.exists():
            history.record_samples(model, recipe.name, ref.key, [json.loads(x) for x in samples.read_text().splitlines()])
        return ref

    fid = {**fidelity.DEFAULTS, "window": 64, "windows": 2, "backend": "fp32"}
    r = {"download": stage("download", download.CODE_VERSION, download.key_params(resolved), [],
                           lambda out: download.download(resolved, out))}
    r["quantize"] = stage("quantize", quantize.CODE_VERSION, recipe.params(), [r["download"]],
                          lambda out: quantize.quantize(store.path(r["download"]), recipe, out))
    smoke_params = {"prompt": "Say hello.", "max_tokens": 8}
    r["smoke"] = stage("smoke", smoke.CODE_VERSION, smoke_params, [r["quantize"], r["download"]],
                       lambda out: smoke.smoke(store.path(r["quantize"]), smoke_params, out, store.path(r["download"])))
    bench = {"tasks": ["qsweep_demo_mc"], "limit": 8, "batch_size": 8, "plan": plan_tasks(["qsweep_demo_mc"])}
    r["benchmark"] = stage("benchmark", benchmark.CODE_VERSION, bench, [r["quantize"]],
                           lambda out: {"metrics": benchmark.benchmark(store.path(r["quantize"]), bench, out)})
    r["reference"] = stage("reference", fidelity.CODE_VERSION, fid, [r["download"]],
                           lambda out: fidelity.reference(store.path(r["download"]), fid, out))
    r["fidelity"] = stage("fidelity", fidelity.CODE_VERSION, fid, [r["quantize"], r["reference"]],
                          lambda out: fidelity.fidelity(store.path(r["quantize"]), store.path(r["reference"]), fid, out))
    return r


def publish_params(model: str, resolved: dict, recipe, **change) -> dict:
    """The publish settings a sweep prepares for a cell (flows/sweep.plan_cells)."""
    from tasks import download

    return {"model": model, "recipe": recipe.params(), "recipe_description": recipe.description,
            "source": download.key_params(resolved), "repo_id": None, "private": True, "license": None,
            "gates": {}, "notes": [], "compare_with": [], **change}


@pytest.fixture(scope="session")
def measured(tiny_model, tmp_path_factory):
    """A store where the tiny model went through bf16, q4 and qx86-hi, with its metric history and
    the comparisons against bf16: (store, {recipe: refs by stage}, resolved source)."""
    from flows.compare import record_comparisons
    from storage.artifacts import Store
    from storage.metrics import MetricStore
    from tasks.download import resolve_source
    from tasks.recipes import BUILTINS

    store = Store(tmp_path_factory.mktemp("measured"))
    history = MetricStore(store.metrics_db)
    resolved = resolve_source(str(tiny_model))
    refs = {name: measure_cell(store, history, "tiny", resolved, BUILTINS[name]) for name in MEASURED_RECIPES}
    record_comparisons(str(store.root), "bf16")
    return store, refs, resolved
