"""ClickHouse SQL boolean expressions over profile columns, checked and compiled to Python.

The text is parsed with sqlglot (ClickHouse dialect), every column and function is checked
against the profile's column types, and the tree is turned into nested Python closures —
no ``eval``, no code generation. NULL follows ClickHouse: comparisons and arithmetic with
NULL give NULL, ``AND``/``OR`` are three-valued, and a NULL result means "not a member".

Supported (see docs/segments.md): ``AND OR NOT``, ``= == != <> < <= > >=``, ``IN``/``NOT IN``
with a list, ``BETWEEN``, ``IS [NOT] NULL``, ``LIKE``/``ILIKE``, ``+ - * / %``, unary minus,
``now()``, ``dateDiff(unit, a, b)`` (second, minute, hour, day, week, month, year),
``x ± INTERVAL n unit`` (second, minute, hour, day, week), ``has``, ``hasAny``, ``hasAll``,
``length``, ``empty``, ``notEmpty``, ``mapContains``, map subscripts ``m['key']``, ``if``,
``coalesce``, ``isNull``, ``isNotNull``, ``lower``, ``upper``, ``abs``, ``greatest``,
``least``, ``toDateTime('…')``.

Every construct is checked against ClickHouse itself (tests/integration/test_differential.py), and
what ClickHouse would refuse or read differently is rejected here: an ``if()`` condition that is not
true/false, ``greatest``/``least`` mixing a 64-bit integer with a float, an integer ``%`` without a
non-zero constant divisor, a fractional ``INTERVAL``, date-times other than ``'YYYY-MM-DD[ hh:mm:ss[.fff]]'``
(UTC). ``now()`` has whole seconds, as ClickHouse's ``now()`` does.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from pipeline.errors import DefinitionError
from pipeline.segments.columns import PROFILE_COLUMNS, T

Row = dict[str, Any]
# A compiled closure: (row, now) -> value. ``now`` is a datetime; in epoch-ms mode (``_Compiler(ms=True)``,
# used by deadlines.py) it is an int of epoch milliseconds, and so is every date-time value inside.
Fn = Callable[[Row, Any], Any]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# The range of Python's datetime, in epoch ms: the datetime form raises OverflowError outside it, so the
# epoch-ms form does too (same answers).
MIN_MS = (datetime.min.replace(tzinfo=UTC) - EPOCH) // _ONE_MS
MAX_MS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // _ONE_MS


def epoch_ms(value: datetime) -> int:
    """A UTC date-time as epoch milliseconds (exact for the millisecond date-times of profile columns)."""
    if value.microsecond % 1000 == 0:
        # a whole millisecond (every profile date-time): the float seconds are within far less than half a
        # millisecond of it (< 0.05 ms off even in year 9999), so rounding gives it exactly: the fast path
        return round(value.timestamp() * 1000)
    if value.tzinfo is None:
        return math.floor(value.timestamp() * 1000)  # naive: local time, as datetime.timestamp() reads it
    return (value - EPOCH) // _ONE_MS
INTERVAL_UNITS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400}
DATEDIFF_UNITS = ("second", "minute", "hour", "day", "week", "month", "year")
FUNCTIONS = (
    "now", "dateDiff", "has", "hasAny", "hasAll", "length", "empty", "notEmpty", "mapContains",
    "if", "coalesce", "isNull", "isNotNull", "lower", "upper", "abs", "greatest", "least", "toDateTime",
)


@dataclass(frozen=True)
class Term:
    """One top-level AND term, for explanations."""

    sql: str
    fn: Fn


@dataclass(frozen=True)
class Compiled:
    """A checked, compiled predicate."""

    text: str
    sql: str  # normalized ClickHouse SQL of the same expression
    fn: Fn
    columns: frozenset[str]
    uses_now: bool
    terms: tuple[Term, ...] = field(default=())

    def __call__(self, row: Row, now: datetime) -> bool:
        return bool(self.fn(row, now))


@dataclass(frozen=True)
class Typed:
    fn: Fn
    type: T
    nullable: bool
    const: bool = False
    column: str | None = None  # a bare column: read inline by the closures of the hot forms below


Locate = Callable[[int], tuple[int, int]]


def _default_locate(text: str) -> Locate:
    def locate(offset: int) -> tuple[int, int]:
        before = text[:offset]
        line = before.count("\n") + 1
        return line, offset - (before.rfind("\n") + 1) + 1
    return locate


class _Compiler:
    def __init__(self, text: str, locate: Locate, segment_id: str | None, source: str | None, *,
                 ms: bool = False) -> None:
        self.text = text
        # Epoch-ms mode: date-times (columns, literals, now) are ints of epoch ms instead of datetimes,
        # so a closure evaluated at many instants (deadlines.py) builds no datetime; same answers.
        self.ms = ms
        self.locate = locate
        self.segment_id = segment_id
        self.source = source
        self.columns: set[str] = set()
        self.uses_now = False

    # errors ------------------------------------------------------------------------

    def _offset(self, node: exp.Expression) -> int:
        for candidate in node.walk():
            meta = candidate.meta if isinstance(candidate, exp.Expression) else None
            if meta and "start" in meta:
                if isinstance(candidate, (exp.Func, exp.Anonymous)) and "clickhouse_name" not in meta:
                    return int(meta["start"])
                if isinstance(candidate, exp.Func):
                    # typed functions record the start of their argument list; step back to the name
                    name = meta.get("clickhouse_name", "")
                    start = self.text.rfind(name, 0, int(meta["start"]) + 1)
                    return start if start >= 0 else int(meta["start"])
                return int(meta["start"])
        return 0

    def fail(self, node: exp.Expression | None, message: str) -> DefinitionError:
        line, column = self.locate(self._offset(node)) if node is not None else (None, None)
        return DefinitionError(message, segment_id=self.segment_id, line=line, column=column, source=self.source)

    def expect(self, node: exp.Expression, typed: Typed, *types: T) -> Typed:
        if typed.type in types or typed.type is T.NULL or T.ANY in types:
            return typed
        wanted = " or ".join(t.value for t in types)
        raise self.fail(node, f"{node.sql('clickhouse')!r} is a {typed.type.value}, but a {wanted} is needed here")

    # tree walk ---------------------------------------------------------------------

    def c(self, node: exp.Expression) -> Typed:  # noqa: C901 - one dispatch table
        handler = _HANDLERS.get(type(node))
        if handler is None:
            if isinstance(node, exp.Anonymous):
                return self.anonymous(node)
            if isinstance(node, exp.Func):
                name = node.meta.get("clickhouse_name") or node.sql_name()
                raise self.fail(node, f"unknown function {name}(); supported: {', '.join(FUNCTIONS)}")
            raise self.fail(node, f"{node.sql('clickhouse')!r} is not supported in a segment definition")
        return handler(self, node)

    def anonymous(self, node: exp.Anonymous) -> Typed:
        name = str(node.this)
        args = list(node.expressions)
        special = _ANONYMOUS.get(name)
        if special is None:
            raise self.fail(node, f"unknown function {name}(); supported: {', '.join(FUNCTIONS)}")
        return special(self, node, args)

    def arity(self, node: exp.Expression, name: str, args: list[Any], count: int) -> None:
        if len(args) != count:
            raise self.fail(node, f"{name}() takes {count} argument{'s' if count != 1 else ''}, got {len(args)}")


def _null_safe2(op: Callable[[Any, Any], Any]) -> Callable[[Fn, Fn], Fn]:
    def build(left: Fn, right: Fn) -> Fn:
        def fn(row: Row, now: datetime) -> Any:
            a = left(row, now)
            if a is None:
                return None
            b = right(row, now)
            if b is None:
                return None
            return op(a, b)
        return fn
    return build


def _column(comp: _Compiler, node: exp.Column) -> Typed:
    if node.table:
        raise comp.fail(node, f"qualified column {node.sql('clickhouse')!r}: use the bare profile column name")
    name = node.name
    if name not in PROFILE_COLUMNS:
        close = [c for c in PROFILE_COLUMNS if c.startswith(name[:4])] if len(name) >= 4 else []
        hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
        raise comp.fail(node, f"unknown column {name!r}{hint}")
    comp.columns.add(name)
    kind, nullable, _ = PROFILE_COLUMNS[name]

    def fn(row: Row, now: datetime) -> Any:
        return row[name]
    return Typed(fn, kind, nullable, column=name)


def _literal(comp: _Compiler, node: exp.Literal) -> Typed:
    value: Any
    if node.is_string:
        value = node.this
        return Typed(lambda row, now: value, T.STR, False, True)
    text = node.this
    value = float(text) if any(ch in text for ch in ".eE") else int(text)
    return Typed(lambda row, now: value, T.NUM, False, True)


def _boolean(comp: _Compiler, node: exp.Boolean) -> Typed:
    value = bool(node.this)
    return Typed(lambda row, now: value, T.BOOL, False, True)


def _null(comp: _Compiler, node: exp.Null) -> Typed:
    return Typed(lambda row, now: None, T.NULL, True, True)


def _paren(comp: _Compiler, node: exp.Paren) -> Typed:
    return comp.c(node.this)


def _truth(value: Any) -> bool | None:
    if value is None:
        return None
    return bool(value)


def _and(comp: _Compiler, node: exp.And) -> Typed:
    left = comp.expect(node.this, comp.c(node.this), T.BOOL, T.NUM)
    right = comp.expect(node.expression, comp.c(node.expression), T.BOOL, T.NUM)
    lf, rf = left.fn, right.fn

    def fn(row: Row, now: datetime) -> bool | None:
        # _truth inlined (a hot path): a value is false when it is not NULL and not truthy
        a = lf(row, now)
        if a is not None and not a:
            return False
        b = rf(row, now)
        if b is not None and not b:
            return False
        if a is None or b is None:
            return None
        return True
    return Typed(fn, T.BOOL, left.nullable or right.nullable)


def _or(comp: _Compiler, node: exp.Or) -> Typed:
    left = comp.expect(node.this, comp.c(node.this), T.BOOL, T.NUM)
    right = comp.expect(node.expression, comp.c(node.expression), T.BOOL, T.NUM)
    lf, rf = left.fn, right.fn

    def fn(row: Row, now: datetime) -> bool | None:
        a = lf(row, now)  # _truth inlined, as in _and
        if a is not None and a:
            return True
        b = rf(row, now)
        if b is not None and b:
            return True
        if a is None or b is None:
            return None
        return False
    return Typed(fn, T.BOOL, left.nullable or right.nullable)


def _not(comp: _Compiler, node: exp.Not) -> Typed:
    inner = comp.expect(node.this, comp.c(node.this), T.BOOL, T.NUM)
    f = inner.fn

    def fn(row: Row, now: datetime) -> bool | None:
        value = _truth(f(row, now))
        return None if value is None else not value
    return Typed(fn, T.BOOL, inner.nullable)


def _comparable(comp: _Compiler, node: exp.Expression, left: Typed, right: Typed,
                lnode: exp.Expression, rnode: exp.Expression) -> tuple[Fn, Fn]:
    """Check two operands can be compared; a string literal against a datetime is parsed."""
    numeric = (T.NUM, T.BOOL)
    if T.NULL in (left.type, right.type):
        return left.fn, right.fn
    if left.type in numeric and right.type in numeric:
        return left.fn, right.fn
    if left.type == right.type and left.type in (T.STR, T.DT):
        return left.fn, right.fn
    if left.type is T.DT and right.type is T.STR and right.const:
        return left.fn, _datetime_literal(comp, rnode, right)
    if right.type is T.DT and left.type is T.STR and left.const:
        return _datetime_literal(comp, lnode, left), right.fn
    raise comp.fail(node, f"cannot compare a {left.type.value} ({lnode.sql('clickhouse')}) "
                          f"with a {right.type.value} ({rnode.sql('clickhouse')})")


def _datetime_literal(comp: _Compiler, node: exp.Expression, typed: Typed) -> Fn:
    text = typed.fn({}, EPOCH)
    value: Any = _parse_datetime(comp, node, text)
    if comp.ms:
        value = epoch_ms(value)
    return lambda row, now: value


_DATETIME_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2}:\d{2}(\.\d{1,3})?)?")


def _parse_datetime(comp: _Compiler, node: exp.Expression, text: str, *,
                    years: tuple[int, int] = (1900, 2299)) -> datetime:
    # Only the forms ClickHouse reads the same way (in UTC): other spellings ('T', 'Z', offsets, more
    # than millisecond digits, compact dates) are parsed differently or not at all there.
    try:
        if not _DATETIME_TEXT.fullmatch(text):
            raise ValueError(text)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise comp.fail(node, f"{text!r} is not a date-time (expected 'YYYY-MM-DD hh:mm:ss[.fff]' or "
                              "'YYYY-MM-DD', UTC)") from None
    if not years[0] <= parsed.year <= years[1]:
        raise comp.fail(node, f"{text!r} is out of range: ClickHouse keeps years {years[0]} to {years[1]} here")
    return parsed.replace(tzinfo=UTC)


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _compare(op: Callable[[Any, Any], bool]) -> Callable[[_Compiler, exp.Binary], Typed]:
    def handler(comp: _Compiler, node: exp.Binary) -> Typed:
        left, right = comp.c(node.this), comp.c(node.expression)
        for side, typed in ((node.this, left), (node.expression, right)):
            if typed.type in (T.ARR, T.MAP):
                raise comp.fail(side, f"{side.sql('clickhouse')!r} is a {typed.type.value} and cannot be compared; "
                                      "use has(), length() or a subscript")
        lf, rf = _comparable(comp, node, left, right, node.this, node.expression)
        # No _num here: a bool compares as the int it is (True == 1, True > 0), so the result is the same.
        return Typed(_compare_fn(op, left, right, lf, rf), T.BOOL, left.nullable or right.nullable)
    return handler


def _compare_fn(op: Callable[[Any, Any], bool], left: Typed, right: Typed, lf: Fn, rf: Fn) -> Fn:
    """``op(a, b)``, NULL if either is NULL; the forms segments mostly use (a column or an expression
    against a constant) evaluated with one Python call."""
    if right.const and not left.const:
        value = rf({}, EPOCH)  # constants read neither the row nor the clock
        if value is not None:
            name = left.column
            if name is not None:
                def column_const(row: Row, now: datetime) -> Any:
                    a = row[name]
                    return None if a is None else op(a, value)
                return column_const

            def expr_const(row: Row, now: datetime) -> Any:
                a = lf(row, now)
                return None if a is None else op(a, value)
            return expr_const
    if left.const and not right.const:
        value = lf({}, EPOCH)
        if value is not None:
            def const_expr(row: Row, now: datetime) -> Any:
                b = rf(row, now)
                return None if b is None else op(value, b)
            return const_expr
    return _null_safe2(op)(lf, rf)


def _arith(op: Callable[[Any, Any], Any], symbol: str) -> Callable[[_Compiler, exp.Binary], Typed]:
    def handler(comp: _Compiler, node: exp.Binary) -> Typed:
        right_node = node.expression
        if isinstance(right_node, exp.Interval) and symbol in "+-":
            return _interval(comp, node, symbol)
        left = comp.expect(node.this, comp.c(node.this), T.NUM, T.BOOL)
        right = comp.expect(right_node, comp.c(right_node), T.NUM, T.BOOL)
        if symbol == "%" and "float" not in (_numeric_kind(node.this), _numeric_kind(right_node)):
            # An integer modulo 0 fails the whole ClickHouse query (ILLEGAL_DIVISION), so it cannot
            # agree with the stream: integers take only a non-zero constant divisor.
            divisor = right.fn({}, EPOCH) if right.const else None
            if divisor is None or divisor == 0:
                raise comp.fail(right_node, f"the divisor of % must be a non-zero number constant here, not "
                                            f"{right_node.sql('clickhouse')} (ClickHouse fails the whole query "
                                            "on an integer modulo 0)")
        fn = _null_safe2(lambda a, b: op(_num(a), _num(b)))(left.fn, right.fn)
        return Typed(fn, T.NUM, left.nullable or right.nullable)
    return handler


def _div(a: Any, b: Any) -> float:
    a, b = float(a), float(b)
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _mod(a: Any, b: Any) -> Any:
    if b == 0:
        if isinstance(a, int) and isinstance(b, int):
            raise ZeroDivisionError("modulo by zero")
        return math.nan
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b)
    remainder = abs(a) % abs(b)  # exact; the sign follows the dividend, as in ClickHouse
    return remainder if a >= 0 else -remainder


def _interval(comp: _Compiler, node: exp.Binary, symbol: str) -> Typed:
    base = comp.expect(node.this, comp.c(node.this), T.DT)
    interval = node.expression
    unit = str(interval.unit.this if interval.unit else "").upper().rstrip("S")
    if unit not in INTERVAL_UNITS:
        raise comp.fail(node, f"INTERVAL unit {unit or '?'} is not supported; use one of "
                              f"{', '.join(INTERVAL_UNITS)}")
    try:
        amount = float(str(interval.this.this))
    except (TypeError, ValueError):
        raise comp.fail(interval, "the INTERVAL amount must be a number") from None
    if not amount.is_integer():
        # ClickHouse truncates INTERVAL 1.5 DAY to 1 day: ask for what it will do
        raise comp.fail(interval, f"the INTERVAL amount must be a whole number, not {amount:g}; "
                                  "use a smaller unit (e.g. INTERVAL 36 HOUR)")
    delta = timedelta(seconds=amount * INTERVAL_UNITS[unit] * (1 if symbol == "+" else -1))
    bf = base.fn
    if comp.ms:
        delta_ms = delta // _ONE_MS

        def fn_ms(row: Row, now: int) -> int | None:
            value = bf(row, now)
            if value is None:
                return None
            value += delta_ms
            if not MIN_MS <= value <= MAX_MS:
                raise OverflowError("date value out of range")  # as datetime + timedelta
            return value  # type: ignore[no-any-return]
        return Typed(fn_ms, T.DT, base.nullable)

    def fn(row: Row, now: datetime) -> datetime | None:
        value = bf(row, now)
        return None if value is None else value + delta
    return Typed(fn, T.DT, base.nullable)


def _neg(comp: _Compiler, node: exp.Neg) -> Typed:
    inner = comp.expect(node.this, comp.c(node.this), T.NUM, T.BOOL)
    f = inner.fn

    def fn(row: Row, now: datetime) -> Any:
        value = f(row, now)
        return None if value is None else -_num(value)
    return Typed(fn, T.NUM, inner.nullable, inner.const)


def _in(comp: _Compiler, node: exp.In) -> Typed:
    if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
        raise comp.fail(node, "IN takes a list of values here, not a subquery")
    left = comp.c(node.this)
    options = []
    for option in node.expressions:
        typed = comp.c(option)
        if not typed.const:
            raise comp.fail(option, "the values of an IN list must be constants")
        _comparable(comp, node, left, typed, node.this, option)
        options.append(typed.fn({}, EPOCH))
    if left.type is T.DT:
        values = frozenset(_parse_datetime(comp, node, v) if isinstance(v, str) else v for v in options)
        if comp.ms:
            values = frozenset(epoch_ms(v) if isinstance(v, datetime) else v for v in values)
    else:
        values = frozenset(_num(v) for v in options if v is not None)
    lf = left.fn
    # ClickHouse's IN looks a Float64 up by its bits: -0.0 IN (0) is false though -0.0 = 0 is true.
    zero_signs = {math.copysign(1.0, v) for v in values if isinstance(v, (int, float)) and v == 0}

    def fn(row: Row, now: datetime) -> bool | None:
        value = lf(row, now)
        if value is None:
            return None
        if isinstance(value, float) and value == 0:
            return math.copysign(1.0, value) in zero_signs
        return _num(value) in values
    return Typed(fn, T.BOOL, left.nullable)


def _between(comp: _Compiler, node: exp.Between) -> Typed:
    value, low, high = comp.c(node.this), comp.c(node.args["low"]), comp.c(node.args["high"])
    vf, lo = _comparable(comp, node, value, low, node.this, node.args["low"])
    _, hi = _comparable(comp, node, value, high, node.this, node.args["high"])
    if low.const and high.const and not value.const:
        low_value, high_value = lo({}, EPOCH), hi({}, EPOCH)
        if low_value is not None and high_value is not None:
            def between_consts(row: Row, now: datetime) -> bool | None:
                v = vf(row, now)  # (v >= low) AND (v <= high) of non-NULL values: both are true/false
                return None if v is None else (v >= low_value and v <= high_value)
            return Typed(between_consts, T.BOOL, value.nullable)
    ge = _null_safe2(lambda a, b: _num(a) >= _num(b))(vf, lo)
    le = _null_safe2(lambda a, b: _num(a) <= _num(b))(vf, hi)

    def fn(row: Row, now: datetime) -> bool | None:
        a, b = ge(row, now), le(row, now)
        if a is False or b is False:
            return False
        if a is None or b is None:
            return None
        return True
    return Typed(fn, T.BOOL, value.nullable or low.nullable or high.nullable)


def _is(comp: _Compiler, node: exp.Is) -> Typed:
    if not isinstance(node.expression, exp.Null):
        raise comp.fail(node, "IS is only supported as IS NULL or IS NOT NULL")
    f = comp.c(node.this).fn
    return Typed(lambda row, now: f(row, now) is None, T.BOOL, False)


def _like(case_insensitive: bool) -> Callable[[_Compiler, exp.Binary], Typed]:
    def handler(comp: _Compiler, node: exp.Binary) -> Typed:
        value = comp.expect(node.this, comp.c(node.this), T.STR)
        pattern = comp.expect(node.expression, comp.c(node.expression), T.STR)
        if not pattern.const:
            raise comp.fail(node.expression, "the LIKE pattern must be a string constant")
        regex = _like_regex(pattern.fn({}, EPOCH), case_insensitive)
        vf = value.fn
        negate = bool(node.args.get("negate"))  # sqlglot parses `x NOT LIKE p` as Like(negate=True)

        def fn(row: Row, now: datetime) -> bool | None:
            text = vf(row, now)
            return None if text is None else (regex.fullmatch(text) is not None) != negate
        return Typed(fn, T.BOOL, value.nullable)
    return handler


def _like_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


def _bracket(comp: _Compiler, node: exp.Bracket) -> Typed:
    target = comp.c(node.this)
    if target.type is not T.MAP:
        raise comp.fail(node, f"{node.this.sql('clickhouse')!r} is a {target.type.value}; "
                              "only maps take a ['key'] subscript")
    if len(node.expressions) != 1:
        raise comp.fail(node, "a map subscript takes one key")
    key = comp.expect(node.expressions[0], comp.c(node.expressions[0]), T.STR)
    tf, kf = target.fn, key.fn

    def fn(row: Row, now: datetime) -> Any:
        name = kf(row, now)
        return None if name is None else tf(row, now).get(name, 0.0)  # m[NULL] is NULL, a missing key 0
    return Typed(fn, T.NUM, key.nullable)


def _date_diff(comp: _Compiler, node: exp.DateDiff) -> Typed:
    unit = str(node.args["unit"].this if node.args.get("unit") else "").lower().strip("'")
    if unit not in DATEDIFF_UNITS:
        raise comp.fail(node, f"dateDiff unit {unit!r} is not supported; use one of {', '.join(DATEDIFF_UNITS)}")
    # sqlglot stores dateDiff('u', a, b) as DateDiff(this=b, expression=a).
    start = comp.expect(node.expression, comp.c(node.expression), T.DT)
    end = comp.expect(node.this, comp.c(node.this), T.DT)
    return Typed(_date_diff_fn(unit, comp.ms, start, end), T.NUM, start.nullable or end.nullable)


def _date_diff_fn(unit: str, ms: bool, start: Typed, end: Typed) -> Fn:
    """dateDiff's closure, NULL if either side is: the fixed-length units computed inline (the same
    expressions as date_diff / date_diff_ms), a bare column read inline."""
    sf, ef = start.fn, end.fn
    size_ms = _UNIT_MS.get(unit)
    if size_ms is None:
        diff = date_diff_ms if ms else date_diff
        return _null_safe2(lambda a, b: diff(unit, a, b))(sf, ef)
    if ms:
        def between(a: int, b: int) -> int:
            return b // size_ms - a // size_ms  # type: ignore[operator]
    else:
        size, floor = size_ms / 1000, math.floor
        day = unit == "day"

        def between(a: datetime, b: datetime) -> int:  # type: ignore[misc]
            if day and a.tzinfo is UTC and b.tzinfo is UTC:
                return b.toordinal() - a.toordinal()  # UTC dates: the days since 1970 differ by as much
            return floor(b.timestamp() / size) - floor(a.timestamp() / size)
    name = start.column
    if name is not None:
        def column_start(row: Row, now: Any) -> int | None:
            a = row[name]
            if a is None:
                return None
            b = ef(row, now)
            return None if b is None else between(a, b)
        return column_start
    return _null_safe2(between)(sf, ef)


def date_diff(unit: str, start: datetime, end: datetime) -> int:
    """ClickHouse's dateDiff in UTC: the number of unit boundaries crossed from start to end."""
    if unit == "second":
        return math.floor(end.timestamp()) - math.floor(start.timestamp())
    if unit == "minute":
        return math.floor(end.timestamp() / 60) - math.floor(start.timestamp() / 60)
    if unit == "hour":
        return math.floor(end.timestamp() / 3600) - math.floor(start.timestamp() / 3600)
    if unit == "day":
        return math.floor(end.timestamp() / 86400) - math.floor(start.timestamp() / 86400)
    if unit == "week":  # weeks start on Monday; 1970-01-01 was a Thursday
        return math.floor((end.timestamp() / 86400 + 3) / 7) - math.floor((start.timestamp() / 86400 + 3) / 7)
    if unit == "month":
        return (end.year * 12 + end.month) - (start.year * 12 + start.month)
    return end.year - start.year


