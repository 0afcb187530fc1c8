"""The slice query language: one grammar, parsed once into an AST, checked against a manifest, compiled
to a parameterised DuckDB query.

Grammar (keywords are case-insensitive)::

    query      := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | atom
    atom       := "(" or ")" | predicate
    predicate  := field [op literal | ["not"] "in" "[" literal ("," literal)* [","] "]"]
    field      := ("labels" | "meta" | "file") "." name
    name       := identifier | "quoted string"
    op         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">="
    literal    := number | "string" | 'string' | true | false

A bare field is a predicate only when it is a bool (``not meta.blurry``). ``labels.<name>`` is the
instance count of a label, ``meta.<key>`` a metadata value, ``file.<attr>`` one of width, height,
size, type, id.

Semantics are two-valued: a comparison with a missing value (an item without that metadata key, an
image size that is unknown) is false, and ``not`` negates that. User text reaches SQL only as
parameters; identifiers come from the manifest's own column list.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from sluicegate._exceptions import QueryError
from sluicegate.core.manifest import FILE_FIELDS, FieldType, query_fields

__all__ = ["MAX_QUERY_CHARS", "MAX_QUERY_DEPTH", "Query", "guard_query", "parse", "select_rows"]

Value = bool | int | float | str
NAMESPACES = ("labels", "meta", "file")
OPS = ("=", "==", "!=", "<", "<=", ">", ">=")
_ORDER_OPS = ("<", "<=", ">", ">=")
_KEYWORDS = ("and", "or", "not", "in", "true", "false")

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-]*)
  | (?P<op>==|!=|<=|>=|=|<|>)
  | (?P<punct>[().\[\],])
  | (?P<quote>["'])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


@dataclass(frozen=True)
class Token:
    kind: str  # number, ident, op, punct, string, end
    text: str
    pos: int
    value: Value | None = None


def _tokenize(text: str) -> Iterator[Token]:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise QueryError(f"unexpected character {text[pos]!r}", text, pos)
        kind = m.lastgroup
        assert kind is not None
        if kind == "quote":
            value, end = _read_string(text, pos)
            yield Token("string", text[pos:end], pos, value)
            pos = end
            continue
        if kind == "number":
            raw = m.group()
            num: int | float = float(raw) if any(c in raw for c in ".eE") else int(raw)
            if isinstance(num, float) and num in (float("inf"), float("-inf")):
                raise QueryError(f"number {raw} is too large", text, pos)
            yield Token("number", raw, pos, num)
        elif kind != "ws":
            yield Token(kind, m.group(), pos)
        pos = m.end()
    yield Token("end", "", len(text))


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= len(text):
                break
            esc = text[i + 1]
            if esc not in _ESCAPES:
                raise QueryError(f"unknown escape \\{esc} in string", text, i)
            out.append(_ESCAPES[esc])
            i += 2
            continue
        out.append(c)
        i += 1
    raise QueryError("unterminated string: add the closing quote", text, start)


# -- AST -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    namespace: str
    name: str
    pos: int

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True)
class Literal:
    value: Value
    pos: int


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str  # one of OPS, "==" normalised to "="
    value: Literal


@dataclass(frozen=True)
class In:
    field: Field
    values: tuple[Literal, ...]
    negated: bool


@dataclass(frozen=True)
class Truthy:
    field: Field


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node = Compare | In | Truthy | Not | And | Or


MAX_QUERY_CHARS = 4096
MAX_QUERY_DEPTH = 32


def guard_query(text: str, what: str = "query") -> None:
    """:class:`QueryError` for a query too long or too deeply nested to be worth parsing (the parser
    recurses per parenthesis and costs time per character; no query may cost a daemon more than this).
    :meth:`Query.parse` calls it first; the operator also calls it where a query is not parsed yet."""
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(
            f"the {what} is {len(text)} characters long; at most {MAX_QUERY_CHARS} are allowed: "
            "select with fewer, broader conditions (e.g. file.id in [...] lists belong in metadata)"
        )
    depth, quote, escaped = 0, "", False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
            if depth > MAX_QUERY_DEPTH:
                raise QueryError(f"the {what} nests parentheses more than {MAX_QUERY_DEPTH} deep", text, i)
        elif ch in ")]":
            depth = max(0, depth - 1)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_tokenize(text))
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _keyword(self, word: str) -> bool:
        return self.tok.kind == "ident" and self.tok.text.lower() == word

    def _error(self, message: str, tok: Token | None = None) -> QueryError:
        tok = tok or self.tok
        return QueryError(message, self.text, tok.pos)

    def _expect_punct(self, p: str, what: str) -> None:
        if not (self.tok.kind == "punct" and self.tok.text == p):
            raise self._error(f"expected {what}, found {_describe(self.tok)}")
        self.i += 1

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self._error("empty query: write a condition such as labels.car > 0")
        node = self._or()
        if self.tok.kind != "end":
            raise self._error(f"unexpected {_describe(self.tok)}; join conditions with 'and' or 'or'")
        return node

    def _or(self) -> Node:
        items = [self._and()]
        while self._keyword("or"):
            self.i += 1
            items.append(self._and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def _and(self) -> Node:
        items = [self._not()]
        while self._keyword("and"):
            self.i += 1
            items.append(self._not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def _not(self) -> Node:
        # Iterative: "not not ... x" must not recurse once per word (guard_query bounds parentheses only).
        negations = 0
        while self._keyword("not"):
            self.i += 1
            negations += 1
        node = self._atom()
        for _ in range(negations):
            node = Not(node)
        return node

    def _atom(self) -> Node:
        if self.tok.kind == "punct" and self.tok.text == "(":
            self.i += 1
            node = self._or()
            self._expect_punct(")", "')' to close the parenthesis")
            return node
        field = self._field()
        if self.tok.kind == "op":
            op = "=" if self.tok.text == "==" else self.tok.text
            self.i += 1
            return Compare(field, op, self._literal())
        negated = False
        if self._keyword("not") and self.tokens[self.i + 1].kind == "ident":
            if self.tokens[self.i + 1].text.lower() != "in":
                raise self._error("expected 'in' after 'not'", self.tokens[self.i + 1])
            negated = True
            self.i += 1
        if self._keyword("in"):
            self.i += 1
            return In(field, self._list(), negated)
        return Truthy(field)

    def _field(self) -> Field:
        tok = self.tok
        if tok.kind != "ident" or tok.text.lower() in _KEYWORDS:
            raise self._error(f"expected a field such as labels.car or meta.split, found {_describe(tok)}")
        if tok.text not in NAMESPACES:
            hint = _suggest(tok.text, NAMESPACES)
            raise self._error(f"unknown field {tok.text!r}: fields start with labels., meta. or file.{hint}")
        self.i += 1
        self._expect_punct(".", f"'.' after {tok.text!r} (as in {tok.text}.name)")
        name_tok = self.tok
        if name_tok.kind == "ident" or (name_tok.kind == "string" and name_tok.value):
            self.i += 1
            name = name_tok.text if name_tok.kind == "ident" else str(name_tok.value)
            return Field(tok.text, name, tok.pos)
        raise self._error(f"expected a name after '{tok.text}.', found {_describe(name_tok)}")

    def _literal(self) -> Literal:
        tok = self.tok
        if tok.kind in ("number", "string"):
            self.i += 1
            assert tok.value is not None
            return Literal(tok.value, tok.pos)
        if self._keyword("true") or self._keyword("false"):
            self.i += 1
            return Literal(tok.text.lower() == "true", tok.pos)
        raise self._error(f"expected a number, a quoted string, true or false, found {_describe(tok)}")

    def _list(self) -> tuple[Literal, ...]:
        self._expect_punct("[", '\'[\' to start the list (as in meta.split in ["train", "val"])')
        items = [self._literal()]
        while self.tok.kind == "punct" and self.tok.text == ",":
            self.i += 1
            if self.tok.kind == "punct" and self.tok.text == "]":
                break
            items.append(self._literal())
        self._expect_punct("]", "',' or ']' in the list")
        return tuple(items)


def _describe(tok: Token) -> str:
    return "the end of the query" if tok.kind == "end" else repr(tok.text)


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- checking and compiling ------------------------------------------------------------------------


def _literal_type(value: Value) -> FieldType:
    if isinstance(value, bool):
        return FieldType.BOOL
    if isinstance(value, int):
        return FieldType.INT
    if isinstance(value, float):
        return FieldType.FLOAT
    return FieldType.STRING


def _type_word(t: FieldType) -> str:
    return "a number" if t.numeric else {FieldType.BOOL: "a bool", FieldType.STRING: "a string"}[t]


@dataclass(frozen=True)
class Query:
    """A parsed slice query. ``Query.parse(text)`` checks syntax; ``compile(fields)`` checks fields
    and types against a manifest and yields SQL."""

    text: str
    root: Node

    @classmethod
    def parse(cls, text: str) -> Query:
        if not isinstance(text, str):
            raise QueryError(f"a query is a string, got {type(text).__name__}")
        guard_query(text)
        return cls(text, _Parser(text).parse())

    def fields(self) -> list[Field]:
        out: list[Field] = []

        def walk(node: Node) -> None:
            if isinstance(node, Compare | In | Truthy):
                out.append(node.field)
            elif isinstance(node, Not):
                walk(node.operand)
            else:
                for child in node.operands:
                    walk(child)

        walk(self.root)
        return out

    def compile(self, fields: Mapping[str, tuple[str, FieldType]]) -> tuple[str, list[Value]]:
        """SQL boolean expression over manifest columns, plus its parameters in order."""
        params: list[Value] = []
        return self._sql(self.root, fields, params), params

    def columns(self, fields: Mapping[str, tuple[str, FieldType]]) -> list[str]:
        return sorted({self._resolve(f, fields)[0] for f in self.fields()})

    def _resolve(self, field: Field, fields: Mapping[str, tuple[str, FieldType]]) -> tuple[str, FieldType]:
        spec = fields.get(field.path)
        if spec is not None:
            return spec
        candidates = [path for path in fields if path.startswith(field.namespace + ".")]
        if field.namespace == "file":
            what = f"{field.path} is not a file attribute (there are {', '.join(FILE_FIELDS)})"
        else:
            noun = "label" if field.namespace == "labels" else "metadata key"
            what = f"unknown {noun} {field.path!r}: this dataset has no such {noun}"
        raise QueryError(what + _suggest(field.path, candidates), self.text, field.pos)

    def _sql(self, node: Node, fields: Mapping[str, tuple[str, FieldType]], params: list[Value]) -> str:
        if isinstance(node, And | Or):
            joiner = " AND " if isinstance(node, And) else " OR "
            return "(" + joiner.join(self._sql(n, fields, params) for n in node.operands) + ")"
        if isinstance(node, Not):
            return f"(NOT {self._sql(node.operand, fields, params)})"
        column, ftype = self._resolve(node.field, fields)
        ident = '"' + column.replace('"', '""') + '"'
        if isinstance(node, Truthy):
            if ftype != FieldType.BOOL:
                example = f"{node.field.path} > 0" if ftype.numeric else f'{node.field.path} = "..."'
                raise QueryError(
                    f"{node.field.path} is {_type_word(ftype)}, not a bool: compare it, e.g. {example}",
                    self.text,
                    node.field.pos,
                )
            return f"coalesce({ident}, false)"
        literals = (node.value,) if isinstance(node, Compare) else node.values
        for lit in literals:
            self._check_type(node.field, ftype, lit)
        if isinstance(node, Compare):
            if node.op in _ORDER_OPS and ftype == FieldType.BOOL:
                raise QueryError(
                    f"{node.field.path} is a bool: only = and != apply", self.text, node.value.pos
                )
            params.append(node.value.value)
            return f"coalesce({ident} {'<>' if node.op == '!=' else node.op} ?, false)"
        params.extend(lit.value for lit in node.values)
        marks = ", ".join("?" for _ in node.values)
        inside = f"coalesce({ident} IN ({marks}), false)"
        return f"(NOT {inside})" if node.negated else inside

    def _check_type(self, field: Field, ftype: FieldType, lit: Literal) -> None:
        ltype = _literal_type(lit.value)
        if ltype == ftype or (ltype.numeric and ftype.numeric):
            return
        raise QueryError(
            f"type mismatch: {field.path} is {_type_word(ftype)}, compared with {_type_word(ltype)} "
            f"{lit.value!r}",
            self.text,
            lit.pos,
        )


def parse(text: str) -> Query:
    """Parse ``text`` into a :class:`Query` (syntax only); raises :class:`QueryError`."""
    return Query.parse(text)


def select_rows(table: pa.Table, queries: Sequence[Query | str]) -> pa.Array:
    """Row positions (int64, ascending) of ``table`` that match every query in ``queries``."""
    parsed = [q if isinstance(q, Query) else Query.parse(q) for q in queries]
    if not parsed:
        return pa.array(np.arange(table.num_rows, dtype=np.int64))
    fields = query_fields(table.schema)
    where, params, columns = [], [], set()
    for q in parsed:
        sql, p = q.compile(fields)
        where.append(sql)
        params.extend(p)
        columns.update(q.columns(fields))
    rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
    view = table.select(sorted(columns)).append_column("__row", rows)
    con = duckdb.connect()
    try:
        con.register("manifest", view)
        found: Any = con.execute(
            f"SELECT __row FROM manifest WHERE {' AND '.join(where)} ORDER BY __row", params
        ).fetchnumpy()["__row"]
    except duckdb.Error as exc:
        raise QueryError(f"query could not be evaluated: {exc}") from exc
    finally:
        con.close()
    return pa.array(found, pa.int64())
