"""Suite files and the trial plan they expand to.

A suite is a TOML or YAML file naming datasets and their parameter grids, models, loss
weightings, parameter budgets, seeds and training settings. The built-in suites live in
``benchmark/suites/``; a user passes a path to run their own. A suite is validated whole before
any trial runs: unknown keys, unknown model, weighting or dataset names, empty grids and
out-of-range values raise :class:`SuiteError` naming the key.

The optional ``quick`` table contains overrides, in the same layout as the suite, that ``--quick``
merges in to shrink the suite to a smoke test.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import inspect
import itertools
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from benchmark.references import REFERENCES
from datasets import DATASETS
from models import MODELS
from models.weighting import DEFAULT_WEIGHTING, WEIGHTINGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SUITE_SUFFIXES = (".toml", ".yaml", ".yml")


class SuiteError(ValueError):
    """A suite file that cannot be run, with the reason and the key at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSection(_Strict):
    """One dataset: fixed parameters plus a grid whose every combination is a sweep point."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid value list `{key}` is empty; give at least one value")
        return grid


class TrainingSection(_Strict):
    """Training settings shared by every trial of the suite."""

    max_epochs: int = Field(20, ge=1)  # upper bound on epochs; early stopping may end sooner
    batch_size: int = Field(256, ge=1)  # samples per training step
    eval_batch_size: int = Field(4096, ge=1)  # samples per validation or test step
    learning_rate: float = Field(1e-3, gt=0)  # Adam step size
    weight_decay: float = Field(0.0, ge=0)  # Adam L2 penalty
    patience: int | None = Field(None, ge=1)  # epochs without validation gain before stopping
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per trial for streamed splits


class Suite(_Strict):
    """A whole suite file, after defaults are filled in."""

    name: str = Field(min_length=1)
    description: str = ""
    datasets: list[DatasetSection] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    model_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    model_grid: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    # Loss weightings crossed with the models; see models/weighting.py.
    weightings: list[str] = Field(default_factory=lambda: [DEFAULT_WEIGHTING], min_length=1)
    weighting_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    references: list[str] = Field(default_factory=list)
    reference_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    budgets: list[int] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    training: TrainingSection = Field(default_factory=TrainingSection)
    quick: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model_grid")
    @classmethod
    def _model_grid_not_empty(
        cls, grid: dict[str, dict[str, list[Any]]]
    ) -> dict[str, dict[str, list[Any]]]:
        for model, options in grid.items():
            for key, values in options.items():
                if not values:
                    raise ValueError(
                        f"value list `{model}.{key}` is empty; give at least one value"
                    )
        return grid

    @field_validator("budgets")
    @classmethod
    def _budgets_positive(cls, budgets: list[int]) -> list[int]:
        for budget in budgets:
            if budget < 1:
                raise ValueError(f"budget {budget!r} is not a positive number of parameters")
        return budgets

    @field_validator("weightings")
    @classmethod
    def _weightings_unique(cls, weightings: list[str]) -> list[str]:
        if len(set(weightings)) != len(weightings):
            raise ValueError(f"weightings {weightings} repeat a name; each must appear once")
        return weightings

    @field_validator("seeds")
    @classmethod
    def _seeds_valid(cls, seeds: list[int]) -> list[int]:
        for seed in seeds:
            if seed < 0:
                raise ValueError(f"seed {seed!r} is negative; seeds must be >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a value; each seed must appear once")
        return seeds


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a model trained with one loss weighting at one budget and seed on one point
    of a dataset's grid.

    A trial of kind ``"reference"`` fits a non-neural reference (``model`` is its name) and has
    no budget, weighting or training settings.
    """

    suite: str
    dataset: str
    dataset_params: dict[str, Any]
    grid_point: dict[str, Any]
    model: str
    model_options: dict[str, Any]
    budget: int
    seed: int
    training: dict[str, Any]
    kind: str = "model"
    variant: dict[str, Any] = field(default_factory=dict)  # this trial's point of model_grid
    weighting: str = DEFAULT_WEIGHTING
    weighting_options: dict[str, Any] = field(default_factory=dict)

    @property
    def default_weighting(self) -> bool:
        """Whether the trial sums its task losses, as every trial did before weightings existed."""
        return self.weighting == DEFAULT_WEIGHTING and not self.weighting_options

    def config(self) -> dict[str, Any]:
        """Return the resolved configuration that identifies the trial."""
        if self.kind == "reference":
            return {
                "dataset": {"name": self.dataset,
                            "params": {**self.dataset_params, **self.grid_point}},
                "reference": {"name": self.model, "options": self.model_options},
                "seed": self.seed,
            }
        config = {
            "dataset": {"name": self.dataset, "params": {**self.dataset_params, **self.grid_point}},
            "model": {"name": self.model, "options": self.model_options},
            "budget": self.budget,
            "seed": self.seed,
            "training": self.training,
        }
        # Left out for the default, so trials stored before weightings existed keep their hash.
        if not self.default_weighting:
            config["weighting"] = {"name": self.weighting, "options": self.weighting_options}
        return config

    @property
    def trial_hash(self) -> str:
        """A hash of :meth:`config`, the trial's identity across sweeps."""
        canonical = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The model as the report shows it: its name, its ``model_grid`` point if any, and
        ``+<weighting>`` unless the weighting is the default, as in ``mmoe[num_experts=4]+pcgrad``.
        """
        label = self.model
        if self.variant:
            label += "[" + ",".join(f"{key}={value}" for key, value in self.variant.items()) + "]"
        return label if self.default_weighting else f"{label}+{self.weighting}"

    @property
    def name(self) -> str:
        parts = [self.label, self.dataset]
        parts += [f"{key}={value}" for key, value in self.grid_point.items()]
        if self.kind == "reference":
            parts.insert(0, "reference")
        else:
            parts.append(f"budget={self.budget}")
        return " ".join(parts + [f"seed={self.seed}"])


def builtin_suites() -> dict[str, Path]:
    """Return the built-in suite files by name."""
    folder = resources.files("benchmark") / "suites"
    return {
        Path(str(item)).stem: Path(str(item))
        for item in folder.iterdir()
        if Path(str(item)).suffix in SUITE_SUFFIXES
    }


def resolve_suite_path(name_or_path: str) -> Path:
    """Return the file of a built-in suite name, or ``name_or_path`` itself if it is a file."""
    suites = builtin_suites()
    if name_or_path in suites:
        return suites[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise SuiteError(
        f"Suite {name_or_path!r} is neither a built-in suite ({', '.join(sorted(suites))}) nor "
        f"an existing file. Pass a built-in name or the path of a .toml or .yaml suite file."
    )


def read_suite_file(path: Path) -> dict[str, Any]:
    """Parse a suite file into plain data, by its suffix."""
    if path.suffix not in SUITE_SUFFIXES:
        raise SuiteError(
            f"Suite file {str(path)!r} has suffix {path.suffix!r}; expected one of "
            f"{', '.join(SUITE_SUFFIXES)}."
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SuiteError(f"Suite file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}")
    if not isinstance(data, dict):
        raise SuiteError(f"Suite file {str(path)!r} must hold a table of keys at its top level.")
    return data


def load_suite(name_or_path: str, quick: bool = False, overrides: dict | None = None) -> Suite:
    """Read, merge and validate a suite.

    Args:
        name_or_path: A built-in suite name or the path of a suite file.
        quick: Merge the suite's ``quick`` overrides in.
        overrides: Top-level values that replace the file's (from command-line options).

    Raises:
        SuiteError: If the file is missing, malformed or invalid; the message names the key.
    """
    path = resolve_suite_path(name_or_path)
    data = read_suite_file(path)
    data.setdefault("name", path.stem)
    if quick:
        data = _deep_merge(data, data.get("quick", {}))
    for key, value in (overrides or {}).items():
        if key == "training":
            data["training"] = {**data.get("training", {}), **value}
        else:
            data[key] = value
    return validate_suite(data, source=str(path), overridden=set(overrides or {}))


def validate_suite(
    data: dict[str, Any], source: str = "<suite>", overridden: Collection[str] = ()
) -> Suite:
    """Check a suite's structure, then every name and parameter against the registries.

    ``overridden`` names the top-level keys that came from the command line, so that an error
    in one of them points to the option rather than to the file.
    """
    try:
        suite = Suite.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"`{_key_path(issue['loc'])}`{_origin(issue['loc'], overridden)}: {_describe(issue)}"
            for issue in error.errors()
        )
        raise SuiteError(f"Invalid suite {source!r}: {problems}") from None

    for index, model in enumerate(suite.models):
        _lookup(MODELS, model, f"models[{index}]", source, _origin(("models",), overridden))
    for model, options in suite.model_options.items():
        if model not in suite.models:
            raise SuiteError(
                f"Invalid suite {source!r}: `model_options.{model}` names a model that is not in "
                f"`models` ({', '.join(suite.models)}). Add it to `models` or remove its options."
            )
        _check_keywords(MODELS.get(model).factory, options, f"model_options.{model}", source,
                        reserved=("input_dim", "task_dims", "width"))
    for model, options in suite.model_grid.items():
        if model not in suite.models:
            raise SuiteError(
                f"Invalid suite {source!r}: `model_grid.{model}` names a model that is not in "
                f"`models` ({', '.join(suite.models)}). Add it to `models` or remove its grid."
            )
        fixed = set(options) & set(suite.model_options.get(model, {}))
        if fixed:
            raise SuiteError(
                f"Invalid suite {source!r}: `{model}` sets {sorted(fixed)} both in "
                f"`model_options` and in `model_grid`. Keep each option in one of them."
            )
        _check_keywords(MODELS.get(model).factory, options, f"model_grid.{model}", source,
                        reserved=("input_dim", "task_dims", "width"))
    for index, weighting in enumerate(suite.weightings):
        _lookup(WEIGHTINGS, weighting, f"weightings[{index}]", source,
                _origin(("weightings",), overridden))
    for weighting, options in suite.weighting_options.items():
        if weighting not in suite.weightings:
            raise SuiteError(
                f"Invalid suite {source!r}: `weighting_options.{weighting}` names a weighting "
                f"that is not in `weightings` ({', '.join(suite.weightings)}). Add it to "
                f"`weightings` or remove its options."
            )
        _check_keywords(WEIGHTINGS.get(weighting).factory, options,
                        f"weighting_options.{weighting}", source, reserved=("tasks",))
    for index, reference in enumerate(suite.references):
        _lookup(REFERENCES, reference, f"references[{index}]", source)
    for reference, options in suite.reference_options.items():
        if reference not in suite.references:
            raise SuiteError(
                f"Invalid suite {source!r}: `reference_options.{reference}` names a reference "
                f"that is not in `references`. Add it to `references` or remove its options."
            )
        _check_keywords(REFERENCES.get(reference).factory, options,
                        f"reference_options.{reference}", source, reserved=("data", "seed"))
    for index, dataset in enumerate(suite.datasets):
        entry = _lookup(DATASETS, dataset.name, f"datasets[{index}].name", source)
        overlap = set(dataset.params) & set(dataset.grid)
        if overlap:
            raise SuiteError(
                f"Invalid suite {source!r}: `datasets[{index}]` sets {sorted(overlap)} both in "
                f"`params` and in `grid`. Keep each parameter in one of them."
            )
        for section in ("params", "grid"):
            _check_keywords(entry.factory, getattr(dataset, section), f"datasets[{index}].{section}",
                            source, reserved=("seed",))
    return suite


def plan_trials(suite: Suite) -> list[TrialSpec]:
    """Expand a suite into its trials: datasets x grid points x budgets x models x weightings x
    seeds, plus one trial per reference, grid point and seed."""
    training = suite.training.model_dump()
    trials = []
    for dataset in suite.datasets:
        keys = list(dataset.grid)
        for values in itertools.product(*(dataset.grid[key] for key in keys)):
            point = functools.partial(
                TrialSpec,
                suite=suite.name,
                dataset=dataset.name,
                dataset_params=copy.deepcopy(dataset.params),
                grid_point=dict(zip(keys, values)),
            )
            for budget, model, weighting, seed in itertools.product(
                suite.budgets, suite.models, suite.weightings, suite.seeds
            ):
                for variant in _grid_points(suite.model_grid.get(model, {})):
                    options = {**copy.deepcopy(suite.model_options.get(model, {})), **variant}
                    trials.append(point(
                        model=model,
                        model_options=options,
                        variant=variant,
                        budget=budget,
                        seed=seed,
                        training=dict(training),
                        weighting=weighting,
                        weighting_options=copy.deepcopy(suite.weighting_options.get(weighting, {})),
                    ))
            for reference, seed in itertools.product(suite.references, suite.seeds):
                options = copy.deepcopy(suite.reference_options.get(reference, {}))
                trials.append(point(model=reference, model_options=options, budget=0, seed=seed,
                                    training={}, kind="reference"))
    return trials


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Return every combination of a grid's values, as dicts; one empty dict for no grid."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _lookup(registry, name: str, key: str, source: str, origin: str = ""):
    try:
        return registry.get(name)
    except KeyError as error:
        raise SuiteError(f"Invalid suite {source!r}: `{key}`{origin}: {error.args[0]}") from None


def _check_keywords(factory, values: dict, key: str, source: str, reserved: tuple[str, ...]) -> None:
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for name in values:
        if name in reserved:
            raise SuiteError(
                f"Invalid suite {source!r}: `{key}.{name}` is set by the harness and cannot be "
                f"given in a suite. Remove it."
            )
        if name not in parameters and not takes_any:
            known = [p for p in parameters if p not in reserved and p != "self"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise SuiteError(
                f"Invalid suite {source!r}: `{key}.{name}` is not a parameter of "
                f"`{factory.__qualname__}`.{hint} Known parameters: {', '.join(known)}."
            )


SECTION_MODELS = {(): Suite, ("training",): TrainingSection, ("datasets",): DatasetSection}
OPTION_NAMES = {"models": "--models", "weightings": "--weighting", "seeds": "--seeds",
                "budgets": "--budgets", "training": "--max-epochs"}


def _key_path(location: tuple) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path:
            path += f".{part}"
        else:
            path = str(part)
    return path


def _origin(location: tuple, overridden: Collection[str]) -> str:
    top = location[0] if location else None
    if top in overridden and top in OPTION_NAMES:
        return f" (from {OPTION_NAMES[top]})"
    return ""


def _describe(issue: dict) -> str:
    if issue["type"] == "extra_forbidden":
        section = tuple(part for part in issue["loc"][:-1] if not isinstance(part, int))
        known = list(SECTION_MODELS.get(section, Suite).model_fields)
        close = difflib.get_close_matches(str(issue["loc"][-1]), known, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        return f"unknown key.{hint} Valid keys here: {', '.join(known)}"
    if issue["type"] == "missing":
        return "required key is missing"
    message = issue["msg"].removeprefix("Value error, ")
    return f"{message} (got {issue.get('input')!r})"


def _deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif key == "datasets" and isinstance(value, list) and isinstance(merged.get(key), list):
            # Dataset overrides apply position by position, so a quick table can shrink one
            # dataset's grid without repeating its name and other parameters.
            merged[key] = [
                _deep_merge(old, new) if isinstance(old, dict) and isinstance(new, dict) else new
                for old, new in itertools.zip_longest(merged[key], value, fillvalue={})
            ]
        else:
            merged[key] = value
    return merged