_UNIT_MS = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
_WEEK_MS, _WEEK_SHIFT_MS = 7 * 86_400_000, 3 * 86_400_000  # weeks start on Monday; 1970-01-01 was a Thursday


def date_diff_ms(unit: str, start: int, end: int) -> int:
    """``date_diff`` on epoch milliseconds (the same answer for the same instants: floor division of
    exact integers where date_diff floors float seconds, which are exact enough for millisecond values)."""
    size = _UNIT_MS.get(unit)
    if size is not None:
        return end // size - start // size
    if unit == "week":
        return (end + _WEEK_SHIFT_MS) // _WEEK_MS - (start + _WEEK_SHIFT_MS) // _WEEK_MS
    return date_diff(unit, _ms_datetime(start), _ms_datetime(end))


def _ms_datetime(ms: int) -> datetime:
    if not MIN_MS <= ms <= MAX_MS:
        raise OverflowError("date value out of range")
    return EPOCH + ms * _ONE_MS


def _array_contains(comp: _Compiler, node: exp.ArrayContains) -> Typed:
    array = comp.expect(node.this, comp.c(node.this), T.ARR)
    item = comp.expect(node.expression, comp.c(node.expression), T.STR)
    af, itf = array.fn, _needle(item)

    def fn(row: Row, now: datetime) -> bool:
        value = itf(row, now)
        return value is not None and value in af(row, now)
    return Typed(fn, T.BOOL, False)


