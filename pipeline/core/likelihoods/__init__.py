"""Likelihood families, one per file. ``FAMILIES`` maps a spec type to its family."""

from pipeline.core.likelihoods.base import EncodedColumn, Family
from pipeline.core.likelihoods.binary import Binary
from pipeline.core.likelihoods.categorical import Categorical
from pipeline.core.likelihoods.count import Count
from pipeline.core.likelihoods.ordinal import Ordinal
from pipeline.core.likelihoods.positive import Positive
from pipeline.core.likelihoods.real import Real

FAMILIES: dict[str, type[Family]] = {
    cls.kind: cls for cls in (Real, Positive, Count, Binary, Categorical, Ordinal)
}


def family_from_state(kind: str, name: str, state: dict) -> Family:
    return FAMILIES[kind](name, **state)


__all__ = ["FAMILIES", "Binary", "Categorical", "Count", "EncodedColumn", "Family", "Ordinal", "Positive", "Real",
           "family_from_state"]
