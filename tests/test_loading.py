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


def test_the_device_is_described_with_its_mlx_build():
    from importlib.metadata import version

    from tasks.loading import describe_device, gpu_build_without_gpu, mlx_builds, unrunnable_mlx

    kind = mx.default_device().type.name
    described = describe_device()
    assert described.startswith(f"{kind}: ") and mx.device_info(mx.default_device())["device_name"] in described
    assert mlx_builds() and all(b.split()[1] == version("mlx") for b in mlx_builds())  # the build matches mlx
    assert unrunnable_mlx() is None
    if sys.platform == "linux" and kind == "cpu":
        assert mlx_builds() == [f"mlx-cpu {version('mlx')}"] and gpu_build_without_gpu() is None


def test_the_cuda_extra_asks_for_mlx_cuda_build_of_the_same_mlx():
    """What `pip install -e '.[cuda]'` resolves to, read from the installed metadata (the CUDA build itself,
    4 GB with NVIDIA's libraries, installs on a machine without a GPU but cannot load there)."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    ours = [Requirement(r) for r in requires("qsweep")]
    linux = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}

    def wanted(reqs, extra):
        return {(r.name, frozenset(r.extras), str(r.specifier)) for r in reqs
                if r.marker is None or r.marker.evaluate({**linux, "extra": extra})}

    base = {name for name, *_ in wanted(ours, "")}
    assert "mlx" in base and not base & {"mlx-cpu", "mlx-cuda-12", "cmeel-openblas"}  # no build in the base
    assert ("mlx", frozenset({"cuda12"}), ">=0.32") in wanted(ours, "cuda")
    assert ("mlx", frozenset({"cpu"}), ">=0.32") in wanted(ours, "cpu")
    mlx_needs = [Requirement(r) for r in requires("mlx")]
    assert ("mlx-cuda-12", frozenset(), f"=={version('mlx')}") in wanted(mlx_needs, "cuda12")
