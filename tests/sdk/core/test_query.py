"""The slice query language: property tests against a plain-Python reference evaluator, garbage input,
error messages and injection attempts."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluicegate import ItemRecord, QueryError
from sluicegate.core import manifest as _manifest
from sluicegate.core.manifest import FieldType
from sluicegate.core.query import Query, select_rows
from sluicegate.core.store import sha256_hex

SETTINGS = settings(max_examples=200, deadline=None)
LABELS = ("car", "traffic light", "person")
META_STRINGS = ["train", "val", "test", "", 'a"b', "it's", "back\\slash", "x\ny", "Train"]
META: dict[str, Any] = {
    "flag": st.booleans(),
    "count": st.integers(-1000, 1000),
    "score": st.floats(-100, 100, allow_nan=False, allow_infinity=False),
    "split": st.sampled_from(META_STRINGS),
}

# -- random manifests and their rows as plain Python --------------------------------------------

Row = dict[str, Any]


@st.composite
def manifests(draw: st.DrawFn) -> tuple[pa.Table, list[Row]]:
    n = draw(st.integers(0, 25))
    records, rows = [], []
    for i in range(n):
        labels = {name: c for name in LABELS if (c := draw(st.integers(0, 3)))}
        metadata = {key: v for key, strat in META.items() if (v := draw(st.none() | strat)) is not None}
        width = draw(st.none() | st.integers(1, 2000))
        height = None if width is None else draw(st.integers(1, 2000))
        media_type = draw(st.sampled_from(["image/png", "image/jpeg"]))
        records.append(
            ItemRecord(
                id=f"item-{i}",
                blob=sha256_hex(str(i).encode()),
                size=i * 10,
                media_type=media_type,
                width=width,
                height=height,
                labels=labels,
                metadata=metadata,
            )
        )
        row: Row = {f"labels.{name}": labels.get(name, 0) for name in LABELS}
        row |= {f"meta.{key}": metadata.get(key) for key in META}
        row |= {
            "file.id": f"item-{i}",
            "file.size": i * 10,
            "file.type": media_type,
            "file.width": width,
            "file.height": height,
        }
        rows.append(row)
    return _manifest.records_to_table(records), rows


# -- random queries as a tiny AST, rendered to text and evaluated in Python ----------------------

Node = tuple[Any, ...]
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_LITERALS = {
    FieldType.INT: st.integers(-5, 5) | st.integers(-(10**6), 10**6),
    FieldType.FLOAT: st.floats(-10, 10, allow_nan=False, allow_infinity=False) | st.integers(-5, 5),
    FieldType.STRING: st.sampled_from([*META_STRINGS, "image/png", "zzz"]),
    FieldType.BOOL: st.booleans(),
}


def _literal(ftype: FieldType) -> st.SearchStrategy[Any]:
    """Literals a field of ``ftype`` may be compared with (numbers of either kind for numbers)."""
    if ftype.numeric:
        return _LITERALS[FieldType.INT] | _LITERALS[FieldType.FLOAT]
    return _LITERALS[ftype]


def predicates(fields: dict[str, FieldType]) -> st.SearchStrategy[Node]:
    @st.composite
    def one(draw: st.DrawFn) -> Node:
        path = draw(st.sampled_from(sorted(fields)))
        ftype = fields[path]
        ops = ["=", "==", "!="] if ftype is FieldType.BOOL else list(_OPS)
        kinds = ["cmp", "in"] + (["truthy"] if ftype is FieldType.BOOL else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "cmp":
            return ("cmp", path, draw(st.sampled_from(ops)), draw(_literal(ftype)))
        if kind == "in":
            return ("in", path, draw(st.lists(_literal(ftype), min_size=1, max_size=4)), draw(st.booleans()))
        return ("truthy", path)

    return one()


def queries(fields: dict[str, FieldType]) -> st.SearchStrategy[Node]:
    return st.recursive(
        predicates(fields),
        lambda kids: st.one_of(
            st.tuples(st.just("not"), kids),
            st.tuples(st.just("paren"), kids),
            st.tuples(st.just("and"), st.lists(kids, min_size=2, max_size=3)),
            st.tuples(st.just("or"), st.lists(kids, min_size=2, max_size=3)),
        ),
        max_leaves=8,
    )


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _render_field(path: str) -> str:
    namespace, name = path.split(".", 1)
    return f'{namespace}."{name}"' if " " in name else path


_PRECEDENCE = {"or": 0, "and": 1, "not": 2}


def render(node: Node, parent: int = 0) -> str:
    kind = node[0]
    if kind == "cmp":
        return f"{_render_field(node[1])} {node[2]} {_render_value(node[3])}"
    if kind == "in":
        items = ", ".join(_render_value(v) for v in node[2])
        return f"{_render_field(node[1])} {'not in' if node[3] else 'in'} [{items}]"
    if kind == "truthy":
        return _render_field(node[1])
    if kind == "paren":
        return f"({render(node[1])})"
    if kind == "not":
        text = f"not {render(node[1], _PRECEDENCE['not'])}"
    else:
        joiner = " and " if kind == "and" else " OR "
        text = joiner.join(render(child, _PRECEDENCE[kind] + 1) for child in node[1])
    return f"({text})" if _PRECEDENCE[kind] < parent else text


def evaluate(node: Node, row: Row) -> bool:
    """The reference semantics: a comparison with a missing value is false; ``not`` negates."""
    kind = node[0]
    if kind == "cmp":
        value = row[node[1]]
        return value is not None and _OPS[node[2]](value, node[3])
    if kind == "in":
        value = row[node[1]]
        found = value is not None and any(value == v for v in node[2])
        return not found if node[3] else found
    if kind == "truthy":
        return row[node[1]] is True
    if kind == "paren":
        return evaluate(node[1], row)
    if kind == "not":
        return not evaluate(node[1], row)
    results = [evaluate(child, row) for child in node[1]]
    return all(results) if kind == "and" else any(results)


@st.composite
def manifest_and_query(draw: st.DrawFn) -> tuple[pa.Table, list[Row], Node]:
    table, rows = draw(manifests())
    fields = {path: ftype for path, (_, ftype) in _manifest.query_fields(table.schema).items()}
    return table, rows, draw(queries(fields))


@SETTINGS
@given(manifest_and_query())
def test_select_rows_matches_reference_evaluator(case: tuple[pa.Table, list[Row], Node]) -> None:
    table, rows, node = case
    text = render(node)
    expected = [i for i, row in enumerate(rows) if evaluate(node, row)]
    assert select_rows(table, [text]).to_pylist() == expected, text


@SETTINGS
@given(manifest_and_query(), st.data())
def test_several_queries_are_anded(case: tuple[pa.Table, list[Row], Node], data: st.DataObject) -> None:
    table, rows, first = case
    fields = {path: ftype for path, (_, ftype) in _manifest.query_fields(table.schema).items()}
    second = data.draw(queries(fields))
    expected = [i for i, row in enumerate(rows) if evaluate(first, row) and evaluate(second, row)]
    assert select_rows(table, [render(first), Query.parse(render(second))]).to_pylist() == expected


# -- garbage in, QueryError out ------------------------------------------------------------------

_FIXED = _manifest.records_to_table(
    [
        ItemRecord(
            id="x",
            blob=sha256_hex(b"x"),
            size=1,
            media_type="image/png",
            labels={"car": 1, "traffic light": 2},
            metadata={"split": "train", "blurry": False, "score": 0.5},
        )
    ]
)
_TOKENS = [
    "labels", "meta", "file", ".", "car", '"traffic light"', "split", "blurry", "score", "width", "and",
    "or", "not", "in", "(", ")", "[", "]", ",", "=", "==", "!=", "<", "<=", ">", ">=", "1", "-2.5", "1e999",
    "99999999999999999999999999", '"train"', "'val'", "true", "false", '"', "'", "\\", ";", "drop", "--",
    "*", "@", "é", "\n", "\t", "\x00",
]  # fmt: skip


@SETTINGS
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map(" ".join) | st.text(max_size=40))
def test_garbage_only_ever_raises_query_error(text: str) -> None:
    try:
        select_rows(_FIXED, [text])
    except QueryError as exc:
        message = str(exc)
    else:
        return
    assert message.strip()  # a message, never an empty one


# -- error messages --------------------------------------------------------------------------------


def _error(text: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        select_rows(_FIXED, [text])
    return info.value


def test_unknown_label_points_at_it_and_suggests() -> None:
    err = _error("meta.split = 'train' and labels.cra > 0")
    assert err.position == len("meta.split = 'train' and ")
    assert "unknown label 'labels.cra'" in err.message
    assert "did you mean 'labels.car'" in err.message
    lines = str(err).splitlines()
    assert lines[1].strip() == "meta.split = 'train' and labels.cra > 0"
    assert lines[2].index("^") == lines[1].index("labels.cra")  # caret under the column


def test_unknown_namespace_suggests_the_right_one() -> None:
    err = _error("lables.car > 1")
    assert err.position == 0
    assert "did you mean 'labels'" in err.message


def test_unterminated_string_points_at_its_quote() -> None:
    err = _error('meta.split = "train')
    assert err.position == len("meta.split = ")
    assert "unterminated string" in err.message


def test_type_mismatch_names_both_types() -> None:
    err = _error('labels.car >= "many"')
    assert err.position == len("labels.car >= ")
    assert "labels.car is a number, compared with a string" in err.message
    assert "meta.split is a string, compared with a number" in _error("meta.split = 3").message
    assert "only = and != apply" in _error("meta.blurry < true").message
    assert "not a bool: compare it" in _error("labels.car").message


@pytest.mark.parametrize(
    ("text", "fragment", "position"),
    [
        ("", "empty query", 0),
        ("labels.car > ", "expected a number, a quoted string, true or false", 13),
        ("(labels.car > 1", "')' to close the parenthesis", 15),
        ("labels.car > 1 meta.split = 'a'", "join conditions with 'and' or 'or'", 15),
        ("meta.split not on ['a']", "expected 'in' after 'not'", 15),
        ("labels.car > 1 $", "unexpected character '$'", 15),
        ("meta.split = 'a\\q'", "unknown escape \\q", 15),
        ("file.colour = 'red'", "not a file attribute", 0),
    ],
)
def test_syntax_errors_say_what_and_where(text: str, fragment: str, position: int) -> None:
    err = _error(text)
    assert fragment in err.message
    assert err.position == position


def test_quoted_label_names_with_spaces_work() -> None:
    assert select_rows(_FIXED, ['labels."traffic light" >= 2']).to_pylist() == [0]
    assert select_rows(_FIXED, ["labels.'traffic light' > 2"]).to_pylist() == []


# -- injection -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["'; drop table manifest; --", '"; drop table manifest; --', "train' or '1'='1", 'x") or (1=1'],
)
def test_injection_in_values_is_data(value: str) -> None:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    assert select_rows(_FIXED, [f'meta.split = "{escaped}"']).to_pylist() == []
    assert select_rows(_FIXED, [f'meta.split != "{escaped}"']).to_pylist() == [0]
    assert select_rows(_FIXED, ["meta.split = 'train'"]).to_pylist() == [0]  # still intact


def test_injection_in_names_is_an_unknown_field() -> None:
    err = _error('labels."car\\" > 0 or 1=1; --" > 0')
    assert "unknown label" in err.message


def test_column_names_with_quotes_are_quoted_identifiers() -> None:
    table = _manifest.records_to_table(
        [ItemRecord(id="q", blob=sha256_hex(b"q"), size=1, media_type="image/png", labels={'a"b': 3})]
    )
    assert select_rows(table, ['labels."a\\"b" = 3']).to_pylist() == [0]


def test_queries_too_long_or_too_deep_are_refused_before_parsing() -> None:
    Query.parse("(" * 32 + "labels.a > 1" + ")" * 32)
    Query.parse('meta.x = "' + "(" * 100 + '"')  # parentheses inside a string do not nest
    Query.parse("not " * 1000 + "labels.a > 1")  # negations do not recurse
    with pytest.raises(QueryError, match="more than 32 deep"):
        Query.parse("(" * 250 + "labels.a > 1" + ")" * 250)
    with pytest.raises(QueryError, match="characters long"):
        Query.parse("labels.a > 1 or " * 1000 + "labels.a > 1")