def _needle(item: Typed) -> Fn:
    """The value has()/mapContains() look for. ClickHouse compares a NULL that comes from a column
    (``has(anonymous_ids, top_category)`` with top_category NULL) as the nested default, the empty
    string, while a literal NULL matches nothing."""
    f = item.fn
    if item.const or not item.nullable:
        return f

    def fn(row: Row, now: datetime) -> Any:
        value = f(row, now)
        return "" if value is None else value
    return fn


def _array_literal(comp: _Compiler, node: exp.Array) -> Typed:
    values = []
    for element in node.expressions:
        typed = comp.expect(element, comp.c(element), T.STR)
        if not typed.const:
            raise comp.fail(element, "array literals may hold only string constants")
        values.append(typed.fn({}, EPOCH))
    frozen = tuple(values)
    return Typed(lambda row, now: frozen, T.ARR, False, True)


def _length(comp: _Compiler, node: exp.Length) -> Typed:
    inner = comp.expect(node.this, comp.c(node.this), T.ARR, T.STR, T.MAP)
    f = inner.fn
    if inner.type is T.STR:
        def fn(row: Row, now: datetime) -> Any:
            value = f(row, now)
            return None if value is None else len(value.encode("utf-8"))  # bytes, like ClickHouse
        return Typed(fn, T.NUM, inner.nullable)
    return Typed(lambda row, now: len(f(row, now)), T.NUM, False)


