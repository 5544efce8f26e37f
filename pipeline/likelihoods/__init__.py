"""Likelihood families, one per file. ``FAMILIES`` maps a spec type to its family."""

from pipeline.likelihoods.base import EncodedColumn, Family
from pipeline.likelihoods.binary import Binary
from pipeline.likelihoods.categorical import Categorical
from pipeline.likelihoods.count import Count
from pipeline.likelihoods.ordinal import Ordinal
from pipeline.likelihoods.positive import Positive
from pipeline.likelihoods.real import Real

FAMILIES: dict[str, type[Family]] = {
    cls.kind: cls for cls in (Real, Positive, Count, Binary, Categorical, Ordinal)
}


def family_from_state(kind: str, name: str, state: dict) -> Family:
    return FAMILIES[kind](name, **state)


__all__ = ["FAMILIES", "Binary", "Categorical", "Count", "EncodedColumn", "Family", "Ordinal", "Positive", "Real",
           "family_from_state"]
