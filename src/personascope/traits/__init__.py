"""Trait specifications, built-in traits and their labelled answer sets."""

from personascope.traits.spec import (
    LADDER_LENGTH,
    InstructionPair,
    JudgePair,
    LabelledAnswer,
    TraitSpec,
    builtin_traits,
    load_labelled,
    load_trait,
)

__all__ = [
    "LADDER_LENGTH",
    "InstructionPair",
    "JudgePair",
    "LabelledAnswer",
    "TraitSpec",
    "builtin_traits",
    "load_labelled",
    "load_trait",
]