def _if(comp: _Compiler, node: exp.If) -> Typed:
    # ClickHouse wants a UInt8/Bool condition: if(orders_count, …) is refused ("Must be UInt8").
    cond = comp.c(node.this)
    if cond.type not in (T.BOOL, T.NULL):
        raise comp.fail(node.this, f"the condition of if() must be true/false, not a {cond.type.value} "
                                   f"({node.this.sql('clickhouse')}); compare it, e.g. "
                                   f"{node.this.sql('clickhouse')} > 0")
    yes = comp.c(node.args["true"])
    false_node = node.args.get("false")
    if false_node is None:
        raise comp.fail(node, "if() takes 3 arguments: condition, value if true, value if false")
    no = comp.c(false_node)
    kind = _common_type(comp, node, yes, no)
    cf, yf, nf = cond.fn, yes.fn, no.fn

    def fn(row: Row, now: datetime) -> Any:
        return yf(row, now) if _truth(cf(row, now)) else nf(row, now)
    return Typed(fn, kind, yes.nullable or no.nullable)


def _common_type(comp: _Compiler, node: exp.Expression, *typed: Typed) -> T:
    kinds = {t.type for t in typed} - {T.NULL}
    if kinds <= {T.NUM, T.BOOL} and kinds:
        return T.NUM if T.NUM in kinds else T.BOOL
    if len(kinds) == 1:
        return kinds.pop()
    if not kinds:
        return T.NULL
    raise comp.fail(node, f"the branches mix types: {', '.join(sorted(k.value for k in kinds))}")


