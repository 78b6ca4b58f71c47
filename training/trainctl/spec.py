"""The job spec a user writes (`trainctl.yaml`), validated before anything is created.

The file is a friendlier shape of `trainctl_core.jobs.JobSpec` (pools as types x subnets,
a `script` shortcut, a Dockerfile instead of an image); `SpecFile.to_job_spec` maps it onto
that one model, so the CLI never forks the job model. Every problem becomes one
`SpecError` naming the field and, where there is a closed set, the allowed values.

    name: resnet50
    command: python train.py --epochs 90      # or a list, or `script: train.py`
    image: 123456789012.dkr.ecr.us-east-1.amazonaws.com/trainctl:latest   # or dockerfile:
    pools:
      instance_types: [g5.xlarge, g4dn.xlarge]
      subnets: [subnet-0abc1234, subnet-0def5678]   # optional: the stack's subnets
    market: spot                              # or spot-then-on-demand
    on_rebalance: checkpoint                  # or migrate
    limits: {max_interruptions: 10, max_hours: 24, budget_usd: 50}
    checkpoint: {interval_seconds: 600, retention: 3}
    env: {EPOCHS: "90"}
    tags: {team: vision}
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from trainctl_core.jobs import CapacityPool, JobLimits, JobSpec

DEFAULT_SPEC_FILE = "trainctl.yaml"

MARKETS = ("spot", "spot-then-on-demand")
MAX_POOLS = 20  # trainctl_core.jobs.JobSpec.pools' bound (the workflow walks them in order)
REBALANCE_POLICIES = ("checkpoint", "migrate")
# Tags trainctl and AWS set themselves; a user tag with these prefixes would be refused by
# EC2 (aws:) or would confuse the fencing and IAM conditions (trainctl:).
RESERVED_TAG_PREFIXES = ("aws:", "trainctl:")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INSTANCE_TYPE = r"^[a-z0-9]+[a-z0-9-]*\.[a-z0-9]+$"
_SUBNET = r"^subnet-[0-9a-f]{8,17}$"


class SpecError(ValueError):
    """The spec cannot be used; `field` is its dotted path (empty for the whole file)."""

    def __init__(self, field: str, message: str, *, source: str = DEFAULT_SPEC_FILE) -> None:
        where = f"{source}: field '{field}'" if field else source
        super().__init__(f"{where}: {message}")
        self.field, self.problem, self.source = field, message, source


class PoolGrid(BaseModel):
    """Capacity pools as a grid: every instance type in every subnet, types in order."""

    model_config = ConfigDict(extra="forbid")

    instance_types: list[str] = Field(min_length=1, max_length=20)
    subnets: list[str] | None = Field(default=None, min_length=1)

    @field_validator("instance_types")
    @classmethod
    def _types(cls, values: list[str]) -> list[str]:
        for value in values:
            _check_instance_type(value)
        return values

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            _check_subnet(value)
        return values


class PoolEntry(BaseModel):
    """One explicit pool, when the grid is not what you want."""

    model_config = ConfigDict(extra="forbid")

    instance_type: str
    subnet: str | None = None

    @field_validator("instance_type")
    @classmethod
    def _type(cls, value: str) -> str:
        return _check_instance_type(value)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        return None if value is None else _check_subnet(value)


# Named checks rather than Field(pattern=...): pydantic would show the raw regex.
def _check_instance_type(value: str) -> str:
    if not re.match(_INSTANCE_TYPE, value):
        raise ValueError(f"{value!r} is not an EC2 instance type such as g5.xlarge")
    return value


def _check_subnet(value: str) -> str:
    if not re.match(_SUBNET, value):
        raise ValueError(f"{value!r} is not a subnet id such as subnet-0abc1234")
    return value


class CheckpointPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval_seconds: int = Field(default=600, ge=10)
    retention: int = Field(default=3, ge=1, le=100)


class SpecFile(BaseModel):
    """`trainctl.yaml`, as written by the user."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    command: list[str] | str | None = None
    # validate_default: the "exactly one of" checks below must run when the field is absent.
    script: str | None = Field(default=None, validate_default=True)
    image: str | None = None
    dockerfile: str | None = Field(default=None, validate_default=True)
    pools: PoolGrid | list[PoolEntry]
    market: Literal["spot", "spot-then-on-demand"] = "spot"
    on_rebalance: Literal["checkpoint", "migrate"] = "checkpoint"
    limits: JobLimits = JobLimits()
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    env: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    # The file it came from, for the errors the stack checks raise later (parse_spec sets it).
    _source: str = PrivateAttr(default=DEFAULT_SPEC_FILE)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not job_id_stem(value):
            raise ValueError("must contain at least one letter or digit")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str):
            try:
                parts = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot be split into words: {exc}") from exc
            if not parts:
                raise ValueError("must not be empty")
        elif value is not None and (not value or not all(value)):
            raise ValueError("must be a non-empty list of non-empty words")
        return value

    @field_validator("script")
    @classmethod
    def _script(cls, value: str | None, info: ValidationInfo) -> str | None:
        has_command = info.data.get("command") is not None
        if (value is None) != has_command:
            # Checked here (not in a model validator) so the message names a field.
            raise PydanticCustomError(
                "command_or_script",
                "give exactly one of 'command' (a command line or list) or 'script' (a file)",
            )
        if value is not None and (not value.strip() or Path(value).is_absolute()):
            raise ValueError("must be a path relative to the project (like train.py)")
        return value

    @field_validator("dockerfile")
    @classmethod
    def _dockerfile(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("image") is not None:
            raise ValueError(
                "give at most one of 'image' (a pushed image) or 'dockerfile' (built by trainctl)"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid variable name (letters, digits, _)")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key, tag_value in value.items():
            if key.lower().startswith(RESERVED_TAG_PREFIXES):
                raise ValueError(f"{key!r}: the prefixes {', '.join(RESERVED_TAG_PREFIXES)} are reserved")
            if not 1 <= len(key) <= 128 or len(tag_value) > 256:
                raise ValueError(f"{key!r}: keys are 1-128 characters, values at most 256")
        return value

    # --- mapping onto the job model ------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        """The training command as the agent runs it."""
        if self.script is not None:
            if self.script.endswith(".py"):
                return ["python", self.script]
            if self.script.endswith(".sh"):
                return ["bash", self.script]
            return [self.script]
        if isinstance(self.command, str):
            return shlex.split(self.command)
        assert self.command is not None  # _script checks exactly one is given
        return list(self.command)

    def pools_for(
        self, *, default_subnets: Sequence[str], allowed_instance_types: Sequence[str] | None = None
    ) -> list[CapacityPool]:
        """The ordered capacity pools, checked against what the stack allows.

        Grid entries are named `pools.instance_types` / `pools.subnets`, list entries
        `pools[i]`; an entry without a subnet gets the stack's first one.
        """
        grid = isinstance(self.pools, PoolGrid)
        if isinstance(self.pools, PoolGrid):
            subnets = self.pools.subnets or list(default_subnets)
            if not subnets:
                raise SpecError(
                    "pools.subnets", "no subnets given and the stack exports none", source=self._source
                )
            entries = [
                ("pools.instance_types", t, "pools.subnets", s)
                for t in self.pools.instance_types
                for s in subnets
            ]
        else:
            if not default_subnets and any(p.subnet is None for p in self.pools):
                raise SpecError(
                    "pools", "an entry has no subnet and the stack exports none", source=self._source
                )
            entries = [
                (
                    f"pools[{i}].instance_type",
                    p.instance_type,
                    f"pools[{i}].subnet",
                    p.subnet or default_subnets[0],
                )
                for i, p in enumerate(self.pools)
            ]
        for type_field, instance_type, subnet_field, subnet in entries:
            if allowed_instance_types and instance_type not in allowed_instance_types:
                raise SpecError(
                    type_field,
                    f"{instance_type!r} is not allowed by the stack; "
                    f"allowed: {', '.join(allowed_instance_types)}",
                    source=self._source,
                )
            if default_subnets and subnet not in default_subnets:
                raise SpecError(
                    subnet_field,
                    f"{subnet!r} is not a subnet of the stack; allowed: {', '.join(default_subnets)}",
                    source=self._source,
                )
        if len(entries) > MAX_POOLS:
            shape = "instance types x subnets" if grid else "entries"
            problem = f"{len(entries)} pools ({shape}); at most {MAX_POOLS} are allowed"
            raise SpecError("pools", problem, source=self._source)
        try:
            return _unique([CapacityPool(instance_type=t, subnet_id=s) for _, t, _, s in entries])
        except ValueError as exc:
            raise SpecError("pools", str(exc), source=self._source) from exc

    def to_job_spec(
        self,
        *,
        image: str | None,
        default_subnets: Sequence[str] = (),
        allowed_instance_types: Sequence[str] | None = None,
    ) -> JobSpec:
        """The core `JobSpec`; `image` is `self.image` or the pushed image of `dockerfile`."""
        pools = self.pools_for(default_subnets=default_subnets, allowed_instance_types=allowed_instance_types)
        try:
            return JobSpec(
                name=self.name,
                command=self.argv,
                image=image,
                pools=pools,
                allow_on_demand=self.market == "spot-then-on-demand",
                on_rebalance=self.on_rebalance,
                limits=self.limits,
                checkpoint_interval_seconds=self.checkpoint.interval_seconds,
                checkpoint_retention=self.checkpoint.retention,
                env=self.env,
                tags=self.tags,
            )
        except ValidationError as exc:  # the file model checks the same; a drift is still named
            raise _spec_error(exc, self._source) from exc


def _unique(pools: list[CapacityPool]) -> list[CapacityPool]:
    labels = [p.label for p in pools]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"capacity pools must be unique, repeated: {', '.join(repeated)}")
    return pools


def job_id_stem(name: str) -> str:
    """The job-id-safe form of a spec name: lowercase letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-")


def parse_spec(data: Any, *, source: str = DEFAULT_SPEC_FILE) -> SpecFile:
    """Validate an already-loaded document; raises `SpecError` with the first problem."""
    if not isinstance(data, dict):
        raise SpecError("", "must be a mapping of fields (name, command, pools, ...)", source=source)
    try:
        # Strict: YAML already types its scalars, and lax mode would take `retention:
        # true` as 1 or `max_hours: "24"` as 24.0 without a word.
        spec = SpecFile.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _spec_error(exc, source) from exc
    spec._source = source
    return spec


def load_spec(path: str | Path) -> SpecFile:
    """Read and validate `trainctl.yaml` (or any path)."""
    spec_path = Path(path)
    source = str(spec_path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            "", "file not found (pass --spec PATH or create trainctl.yaml)", source=source
        ) from None
    except OSError as exc:
        raise SpecError("", f"cannot be read: {exc.strerror}", source=source) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError("", f"is not valid YAML{where}: {problem}", source=source) from exc
    return parse_spec(data, source=source)


# --- one clear message out of pydantic's error list ------------------------------------------


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at `loc`'s parent (for 'unknown field' messages)."""
    model: Any = SpecFile
    for part in loc[:-1]:
        if part in _UNION_BRANCHES:  # which alternative of `pools` pydantic was trying
            model = PoolGrid if part == "PoolGrid" else PoolEntry
        elif isinstance(part, str) and model is not None:
            annotation = getattr(model.model_fields.get(part), "annotation", None)
            is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            model = annotation if is_model else None
    return list(model.model_fields) if model is not None else []


def _spec_error(exc: ValidationError, source: str) -> SpecError:
    errors = _relevant(exc.errors())
    first = errors[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc if p not in _UNION_BRANCHES)
    path = re.sub(r"\.(\d+)", r"[\1]", path)
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        message = f"unknown field{hint}; allowed fields: {', '.join(allowed)}"
    elif kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        message = f"got {first.get('input')!r}; allowed values: {expected.replace(' or ', ', ')}"
    elif kind == "missing":
        message = "is required"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
        if first.get("input") is not None and not isinstance(first["input"], dict | list):
            message += f" (got {first['input']!r})"
    more = len({tuple(e["loc"]) for e in errors}) - 1
    if more > 0:
        message += f" [{more} more problem{'s' if more > 1 else ''} after this one]"
    return SpecError(path, message, source=source)


_UNION_BRANCHES = ("PoolGrid", "list[PoolEntry]")
# pydantic reports a failed union once per alternative; the alternative whose shape does
# not match the input at all (a mapping is not a list, a list is not a grid) is noise.
_WRONG_SHAPE = {"PoolGrid": "model_type", "list[PoolEntry]": "list_type"}


def _relevant(errors: list[Any]) -> list[Any]:
    kept = [
        e
        for e in errors
        if not (len(e["loc"]) == 2 and e["loc"][0] == "pools" and _WRONG_SHAPE.get(e["loc"][1]) == e["type"])
    ]
    if not kept:  # neither shape: say what is expected
        return [{"loc": ("pools",), "type": "pools_shape", "msg": _POOLS_SHAPE}]
    return kept


_POOLS_SHAPE = (
    "must be a mapping {instance_types: [...], subnets: [...]} or a list of "
    "{instance_type: ..., subnet: ...} entries"
)
