"""A model that asks to run its own code: found, refused unless allowed, and when allowed run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import remote_code

CUSTOM_TOKENIZER = '''
import os
from pathlib import Path
from transformers import PreTrainedTokenizerFast
Path(os.environ["RAN"]).write_text("the model's code ran")
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def asks_for_code(tiny_model, tmp_path):
    """The tiny model with a tokenizer from its own Python file, as some hub repos have."""
    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}, tokenizer_class="CustomTokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER)
    return model


def test_what_a_model_asks_to_run_is_listed(asks_for_code, tiny_model, tmp_path):
    assert remote_code.asks_for(tiny_model) == []
    assert remote_code.asks_for(asks_for_code) == [
        "tokenizer_config.json auto_map AutoTokenizer: tokenization_custom.CustomTokenizer",
        "tokenization_custom.py (Python)"]
    config = json.loads((tiny_model / "config.json").read_text())
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "config.json").write_text(json.dumps({**config, "model_file": "arch.py"}))
    assert remote_code.asks_for(tmp_path / "mlx") == ["config.json model_file: arch.py"]


def test_refused_unless_the_sweep_file_allows_it(asks_for_code):
    with pytest.raises(remote_code.RemoteCodeRefused) as e:
        remote_code.check("custom", asks_for_code, allowed=False)
    assert "tokenization_custom.py" in str(e.value) and "models[].trust_remote_code: true" in str(e.value)
    remote_code.check("custom", asks_for_code, allowed=True)


LOAD = """
import sys
from pathlib import Path
from tasks import remote_code
from tasks.loading import load_as
try:
    load_as(Path(sys.argv[1]), "fp32")
except ValueError as e:
    print("refused:", e)
import os
print("ran before allowed:", Path(os.environ["RAN"]).exists())
with remote_code.allowed(True):
    model, tokenizer = load_as(Path(sys.argv[1]), "fp32")
print("loaded:", type(tokenizer._tokenizer).__name__)
"""


def test_allowed_the_load_runs_the_models_code_and_not_before(asks_for_code, tmp_path):
    ran = tmp_path / "ran"
    env = {**os.environ, "RAN": str(ran), "HF_HOME": str(tmp_path / "hf")}  # transformers copies the code there
    done = subprocess.run([sys.executable, "-c", LOAD, str(asks_for_code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert "refused: The repository" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "ran before allowed: False" in done.stdout
    assert "loaded: CustomTokenizer" in done.stdout and ran.read_text() == "the model's code ran"


ARCH = '''
import os
from pathlib import Path
from mlx_lm.models.llama import Model, ModelArgs  # the model's "own" architecture, here llama's
Path(os.environ["RAN"]).write_text("the model's code ran")
'''


def test_a_model_with_its_own_architecture_quantizes_and_loads_only_when_allowed(tiny_model, tmp_path, monkeypatch):
    from tasks import quantize
    from tasks.loading import load_as
    from tasks.recipes import BUILTINS

    model, ran = tmp_path / "own", tmp_path / "ran"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "own", "model_file": "arch.py"}))
    (model / "arch.py").write_text(ARCH)
    monkeypatch.setenv("RAN", str(ran))
    (tmp_path / "refused").mkdir()
    with pytest.raises(remote_code.RemoteCodeRefused, match="model_file 'arch.py'"):
        quantize.quantize(model, BUILTINS["q4"], tmp_path / "refused")
    assert not ran.exists()
    (tmp_path / "q4").mkdir()
    with remote_code.allowed(True):
        info = quantize.quantize(model, BUILTINS["q4"], tmp_path / "q4")
        assert ran.read_text() == "the model's code ran" and (tmp_path / "q4" / "arch.py").exists()
        quantized, tokenizer = load_as(tmp_path / "q4", "native")
    assert info["defaults"]["bits"] == 4 and len(tokenizer.encode("hello")) > 0