def _coalesce(comp: _Compiler, node: exp.Coalesce) -> Typed:
    parts = [comp.c(node.this)] + [comp.c(e) for e in node.expressions]
    kind = _common_type(comp, node, *parts)
    fns = [p.fn for p in parts]

    def fn(row: Row, now: datetime) -> Any:
        for f in fns:
            value = f(row, now)
            if value is not None:
                return value
        return None
    return Typed(fn, kind, all(p.nullable for p in parts))


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _case_fn(convert: Callable[[str], str]) -> Callable[[_Compiler, exp.Func], Typed]:
    def handler(comp: _Compiler, node: exp.Func) -> Typed:
        inner = comp.expect(node.this, comp.c(node.this), T.STR)
        f = inner.fn

        def fn(row: Row, now: datetime) -> Any:
            value = f(row, now)
            return None if value is None else convert(value)
        return Typed(fn, T.STR, inner.nullable, inner.const)
    return handler


def _abs(comp: _Compiler, node: exp.Abs) -> Typed:
    inner = comp.expect(node.this, comp.c(node.this), T.NUM, T.BOOL)
    f = inner.fn

    def fn(row: Row, now: datetime) -> Any:
        value = f(row, now)
        return None if value is None else abs(_num(value))
    return Typed(fn, T.NUM, inner.nullable)


