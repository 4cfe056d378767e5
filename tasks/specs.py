"""Each stage's settings as the sweep file gives them: the only place their defaults are written.

Light on purpose (pydantic only): validating a sweep file must not import mlx or lm-eval.
A stage's parameters are the model_dump() of its spec plus what the sweep resolved for this
machine (a backend, a corpus digest, a task plan), so the stages never fill in defaults themselves.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DATA = Path(__file__).parent / "data"  # files that ship with qsweep, named "qsweep:<path under tasks/>"
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a sweep's, model's or recipe's name: it names folders and repos
BACKENDS = ("auto", "native", "fp32")


def shipped_path(ref: str, relative_to: Path = Path(".")) -> Path:
    """A file named in a sweep or recipe: "qsweep:data/hamlet.txt" ships with qsweep; anything else is a path."""
    if ref.startswith("qsweep:"):
        return Path(__file__).parent / ref.removeprefix("qsweep:")
    return (Path(relative_to) / ref).resolve()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SmokeSpec(Strict):
    prompt: str = "What is the capital of France? Answer in one sentence."
    max_tokens: int = Field(48, ge=1, le=4096)
    # auto: native kernels on a GPU (the weights as users run them), the weights dequantized to fp32 on a CPU,
    # where mlx's quantized kernels with float16 scales run ~25x slower than fp32; rows and cards say which
    backend: Literal["auto", "native", "fp32"] = "auto"

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
    backend: Literal["auto", "native", "fp32"] = "auto"  # auto: native kernels on a GPU, dequantized fp32 on a CPU
    data: Literal["auto", "offline", "hub"] = "auto"  # auto: the offline copies when the hub is unreachable



class FidelitySpec(Strict):
    """Perplexity and KL divergence against the base model on a text corpus (tasks/fidelity.py)."""
    enabled: bool = True
    corpus: str = "qsweep:data/hamlet.txt"  # a text file; qsweep:... names one that ships with qsweep
    window: int = Field(512, ge=16)  # tokens per window; its second half is scored, as llama-perplexity does
    windows: int = Field(12, ge=1)
    top_k: int = Field(4096, ge=1, le=262144)  # base log-probs kept per position, plus the rest's mass
    backend: Literal["auto", "native", "fp32"] = "auto"

    @field_validator("corpus")
    @classmethod
    def _corpus_exists(cls, corpus: str) -> str:
        if not shipped_path(corpus).is_file():
            raise ValueError(f"{corpus!r}: no such file (a text file, or qsweep:data/hamlet.txt)")
        return corpus



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
