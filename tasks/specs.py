"""Each stage's settings as the sweep file gives them: the only place their defaults are written.

Light on purpose (pydantic only): validating a sweep file must not import mlx or lm-eval.
A stage's parameters are the model_dump() of its spec plus what the sweep resolved for this
machine (a backend, a corpus digest, a task plan), so the stages never fill in defaults themselves.
"""

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a sweep's, model's or recipe's name: it names folders and repos
# What mlx's quantize accepts, per mode (mlx.core.quantize docs; checked on the CPU build).
MODES = {
    "affine": {"bits": (2, 3, 4, 5, 6, 8), "group_size": (32, 64, 128)},
    "mxfp4": {"bits": (4,), "group_size": (32,)},
    "nvfp4": {"bits": (4,), "group_size": (16,)},
    "mxfp8": {"bits": (8,), "group_size": (32,)},
}
Backend = Literal["auto", "native", "fp32"]  # how a stage runs the weights (SmokeSpec.backend says what each means)
BACKENDS = get_args(Backend)


def shipped_path(ref: str, relative_to: Path = Path(".")) -> Path:
    """A file named in a sweep or recipe: "qsweep:data/hamlet.txt" ships with qsweep; anything else is a path."""
    if ref.startswith("qsweep:"):
        return Path(__file__).parent / ref.removeprefix("qsweep:")
    return (Path(relative_to) / ref).resolve()


def shipped_ref(path: Path) -> str:
    """How a sweep or recipe names a file, the other way round: "qsweep:<path under tasks/>" for one that
    ships with qsweep (the same in every checkout), else the path itself."""
    path, tasks_dir = Path(path).resolve(), Path(__file__).parent.resolve()
    return f"qsweep:{path.relative_to(tasks_dir).as_posix()}" if path.is_relative_to(tasks_dir) else str(path)