def _numeric_kind(node: exp.Expression) -> str:
    """ClickHouse's numeric type family of an expression: 'float' (Float64), 'uint64' / 'int64' (64-bit
    unsigned / signed integers), 'int?' (a 64-bit integer of uncertain sign), 'small' (Bool, UInt8
    results, small non-negative integer literals), 'small-' (small negative literals), 'null' or 'other'."""
    if isinstance(node, exp.Paren):
        return _numeric_kind(node.this)
    if isinstance(node, exp.Column):
        ch_type = PROFILE_COLUMNS[node.name][2] if node.name in PROFILE_COLUMNS else ""
        return "float" if "Float" in ch_type else "uint64" if "UInt" in ch_type else "int64" if "Int" in ch_type \
            else "small" if "Bool" in ch_type else "other"
    if isinstance(node, exp.Literal):
        if node.is_string:
            return "other"
        if any(ch in node.this for ch in ".eE"):
            return "float"
        return "small" if int(node.this) < 2**31 else "uint64"
    if isinstance(node, exp.Neg):
        inner = _numeric_kind(node.this)
        return {"small": "small-", "small-": "small", "uint64": "int64"}.get(inner, inner)
    if isinstance(node, exp.Abs):
        inner = _numeric_kind(node.this)
        return {"small-": "small", "int64": "uint64"}.get(inner, inner)
    if isinstance(node, exp.Null):
        return "null"
    if isinstance(node, (exp.Div, exp.Bracket)):
        return "float"
    if isinstance(node, exp.DateDiff):
        return "int64"
    if isinstance(node, exp.Length):
        return "uint64"
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Mod)):
        kinds = {_numeric_kind(node.this), _numeric_kind(node.expression)}
        if "float" in kinds:
            return "float"
        if isinstance(node, exp.Sub):
            return "int64"
        return kinds.pop() if len(kinds) == 1 and isinstance(node, (exp.Add, exp.Mul)) and \
            kinds <= {"uint64", "int64"} else "int?"
    if isinstance(node, (exp.If, exp.Coalesce, exp.Greatest, exp.Least)):
        parts = [node.args.get("true"), node.args.get("false")] if isinstance(node, exp.If) \
            else [node.this, *node.expressions]
        kinds = {_numeric_kind(p) for p in parts if p is not None} - {"null"}
        if not kinds:
            return "null"
        for kind in ("other", "float", "int?"):
            if kind in kinds:
                return kind
        wide = kinds & {"uint64", "int64"}
        return (wide.pop() if len(wide) == 1 else "int?") if wide else "small" if kinds == {"small"} else "small-"
    if isinstance(node, (exp.Predicate, exp.Connector, exp.Not, exp.Boolean, exp.ArrayContains)):
        return "small"
    return "other"


