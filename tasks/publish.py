"""publish: quantized model + its metrics -> model card, local export, hub upload.

The card is the artifact (deterministic from its inputs). Delivering it, the
export folder (model files + card) and the upload (only when the sweep names a
hub repo and a token is present), happens whenever the export folder does not
yet hold this card, or holds it but has not uploaded it while it now could. The token is read by huggingface_hub
itself and never passes through our code, logs or files.
"""

import json
import shutil
from collections import Counter
from pathlib import Path

from prefect import get_run_logger, task

from storage.artifacts import MANIFEST, ArtifactRef, Store
from storage.keys import tool_versions
from tasks.download import redact
from tasks.stage import artifact_cache

CODE_VERSION = "1"
RECEIPT = ".qsweep-publish.json"  # in the export folder: which card it holds, where it was uploaded


class PublishError(RuntimeError):
    pass


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _layer_summary(layers: dict, defaults: dict) -> list[str]:
    by_bits = Counter((v["bits"], v["group_size"], v.get("mode", "affine")) for v in layers.values())
    lines = []
    if defaults.get("bits"):
        lines.append(f"- default: {defaults['bits']}-bit {defaults.get('mode', 'affine')}, group size {defaults['group_size']}")
    for (bits, gs, mode), count in sorted(by_bits.items(), reverse=True):
        examples = sorted({".".join(p for p in k.split(".") if not p.isdigit()) for k, v in layers.items()
                           if (v["bits"], v["group_size"], v.get("mode", "affine")) == (bits, gs, mode)})
        lines.append(f"- {bits}-bit {mode}, group size {gs}: {count} modules ({', '.join(examples)})")
    return lines or ["- no quantization"]


def model_card(params: dict, quantized: dict, smoke: dict, benchmark: dict) -> str:
    metric = {r["metric"]: r["value"] for r in quantized["info"]["metrics"]}
    source = params["source"]
    base = f"{source['repo']}" if source.get("kind") == "hf" else None
    tags = ["mlx", "qsweep", "quantized" if quantized["info"]["defaults"] else "bf16", params["recipe"]["name"]]
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: quantized"]
    if params.get("license"):
        front.append(f"license: {params['license']}")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]

    name = f"{params['model']}-{params['recipe']['name']}-mlx"
    where = (f"[{base}](https://huggingface.co/{base}) at revision `{source['revision']}`" if base
             else f"`{params['model']}` ({source.get('kind')} source, content digest `{quantized['inputs'][0]['digest'][:12]}`)")
    recipe = params["recipe"]
    if source.get("kind") == "gguf":
        where = (f"`{params['model']}`, a GGUF file already quantized at **{source['quantization']}** "
                 f"(sha256 `{source['content'][:12]}`; its weights were dequantized, so they carry that rounding "
                 f"and no recipe here is more precise than it)")
    lines = front + [
        f"# {name}", "",
        f"This model was quantized from {where} with the qsweep recipe **{recipe['name']}**"
        + (f": {params['recipe_description']}." if params.get("recipe_description") else "."), "",
        "| | |", "|---|---|",
        f"| bits per weight | {metric['bits_per_weight']:.2f} |",
        f"| size on disk | {_size(metric['disk_bytes'])} |",
        f"| weights dtype | {recipe['dtype']} |", "",
        "Quantization plan:", *_layer_summary(quantized["info"]["layers"], quantized["info"]["defaults"]), "",
    ]

    results = benchmark["results"]
    run = benchmark["config"]["params"]
    lines += ["## Benchmarks", "",
              f"lm-eval {benchmark['lm_eval_version']}, {run['num_fewshot']}-shot, limit {run['limit']}, "
              f"chat template {'on' if benchmark['config']['apply_chat_template'] else 'off'}, "
              f"evaluated with {run.get('backend', 'native')} weights.", "",
              "| task | acc | acc_norm | n | data |", "|---|---|---|---|---|"]
    plan = {t["run"]: t for t in run.get("plan") or []}  # offline copies report under the official name
    for task_name, r in sorted(results.items()):
        def cell(m):
            v, e = r.get(f"{m},none"), r.get(f"{m}_stderr,none")
            return "" if v is None else f"{v:.3f}" + (f" ± {e:.3f}" if isinstance(e, (int, float)) else "")
        shown = plan.get(task_name, {"task": task_name, "data": ""})
        lines.append(f"| {shown['task']} | {cell('acc')} | {cell('acc_norm')} | "
                     f"{benchmark['n-samples'].get(task_name, {}).get('effective', '')} | {shown['data'] or ''} |")

    answer = smoke["text"].strip().replace("\n", " ")
    lines += ["", "## Smoke test", "", f"Prompt: {smoke['prompt']}", "",
              f"Answer ({smoke['verdict']}): {answer[:300]}", "",
              "## Use with mlx", "", "```python", "from mlx_lm import load, generate", "",
              f'model, tokenizer = load("{params.get("repo_id") or name}")',
              'messages = [{"role": "user", "content": "hello"}]',
              "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
              "print(generate(model, tokenizer, prompt=prompt, max_tokens=100))", "```", "",
              "Made with qsweep: " + ", ".join(f"{k} {v}" for k, v in tool_versions().items()) + ".", ""]
    return "\n".join(lines)


