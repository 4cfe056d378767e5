"""tasks/compat.py against the installed mlx, mlx-lm and lm-eval: each internal still does what qsweep relies on.

A failure here after an upgrade names the internal that moved (compat.CHECKED: the versions it was read in).
"""

import json

import mlx.core as mx
import pytest

from tasks import compat
from tasks.benchmark import LOCAL_TASKS
from tasks.loading import load_as


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_as(tiny_model, "fp32")[0]


def test_model_classes_are_the_ones_mlx_lm_loads(tiny_model, model):
    model_class, args_class = compat.model_classes(json.loads((tiny_model / "config.json").read_text()))
    assert type(model) is model_class and args_class.__name__ == "ModelArgs"


def test_a_llama_packs_rows_of_any_length(model):
    assert compat.packable_length(model) == float("inf")


def test_packed_rows_cache_and_positioned_rope_drive_mlx_lm_attention(model):
    """Two sequences in one row, each at positions from 0 and masked from the other, through mlx-lm's own
    attention with PackedRowsCache for every layer: each scores as it does alone."""
    a, b = [1, 17, 42, 99, 3], [250, 7, 8]
    alone = [model.model(mx.array([s])) for s in (a, b)]
    assert compat.positioned_rope(model) and compat.positioned_rope(model)  # a second call wraps nothing twice
    assert all(isinstance(layer.self_attn.rope, compat.PositionedRoPE) for layer in model.layers)
    n = len(a) + len(b)
    seg = mx.array([0] * len(a) + [1] * len(b))
    mask = mx.tril(mx.ones((n, n), dtype=mx.bool_)) & (seg[None, :] == seg[:, None])
    positions = mx.array([list(range(len(a))) + list(range(len(b)))])
    packed = model.model(mx.array([a + b]), cache=[compat.PackedRowsCache(mask[None, None], positions)
                                                   for _ in model.layers])
    assert mx.allclose(packed[:, :len(a)], alone[0], atol=1e-4).item()
    assert mx.allclose(packed[:, len(a):], alone[1], atol=1e-4).item()
    assert mx.allclose(model(mx.array([a])), model.lm_head(alone[0]) if hasattr(model, "lm_head")
                       else model.model.embed_tokens.as_linear(alone[0])).item()  # an ordinary call unchanged


def test_pin_eval_docs_processes_the_documents_once():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)
    task = manager.load("qsweep_demo_mc")["tasks"]["qsweep_demo_mc"]
    calls = []
    ask = lambda d: {**d, "question": d["question"] + "?"}  # noqa: E731
    task.config.process_docs = lambda docs: calls.append(1) or docs.map(ask)
    before = [list(task.eval_docs) for _ in range(2)]
    assert len(calls) == 2  # lm-eval processes the documents again on every read: why they are pinned
    compat.pin_eval_docs(task)
    after = [list(task.eval_docs) for _ in range(3)]
    assert len(calls) == 3 and before[0] == after[0] == after[2] and after[0][0]["question"].endswith("?")


def test_load_task_yaml_reads_lm_evals_own_task_files():
    import lm_eval.tasks
    from pathlib import Path

    config = compat.load_task_yaml(Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml")
    assert config["task"] == "arc_easy" and config["output_type"] == "multiple_choice"