def existing_text(ref: str, shipped_example: str) -> str:
    """A text file named in a sweep file, checked to exist; the message names one that ships with qsweep."""
    if not shipped_path(ref).is_file():
        raise ValueError(f"{ref!r}: no such file (a text file, or {shipped_example})")
    return ref


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def spec_errors(errors: list[dict], root: type[BaseModel]) -> list[str]:
    """One line per mistake, sorted: the field's path as the file writes it and what is allowed, e.g.
    `recipes[0].rules[0].bitz: unknown key; allowed keys: match, layers, bits, group_size, mode, keep`."""
    out = set()
    for err in errors:  # ValidationError.errors() of a `root`
        where, holder = _locate(err["loc"], root)
        if err["type"] == "extra_forbidden":
            out.add(f"{where}: unknown key; allowed keys: {', '.join(holder.model_fields if holder else ())}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            out.add(f"{where}: {msg}" if where else msg)
    return sorted(out)


def _locate(loc: tuple, root: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """The path as the file writes it, and the model whose keys its last part was looked up in.
    pydantic puts validators ('function-after[...]') and union branches ('str', 'RecipeSpec') into the
    path; the file has neither."""
    where, cls, holder, annotation = "", root, root, None
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if isinstance(part, str) and part in _type_names(annotation):
            annotation = None  # a union's branch: the part after it is the file's again
            continue
        holder = cls
        if isinstance(part, int):
            where += f"[{part}]"
            continue
        where += ("." if where else "") + part
        field = cls.model_fields.get(part) if cls else None
        annotation = field.annotation if field else None
        cls = _model_in(annotation)
    return where, holder


def _args(annotation) -> list:
    """Every type inside an annotation: list[Annotated[str | RecipeSpec, ...]] -> [Annotated..., str | RecipeSpec, str, ...]."""
    out, todo = [], list(get_args(annotation))
    while todo:
        a = todo.pop(0)
        out.append(a)
        todo += get_args(a)
    return out


def _type_names(annotation) -> set[str]:
    return {a.__name__ if isinstance(a, type) else str(a) for a in _args(annotation)} if annotation else set()


def _model_in(annotation) -> type[BaseModel] | None:
    return next((a for a in [annotation, *_args(annotation)] if isinstance(a, type) and issubclass(a, BaseModel)), None)


class SmokeSpec(Strict):
    prompt: str = "What is the capital of France? Answer in one sentence."
    max_tokens: int = Field(48, ge=1, le=4096)
    # auto: native kernels on a GPU (the weights as users run them), the weights dequantized to fp32 on a CPU,
    # where mlx's quantized kernels with float16 scales run ~25x slower than fp32; rows and cards say which
    backend: Backend = "auto"

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be empty: the smoke test asks the model this")
        return prompt



class BenchmarkSpec(Strict):
    tasks: list[str] = Field(["qsweep_demo_mc"], min_length=1)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0)
    chat_template: bool = False  # multiple-choice scores skew with it on; the card says which
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    backend: Backend = "auto"  # auto: native kernels on a GPU, dequantized fp32 on a CPU
    data: Literal["auto", "offline", "hub"] = "auto"  # auto: the offline copies when the hub is unreachable



class FidelitySpec(Strict):
    """Perplexity and KL divergence against the base model on a text corpus (tasks/fidelity.py)."""
    enabled: bool = True
    corpus: str = "qsweep:data/hamlet.txt"  # a text file; qsweep:... names one that ships with qsweep
    window: int = Field(512, ge=16)  # tokens per window; its second half is scored, as llama-perplexity does
    windows: int = Field(12, ge=1)
    top_k: int = Field(4096, ge=1, le=262144)  # base log-probs kept per position, plus the rest's mass
    backend: Backend = "auto"

    @field_validator("corpus")
    @classmethod
    def _corpus_exists(cls, corpus: str) -> str:
        return existing_text(corpus, "qsweep:data/hamlet.txt")



class SearchSpec(Strict):
    """Recipes found for size budgets from measured sensitivity (tasks/sensitivity.py, tasks/search.py): each
    budget becomes a cell named auto-<bpw> (or auto-<bytes>B), measured like any recipe."""
    budgets_bpw: list[float] = []  # bits per weight over the quantizable modules, scales included (as `recipes show`)
    budgets_bytes: list[int] = []  # bytes of the quantizable modules
    formats: list[str] = []  # what a module may take, e.g. q4g64, mxfp4, float (format_names); empty: every format
    calibration: str = "qsweep:data/calibration.txt"  # the text sensitivity is measured on; never the fidelity corpus
    window: int = Field(128, ge=16)  # tokens per calibration window (scored from window/8 on)
    windows: int = Field(5, ge=1)
    check_every: int = Field(4, ge=0)  # every n-th module is also measured in a second format (0: none)
    backend: Backend = "auto"

    @field_validator("budgets_bpw")
    @classmethod
    def _bpw(cls, budgets: list[float]) -> list[float]:
        for b in budgets:
            if not 1 < b <= 32:
                raise ValueError(f"{b}: a budget in bits per weight, more than 1 and at most 32")
        return budgets

    @field_validator("budgets_bytes")
    @classmethod
    def _bytes(cls, budgets: list[int]) -> list[int]:
        if any(b <= 0 for b in budgets):
            raise ValueError(f"{budgets}: budgets in bytes are positive")
        return budgets

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        allowed = format_names()
        for f in formats:
            if f not in allowed:
                raise ValueError(f"{f!r} is not a format; allowed: {', '.join(allowed)}")
        return formats

    @field_validator("calibration")
    @classmethod
    def _calibration_exists(cls, text: str) -> str:
        return existing_text(text, "qsweep:data/calibration.txt")

    def names(self) -> list[str]:
        return [f"auto-{b:g}" for b in self.budgets_bpw] + [f"auto-{b}B" for b in self.budgets_bytes]


def format_names() -> list[str]:
    """Every format a searched module may take (MODES), named as format_name names them; float last."""
    return [format_name({"bits": b, "group_size": g, "mode": mode}) for mode, allowed in MODES.items()
            for b in allowed["bits"] for g in allowed["group_size"]] + ["float"]


def format_name(fmt: dict | None) -> str:
    """A format's short name: affine 4-bit group 64 -> q4g64; the MX formats by their mode (mxfp4, nvfp4,
    mxfp8: one bits and group size each); None (stays in float) -> float."""
    if fmt is None:
        return "float"
    return f"q{fmt['bits']}g{fmt['group_size']}" if fmt["mode"] == "affine" else fmt["mode"]


def parse_format(name: str) -> dict | None:
    """format_name the other way round."""
    if name == "float":
        return None
    if name in MODES:
        return {"bits": MODES[name]["bits"][0], "group_size": MODES[name]["group_size"][0], "mode": name}
    bits, group = name[1:].split("g")
    return {"bits": int(bits), "group_size": int(group), "mode": "affine"}


class GatesSpec(Strict):
    """What a variant must show before qsweep lets it out (tasks/gates.py). A cell that fails a gate is
    measured, recorded and carded like any other, but neither exported for upload nor uploaded.
    The defaults come from measurements on the demo model (README, "Quality gates")."""
    smoke: Literal["ok", "any"] = "ok"  # the smoke answer's verdict must be ok
    max_kl_mean: float | None = Field(1.0, gt=0)  # mean KL divergence from the base, nats per token; null: no gate
    max_ppl_ratio: float | None = Field(1.5, gt=1)  # perplexity over the base's; null: no gate
    allow: list[str] = []  # recipes or model/recipe cells published even when they fail a gate

    def limits(self) -> dict:
        return self.model_dump(exclude={"allow"})
