"""The sweep file: models x recipes plus stage settings, validated before any work.

Every mistake is reported with the field's path in the file and what is allowed,
e.g. `recipes[2].bits: bits 7 is not allowed for mode affine; allowed: 2, 3, 4, 5, 6, 8`.
"""

import hashlib
import re
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from tasks.recipes import Recipe, RecipeSpec, get_recipe, recipe_from_spec, with_calibration_digest
from tasks.specs import (SAFE_NAME, BenchmarkSpec, FidelitySpec, GatesSpec, SearchSpec, SmokeSpec, Strict,
                         spec_errors)


class SweepError(ValueError):
    pass


class ModelSpec(Strict):
    name: str
    source: str  # hf://org/name[@revision], demo://tiny-llama, or a local directory
    trust_remote_code: bool = False  # let the model's own code run on loading (tasks/remote_code.py)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(SAFE_NAME, name):  # nothing may escape the store
            raise ValueError(f"{name!r}: letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return name


class PublishSpec(Strict):
    repo: str | None = None  # e.g. "my-org/{model}-{recipe}-mlx"; uploads only with a token present
    private: bool = True
    export_dir: str | None = None  # default: <store>/published
    license: str | None = None

    @field_validator("repo")
    @classmethod
    def _placeholders(cls, repo):
        if repo is not None:
            try:
                name = repo.format(model="m", recipe="r")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{repo!r}: bad placeholder {e}; allowed: {{model}}, {{recipe}}") from None
            if name.count("/") != 1:
                raise ValueError(f"{repo!r}: must be a hub repo id 'org/name' (placeholders {{model}}, {{recipe}})")
        return repo


class CellRef(Strict):
    model: str
    recipe: str


class CardSpec(Strict):
    """The author's part of every card: notes placed in it, other models' cells shown beside it."""
    notes: dict[str, str] = {}  # a model, recipe or model/recipe -> a Markdown file (relative to the sweep file)
    compare_with: list[CellRef] = []  # cells of other models in the store, measured on the same questions
    compare_matching: bool = True  # and, in a sweep of several models, the other models' cells of the same recipe


class ConcurrencySpec(Strict):
    """How much runs at once. Speed and peak memory are measured while other cells run, so
    numbers meant for a card come from the defaults."""
    cells: int = Field(1, ge=1, le=64)  # cells of this sweep measured at once
    model_slots: int = Field(1, ge=1, le=64)  # stages holding a model in memory at once, per machine


class Sweep(Strict):
    name: str = Field(pattern=f"^{SAFE_NAME}$")
    models: list[ModelSpec] = Field(min_length=1)
    recipes: list[Annotated[Union[str, RecipeSpec], AfterValidator(lambda r: _check_recipe(r))]] = []
    smoke: SmokeSpec = SmokeSpec()
    benchmark: BenchmarkSpec = BenchmarkSpec()
    fidelity: FidelitySpec = FidelitySpec()
    search: SearchSpec = SearchSpec()  # recipes found for size budgets: cells auto-<budget>
    publish: PublishSpec = PublishSpec()
    gates: GatesSpec = GatesSpec()
    card: CardSpec = CardSpec()
    concurrency: ConcurrencySpec = ConcurrencySpec()

    @model_validator(mode="after")
    def _unique(self):
        if not self.recipes and not self.search.names():
            raise ValueError("recipes: none given; name at least one recipe, or a budget under search "
                             "(search.budgets_bpw or search.budgets_bytes)")
        if self.search.names() and self.fidelity.enabled and _same_text(self.search.calibration, self.fidelity.corpus):
            raise ValueError(f"search.calibration: {self.search.calibration} is the fidelity corpus's text: a recipe "
                             "would be judged on the text it was chosen on; allowed: any other text file")
        for what, names in (("models", [m.name for m in self.models]), ("recipes", self.recipe_names())):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate names {', '.join(dupes)}; each must be unique")
        repo = self.publish.repo or ""
        for what, placeholder in (("models", "{model}"), ("recipes", "{recipe}")):
            if repo and len(getattr(self, what)) > 1 and placeholder not in repo:
                raise ValueError(f"publish.repo: {repo!r} lacks {placeholder}: every cell would upload to one repo")
        models, recipes = [m.name for m in self.models], self.recipe_names()
        cells = [f"{m}/{r}" for m in models for r in recipes]
        for i, name in enumerate(self.gates.allow):
            if name not in recipes + cells:
                raise ValueError(f"gates.allow[{i}]: {name!r} is not a recipe or model/recipe cell of this sweep; "
                                 f"allowed: {', '.join(recipes + cells)}")
        for name in self.card.notes:
            if name not in models + recipes + cells:
                raise ValueError(f"card.notes: {name!r} is not a model, recipe or model/recipe cell of this sweep; "
                                 f"allowed: {', '.join(models + recipes + cells)}")
        return self

    def allowed_gated(self, model: str, recipe: str) -> bool:
        """Whether the sweep file lets this cell out although it fails a gate."""
        return recipe in self.gates.allow or f"{model}/{recipe}" in self.gates.allow

    def notes_for(self, model: str, recipe: str) -> list[str]:
        """The Markdown of the notes files for this cell: the model's, the recipe's, the cell's, in that order."""
        return [Path(self.card.notes[k]).read_text(encoding="utf-8")
                for k in (model, recipe, f"{model}/{recipe}") if k in self.card.notes]

    def recipe_names(self) -> list[str]:
        """Every recipe of a cell: those listed, then the searched ones (auto-<budget>)."""
        return [recipe_name(r) for r in self.recipes] + self.search.names()

    def recipe_objects(self) -> list[Recipe]:
        return [get_recipe(r) if isinstance(r, str) else to_recipe(r) for r in self.recipes]


def _check_recipe(r):
    get_recipe(r) if isinstance(r, str) else to_recipe(r).check()
    return r


def _same_text(a: str, b: str) -> bool:
    from tasks.specs import shipped_path

    return shipped_path(a).read_bytes() == shipped_path(b).read_bytes()


def recipe_name(r) -> str:
    return get_recipe(r).name if isinstance(r, str) else r.name


def to_recipe(spec: RecipeSpec) -> Recipe:
    recipe = recipe_from_spec(spec).check()
    # a learned recipe's calibration text: relative paths from where qsweep runs; its digest joins the key
    return with_calibration_digest(recipe, Path(".")) if recipe.calibration else recipe


def parse_sweep(data, origin: str = "sweep", what: str = "sweep file") -> Sweep:
    """`what` names the input in the message: `qsweep quantize` validates its options as the sweep file they make."""
    if not isinstance(data, dict):
        got = "nothing (empty)" if data is None else {list: "a list", str: "a string", bool: "true or false",
                                                       int: "a number", float: "a number"}.get(type(data), type(data).__name__)
        raise SweepError(f"{origin}: expected a mapping with keys {', '.join(Sweep.model_fields)}; got {got}")
    try:
        return Sweep.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # A recipe given as a mapping fails the `str` branch too; that error says nothing useful.
        errors = [x for x in errors if not (x["type"] == "string_type" and "recipes" in x["loc"] and len(errors) > 1)]
        lines = spec_errors(errors, Sweep)
        raise SweepError(f"{origin}: invalid {what}:\n  " + "\n  ".join(lines)) from None


def load_sweep(path: Path | str) -> tuple[Sweep, str]:
    """The validated sweep and the sha256 of the file's bytes."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # no bytes, blanks or comments only
        raise SweepError(f"{path}: empty; a sweep file is a mapping with keys {', '.join(Sweep.model_fields)}")
    notes = (data.get("card") or {}).get("notes") if isinstance(data, dict) else None
    if isinstance(notes, dict):  # notes files are relative to the sweep file, wherever qsweep runs
        for name, file in notes.items():
            if isinstance(file, str):
                notes[name] = str((path.parent / file).resolve())
                _check_notes(name, Path(notes[name]), file)
    return parse_sweep(data, str(path)), hashlib.sha256(raw).hexdigest()


def _check_notes(name: str, file: Path, as_written: str) -> None:
    try:
        file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__).lower()
        raise SweepError(f"card.notes.{name}: {as_written!r}: {why}; a Markdown file, relative to the sweep file") from None
