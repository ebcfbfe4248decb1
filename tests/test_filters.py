"""The filter grammar: parsing, the allow-list, canonical form, and the agreement of the
vectorised mask with the per-record check (ARCHITECTURE §4 filters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.index.exceptions import InvalidRequest
from streams.index.filters import (
    Filter,
    NumericClause,
    RowColumns,
    TagClause,
    parse_filter,
    tag_term,
)
from streams.index.model import FieldKind, FilterField, IndexConfig

CONFIG = IndexConfig(
    "acme",
    "kb",
    4,
    fields=(
        FilterField("color", FieldKind.TAG),
        FilterField("size", FieldKind.TAG),
        FilterField("price", FieldKind.NUMERIC),
        FilterField("rating", FieldKind.NUMERIC),
    ),
)


def parse(text: str) -> Filter:
    return parse_filter(text, CONFIG)


# -- parsing ---------------------------------------------------------------------------


def test_tag_clauses() -> None:
    assert parse("color:red").clauses == (TagClause("color", ("red",)),)
    assert parse("color:red|blue").clauses == (TagClause("color", ("blue", "red")),)
    assert parse("-color:red").clauses == (TagClause("color", ("red",), negated=True),)
    assert parse("tag:foo").clauses == (TagClause("tag", ("foo",)),)


def test_numeric_clauses() -> None:
    assert parse("price>=10").clauses == (NumericClause("price", ">=", 10.0),)
    assert parse("price<50").clauses == (NumericClause("price", "<", 50.0),)
    assert parse("price=3").clauses == (NumericClause("price", "=", 3.0),)
    assert parse("price>-1.5e3").clauses == (NumericClause("price", ">", -1500.0),)
    assert parse("price<=.5").clauses == (NumericClause("price", "<=", 0.5),)
    rng = NumericClause("price", "range", 10.0, 50.0)
    assert parse("price:[10 50]").clauses == (rng,)
    assert parse("price:[10,50]").clauses == (rng,)
    assert parse("price:[ 10   50 ]").clauses == (rng,)
    assert parse("-price:[10 50]").clauses == (NumericClause("price", "range", 10, 50, True),)


def test_conjunction_is_canonical() -> None:
    a = parse("price<50 color:red|blue  -size:xl")
    b = parse("-size:xl color:blue|red price<50 color:red|blue")
    assert a == b
    assert hash(a) == hash(b)
    assert str(a) == str(b) == "color:blue|red price<50 -size:xl"
    assert parse(str(a)) == a


def test_quoted_values_round_trip() -> None:
    f = parse('color:"dark red"|"a|b"|"say \\"hi\\""')
    assert f.clauses == (TagClause("color", ('a|b', "dark red", 'say "hi"')),)
    assert parse(str(f)) == f
    assert f.matches(["color:dark red"], {})
    assert f.matches(['color:say "hi"'], {})
    assert not f.matches(["color:dark"], {})


def test_values_may_contain_colons() -> None:
    f = parse("color:http://x")
    assert f.matches(["color:http://x"], {})
    assert not f.matches(["color:http"], {})


@pytest.mark.parametrize(
    "text",
    [
        "shape:round",  # undeclared field
        "price:cheap",  # numeric field used as a tag
        "color>=3",  # tag field compared
        "color:[1 2]",  # tag field ranged
        "",
        "   ",
        "color:",
        "color:red|",
        "color:|red",
        ":red",
        "-",
        "price>=",
        ">=3",
        "price>=abc",
        "price>=nan",
        "price>=1_000",
        "price:[10 50",
        "price:[50 10]",
        "price:[1 2 3]",
        "price:[1]",
        'color:"red',
        "color:red]",
        'color:a"b"',
        "color:red\\",
        "color:red price",
        "color=red",
        "x" * 5000,
        " ".join(["color:red"] * 65),
        "color:" + "|".join(f"v{i}" for i in range(257)),
    ],
)
def test_malformed_or_not_allowed(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(text)
    assert info.value.field == "filter"


def test_declared_tag_field_named_tag_must_be_a_tag() -> None:
    config = IndexConfig("a", "b", 4, fields=(FilterField("tag", FieldKind.NUMERIC),))
    with pytest.raises(InvalidRequest):
        parse_filter("tag:foo", config)
    assert parse_filter("tag>3", config).clauses == (NumericClause("tag", ">", 3.0),)


# -- semantics -------------------------------------------------------------------------


def test_plain_tags_belong_to_field_tag() -> None:
    assert tag_term("foo") == "tag:foo"
    assert tag_term("color:red") == "color:red"
    f = parse("tag:foo")
    assert f.matches(["foo"], {})
    assert not f.matches(["color:foo"], {})


def test_negation_is_a_complement_that_includes_missing_fields() -> None:
    assert parse("-price>=10").matches([], {})
    assert not parse("price>=10").matches([], {})
    assert parse("-price>=10").matches([], {"price": 5})
    assert not parse("-price>=10").matches([], {"price": 10})
    assert parse("-color:red").matches([], {})
    assert not parse("-color:red").matches(["color:red", "size:s"], {})


def test_range_is_inclusive() -> None:
    f = parse("price:[10 50]")
    assert [f.matches([], {"price": p}) for p in (9.99, 10, 30, 50, 50.01)] == [
        False, True, True, True, False,
    ]


# -- mask agrees with matches ----------------------------------------------------------

COLORS = ["red", "blue", "green", "dark red"]
SIZES = ["s", "m", "xl"]
PLAIN = ["foo", "bar"]

record = st.tuples(
    st.lists(
        st.sampled_from([f"color:{c}" for c in COLORS] + [f"size:{s}" for s in SIZES] + PLAIN),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(["price", "rating"]),
        st.sampled_from([0.0, 1.0, 2.5, 10.0, 49.0, 50.0, -3.0]),
    ),
)


def _value(v: str) -> str:
    return f'"{v}"' if " " in v else v


tag_clause = st.builds(
    lambda neg, field, values: ("-" if neg else "") + field + ":" + "|".join(map(_value, values)),
    st.booleans(),
    st.sampled_from(["color", "size", "tag"]),
    st.lists(st.sampled_from(COLORS + SIZES + PLAIN + ["none"]), min_size=1, max_size=3),
)
number = st.sampled_from(["0", "1", "2.5", "10", "50", "-3", "1e1", "inf", "-inf"])
numeric_clause = st.one_of(
    st.builds(
        lambda neg, field, op, v: ("-" if neg else "") + field + op + v,
        st.booleans(),
        st.sampled_from(["price", "rating"]),
        st.sampled_from(["<", "<=", ">", ">=", "="]),
        number,
    ),
    st.builds(
        lambda neg, field, lo, width: f"{'-' if neg else ''}{field}:[{lo} {lo + width}]",
        st.booleans(),
        st.sampled_from(["price", "rating"]),
        st.sampled_from([-3, 0, 1, 10]),
        st.sampled_from([0, 1.5, 40]),
    ),
)
filter_text = st.lists(st.one_of(tag_clause, numeric_clause), min_size=1, max_size=4).map(" ".join)


def columns_of(records: list[tuple[list[str], dict[str, float]]]) -> RowColumns:
    tags: dict[str, list[int]] = {}
    for row, (row_tags, _) in enumerate(records):
        for term in sorted({tag_term(t) for t in row_tags}):
            tags.setdefault(term, []).append(row)
    numeric = {
        name: np.array([r[1].get(name, math.nan) for r in records], dtype=np.float64)
        for name in ("price", "rating")
    }
    return RowColumns(
        len(records), {t: np.array(r, dtype=np.int32) for t, r in tags.items()}, numeric
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(record, max_size=30), filter_text)
def test_mask_agrees_with_matches(
    records: list[tuple[list[str], dict[str, float]]], text: str
) -> None:
    flt = parse(text)
    mask = flt.mask(columns_of(records))
    assert mask.dtype == np.bool_
    assert mask.tolist() == [flt.matches(tags, numeric) for tags, numeric in records]


@settings(max_examples=300, deadline=None)
@given(filter_text)
def test_valid_filters_round_trip(text: str) -> None:
    flt = parse(text)
    again = parse(str(flt))
    assert again == flt
    assert hash(again) == hash(flt)
    assert str(again) == str(flt)


ALPHABET = st.sampled_from([*'colrpiceatg:-|[]"\\ <>=.,0123456789e\t\n', "size", "é"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.lists(ALPHABET, max_size=40).map("".join)))
def test_fuzz_raises_only_invalid_request(text: str) -> None:
    try:
        flt = parse(text)
    except InvalidRequest as exc:
        assert exc.field == "filter"
    else:
        assert parse(str(flt)) == flt
