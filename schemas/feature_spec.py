"""The feature spec: which columns identify a record and which are modelled, with what likelihood.

YAML form (the README, "A tour", shows one; "How it fits together" says where it is used)::

    id_columns: [record_id]
    features:
      age: count
      workclass: categorical
      fnlwgt: positive
      hours_per_week: real
      sex: binary
      education: ordinal            # ints, ordered by value
      grade: {ordinal: [low, mid, high]}   # labels in the given order

Load with :func:`load_spec` / :meth:`FeatureSpec.from_dict`, check against a Parquet schema with
:meth:`FeatureSpec.check_schema`, infer one from data with :func:`infer_spec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline.errors import InputDataError, UsageError

FEATURE_TYPES = ("real", "positive", "count", "binary", "categorical", "ordinal")
NUMERIC_TYPES = ("real", "positive", "count")


@dataclass(frozen=True)
class Feature:
    name: str
    type: str
    levels: tuple[Any, ...] | None = None  # ordinal only: explicit order, low to high

    def to_yaml_value(self) -> Any:
        if self.type == "ordinal" and self.levels is not None:
            return {"ordinal": list(self.levels)}
        return self.type


@dataclass(frozen=True)
class FeatureSpec:
    id_columns: tuple[str, ...]
    features: tuple[Feature, ...]
    _by_name: dict[str, Feature] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "spec") -> FeatureSpec:
        if not isinstance(raw, Mapping):
            raise UsageError(f"{source}: a feature spec is a mapping with 'id_columns' and 'features'")
        unknown = set(raw) - {"id_columns", "features"}
        if unknown:
            raise UsageError(f"{source}: unknown top-level keys {sorted(unknown)}")
        ids = raw.get("id_columns") or []
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, Sequence) or not all(isinstance(c, str) for c in ids):
            raise UsageError(f"{source}: 'id_columns' must be a list of column names")
        if len(set(ids)) != len(ids):
            raise UsageError(f"{source}: duplicate id column in {list(ids)}")
        if not ids:
            raise UsageError(f"{source}: 'id_columns' must name at least one column identifying a record")
        feats_raw = raw.get("features")
        if isinstance(feats_raw, Sequence) and not isinstance(feats_raw, str):
            # list form: [{name: type}, ...] -- lets a duplicate be reported instead of silently merged
            pairs = []
            for item in feats_raw:
                if not isinstance(item, Mapping) or len(item) != 1:
                    raise UsageError(f"{source}: each item of a 'features' list is a single {{column: type}}")
                pairs.extend(item.items())
        elif isinstance(feats_raw, Mapping):
            pairs = list(feats_raw.items())
        else:
            raise UsageError(f"{source}: 'features' must map column names to types")
        if not pairs:
            raise UsageError(f"{source}: 'features' is empty")
        features: list[Feature] = []
        seen: set[str] = set()
        for name, value in pairs:
            if not isinstance(name, str):
                raise UsageError(f"{source}: feature name {name!r} is not a string")
            if name in seen:
                raise UsageError(f"{source}: duplicate feature column {name!r}")
            if name in ids:
                raise UsageError(f"{source}: column {name!r} is both an id column and a feature")
            seen.add(name)
            features.append(_parse_feature(name, value, source))
        return cls(tuple(ids), tuple(features))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id_columns": list(self.id_columns),
            "features": {f.name: f.to_yaml_value() for f in self.features},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # ---- access ---------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        """Every column the jobs read: ids first, then features."""
        return [*self.id_columns, *self.feature_names]

    def __getitem__(self, name: str) -> Feature:
        return self._by_name[name]

    # ---- checks against data --------------------------------------------------------------------
    def check_schema(self, schema: pa.Schema, source: str) -> None:
        """Raise InputDataError naming the file and column if `schema` cannot carry this spec."""
        names = set(schema.names)
        for col in self.columns:
            if col not in names:
                raise InputDataError("column in the feature spec is absent from the data", file=source, column=col)
        for f in self.features:
            t = schema.field(f.name).type
            if not type_compatible(f, t):
                raise InputDataError(
                    f"type {t} cannot hold a {f.type} feature", file=source, column=f.name
                )


def _parse_feature(name: str, value: Any, source: str) -> Feature:
    if isinstance(value, str):
        if value not in FEATURE_TYPES:
            raise UsageError(
                f"{source}: feature {name!r} has unknown type {value!r}; expected one of {', '.join(FEATURE_TYPES)}"
            )
        return Feature(name, value)
    if isinstance(value, Mapping) and len(value) == 1 and "ordinal" in value:
        levels = value["ordinal"]
        if not isinstance(levels, Sequence) or isinstance(levels, str) or len(levels) < 2:
            raise UsageError(f"{source}: ordinal feature {name!r} needs a list of at least two levels")
        if len({str(v) for v in levels}) != len(levels):
            raise UsageError(f"{source}: ordinal feature {name!r} lists a level twice")
        return Feature(name, "ordinal", tuple(levels))
    raise UsageError(
        f"{source}: feature {name!r}: expected a type name or {{ordinal: [levels]}}, got {value!r}"
    )


def type_compatible(feature: Feature, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if feature.type in NUMERIC_TYPES:
        return numeric
    if feature.type == "ordinal" and feature.levels is None:
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    return numeric or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)


def load_spec(uri: str) -> FeatureSpec:
    """Load a spec from a YAML file, local or s3://."""
    from pipeline.io import storage

    try:
        text = storage.read_text(uri)
    except FileNotFoundError as e:
        raise UsageError(f"feature spec not found: {uri}") from e
    return parse_spec(text, source=uri)