def _extreme(pick: Callable[[Iterable[Any]], Any]) -> Callable[[_Compiler, exp.Func], Typed]:
    def handler(comp: _Compiler, node: exp.Func) -> Typed:
        parts = [comp.c(node.this)] + [comp.c(e) for e in node.expressions]
        kind = _common_type(comp, node, *parts)
        if kind not in (T.NUM, T.BOOL, T.DT, T.STR):
            raise comp.fail(node, "greatest() and least() compare numbers, strings or date-times")
        if kind is T.NUM:
            # ClickHouse refuses greatest/least over a 64-bit integer and a Float64 (no common type).
            nodes = [node.this, *node.expressions]
            kinds = [_numeric_kind(n) for n in nodes]
            wide = [n for n, k in zip(nodes, kinds, strict=True) if k in ("uint64", "int64", "int?")]
            if "float" in kinds and wide:
                integer = wide[0].sql("clickhouse")
                raise comp.fail(node, f"{node.sql_name().lower()}() cannot mix an integer ({integer}) with a "
                                      f"floating-point number (ClickHouse has no common type for them); "
                                      f"write {integer} * 1.0 to compare as numbers with a fraction")
            # With a NULL-able argument ClickHouse needs one common type: none for UInt64 and signed.
            signed = {"int64", "small-"} & set(kinds)
            if any(p.nullable and p.type is not T.NULL for p in parts) and (
                    ("uint64" in kinds and signed) or ("int?" in kinds and len(wide) + len(signed) > 1)):
                raise comp.fail(node, f"{node.sql_name().lower()}() mixes unsigned and signed integers with a "
                                      "value that may be NULL (ClickHouse has no common type for them); "
                                      "make the unsigned one signed (e.g. orders_count - 0) or coalesce() "
                                      "the NULL-able one")
        fns = [p.fn for p in parts]

        def fn(row: Row, now: datetime) -> Any:
            # ClickHouse skips NULL arguments here (greatest(1, NULL) = 1).
            values = [_num(v) for v in (f(row, now) for f in fns) if v is not None]
            return pick(values) if values else None
        return Typed(fn, kind, all(p.nullable for p in parts))
    return handler


