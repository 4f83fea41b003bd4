"""The declarative config sections (verl_omni/workers/config/schema.py): the message each declaration produces,
nested sections named by their full dotted path, rules between fields, and no verl or torch at import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import Field

from verl_omni.workers.config.schema import ConfigError, Section, option, parse, section

REPO = Path(__file__).resolve().parents[1]


@section("outer.inner")
class Inner(Section):
    KEYS: ClassVar[dict[str, str]] = {"depth": "nested.depth"}

    steps: int = option(4, ge=1)
    share: float = option(0.5, ge=0, lt=1)
    rate: float | None = option(None, gt=0, note="per second")
    mode: Literal["fast", "slow"] = "fast"
    enabled: bool = True
    depth: int = option(2, ge=0)
    size: int = option(2, why="must be an integer in [1, steps={steps}]")

    def __post_init__(self) -> None:
        if self.size > self.steps:
            raise ConfigError(f"size={self.size} must be an integer in [1, steps={self.steps}]")


@section("", closed=False)
class Outer(Section):
    name: str = "x"
    inner: Inner = Field(default_factory=Inner)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": 0}, "outer.inner.steps=0 must be a positive integer"),
        ({"steps": "3"}, "outer.inner.steps='3' must be a positive integer"),
        ({"steps": True}, "outer.inner.steps=True must be a positive integer"),
        ({"share": 1.0}, "outer.inner.share=1.0 is outside the valid range [0, 1)"),
        ({"rate": 0}, "outer.inner.rate=0 must be a finite number > 0 (per second) or null"),
        ({"rate": float("inf")}, "outer.inner.rate=inf must be a finite number > 0 (per second) or null"),
        ({"mode": "medium"}, "outer.inner.mode='medium' is not valid; valid choices: fast, slow"),
        ({"enabled": 1}, "outer.inner.enabled=1 is not valid; valid choices: true, false"),
        ({"depth": -1}, "outer.inner.nested.depth=-1 must be a non-negative integer"),
        ({"size": 2.5}, "outer.inner.size=2.5 must be an integer in [1, steps=4]"),
        ({"size": 9, "steps": 6}, "outer.inner.size=9 must be an integer in [1, steps=6]"),
        ({"step": 3, "szie": 1}, "Unknown key(s) ['step', 'szie'] in outer.inner; valid keys: ['steps', 'share'"),
    ],
)
def test_each_declaration_names_key_value_and_what_is_valid(values, message):
    with pytest.raises(ValueError) as direct:
        Inner(**values)
    assert str(direct.value).startswith(message)
    with pytest.raises(ValueError) as nested:  # the same error, found while parsing the whole config
        parse(Outer, {"name": "y", "extra": "ignored: an open section", "inner": values}, "")
    assert str(nested.value).startswith(message.replace("outer.inner", "inner"))
    with pytest.raises(ValueError) as elsewhere:  # and under another section's path
        Inner.from_config(values, prefix="a.b")
    assert str(elsewhere.value).startswith(message.replace("outer.inner", "a.b"))


def test_sections_are_frozen_dataclasses_that_read_dicts_and_omegaconf():
    from omegaconf import OmegaConf

    outer = Outer.from_config(OmegaConf.create({"inner": {"steps": 6, "size": 6, "_target_": "dropped"}}))
    assert outer.inner == Inner(steps=6, size=6) and dataclasses.is_dataclass(outer)
    assert Inner.from_config(outer.inner) is outer.inner and Inner.from_config(None) == Inner()
    with pytest.raises(dataclasses.FrozenInstanceError):
        outer.inner.steps = 3
    assert dataclasses.replace(outer.inner, steps=7).steps == 7
    with pytest.raises(ValueError, match=r"outer\.inner\.steps=0"):
        dataclasses.replace(outer.inner, steps=0)


def test_schema_imports_neither_verl_nor_torch():
    code = (
        "import sys; import recipes.flowgrpo.schema; "
        "assert not {'verl', 'torch', 'ray', 'numpy'} & set(sys.modules), sorted({'verl', 'torch', 'ray', 'numpy'} "
        "& set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