def parse_spec(text: str, source: str = "spec") -> FeatureSpec:
    """Parse and validate spec YAML; duplicate keys are an error, not a silent overwrite."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UsageError(f"{source}: not valid YAML: {e}") from e
    return FeatureSpec.from_dict(raw, source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# ---- inference ----------------------------------------------------------------------------------
ID_NAME_HINTS = ("id", "record_id", "row_id", "key", "uuid")
MAX_CATEGORICAL_INT_LEVELS = 20


def infer_spec(sample: pa.Table, id_columns: Sequence[str] | None = None) -> FeatureSpec:
    """Guess a spec from a sample of rows. The guess is a starting point to review, not a verdict.

    Rules: an id column is named like an id and unique in the sample (or given); booleans and columns
    with two distinct values are binary; strings are categorical; integers with at most
    MAX_CATEGORICAL_INT_LEVELS distinct values are categorical, other non-negative integers counts;
    floats are positive when no sampled value is negative, real otherwise.
    """
    if id_columns is None:
        id_columns = [
            n
            for n in sample.column_names
            if (n.lower() in ID_NAME_HINTS or n.lower().endswith("_id"))
            and pc.count_distinct(sample.column(n)).as_py() == sample.num_rows
        ][:1]
    for c in id_columns:
        if c not in sample.column_names:
            raise UsageError(f"id column {c!r} is not in the data")
    if not id_columns:
        raise UsageError("no id column found; name one with --id-columns")
    features = []
    for name in sample.column_names:
        if name in id_columns:
            continue
        kind = _infer_type(sample.column(name))
        if kind is not None:
            features.append(Feature(name, kind))
    if not features:
        raise UsageError("no column of the data can be modelled")
    return FeatureSpec(tuple(id_columns), tuple(features))


def _infer_type(col: pa.ChunkedArray) -> str | None:
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
        col = col.cast(t)
    valid = pc.drop_null(col)
    if len(valid) == 0:
        return None
    if pa.types.is_floating(t):
        valid = pc.filter(valid, pc.invert(pc.is_nan(valid)))
        if len(valid) == 0:
            return None
    n_distinct = pc.count_distinct(valid).as_py()
    if pa.types.is_boolean(t) or n_distinct == 2:
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "categorical"
    if pa.types.is_integer(t):
        if n_distinct <= MAX_CATEGORICAL_INT_LEVELS:
            return "categorical"
        return "count" if pc.min(valid).as_py() >= 0 else "real"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "positive" if pc.min(valid).as_py() >= 0 else "real"
    return None