def _fn_now(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
    comp.arity(node, "now", args, 0)
    comp.uses_now = True
    # ClickHouse's now() is a DateTime: whole seconds (the milliseconds of the clock are dropped).
    if comp.ms:
        return Typed(lambda row, now: now - now % 1000, T.DT, False)
    return Typed(_now_seconds, T.DT, False)


_now_cache: tuple[datetime | None, datetime | None] = (None, None)


def _now_seconds(row: Row, now: datetime) -> datetime:
    """``now`` without its fraction of a second, kept for the last ``now`` seen: every now() of every
    segment evaluated at one instant gets the same object (one tuple, replaced whole: thread-safe)."""
    global _now_cache
    cached = _now_cache
    if cached[0] is now:
        return cached[1]  # type: ignore[return-value]
    value = now.replace(microsecond=0)
    _now_cache = (now, value)
    return value


def _fn_null_check(negate: bool) -> Callable[[_Compiler, exp.Anonymous, list[exp.Expression]], Typed]:
    def handler(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
        comp.arity(node, "isNotNull" if negate else "isNull", args, 1)
        f = comp.c(args[0]).fn
        if negate:
            return Typed(lambda row, now: f(row, now) is not None, T.BOOL, False)
        return Typed(lambda row, now: f(row, now) is None, T.BOOL, False)
    return handler


def _fn_empty(negate: bool) -> Callable[[_Compiler, exp.Anonymous, list[exp.Expression]], Typed]:
    def handler(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
        comp.arity(node, "notEmpty" if negate else "empty", args, 1)
        inner = comp.expect(args[0], comp.c(args[0]), T.ARR, T.STR, T.MAP)
        f = inner.fn

        def fn(row: Row, now: datetime) -> Any:
            value = f(row, now)
            if value is None:
                return None
            return (len(value) > 0) if negate else (len(value) == 0)
        return Typed(fn, T.BOOL, inner.nullable)
    return handler


def _fn_has_many(every: bool) -> Callable[[_Compiler, exp.Anonymous, list[exp.Expression]], Typed]:
    def handler(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
        comp.arity(node, "hasAll" if every else "hasAny", args, 2)
        array = comp.expect(args[0], comp.c(args[0]), T.ARR)
        wanted = comp.expect(args[1], comp.c(args[1]), T.ARR)
        af, wf = array.fn, wanted.fn

        def fn(row: Row, now: datetime) -> bool:
            have = set(af(row, now))
            items = wf(row, now)
            return all(i in have for i in items) if every else any(i in have for i in items)
        return Typed(fn, T.BOOL, False)
    return handler


def _fn_map_contains(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
    comp.arity(node, "mapContains", args, 2)
    mapping = comp.expect(args[0], comp.c(args[0]), T.MAP)
    key = comp.expect(args[1], comp.c(args[1]), T.STR)
    mf, kf = mapping.fn, _needle(key)

    def fn(row: Row, now: datetime) -> bool:
        value = kf(row, now)
        return value is not None and value in mf(row, now)
    return Typed(fn, T.BOOL, False)


def _fn_to_datetime(comp: _Compiler, node: exp.Anonymous, args: list[exp.Expression]) -> Typed:
    comp.arity(node, "toDateTime", args, 1)
    text = comp.expect(args[0], comp.c(args[0]), T.STR)
    if not text.const:
        raise comp.fail(args[0], "toDateTime() takes a string constant here")
    # toDateTime() is a DateTime: whole seconds from 1970 to 2105 (ClickHouse clamps outside the range)
    value: Any = _parse_datetime(comp, args[0], text.fn({}, EPOCH), years=(1970, 2105)).replace(microsecond=0)
    if comp.ms:
        value = epoch_ms(value)
    return Typed(lambda row, now: value, T.DT, False, True)


_HANDLERS: dict[type, Callable[[_Compiler, Any], Typed]] = {
    exp.Column: _column,
    exp.Literal: _literal,
    exp.Boolean: _boolean,
    exp.Null: _null,
    exp.Paren: _paren,
    exp.And: _and,
    exp.Or: _or,
    exp.Not: _not,
    exp.EQ: _compare(operator.eq),
    exp.NEQ: _compare(operator.ne),
    exp.LT: _compare(operator.lt),
    exp.LTE: _compare(operator.le),
    exp.GT: _compare(operator.gt),
    exp.GTE: _compare(operator.ge),
    exp.Add: _arith(lambda a, b: a + b, "+"),
    exp.Sub: _arith(lambda a, b: a - b, "-"),
    exp.Mul: _arith(lambda a, b: a * b, "*"),
    exp.Div: _arith(_div, "/"),
    exp.Mod: _arith(_mod, "%"),
    exp.Neg: _neg,
    exp.In: _in,
    exp.Between: _between,
    exp.Is: _is,
    exp.Like: _like(False),
    exp.ILike: _like(True),
    exp.Bracket: _bracket,
    exp.DateDiff: _date_diff,
    exp.ArrayContains: _array_contains,
    exp.Array: _array_literal,
    exp.Length: _length,
    exp.If: _if,
    exp.Coalesce: _coalesce,
    exp.Lower: _case_fn(lambda text: text.translate(_ASCII_LOWER)),  # ClickHouse's lower() is ASCII-only
    exp.Upper: _case_fn(lambda text: text.translate(_ASCII_UPPER)),
    exp.Abs: _abs,
    exp.Greatest: _extreme(max),
    exp.Least: _extreme(min),
}

_ANONYMOUS: dict[str, Callable[[_Compiler, exp.Anonymous, list[exp.Expression]], Typed]] = {
    "now": _fn_now,
    "isNull": _fn_null_check(False),
    "isNotNull": _fn_null_check(True),
    "empty": _fn_empty(False),
    "notEmpty": _fn_empty(True),
    "hasAny": _fn_has_many(False),
    "hasAll": _fn_has_many(True),
    "mapContains": _fn_map_contains,
    "toDateTime": _fn_to_datetime,
}


def _split_and(node: exp.Expression) -> list[exp.Expression]:
    if isinstance(node, exp.And):
        return _split_and(node.this) + _split_and(node.expression)
    return [node]


def compile_where(text: str, *, segment_id: str | None = None, source: str | None = None,
                  locate: Locate | None = None) -> Compiled:
    """Parse, check and compile one ``where`` expression; raise DefinitionError with a position."""
    locate = locate or _default_locate(text)
    if not text or not text.strip():
        raise DefinitionError("the 'where' expression is empty", segment_id=segment_id, source=source)
    try:
        tree = sqlglot.parse_one(text, read="clickhouse")
    except (ParseError, TokenError) as exc:
        errors = getattr(exc, "errors", None) or [{}]
        first = errors[0]
        offset = _offset_of(text, first.get("line"), first.get("col"))
        line, column = locate(offset)
        description = first.get("description") or str(exc).splitlines()[0]
        raise DefinitionError(f"syntax error: {description}", segment_id=segment_id, line=line,
                              column=column, source=source) from None
    if isinstance(tree, (exp.Select, exp.Query)) or tree.find(exp.Select, exp.Subquery) is not None:
        found = re.search(r"(?i)\b(select|union|with|from)\b", text)
        line, column = locate(found.start() if found else 0)
        raise DefinitionError("a segment's 'where' must be an expression, not a query",
                              segment_id=segment_id, source=source, line=line, column=column)
    if any(getattr(node, "comments", None) for node in tree.walk()) or re.search(r"--|/\*", _outside_quotes(text)):
        found = re.search(r"--|/\*", _outside_quotes(text))
        line, column = locate(found.start() if found else 0)
        raise DefinitionError("comments are not allowed in a 'where' expression (use YAML comments)",
                              segment_id=segment_id, source=source, line=line, column=column)
    comp = _Compiler(text, locate, segment_id, source)
    top = comp.c(tree)
    if top.type not in (T.BOOL, T.NUM, T.NULL):
        raise comp.fail(tree, f"the expression is a {top.type.value}; a segment needs a condition (true/false)")
    terms = tuple(Term(part.sql("clickhouse"), comp.c(part).fn) for part in _split_and(tree))
    top_fn = top.fn

    def predicate(row: Row, now: datetime) -> bool:
        try:
            value = top_fn(row, now)
        except (ZeroDivisionError, OverflowError, ValueError):
            return False  # ClickHouse would raise; the stream treats it as "not a member"
        return value is not None and bool(value)  # like ClickHouse's WHERE: non-zero, NaN included

    return Compiled(text=text, sql=tree.sql("clickhouse"), fn=predicate, columns=frozenset(comp.columns),
                    uses_now=comp.uses_now, terms=terms)


def _outside_quotes(text: str) -> str:
    """``text`` with the inside of '...' string literals blanked (same length), so markers found in
    it are outside strings."""
    return re.sub(r"'(?:[^'\\]|\\.|'')*'", lambda m: "'" + " " * (len(m.group()) - 2) + "'", text)


def _offset_of(text: str, line: int | None, col: int | None) -> int:
    if not line:
        return 0
    lines = text.split("\n")
    offset = sum(len(part) + 1 for part in lines[: line - 1])
    return max(0, min(len(text), offset + max((col or 1) - 1, 0)))
