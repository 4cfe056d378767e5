"""The stages, declared once: what each takes, whether it holds a model, where its code is.

A stage is a module of tasks/ with a CODE_VERSION and a build function that writes its
artifact's files into job.out and returns the info its manifest keeps. Everything else
follows from STAGES: the key (storage/keys.py, through Stage.key), the Prefect task that runs
it and its model slot (flows/stage.py), the order of a cell (flows/cells.py). No Prefect here,
so `qsweep status` and the tests can name stages without starting it.
"""

import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from storage.artifacts import ArtifactRef, Store, artifact_key


@dataclass(frozen=True)
class Job:
    """What a stage's build gets: where to write, and what its key was made of."""

    out: Path  # the artifact's folder, being written (renamed into place once whole)
    params: dict
    inputs: list[Path]  # the input artifacts' folders, in Stage.needs order
    scratch: Path  # a file or folder the build may make, kept across a crash and removed once the artifact
    # is whole: a resumable build's progress (the benchmark's checkpoint)
    extra: dict = field(default_factory=dict)  # what the build needs but the key must not hold


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # tasks.<module>: its CODE_VERSION and the build function
    needs: tuple[str, ...] = ()  # stages whose artifacts it takes, in order; a missing optional one is skipped
    loads_model: bool = False  # holds one of the machine's model slots while it builds
    shared: bool = False  # one artifact for every recipe of a model
    retries: int = 0
    builder: str = "build"  # the function of `module` that writes the artifact: builder(job) -> info

    @property
    def code_version(self) -> str:
        return importlib.import_module(self.module).CODE_VERSION

    def key(self, params: dict, inputs: list[ArtifactRef]) -> str:
        return artifact_key(self.name, self.code_version, params, inputs)

    def produce(self, store: Store, params: dict, inputs: list[ArtifactRef], extra: dict | None = None) -> ArtifactRef:
        """The stage's artifact, built only if the store lacks it."""
        build = getattr(importlib.import_module(self.module), self.builder)
        scratch = store.root / "partial" / self.name / self.key(params, inputs)

        def job(out: Path) -> dict:
            scratch.parent.mkdir(parents=True, exist_ok=True)
            info = build(Job(out, params, [store.path(i) for i in inputs], scratch, extra or {})) or {}
            if self.loads_model:  # where the model ran: speed and memory (and the last bits of numbers) depend on it
                from tasks.loading import describe_device

                info.setdefault("device", describe_device())
            return info

        ref = store.produce(self.name, self.code_version, params, inputs, job)
        shutil.rmtree(scratch, ignore_errors=True) if scratch.is_dir() else scratch.unlink(missing_ok=True)
        return ref


STAGES = {s.name: s for s in (
    Stage("download", "tasks.download", retries=2, shared=True),
    Stage("sensitivity", "tasks.sensitivity", ("download",), loads_model=True, shared=True),  # searched recipes only
    Stage("quantize", "tasks.quantize", ("download", "sensitivity"), loads_model=True),
    Stage("smoke", "tasks.smoke", ("quantize", "download"), loads_model=True),  # the base judges the answer
    Stage("benchmark", "tasks.benchmark", ("quantize",), loads_model=True),
    Stage("reference", "tasks.fidelity", ("download",), loads_model=True, shared=True, builder="build_reference"),
    Stage("fidelity", "tasks.fidelity", ("quantize", "reference"), loads_model=True),
    Stage("publish", "tasks.publish", ("quantize", "smoke", "benchmark", "fidelity")),  # the card
)}
MEASURING = ("download", "sensitivity", "quantize", "smoke", "benchmark", "reference", "fidelity")
