"""What a Slurm job and a grid of runs are: ``crate submit``'s job options and the sweep file as pydantic models, and
the one grid expander that ``crate submit --sweep`` and ``crate sweep`` share.

``JobSpec`` is built from ``crate submit``'s flags, so its problems name the flag (``--nodes: must be >= 1 (got
0)``); a sweep file's ``slurm:`` section is the same options (all but ``command``, which is the sweep's own),
validated with the file, so its problems name the key (``slurm.nodes: ...``). Every string option is refused if it
holds a control character (a newline, a carriage return, ...): each one is rendered into a line of the batch script.

A ``Grid`` is axes (labelled points, or one dotted key with a list of values) and exclusions; ``expand`` walks their
cartesian product in axis order. The two commands name a point differently, and both namings are kept because each
is a directory that existing runs already live in: a sweep file joins the labels (``crate-s-seed0``, under its
``output_root``; ``label_name``), ``crate submit --sweep KEY=V1,V2`` joins the overrides (``optimizer.lr=1e-3-
zero.stage=1``, under each run's ``output_dir``; ``override_name``). ``expand`` takes the naming as a parameter.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher.config.validation import dotted, first_error
from launcher.errors import ConfigError

TIME_PATTERN = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # Slurm's --time: minutes, H:M:S, D-H[:M[:S]]
ENV_ITEM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


# Validators raise ConfigError: the message is complete (launcher.config.validation adds only the key).
def _at_least(bound: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < bound:
            raise ConfigError(f"must be >= {bound} (got {value})")
        return value

    return AfterValidator(check)


def _slurm_time(value: str | None) -> str | None:
    if value is not None and not TIME_PATTERN.match(value):
        raise ConfigError(f"{value!r} is not a Slurm time (minutes, H:M:S or D-H:M:S)")
    return value


def single_line(value: str) -> str:
    """``value`` itself; a ConfigError if it holds a control character (unicode category Cc: newline, tab, ...)."""
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ConfigError(f"must not contain control characters (got {value!r})")
    return value


def _each(test: Callable[[str], Any], expected: str) -> AfterValidator:
    def check(items: tuple[str, ...]) -> tuple[str, ...]:
        for item in items:
            if not test(item):
                raise ConfigError(f"expected {expected}, got {item!r}")
        return items

    return AfterValidator(check)


Lines = Annotated[tuple[str, ...], Field(strict=False)]  # YAML gives a list
_empty_if_none = BeforeValidator(lambda value: {} if value is None else value)


class JobOptions(BaseModel):
    """The Slurm job's options: ``crate submit``'s flags, a sweep file's ``slurm:``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    nodes: Annotated[int, _at_least(1)] = 1
    gpus_per_node: Annotated[int, _at_least(0)] = 0  # 0: a CPU partition; procs_per_node processes per node, gloo
    procs_per_node: Annotated[int, _at_least(1)] = 1  # CPU only; with GPUs one process per GPU
    cpus_per_task: int | None = None  # default: all of a node's cores we ask for (Slurm's default otherwise)
    partition: str | None = None
    account: str | None = None
    time: Annotated[str | None, AfterValidator(_slurm_time)] = None  # e.g. 1-00:00:00
    array: str | None = None  # extra array syntax, e.g. "%2" to run two tasks at a time
    signal_seconds: Annotated[int, _at_least(1)] = 300  # USR1 this long before the time limit: enough to save
    job_name: str | None = None
    # raw "--key=value" lines, e.g. --qos=high
    extra_sbatch: Annotated[Lines, _each(lambda item: item.startswith("--"), "an sbatch option like --qos=high")] = ()
    env: Annotated[Lines, _each(ENV_ITEM.match, "KEY=VALUE")] = ()  # KEY=VALUE exported in the job

    @field_validator("*", mode="before")
    @classmethod
    def _single_lines(cls, value: Any) -> Any:
        # Each string (or item of a list) becomes part of one line of the batch script: a newline there would start
        # a line of its own, a shell command, and end sbatch's reading of the #SBATCH lines after it. Checked
        # before the fields' own validators, so that is the message such a value gets.
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, str):
                single_line(item)
        return value

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def _flag(loc: tuple) -> str:
    """A JobSpec field as crate submit's flag: extra_sbatch -> --sbatch, gpus_per_node -> --gpus-per-node."""
    return "--sbatch" if loc[:1] == ("extra_sbatch",) else "--" + dotted(loc[:1]).replace("_", "-")


