"""The config schema (workflow/schemas/config.schema.yaml): the one place every setting's default is written.

A leaf module (no brainfuse imports), so that the stage modules can read their defaults without importing
the validation machinery of :mod:`brainfuse.config`.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=None)
def _schema() -> dict:
    with open(SCHEMA) as f:
        return yaml.safe_load(f)


def load() -> dict:
    """A copy of the whole schema."""
    return copy.deepcopy(_schema())


def section_defaults(section: str) -> dict:
    """The defaults of one config section (e.g. 'anat'), for callers that pass no config (the CLI, the library,
    tests); the workflow gets the same values from validation."""
    props = _schema()["properties"][section]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}
