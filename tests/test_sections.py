"""Typed config sections: fields checked by their annotations, errors naming the config path."""

import dataclasses

import ml_collections
import pytest

from longjax import sections


@dataclasses.dataclass(frozen=True)
class Example:
    count: int
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    limit: int | None = None
    sizes: tuple[int, ...] = ()

    def __post_init__(self):
        sections.positive_int("example.count", self.count)


def test_a_section_is_filled_and_converted():
    parsed = sections.parse_section(
        Example, ml_collections.ConfigDict(dict(count=3, rate=1, limit=None, sizes=[1, 2])), "example"
    )
    assert parsed == Example(count=3, rate=1.0, sizes=(1, 2))
    assert isinstance(parsed.rate, float)


@pytest.mark.parametrize("fields, message", [
    (dict(rate=0.1), r"example.count is missing \(an int\)"),
    (dict(count=1, size=3), r"example: unknown field\(s\) \['size'\]; the fields are"),
    (dict(count="3"), r"example.count must be an int, got '3'"),
    (dict(count=True), r"example.count must be an int, got True"),
    (dict(count=1, rate="fast"), r"example.rate must be a number, got 'fast'"),
    (dict(count=1, flag=1), r"example.flag must be a bool \(True/False\), got 1"),
    (dict(count=1, limit=2.5), r"example.limit must be an int or None, got 2.5"),
    (dict(count=1, sizes=[1, "a"]), r"example.sizes\[1\] must be an int, got 'a'"),
    (dict(count=0), r"example.count must be a positive int, got 0"),
])
def test_bad_fields_name_their_path(fields, message):
    with pytest.raises(sections.ConfigError, match=message):
        sections.parse_section(Example, fields, "example")


def test_a_section_must_be_a_mapping():
    with pytest.raises(sections.ConfigError, match=r"example must be a section \(a dict of fields\), got 3"):
        sections.parse_section(Example, 3, "example")


def test_flatten_and_one_of():
    assert sections.flatten({"a": {"b": [1, 2]}, "c": None}) == {"a.b": (1, 2), "c": None}
    sections.one_of("x.kind", "a", ("a", "b"))
    with pytest.raises(sections.ConfigError, match=r"x.kind must be one of \('a', 'b'\), got 'c'"):
        sections.one_of("x.kind", "c", ("a", "b"))
