"""tasks/loading.py: loading a model as a stage runs it, without lm-eval."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tasks.loading import context_length, load_as, resolve_backend, trunk_and_head

ROOT = Path(__file__).parent.parent


def imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("module", ["tasks.smoke", "tasks.fidelity", "tasks.scoring"])
def test_loading_a_model_imports_no_lm_eval(module):
    assert "lm_eval" not in imported_by(module)


@pytest.mark.parametrize("module", ["tasks.loading", "tasks.benchmark", "tasks.compat"])
def test_planning_imports_neither_mlx_nor_lm_eval(module):
    """The sweep resolves backends and reads tasks.benchmark's task list while it plans; mlx and lm-eval
    load with a model."""
    assert not {"mlx", "mlx_lm", "lm_eval"} & imported_by(module)


def test_unknown_backend_names_the_allowed_values(tiny_model):
    with pytest.raises(ValueError, match="allowed: auto, native, fp32"):
        load_as(tiny_model, "gpu")
    with pytest.raises(ValueError, match="'auto' resolved first"):
        load_as(tiny_model, "auto")
    with pytest.raises(ValueError, match="allowed: auto, native, fp32"):
        resolve_backend("gpu")
    assert resolve_backend("auto") == ("native" if mx.default_device() == mx.gpu else "fp32")
    assert resolve_backend("native") == "native"


def test_trunk_and_head_split_the_model_where_it_gives_the_same_logits(tiny_model):
    model, tokenizer = load_as(tiny_model, "fp32")
    trunk, head = trunk_and_head(model, tokenizer.bos_token_id)
    assert trunk is model.model  # the tiny model ties its head to the embedding
    x = mx.array([[1, 17, 42, 99]])
    assert mx.array_equal(head(trunk(x)), model(x)).item()
    whole, identity = trunk_and_head(model.model)  # no head to split off: the model, whole
    assert whole is model.model and identity(x) is x


def test_context_length_from_the_config(tiny_model, tmp_path):
    config = json.loads((tiny_model / "config.json").read_text())
    assert context_length(tiny_model) == config["max_position_embeddings"]
    other = shutil.copytree(tiny_model, tmp_path / "m")
    del config["max_position_embeddings"]
    (other / "config.json").write_text(json.dumps({**config, "text_config": {"n_ctx": 77}}))
    assert context_length(other) == 77
    (other / "config.json").write_text(json.dumps(config))
    assert context_length(other) == 2048
