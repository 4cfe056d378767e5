"""publish: model card, local export and hub upload, from real stage artifacts of the tiny model."""

import json
import shutil
import socket

import pytest
import yaml
from huggingface_hub import constants, get_token
from mlx_lm import load

from hub_server import COMMIT
from storage.artifacts import MANIFEST, Store
from tasks import benchmark, download, publish, quantize, smoke
from tasks.publish import PublishError
from tasks.recipes import BUILTINS

RECIPE = BUILTINS["qx86-hi"]
TOKEN = "hf_SECRETtoken123"


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """A store holding download -> quantize -> smoke -> benchmark of the tiny model with qx86-hi."""
    store = Store(tmp_path_factory.mktemp("store"))
    resolved = download.resolve_source(str(tiny_model))
    base = store.produce("download", download.CODE_VERSION, download.key_params(resolved), [],
                         lambda out: download.download(resolved, out))
    q = store.produce("quantize", quantize.CODE_VERSION, RECIPE.params(), [base],
                      lambda out: quantize.quantize(store.path(base), RECIPE, out))
    smoke_params = {"prompt": "Say hello.", "max_tokens": 8}
    s = store.produce("smoke", smoke.CODE_VERSION, smoke_params, [q],
                      lambda out: smoke.smoke(store.path(q), smoke_params, out))
    bench_params = {"tasks": ["qsweep_demo_mc"], "limit": 8, "batch_size": 8}
    b = store.produce("benchmark", benchmark.CODE_VERSION, bench_params, [q],
                      lambda out: {"metrics": benchmark.benchmark(store.path(q), bench_params, out)})
    params = {"model": "tiny", "recipe": RECIPE.params(), "recipe_description": RECIPE.description,
              "source": download.key_params(resolved), "repo_id": None, "private": True, "license": None}
    return store, [q, s, b], params


@pytest.fixture
def store(made, tmp_path):
    """This test's own copy of the store, so that no publish artifact carries over between tests."""
    return Store(shutil.copytree(made[0].root, tmp_path / "store"))


def run_publish(store, made, dest, **change):
    """The publish stage as a sweep runs it; returns (card, manifest info)."""
    _, inputs, params = made
    card, receipt = publish.publish(store, {**params, **change}, inputs, dest)
    return (store.path(card) / "README.md").read_text(), receipt


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def table_row(card: str, first_cell: str) -> list[str]:
    [row] = [line for line in card.splitlines() if line.startswith(f"| {first_cell} |")]
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.fixture
def no_stored_token(tmp_path, monkeypatch):
    """No token from the environment nor from a `hf auth login` on this machine."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))


def test_card_front_matter(made, store, tmp_path):
    card, _ = run_publish(store, made, tmp_path / "export")
    meta = front_matter(card)
    assert meta["library_name"] == "mlx"
    assert {"mlx", "quantized", RECIPE.name} <= set(meta["tags"])
    assert "base_model" not in meta  # a local model has no hub repo to point to


def test_card_names_the_hub_base_model(made, store, tmp_path):
    hub_source = {"kind": "hf", "repo": "org/tiny", "revision": COMMIT}
    card, _ = run_publish(store, made, tmp_path / "export", source=hub_source)
    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "quantized"
    assert COMMIT in card


def test_card_shows_size_and_benchmarks(made, store, tmp_path):
    q, s, b = made[1]
    card, _ = run_publish(store, made, tmp_path / "export")
    bpw = {r["metric"]: r["value"] for r in store.manifest(q)["info"]["metrics"]}["bits_per_weight"]
    assert float(table_row(card, "bits per weight")[1]) == pytest.approx(bpw, abs=0.005)
    assert "8-bit affine, group size 32" in card and "6-bit affine, group size 32" in card

    results = json.loads((store.path(b) / "results.json").read_text())
    for task, metrics in results["results"].items():
        name, acc, acc_norm, n, data = table_row(card, task)
        assert float(acc.split(" ± ")[0]) == pytest.approx(metrics["acc,none"], abs=0.0005)
        assert float(acc_norm.split(" ± ")[0]) == pytest.approx(metrics["acc_norm,none"], abs=0.0005)
        assert int(n) == 8
    assert "limit 8" in card

    answer = json.loads((store.path(s) / "smoke.json").read_text())
    assert f"Answer ({answer['verdict']})" in card


def test_export_holds_model_and_card_and_loads(made, store, tmp_path):
    q = made[1][0]
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"from an earlier export")
    card, info = run_publish(store, made, dest)

    assert info["exported_to"] == str(dest) and info["uploaded"] is None
    model_files = {p.name for p in store.path(q).iterdir() if p.name not in (MANIFEST, "README.md")}
    assert {p.name for p in dest.iterdir()} == model_files | {"README.md", publish.RECEIPT}
    for name in model_files:
        assert (dest / name).read_bytes() == (store.path(q) / name).read_bytes(), name
    assert (dest / "README.md").read_text() == card
    model, tokenizer = load(str(dest))
    assert tokenizer.chat_template is not None


def test_repo_without_token_exports_locally(made, store, tmp_path, no_stored_token):
    assert get_token() is None
    dest = tmp_path / "export"
    card, info = run_publish(store, made, dest, repo_id="me/tiny-qx86-hi-mlx")
    assert info["uploaded"] is None and "token" in info["note"]
    assert (dest / "README.md").read_text() == card
    assert 'load("me/tiny-qx86-hi-mlx")' in card


def test_failed_upload_never_shows_the_token(made, store, tmp_path, no_stored_token, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert get_token() == TOKEN
    dest = store.root / "published" / "tiny-qx86-hi-mlx"

    with pytest.raises(PublishError) as err:
        run_publish(store, made, dest, repo_id="me/tiny-qx86-hi-mlx")
    assert "me/tiny-qx86-hi-mlx" in str(err.value)
    assert TOKEN not in str(err.value) and err.value.__cause__ is None

    key = next((store.root / "artifacts" / "publish").iterdir()).name  # the card itself is fine
    assert not publish.delivered(key, {"repo_id": "me/tiny-qx86-hi-mlx"}, dest)  # so the next run tries again
    leaked = [p for root in (store.root, tmp_path) for p in root.rglob("*")
              if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


# --- delivery is redone when it does not hold: a token set later, an export deleted ---

def test_setting_a_token_later_uploads(made, store, tmp_path, no_stored_token, monkeypatch):
    card, _ = run_publish(store, made, tmp_path / "export", repo_id="me/tiny-qx86-hi-mlx")
    params = {**made[2], "repo_id": "me/tiny-qx86-hi-mlx"}
    key = store.get("publish", next((store.root / "artifacts" / "publish").iterdir()).name).key
    assert publish.delivered(key, params, tmp_path / "export")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not publish.delivered(key, params, tmp_path / "export")  # it can upload now, so it is not done
    with pytest.raises(PublishError):  # i.e. it tried to upload
        run_publish(store, made, tmp_path / "export", repo_id="me/tiny-qx86-hi-mlx")


def test_a_deleted_export_is_not_delivered(made, store, tmp_path):
    run_publish(store, made, tmp_path / "export")
    key = next((store.root / "artifacts" / "publish").iterdir()).name
    assert publish.delivered(key, made[2], tmp_path / "export")
    shutil.rmtree(tmp_path / "export")
    assert not publish.delivered(key, made[2], tmp_path / "export")
    assert not publish.delivered(key, made[2], tmp_path / "elsewhere")
