"""Code a model asks to run, and the sweep file's say on it.

A hub repo can ship Python that loading it would run: `auto_map` in config.json or
tokenizer_config.json (transformers' remote code), `model_file` in config.json (mlx-lm's
custom architectures), or .py files. qsweep runs none of it unless the sweep file sets
`trust_remote_code: true` for that model; the cell is refused after download, before
anything is loaded, and the other cells go on.
"""

import contextlib
import contextvars
import json
from pathlib import Path

_allowed = contextvars.ContextVar("trust_remote_code", default=False)


class RemoteCodeRefused(RuntimeError):
    pass


def asks_for(model_dir: Path) -> list[str]:
    """What in the model's files would run code on loading, one line each; empty if nothing."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for kind, target in sorted((config.get("auto_map") or {}).items()):
            targets = [t for t in (target if isinstance(target, list) else [target]) if t]
            found.append(f"{name} auto_map {kind}: {', '.join(targets)}")
        if name == "config.json" and config.get("model_file"):
            found.append(f"config.json model_file: {config['model_file']}")
    found += [f"{p.name} (Python)" for p in sorted(Path(model_dir).glob("*.py"))]
    return found


def check(model: str, model_dir: Path, allowed: bool) -> None:
    if allowed:
        return
    asks = asks_for(model_dir)
    if asks:
        raise RemoteCodeRefused(
            f"model {model!r} asks to run code from its repo ({'; '.join(asks)}); qsweep runs no model's code unless "
            f"the sweep file allows it for that model: models[].trust_remote_code: true")


@contextlib.contextmanager
def allowed(flag: bool):
    """Within this block, model loads may run the model's own code (the sweep file allowed it)."""
    token = _allowed.set(bool(flag))
    try:
        yield
    finally:
        _allowed.reset(token)


def trusted() -> bool:
    """Whether model loads here may run the model's own code."""
    return _allowed.get()


def load_options() -> dict:
    """mlx_lm.load's keyword arguments for the current allowance."""
    return {"trust_remote_code": trusted(), "tokenizer_config": {"trust_remote_code": trusted()}}