class JobSpec(JobOptions):
    """A job: its options and the crate subcommand it runs. ``JobSpec(...)`` takes crate submit's flags."""

    command: str = "pretrain"

    def __init__(self, **options: Any):
        try:
            super().__init__(**options)
        except ValidationError as error:  # the keywords are crate submit's flags: name the flag
            raise ConfigError(first_error(error, _flag, type(self))) from None


def _string_keys(value: Any) -> Any:
    # YAML reads labels such as 1 or true as numbers and booleans; they are names (of directories, too)
    return {str(key): item for key, item in value.items()} if isinstance(value, dict) else value


def _non_empty(message: str) -> AfterValidator:
    def check(items: list | dict) -> list | dict:
        if not items:
            raise ConfigError(message)
        return items

    return AfterValidator(check)


def _point_mapping(value: Any) -> Any:
    if value is not None and not isinstance(value, dict | Point):
        raise ConfigError(f"must be a mapping of dotted keys to values (got {value!r})")
    return {} if value is None else value


Overrides = dict[str, Any]  # dotted key -> value


class Point(BaseModel):
    """A labelled point: dotted overrides (its other keys, in order); ``config`` swaps the run config; ``when`` adds
    overrides only in the runs that also carry another axis's label."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    config: str | None = None
    when: Annotated[dict[str, Overrides], BeforeValidator(_string_keys)] = {}

    @field_validator("when")
    @classmethod
    def _no_config_under_when(cls, when: dict[str, Overrides]) -> dict[str, Overrides]:
        for label, overrides in when.items():
            if "config" in overrides:
                raise ConfigError(f"{label}.config: swap configs on an axis point, not under when")
        return when


AXIS_KINDS = ("values", "points")
ValueAxis = dict[str, Annotated[list[Any], _non_empty("the list of values is empty")]]  # one dotted key: its values
LabelledAxis = Annotated[
    dict[str, Annotated[Point, BeforeValidator(_point_mapping)]],
    BeforeValidator(_string_keys),
    _non_empty("must be a non-empty mapping (labelled points, or one key with a list of values)"),
]


def _axis_kind(raw: Any) -> str:
    one_list = isinstance(raw, dict) and len(raw) == 1 and isinstance(next(iter(raw.values())), list)
    return "values" if one_list else "points"


Axis = Annotated[
    Annotated[ValueAxis, Tag("values")] | Annotated[LabelledAxis, Tag("points")], Discriminator(_axis_kind)
]


def grid_key(loc: tuple) -> str:
    """A location in a grid as its dotted key. Pydantic names the kind of an axis (``values`` or ``points``, a
    union's tag) after the axis; the file has no such key."""
    if len(loc) > 2 and loc[0] == "axes" and loc[2] in AXIS_KINDS:
        loc = loc[:2] + loc[3:]
    return dotted(loc)


def _yaml_value(value: Any) -> str:
    """A value as override text that reads back as the same YAML value."""
    return json.dumps(value) if not isinstance(value, str) else value


def override_items(mapping: Overrides) -> list[str]:
    """``{a.b: value, ...}`` -> ``["a.b=value", ...]``; ``config`` and ``when`` are not overrides."""
    return [f"{key}={_yaml_value(value)}" for key, value in mapping.items() if key not in ("config", "when")]


def _axis_points(axis: str, raw: dict) -> list[tuple[str, str | None, list[str], dict[str, list[str]]]]:
    """An axis's points as (label, config path or None, overrides, overrides by the label they go with)."""
    if _axis_kind(raw) == "values":
        key, values = next(iter(raw.items()))
        return [(f"{axis}{value}", None, [f"{key}={_yaml_value(value)}"], {}) for value in values]
    return [
        (
            label,
            point.config,
            override_items(point.model_extra or {}),
            {other: override_items(overrides) for other, overrides in point.when.items()},
        )
        for label, point in raw.items()
    ]


class Grid(BaseModel):
    """Axes, in order (their cartesian product), and the points to leave out (by labels; all given must match)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    axes: Annotated[
        dict[str, Axis], BeforeValidator(_string_keys), _non_empty("must be a non-empty mapping of axis name to points")
    ]
    exclude: Annotated[list[dict[str, Any]], BeforeValidator(lambda value: [] if value is None else value)] = []

    @model_validator(mode="after")
    def _labels_are_known(self):
        labels = {axis: [point[0] for point in _axis_points(axis, raw)] for axis, raw in self.axes.items()}
        for axis, raw in self.axes.items():
            for label in raw if _axis_kind(raw) == "points" else ():
                if not LABEL.match(label):
                    raise ConfigError(
                        f"axes.{axis}.{label}: a label names a directory: letters, digits, '_', '.', '+', '-'"
                    )
        for item in self.exclude:
            for axis, label in item.items():
                if axis not in self.axes:
                    raise ConfigError(f"exclude: {axis!r} is not an axis ({list(self.axes)})")
                if str(label) not in labels[axis]:
                    raise ConfigError(f"exclude: {axis}={label!r} is not a label of that axis")
        every_label = {label for names in labels.values() for label in names}
        for axis, raw in self.axes.items():
            for label, _, _, conditional in _axis_points(axis, raw):
                for other in conditional:
                    if other not in every_label:
                        raise ConfigError(f"axes.{axis}.{label}.when: {other!r} is not a label of any axis")
        return self


class SweepFile(Grid):
    """A sweep file (``crate sweep``): the grid, where its runs go, what they start from and how Slurm runs them."""

    # YAML reads a name like 2024 as a number; the name is the default Slurm job name
    name: Annotated[str, Field(strict=False, coerce_numbers_to_str=True), AfterValidator(single_line)]
    output_root: Annotated[str, AfterValidator(single_line)]  # each run in <output_root>/<its name>
    command: Literal["pretrain", "finetune"] = "pretrain"
    config: str | None = None  # relative to the sweep file
    overrides: Annotated[Overrides, _empty_if_none] = {}  # every run
    slurm: Annotated[JobOptions, _empty_if_none] = JobOptions()

    @model_validator(mode="after")
    def _config_is_a_path(self):
        if not isinstance(self.overrides.get("config", ""), str):
            raise ConfigError(f"overrides.config: must be a path to a run config (got {self.overrides['config']!r})")
        return self

    @property
    def base_config(self) -> str | None:
        """The run config a point starts from (``overrides.config`` too, as ever)."""
        return self.config if self.config is not None else self.overrides.get("config")


@dataclass(frozen=True)
class GridPoint:
    """One point of the product."""

    name: str
    labels: dict[str, str]  # axis -> label
    configs: tuple[str, ...]  # the run configs its points swap in (more than one is the caller's to refuse)
    overrides: tuple[str, ...]  # its points' overrides, in axis order, then those of the when that apply


def label_name(labels: dict[str, str], overrides: tuple[str, ...]) -> str:
    """A sweep file's run name: the labels, ``crate-s-seed0``."""
    return "-".join(labels.values())


def override_name(labels: dict[str, str], overrides: tuple[str, ...]) -> str:
    """``crate submit --sweep``'s directory name: the overrides, ``optimizer.lr=1e-3-zero.stage=1``."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.=+-]", "_", item) for item in overrides)


def expand(grid: Grid, name: Callable[[dict[str, str], tuple[str, ...]], str] = label_name) -> list[GridPoint]:
    """The grid's points in axis order (the last axis varies fastest), the excluded ones left out."""
    axes = [[(axis, *point) for point in _axis_points(axis, raw)] for axis, raw in grid.axes.items()]
    points = []
    for combination in itertools.product(*axes):
        labels = {axis: label for axis, label, *_ in combination}
        if any(all(labels[axis] == str(label) for axis, label in item.items()) for item in grid.exclude):
            continue
        chosen = set(labels.values())
        overrides = (
            *(item for _, _, _, items, _ in combination for item in items),
            *(
                item
                for *_, conditional in combination
                for label, items in conditional.items()
                if label in chosen
                for item in items
            ),
        )
        configs = tuple(config for _, _, config, _, _ in combination if config)
        points.append(GridPoint(name(labels, overrides), labels, configs, overrides))
    if not points:
        raise ConfigError("exclude leaves no runs")
    return points