def export(model_dir: Path, card: str, dest: Path) -> None:
    """Model files plus the card into `dest`, replacing what was there, atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in (MANIFEST, "README.md", RECEIPT):
            shutil.copyfile(f, tmp / f.name)
    (tmp / "README.md").write_text(card)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def upload(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="qsweep publish",
                                 ignore_patterns=[RECEIPT])
        return str(getattr(info, "commit_url", info))
    except Exception as e:  # never re-raise the hub's own exception: its text may carry request headers
        raise PublishError(redact(f"upload to hub repo {repo_id!r} failed: {type(e).__name__}: {e}")) from None


def write_card(store: Store, params: dict, inputs: list[ArtifactRef], out: Path) -> dict:
    quantized, smoke, benchmark = inputs
    card = model_card(
        params,
        store.manifest(quantized),
        json.loads((store.path(smoke) / "smoke.json").read_text()),
        json.loads((store.path(benchmark) / "results.json").read_text()),
    )
    (out / "README.md").write_text(card)
    return {}


def wants_upload(params: dict) -> bool:
    from huggingface_hub import get_token

    return bool(params.get("repo_id")) and get_token() is not None


def delivered(card_key: str, params: dict, dest: Path) -> bool:
    """The export holds this card, and it reached the hub if it should have."""
    try:
        receipt = json.loads((dest / RECEIPT).read_text())
    except (OSError, ValueError):
        return False
    return receipt.get("card") == card_key and (receipt.get("uploaded") is not None or not wants_upload(params))


def deliver(store: Store, card: ArtifactRef, quantized: ArtifactRef, params: dict, dest: Path) -> dict:
    """Export the model with its card to `dest`, upload it when asked and able; return the receipt."""
    export(store.path(quantized), (store.path(card) / "README.md").read_text(), dest)
    receipt = {"card": card.key, "exported_to": str(dest), "uploaded": None}
    if params.get("repo_id"):
        if wants_upload(params):
            receipt["uploaded"] = upload(dest, params["repo_id"], params.get("private", True))
        else:
            receipt["note"] = "no hub token (HF_TOKEN or `hf auth login`): exported locally only"
    (dest / RECEIPT).write_text(json.dumps(receipt, indent=2))
    return receipt


def publish(store: Store, params: dict, inputs: list[ArtifactRef], dest: Path) -> tuple[ArtifactRef, dict]:
    """The card is the artifact; the export and the upload are its delivery, redone when missing."""
    card = store.produce("publish", CODE_VERSION, params, inputs, lambda out: write_card(store, params, inputs, out))
    return card, deliver(store, card, inputs[0], params, dest)


@task(name="publish", persist_result=True,
      cache_policy=artifact_cache("publish", CODE_VERSION, done=lambda key, p: delivered(key, p["params"], Path(p["dest"]))))
def publish_task(store: str, params: dict, inputs: list[ArtifactRef], dest: str) -> ArtifactRef:
    card, receipt = publish(Store(store), params, inputs, Path(dest))
    get_run_logger().info("published to %s%s", receipt["exported_to"],
                          f" and {receipt['uploaded']}" if receipt["uploaded"] else "")
    return card
