"""When could a profile's memberships next change with no new event? (DESIGN §4.3, time-driven transitions.)

``next_check_at(state, segments, now_ms, half_life_days=...)`` returns the earliest instant
(epoch ms, ``> now_ms``) at which the membership of any of ``segments`` for this profile may
change while no event arrives, or ``None`` when it never can. The worker keeps that instant in
a timer index, so a tick costs what is due, not what is stored.

Contract: membership of every segment is constant on ``[now_ms, returned instant)`` (*sound*:
never late). For the forms below the instant is also *exact*: membership really differs there.
An inexact instant (nothing changes; the worker re-evaluates and asks again) comes only from
the cases listed under "inexact" below.

How it works. Between events, only these inputs move (everything else in §4.2 is constant):

* piecewise constant, with known breakpoints: ``orders_Nd`` and ``spend_Nd`` change exactly when
  an order leaves its window (``order_at + N days``: the window (now - N days, now] is half-open,
  so at that very millisecond the order is out) or enters it (an order dated after now);
  ``top_category`` changes only when the rounded affinities of two categories tie or cross,
  found by a bounded search (below);
* continuous and monotone: ``now()`` (increasing) and ``category_affinity[k]`` (non-increasing:
  it only decays without events; constant until its ``as_of`` when that is in the future).

The ``where`` tree is split on AND/OR/NOT into comparisons. Between two consecutive breakpoints
of the piecewise inputs the predicate reads, each comparison that reads a continuous input is
*monotone* when a sign analysis proves it (``now()``, ``dateDiff(unit, x, now())`` and
``dateDiff(unit, now(), x)``, ``x ± INTERVAL``, ``+ -``, unary minus, ``*`` and ``/`` by a numeric
literal, ``greatest``/``least``/``coalesce`` of same-direction arguments, ``if`` whose condition
reads no continuous input, a map subscript ``category_affinity[k]`` with a key that reads no
continuous input, compared with ``< <= > >=``). ``= != IN BETWEEN`` are split into two monotone
comparisons per bound. A monotone comparison flips at most once per piece, and a binary search
on integer milliseconds finds the flip exactly (the very functions the compiler evaluates, on
the profile's columns at that instant: rounding included). The predicate itself (with its
three-valued NULL logic) is then evaluated at every flip and breakpoint in time order; the first
instant where membership differs is the answer. Both are the compiler's epoch-ms form
(``_Compiler(ms=True)``: date-time columns, literals and ``now()`` as int ms, so an instant costs no
datetime; the same answers as the datetime form on millisecond date-times, property-tested in
tests/unit/test_compiler_fast.py).

``top_category`` is not walked change by change: two nearly tied categories (weights 3.0 and
2.99999999973, from views 1 ms apart) swap places whenever a rounding boundary falls between them,
at most 1e-6 steps, hundreds of thousands of times, none of which changes ``top_category =
'garden'``. A comparison that reads it is searched once per category it can take (with it held);
between the window breakpoints and all those flips, membership is then a function of
``top_category`` alone, so the only changes that matter are those to a category that gives the
other membership (evaluated once per category). The first is found by jumping: a wanted category
must first rank above the current top, at the first instant some does the top is checked, and the
jump repeats from there (``_Context.next_top_in``). A category whose weight never exceeds the
top's and that loses ties (an exact tie, for one) is never searched.

Top-level AND terms that read no time-dependent input are evaluated first: when one is false or
NULL the segment can never hold, whatever time does (most profiles stop there).

Cost (the worker asks once per changed profile per batch). One call shares its per-instant work
across segments (windows, the affinity map and top_category at an instant, the next top_category
change from an instant), searches the segments cheapest first (windows only, then ``now()``, then
affinities, then top_category), and searches each only up to the earliest answer found so far:
anything later cannot be the result, so a bounded search that finds nothing there answers "not
before" instead. Searches on a decaying affinity start from the closed-form instant (the inverse
of ``1 - 2^(-raw * 2^(-(t - as_of)/half_life) / SCALE)`` at the rounding boundary; for
top_category, at the level the other category is at, and where the unrounded gap falls to
``TOP_GAP``), gallop from it and bisect: the guess only saves evaluations, the real rounded
function decides, so the instants are exactly those a plain bisection finds (property-tested).

``dateDiff(unit, x, now()) OP n`` (fixed-length units) has a closed form too: the unit boundary at
which the difference reaches the deciding value. Every guess is checked first: when the probe has
flipped there, the flip is searched for below it only.

Across calls (``DeadlineCache``, used by ``processor.schedule``): a segment's answer depends only on
the held columns it reads, the orders (if it reads a window) and the affinities it reads (some keys,
or all), besides the instant. An answer found at t0 is kept per profile and reused at t1 in [t0,
answer) while those inputs are equal (checked by value on every call); an answer bounded by the
search limit only says "not before" and is searched again when it could be the result. Same answer
as from scratch (property-tested), fewer searches when an event leaves most inputs alone.

Swept (``now_ms + sweep_ms``, re-asked at every sweep), for the whole segment, when a continuous
input (``now()`` or ``category_affinity``) appears inside a construct the sign analysis cannot
prove monotone: ``%``, ``abs``, ``*`` or ``/`` by anything but a numeric literal (or a literal
divided by a time-dependent value), ``if`` whose condition reads a continuous input, arguments
of mixed directions (``dateDiff('day', now(), x) + category_affinity['k']``, ``now() > now() -
INTERVAL 1 DAY``), a number used directly as a condition (``WHERE category_affinity['k']``),
``category_affinity`` subscripted by a key that itself decays, or any other function of them.
Piecewise inputs are never swept: any expression of ``orders_Nd``/``spend_Nd``/``top_category``
(``spend_30d / orders_30d > 20``, ``spend_90d % 7 = 0``) is checked at its breakpoints, exactly.

Inexact (sound, and returns an instant at which nothing may change): a predicate reading
``now()`` whose comparisons have not flipped within ``HORIZON_MS`` (10 years) returns that
horizon unless each is already at its final value; a search stopped by its caps (more than
``MAX_PIECES`` order breakpoints, or ``top_category`` with categories tied to 1e-6 for more than
``TOP_CAP`` rounding steps or jumps) returns the instant it reached.

Columns that change only with evaluation itself (``segments``, ``version``, ``updated_at``) are
taken as constant between events.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import sqlglot
from sqlglot import exp

from pipeline.profile import AFFINITY_SCALE, DAY_MS, WINDOWS_DAYS, ProfileState, columns
from pipeline.segments.columns import PROFILE_COLUMNS, T
from pipeline.segments.compiler import Compiled, Fn, _Compiler, _default_locate, epoch_ms
from pipeline.segments.definitions import Segment

HORIZON_MS = 10 * 365 * DAY_MS  # how far a now()-comparison is searched before giving a re-check instant
MAX_PIECES = 512  # order breakpoints walked per segment before returning the instant reached
TOP_CAP = 32  # rounding steps searched per pair of categories for a top_category tie
SETTLED_RAW = 1e-7  # a decayed raw weight below this rounds to an affinity of 0.0
TOP_GAP = 1e-6 + 1e-12  # two affinities further apart cannot round to a tie (6 decimals: one bucket is 1e-6
# wide; the margin covers float error). Not looser: while the gap is between 1e-6 and this, each rounding
# step is searched in turn (a gap shrinking from 1.5e-6 to 1e-6 crossed tens of thousands, past TOP_CAP)
NEVER_ABOVE_LOG2 = 1e-12  # a weight this far below another (log2) in exact terms stays below it in floats

AFFINITY = "category_affinity"
TOP = "top_category"
WINDOW_COLUMNS = {f"{kind}_{days}d": days for days in WINDOWS_DAYS for kind in ("orders", "spend")}
TIME_COLUMNS = frozenset(WINDOW_COLUMNS) | {AFFINITY, TOP}

_STATIC_KEY_FUNCTIONS = ("mapContains", "empty", "notEmpty")  # read a map's keys, which never go away


class _Unsupported(Exception):
    """A continuous input inside a construct not proven monotone: the segment is swept."""


def compile_expression(node: exp.Expression) -> Fn:
    """The compiler's own closure for one sub-expression of an accepted ``where`` (or a comparison
    built from its sub-expressions): NULL stays None, errors propagate. Uses the compiler's internals
    on purpose, so the deadlines evaluate exactly what membership evaluates. Epoch-ms form: called as
    ``fn(row, t)`` with ``t`` in epoch ms and the row's date-time columns in epoch ms (``_ms_row``), so
    an evaluation at an instant builds no datetime (same answers as the datetime form)."""
    text = node.sql("clickhouse")
    return _Compiler(text, _default_locate(text), None, None, ms=True).c(node).fn


def _member_fn(tree: Any) -> Callable[[dict[str, Any], int], bool]:
    """The whole predicate in epoch-ms form, with compile_where's rules for its value (an error or NULL is
    "not a member")."""
    fn = compile_expression(tree)

    def member(row: dict[str, Any], t: int) -> bool:
        try:
            value = fn(row, t)
        except (ZeroDivisionError, OverflowError, ValueError):
            return False
        return value is not None and bool(value)
    return member


DT_COLUMNS = tuple(name for name, (kind, _, _) in PROFILE_COLUMNS.items() if kind is T.DT)


def _ms_row(row: Mapping[str, Any], dt_columns: Sequence[str] = DT_COLUMNS) -> dict[str, Any]:
    """A copy of the columns with the date-times as epoch ms, as the epoch-ms closures read them (only
    ``dt_columns``: those the segments read)."""
    out = dict(row)
    for name in dt_columns:
        value = out.get(name)
        if isinstance(value, datetime):
            # epoch_ms's fast path inlined: a whole millisecond (every profile date-time) rounds exactly
            out[name] = round(value.timestamp() * 1000) if value.microsecond % 1000 == 0 else epoch_ms(value)
    return out


def _truth(value: Any) -> bool:
    return value is not None and bool(value) and not (isinstance(value, float) and math.isnan(value))


# --- the plan: what a predicate reads, and its monotone comparisons (cached per text) ---------------


@dataclass(frozen=True)
class _Probe:
    """A comparison that, between two breakpoints, flips at most once."""

    fn: Fn
    direction: int  # +1: can only become true as time passes; -1: can only become false
    aff_keys: frozenset[str] | None  # the affinity keys it reads; None: the whole map
    reads_aff: bool

    reads_now: bool
    threshold: tuple[str, float] | None = None  # ``category_affinity['k'] OP c``: the key, and the unrounded
    # affinity at which the rounded one crosses c (where the flip is: a guess, always verified)
    reads_top: bool = False  # then it is monotone only between top_category changes
    guess: Callable[[dict[str, Any]], int | None] | None = None  # ``dateDiff(unit, x, now()) OP n``: about
    # when it flips, from the row (a starting point for the search, always verified)

    def value(self, row: dict[str, Any], ctx: _Context, t: int) -> bool | None:
        """Its truth at ``t``; None for NULL (which only the held inputs decide)."""
        if self.reads_aff:
            row[AFFINITY] = ctx.affinity_at(t, self.aff_keys)
        try:
            value = self.fn(row, t)
        except (ZeroDivisionError, OverflowError, ValueError):
            return False
        if value is True or value is False or value is None:  # a comparison's usual answers
            return value  # type: ignore[no-any-return]
        return _truth(value)

    def holds(self, row: dict[str, Any], ctx: _Context, t: int) -> bool:
        return bool(self.value(row, ctx, t))


@dataclass(frozen=True)
class _Plan:
    static: bool  # no input moves with time
    sweep: str | None  # why the segment is swept, if it is
    windows: tuple[int, ...]  # windows whose orders_/spend_ columns it reads
    reads_aff: bool
    reads_top: bool
    reads_now: bool
    static_terms: tuple[Fn, ...]  # top-level AND terms that never change with time
    probes: tuple[_Probe, ...]
    member: Callable[[dict[str, Any], int], bool] | None = None  # the predicate, epoch-ms form
    aff_keys: frozenset[str] | None = None  # the affinity keys it reads, when only literal keys (_affinity_keys)


def _is_now(node: Any) -> bool:  # sqlglot's Expr/Expression annotations vary by version
    return isinstance(node, exp.Anonymous) and str(node.this) == "now"


def _is_affinity(node: Any) -> bool:
    return isinstance(node, exp.Column) and node.name == AFFINITY


def _reads_time(node: exp.Expression) -> bool:
    return any(_is_now(n) or (isinstance(n, exp.Column) and n.name in TIME_COLUMNS) for n in node.walk())


def _continuous(node: exp.Expression) -> bool:
    return any(_is_now(n) or _is_affinity(n) for n in node.walk())


def _combine(*dirs: int | None) -> int | None:
    if any(d is None for d in dirs):
        return None
    signs = {d for d in dirs if d}
    if not signs:
        return 0
    return signs.pop() if len(signs) == 1 else None


def _neg(d: int | None) -> int | None:
    return None if d is None else -d


def _literal_sign(node: exp.Expression) -> int | None:
    """The sign of a numeric literal (``3``, ``-0.5``, ``(2)``), else None."""
    while isinstance(node, exp.Paren):
        node = node.this
    sign = 1
    if isinstance(node, exp.Neg):
        sign, node = -1, node.this
    if isinstance(node, exp.Literal) and not node.is_string:
        value = float(node.this)
        return 0 if value == 0 else sign * (1 if value > 0 else -1)
    return None


def _dir(node: exp.Expression) -> int | None:
    """How the value moves as time passes with the piecewise inputs held: +1 non-decreasing,
    -1 non-increasing, 0 constant, None unknown (for a comparison: its truth)."""
    if not _continuous(node):
        return 0
    if isinstance(node, exp.Paren):
        return _dir(node.this)
    if _is_now(node):
        return 1
    if isinstance(node, exp.Bracket):
        if _is_affinity(node.this) and len(node.expressions) == 1 and not _continuous(node.expressions[0]):
            return -1
        return None
    name = str(node.this) if isinstance(node, exp.Anonymous) else None
    if isinstance(node, exp.Length) or name in _STATIC_KEY_FUNCTIONS:
        args = [node.this] if isinstance(node, exp.Length) else list(node.expressions)
        if args and _is_affinity(args[0]) and not any(_continuous(a) for a in args[1:]):
            return 0  # keys only
        return None
    if isinstance(node, exp.Is) or name in ("isNull", "isNotNull"):
        inner = node.this if isinstance(node, exp.Is) else (node.expressions[0] if node.expressions else node)
        # continuous inputs are never NULL, so NULL-ness only follows the held inputs
        return 0 if _dir(inner) is not None else None
    if isinstance(node, exp.DateDiff):
        return _combine(_dir(node.this), _neg(_dir(node.expression)))
    if isinstance(node, (exp.Add, exp.Sub)):
        if isinstance(node.expression, exp.Interval):
            return _dir(node.this)
        right = _dir(node.expression)
        return _combine(_dir(node.this), right if isinstance(node, exp.Add) else _neg(right))
    if isinstance(node, exp.Neg):
        return _neg(_dir(node.this))
    if isinstance(node, exp.Mul):
        for value, factor in ((node.this, node.expression), (node.expression, node.this)):
            sign = _literal_sign(factor)
            if sign is not None:
                inner = _dir(value)
                return None if inner is None else inner * sign
        return None
    if isinstance(node, exp.Div):
        sign = _literal_sign(node.expression)
        if sign:
            inner = _dir(node.this)
            return None if inner is None else inner * sign
        return None
    if isinstance(node, (exp.Greatest, exp.Least, exp.Coalesce)):
        return _combine(*(_dir(a) for a in [node.this, *node.expressions]))
    if isinstance(node, exp.If):
        if _continuous(node.this) or node.args.get("false") is None:
            return None
        return _combine(_dir(node.args["true"]), _dir(node.args["false"]))
    if isinstance(node, (exp.GT, exp.GTE)):
        return _combine(_dir(node.this), _neg(_dir(node.expression)))
    if isinstance(node, (exp.LT, exp.LTE)):
        return _neg(_combine(_dir(node.this), _neg(_dir(node.expression))))
    return None


def _probe(node: exp.Expression, direction: int | None) -> _Probe | None:
    if direction == 0:
        return None
    if direction is None:
        raise _Unsupported(node.sql("clickhouse"))
    keys: set[str] | None = set()
    for n in node.walk():
        if _is_affinity(n):
            parent = n.parent
            key = parent.expressions[0] if isinstance(parent, exp.Bracket) and parent.this is n else None
            if isinstance(key, exp.Literal) and key.is_string and keys is not None:
                keys.add(str(key.this))
            else:
                keys = None
    reads_aff = any(_is_affinity(n) for n in node.walk())
    reads_now = any(_is_now(n) for n in node.walk())
    reads_top = any(isinstance(n, exp.Column) and n.name == TOP for n in node.walk())
    return _Probe(compile_expression(node), direction, None if keys is None else frozenset(keys), reads_aff,
                  reads_now, _threshold(node), reads_top, None if reads_aff else _now_guess(node))


def _unparen(node: Any) -> Any:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _literal_value(node: Any) -> float | None:
    node = _unparen(node)
    sign = 1.0
    if isinstance(node, exp.Neg):
        sign, node = -1.0, _unparen(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        return sign * float(node.this)
    return None


def _affinity_key(node: Any) -> str | None:
    node = _unparen(node)
    if isinstance(node, exp.Bracket) and _is_affinity(node.this) and len(node.expressions) == 1:
        key = node.expressions[0]
        if isinstance(key, exp.Literal) and key.is_string:
            return str(key.this)
    return None


_MIRROR: dict[type, type] = {exp.GT: exp.LT, exp.GTE: exp.LTE, exp.LT: exp.GT, exp.LTE: exp.GTE}
HALF_STEP = 5e-7  # half of the 6-decimal rounding step


def _threshold(node: exp.Expression) -> tuple[str, float] | None:
    """For ``category_affinity['k'] OP c`` (either side): the key and the unrounded affinity at which
    the comparison of the rounded one flips (``>= c`` and ``< c`` flip when it falls below c - 5e-7,
    ``> c`` and ``<= c`` below c + 5e-7). Only a starting point for the search, never trusted."""
    op, left, right = type(node), node.this, node.expression
    if op not in _MIRROR:
        return None
    if _affinity_key(left) is None:
        op, left, right = _MIRROR[op], right, left
    key, value = _affinity_key(left), _literal_value(right)
    if key is None or value is None:
        return None
    return key, value - HALF_STEP if op in (exp.GTE, exp.LT) else value + HALF_STEP


_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400, "week": 7 * 86_400}


def _now_guess(node: exp.Expression) -> Callable[[dict[str, Any]], int | None] | None:
    """For ``dateDiff(unit, x, now()) OP n`` (either side; x reads no continuous input, unit of a fixed
    length): the unit boundary at which the difference reaches the value that decides the comparison
    (dateDiff counts boundaries crossed, as compiler.date_diff). Only a starting point for the search:
    a good one saves the day/hour/second grid search of _first_true_aligned (about ten evaluations)."""
    op, left, right = type(node), _unparen(node.this), _unparen(node.expression)
    if op not in _MIRROR:
        return None
    if not isinstance(left, exp.DateDiff):
        op, left, right = _MIRROR[op], right, left
    n = _literal_value(right)
    if (not isinstance(left, exp.DateDiff) or n is None or not math.isfinite(n) or not _is_now(_unparen(left.this))
            or _continuous(left.expression)):
        return None
    unit = str(left.args["unit"].this if left.args.get("unit") else "").lower().strip("'")
    size = _UNIT_SECONDS.get(unit)
    if size is None:
        return None
    reach = math.floor(n) + 1 if op in (exp.GT, exp.LTE) else math.ceil(n)  # > n, <= n: past n; >= n, < n: at n
    shift = 3 * 86_400 if unit == "week" else 0  # weeks start on Monday; 1970-01-01 was a Thursday
    start = compile_expression(left.expression)

    size_ms, shift_ms = size * 1000, shift * 1000

    def guess(row: dict[str, Any]) -> int | None:
        try:
            x = start(row, 0)  # reads no now(); epoch ms
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
        if type(x) is not int:
            return None
        return ((x + shift_ms) // size_ms + reach) * size_ms - shift_ms

    return guess


def _probes(node: exp.Expression, out: list[_Probe]) -> None:
    """The monotone comparisons whose flips, with the breakpoints, bound every change of ``node``."""
    if not _continuous(node):
        return
    if isinstance(node, (exp.Paren, exp.Not)):
        _probes(node.this, out)
        return
    if isinstance(node, (exp.And, exp.Or)):
        _probes(node.this, out)
        _probes(node.expression, out)
        return
    pairs: list[tuple[exp.Expression, exp.Expression]] = []
    if isinstance(node, (exp.GT, exp.GTE, exp.LT, exp.LTE)):
        probe = _probe(node, _dir(node))
        if probe is not None:
            out.append(probe)
        return
    if isinstance(node, (exp.EQ, exp.NEQ)):
        pairs = [(node.this, node.expression)]
    elif isinstance(node, exp.Between):
        for bound, cls in ((node.args["low"], exp.GTE), (node.args["high"], exp.LTE)):
            comparison = cls(this=node.this.copy(), expression=bound.copy())
            probe = _probe(comparison, _dir(comparison))
            if probe is not None:
                out.append(probe)
        return
    elif isinstance(node, exp.In):
        if any(_continuous(option) for option in node.expressions):
            raise _Unsupported(node.sql("clickhouse"))
        pairs = [(node.this, option) for option in node.expressions]
    elif _dir(node) == 0:
        return  # IS NULL and the like: constant between breakpoints
    else:
        raise _Unsupported(node.sql("clickhouse"))
    for left, right in pairs:
        for cls in (exp.GTE, exp.LTE):
            comparison = cls(this=left.copy(), expression=right.copy())
            probe = _probe(comparison, _dir(comparison))
            if probe is not None:
                out.append(probe)


def _split_and(node: Any) -> list[Any]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return _split_and(node.this) + _split_and(node.expression)
    return [node]


@lru_cache(maxsize=4096)
def _plan(text: str, compiled_columns: frozenset[str], uses_now: bool) -> _Plan:
    time_columns = compiled_columns & TIME_COLUMNS
    windows = tuple(sorted({WINDOW_COLUMNS[c] for c in time_columns if c in WINDOW_COLUMNS}))
    reads_aff, reads_top = AFFINITY in time_columns, TOP in time_columns
    if not time_columns and not uses_now:
        return _Plan(True, None, (), False, False, False, (), ())
    tree = sqlglot.parse_one(text, read="clickhouse")
    terms = _split_and(tree)
    static_terms = tuple(compile_expression(term) for term in terms if not _reads_time(term))
    probes: list[_Probe] = []
    sweep = None
    try:
        for term in terms:
            _probes(term, probes)
    except _Unsupported as exc:
        sweep = f"not provably monotone: {exc}"
    return _Plan(False, sweep, windows, reads_aff, reads_top, uses_now, static_terms, tuple(probes),
                 _member_fn(tree), _affinity_keys(text) if reads_aff else None)


def plan_of(compiled: Compiled) -> _Plan:
    return _plan(compiled.text, compiled.columns, compiled.uses_now)


def sweep_reason(segment: Segment) -> str | None:
    """Why the segment's time-driven transitions are found by sweeping (None: they are derived)."""
    return plan_of(segment.predicate).sweep


# --- the profile's time-dependent columns at any instant -------------------------------------------


class _Context:
    """One call's view of the profile: columns at now, and the moving ones at any instant. What it
    computes per instant (windows, the affinity map and top_category, the next top_category change)
    is kept for the call, so every segment reuses it."""

    def __init__(self, state: ProfileState, now_ms: int, half_life_days: float, row: Mapping[str, Any],
                 dt_columns: Sequence[str] = DT_COLUMNS) -> None:
        self.state = state
        self.now_ms = now_ms
        self.half_life_ms = half_life_days * DAY_MS
        # What the epoch-ms closures read, reused for every instant: only the moving columns are rewritten. The
        # static terms read it too (at now): they read no moving column, so the instant it was last set to is moot.
        self.base = self.work = _ms_row(row, dt_columns)
        self._times: list[float] | None = None  # the orders' instants, when a window is first asked for
        self.sorted = True  # whether they are in order (set with them)
        self._keys_settled: dict[frozenset[str], int] = {}
        self._breakpoints: dict[tuple[int, ...], list[int]] = {}
        self._windows: dict[tuple[int, int], tuple[int, float]] = {}
        self._affinity: dict[int, tuple[dict[str, float], str | None]] = {}
        self._top: list[tuple[int, int | None, int | None]] = []  # (t0, answer, bound it was searched to)
        self._settled: int | None = None

    # windows (exactly as profile.columns computes them)
    def window(self, t: int, days: int) -> tuple[int, float]:
        found = self._windows.get((t, days))
        if found is not None:
            return found
        orders = self.state.orders
        start = t - days * DAY_MS
        times = self.times
        if self.sorted:
            inside = orders[bisect_right(times, start):bisect_right(times, t)]
        else:
            inside = [o for o in orders if start < o[0] <= t]
        found = self._windows[(t, days)] = (sum(int(o[2]) for o in inside), round(sum(o[1] for o in inside), 2))
        return found

    @property
    def times(self) -> list[float]:
        if self._times is None:
            self._times = [o[0] for o in self.state.orders]
            self.sorted = all(map(operator.le, self._times, self._times[1:]))  # a <= b pairwise, in C
        return self._times

    def breakpoints(self, windows: tuple[int, ...]) -> list[int]:
        """Instants after now at which a window of ``windows`` gains or loses an order."""
        found = self._breakpoints.get(windows)
        if found is None:
            points = set()
            for at in self.times:
                if at > self.now_ms:
                    points.add(math.ceil(at))
                for days in windows:
                    out = math.ceil(at + days * DAY_MS)  # (t - N days, t] excludes the order from here on
                    if out > self.now_ms:
                        points.add(out)
            found = self._breakpoints[windows] = sorted(points)
        return found

    # affinity (exactly as profile.affinities computes it)
    def score(self, category: str, t: int) -> float:
        raw, as_of = self.state.affinity[category]
        elapsed = t - as_of
        decayed = raw * math.pow(2.0, -elapsed / self.half_life_ms) if elapsed > 0 else raw
        return round(1.0 - math.pow(2.0, -decayed / AFFINITY_SCALE), 6)

    def affinity_at(self, t: int, keys: frozenset[str] | None = None) -> dict[str, float]:
        if keys is None:
            return self.affinity_top(t)[0]
        categories = [k for k in keys if k in self.state.affinity]
        return {category: self.score(category, t) for category in categories}

    def affinity_top(self, t: int) -> tuple[dict[str, float], str | None]:
        """The whole affinity map at ``t`` and its top_category (as profile.columns: ties to the first name)."""
        found = self._affinity.get(t)
        if found is None:
            affinity = {category: self.score(category, t) for category in self.state.affinity}
            top = max(sorted(affinity), key=lambda c: affinity[c]) if affinity else None
            found = self._affinity[t] = (affinity, top)
        return found

    def falls_to(self, category: str, level: float) -> int | None:
        """About when the category's unrounded affinity falls to ``level`` (closed form; None: never).
        A starting point for a search, never trusted on its own."""
        if level <= 0.0:
            return None
        raw, as_of = self.state.affinity[category]
        if level >= 1.0:
            return int(as_of)
        decayed = -AFFINITY_SCALE * math.log2(1.0 - level)  # the decayed raw weight at which affinity is level
        if raw <= decayed:
            return int(as_of)
        at = as_of + self.half_life_ms * math.log2(raw / decayed)
        return int(at) if math.isfinite(at) else None

    def settled_at(self, category: str) -> int:
        """An instant from which the category's affinity is 0.0 for good."""
        raw, as_of = self.state.affinity[category]
        extra = self.half_life_ms * math.log2(raw / SETTLED_RAW) if raw > SETTLED_RAW else 0.0
        return math.ceil(as_of + extra) + 1

    def all_settled_at(self) -> int:
        if self._settled is None:
            self._settled = max((self.settled_at(c) for c in self.state.affinity), default=self.now_ms)
        return self._settled

    def settled_keys_at(self, keys: frozenset[str] | None) -> int:
        """From then on, the affinities of ``keys`` (None: all) no longer change."""
        if keys is None:
            return self.all_settled_at()
        found = self._keys_settled.get(keys)
        if found is None:
            found = self._keys_settled[keys] = max((self.settled_at(k) for k in keys if k in self.state.affinity),
                                                   default=self.now_ms)
        return found

    def row_at(self, t: int, plan: _Plan) -> dict[str, Any]:
        """The columns at ``t`` (the shared work row: valid until the next call)."""
        row = self.work
        for days in plan.windows:
            row[f"orders_{days}d"], row[f"spend_{days}d"] = self.window(t, days)
        if plan.reads_top or (plan.reads_aff and plan.aff_keys is None):
            row[AFFINITY], row[TOP] = self.affinity_top(t)
        elif plan.reads_aff:
            # only the keys it reads (by literal subscripts or mapContains): a missing key reads as in the whole
            # map, so the predicate's value is the same, without scoring every category and ranking them
            row[AFFINITY] = self.affinity_at(t, plan.aff_keys)
        return row

    # top_category
    def next_top_change(self, t0: int, bound: int | None = None) -> int | None:
        """An instant > t0 before which top_category cannot change (exact unless a cap stops the
        search); None when it never changes again. With ``bound``, an answer later than ``bound``
        only says "not up to bound" (sound, not exact): the search stops there."""
        if len(self.state.affinity) < 2:
            return None
        for start, answer, searched in self._top:
            # top_category is the same from start up to the answer: so is the answer from any t0 there
            if start <= t0 and (answer is None or (
                    t0 < answer if searched is None or answer <= searched
                    else t0 <= searched and bound is not None and bound <= searched)):
                return answer
        top = self.affinity_top(t0)[1]
        best: int | None = None
        for other in self.state.affinity:
            if other != top:
                assert top is not None
                beat = self._first_beat(top, other, t0, bound if best is None else
                                        best - 1 if bound is None else min(bound, best - 1))
                if beat is not None and (best is None or beat < best):
                    best = beat
        self._top.append((t0, best, None if best is None else bound))
        return best

    def next_top_in(self, wanted: set[str], t0: int, end: int) -> int | None:
        """The first instant in (t0, end] at which top_category is one of ``wanted`` (it is not at t0), None
        when there is none; or, when TOP_CAP steps do not reach it, the instant reached (it is not one there).
        Changes of top_category among the other categories are jumped over, not walked: two nearly tied
        categories can swap places at almost every rounding step, hundreds of thousands of times."""
        t = self.next_top_change(t0, end)  # top_category must change first (cached: shared by segments)
        for _ in range(TOP_CAP):
            if t is None or t > end:
                return None
            top = self.affinity_top(t)[1]
            if top in wanted:
                return t
            assert top is not None
            # to be top, a wanted category must first rank above the current one: no earlier instant can do
            best: int | None = None
            for category in wanted:
                beat = self._first_beat(top, category, t, end if best is None else min(end, best - 1))
                if beat is not None and (best is None or beat < best):
                    best = beat
            t = best
        return None if t is None or t > end else t

    def _first_beat(self, top: str, other: str, t0: int, bound: int | None = None) -> int | None:
        """The first instant > t0 at which ``other`` ranks above ``top`` (columns' tie-break: equal
        rounded scores go to the name first in sorted order), or the instant a capped search reached;
        an instant > ``bound`` only says "not up to bound"."""
        wins_ties = other < top
        if not wins_ties and self._never_above(other, top, t0):
            return None  # (an exact tie, for one: both fall through every rounding step together)

        def beats(t: int) -> bool:
            a, b = self.score(other, t), self.score(top, t)
            return a > b or (wins_ties and a == b)

        t = t0
        end = self.settled_at(top)
        stop = end if bound is None else min(end, bound + 1)
        for _ in range(TOP_CAP):
            if t > t0 and beats(t):
                return t
            if t >= stop and stop < end:
                return t  # nothing up to bound
            level = self.score(other, t)  # ``other`` never rises: ``top`` must first come down to it
            if level == 0.0 and not wins_ties:
                return None
            down = self._down_to(top, level, inclusive=wins_ties)
            guess = self.falls_to(top, level + HALF_STEP if wins_ties else level - HALF_STEP)
            reached = _first_true_near(down, t, stop, guess)
            if reached is None:
                return None if stop == end else stop
            t = max(reached, self._gap_closes(top, other, t, stop))
        return t

    def _never_above(self, lower: str, upper: str, t: int) -> bool:
        """From t on, ``lower``'s decayed weight never exceeds ``upper``'s, so neither does its rounded
        affinity. log2 of a weight is piecewise linear in time (flat up to its as_of, then falling 1 per
        half-life), so over whole milliseconds the difference is largest at t, at an as_of or 1 ms after.
        Where neither decays yet, score uses the raw weights as they are (compared exactly); elsewhere
        the margin (NEVER_ABOVE_LOG2) covers the float error of score's weights (~1e-14 relative: the
        exponent's rounding, pow, the product); 1 ms of decay at a 30-day half-life is 3.9e-10."""
        (raw_l, as_l), (raw_u, as_u) = self.state.affinity[lower], self.state.affinity[upper]
        if raw_l == raw_u and as_l == as_u:
            return True  # computed identically: equal at every instant
        if raw_l <= 0.0:
            return True
        if raw_u <= 0.0:
            return False
        hl = self.half_life_ms
        for s in {t, max(t, as_l), max(t, as_l + 1), max(t, as_u), max(t, as_u + 1)}:
            if s <= as_l and s <= as_u:
                if raw_l > raw_u:
                    return False
            elif (math.log2(raw_l) - max(0.0, s - as_l) / hl
                  > math.log2(raw_u) - max(0.0, s - as_u) / hl - NEVER_ABOVE_LOG2):
                return False
        return True

    def _down_to(self, category: str, level: float, *, inclusive: bool) -> Callable[[int], bool]:
        if inclusive:
            return lambda s: self.score(category, s) <= level
        return lambda s: self.score(category, s) < level

    def _gap_closes(self, top: str, other: str, t: int, end: int) -> int:
        """The first instant >= t from which the unrounded affinities are within TOP_GAP (a rounded
        tie needs that), when both are decaying; else t."""
        (raw_w, as_w), (raw_c, as_c) = self.state.affinity[top], self.state.affinity[other]
        if as_w > t or as_c > t:
            return t
        hl = self.half_life_ms

        def gap(s: int) -> float:
            dw = raw_w * math.pow(2.0, -(s - as_w) / hl)
            dc = raw_c * math.pow(2.0, -(s - as_c) / hl)
            return math.pow(2.0, -dc / AFFINITY_SCALE) - math.pow(2.0, -dw / AFFINITY_SCALE)

        if gap(t) <= TOP_GAP:
            return t
        a = raw_c * math.pow(2.0, -(t - as_c) / hl) / AFFINITY_SCALE
        b = raw_w * math.pow(2.0, -(t - as_w) / hl) / AFFINITY_SCALE
        start = t
        if a > 0 and b > a:
            peak = math.log2(b / a) / (b - a)  # gap as a function of the common decay factor peaks here
            if peak < 1.0:
                start = t + math.ceil(hl * math.log2(1.0 / peak))
        if start >= end:
            return end
        found = _first_true_near(lambda s: gap(s) <= TOP_GAP, start, end, _gap_guess(a, b, t, hl))
        return end if found is None else found


def _gap_guess(a: float, b: float, t: int, hl: float) -> int | None:
    """About when 2^-(a q) - 2^-(b q) (q = 2^-(s - t)/hl, the common decay from t) falls to TOP_GAP
    past its peak: Newton's method from below on the concave rise from q = 0. A guess only."""
    if not 0.0 <= a < b:
        return None
    ln2 = math.log(2.0)
    q = TOP_GAP / (ln2 * (b - a))
    for _ in range(6):
        value = math.pow(2.0, -a * q) - math.pow(2.0, -b * q) - TOP_GAP
        slope = ln2 * (b * math.pow(2.0, -b * q) - a * math.pow(2.0, -a * q))
        if slope <= 0.0 or abs(value) < 1e-12:
            break
        q -= value / slope
    if not 0.0 < q < 1.0:
        return None
    return t + int(hl * math.log2(1.0 / q))


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The least t in (lo, hi] with pred(t), for pred monotone (False then True); None if pred(hi) fails."""
    if hi <= lo or not pred(hi):
        return None
    return _bisect(pred, lo, hi)


def _first_true_near(pred: Callable[[int], bool], lo: int, hi: int, guess: int | None, *,
                     checked: bool = False) -> int | None:
    """As _first_true, starting from ``guess`` (a closed form's answer, possibly off by a little or a
    lot): probe it, gallop away from it by doubling steps until the flip is bracketed, then bisect.
    The answer is the same as _first_true's (only pred decides); a good guess costs a few calls.
    ``checked``: the caller knows pred(hi) holds (and hi > lo)."""
    if not checked and (hi <= lo or not pred(hi)):
        return None
    if guess is None:
        return _bisect(pred, lo, hi)
    at = min(max(guess, lo + 1), hi)
    step = 1
    if pred(at):
        hi = at
        while hi - step > lo:
            if not pred(hi - step):
                lo = hi - step
                break
            hi -= step
            step *= 2
    else:
        lo = at
        while lo + step < hi:
            if pred(lo + step):
                hi = lo + step
                break
            lo += step
            step *= 2
    return _bisect(pred, lo, hi)


def _bisect(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


_GRIDS = (DAY_MS, 3_600_000, 1000)


def _scaled(pred: Callable[[int], bool], step: int) -> Callable[[int], bool]:
    return lambda i: pred(i * step)


def _first_true_aligned(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """As _first_true with pred(lo) false and pred(hi) true known, searching UTC day, hour and second
    boundaries first: a flip driven by now() (whole seconds, as ClickHouse's DateTime) through
    dateDiff or INTERVAL usually sits on one, and is then found in a dozen evaluations, not forty.
    Days from lo are galloped first (1, 2, 4, ...): a flip in the next few days costs a few evaluations."""
    days = 1
    while lo + days * DAY_MS < hi:
        if pred(lo + days * DAY_MS):
            hi = lo + days * DAY_MS
            break
        lo += days * DAY_MS
        days *= 2
    for step in _GRIDS:
        first, last = lo // step + 1, (hi - 1) // step  # grid points strictly inside (lo, hi)
        if first <= last:
            k = _bisect(_scaled(pred, step), first - 1, last + 1)  # pred(hi) stands for k = last + 1
            if k <= last:
                hi = k * step
            if k - 1 >= first:
                lo = (k - 1) * step
            elif k > last:
                lo = last * step
        if hi - lo <= 1 or not pred(hi - 1):
            return hi  # the flip is on this boundary
    return _bisect(pred, lo, hi)


def _changed(probe: _Probe, row: dict[str, Any], ctx: _Context, first: bool) -> Callable[[int], bool]:
    if probe.reads_aff:
        return lambda t: probe.holds(row, ctx, t) != first
    fn = probe.fn

    def changed(t: int) -> bool:  # probe.holds(row, ctx, t) != first, without its two calls (a search's inner loop)
        try:
            value = fn(row, t)
        except (ZeroDivisionError, OverflowError, ValueError):
            return first  # holds() is False
        if value is True or value is False:
            return value is not first
        return _truth(value) is not first  # _truth(None) is False, as holds()
    return changed


# --- the walk --------------------------------------------------------------------------------------


def _flip(probe: _Probe, row: dict[str, Any], ctx: _Context, lo: int, top: int, first: bool, flips: set[int]) -> bool:
    """Add to ``flips`` the instant in (lo, top] at which the probe's truth first differs from ``first``
    (its value at lo), if it does by top. A closed-form guess, when there is one, is checked first: a
    flip by then is searched for below it and top is never evaluated."""
    changed = _changed(probe, row, ctx, first)
    guess: int | None = None  # a closed form's instant for the flip (verified, never trusted)
    if probe.threshold is not None and not probe.reads_now:
        if probe.threshold[0] in ctx.state.affinity:
            guess = ctx.falls_to(*probe.threshold)
    elif probe.guess is not None:
        guess = probe.guess(row)
    start = lo  # the flip is after start
    if guess is not None and lo < guess <= top:
        if changed(guess):  # flipped by then (monotone): in (lo, guess], searched down from it
            flip = _first_true_near(changed, lo, guess, guess - 1, checked=True)
            assert flip is not None
            flips.add(flip)
            return True
        start = guess  # not flipped there, so not before either
    if probe.holds(row, ctx, top) == first:
        return False
    if guess is not None:
        flip = _first_true_near(changed, start, top, guess if start == lo else start + 1, checked=True)
        assert flip is not None  # changed(top) holds
    elif probe.reads_aff:
        flip = _bisect(changed, lo, top)
    else:
        flip = _first_true_aligned(changed, lo, top)
    flips.add(flip)
    return True


def _segment_deadline(segment: Segment, plan: _Plan, ctx: _Context, sweep_ms: int,
                      limit: int | None = None) -> int | None:
    """The segment's next change (as next_check_at). With ``limit``, only an answer before it counts:
    None then also means "not before limit", and the searches stop there."""
    return _segment_walk(segment, plan, ctx, sweep_ms, limit)[0]


def _segment_walk(segment: Segment, plan: _Plan, ctx: _Context, sweep_ms: int,
                  limit: int | None = None) -> tuple[int | None, bool]:
    """As _segment_deadline, and whether the answer is exact: membership really differs at the instant
    (False: a sweep, the horizon or a cap; nothing changes before it). None with ``exact`` means never,
    unless a ``limit`` was given (then: not before it)."""
    now_ms, base = ctx.now_ms, ctx.base
    if segment.requires_consent == "marketing" and base.get("consent_marketing") is not True:
        return None, True  # consent is not time-dependent
    for term in plan.static_terms:
        try:
            if not _truth(term(base, now_ms)):
                return None, True  # a constant false AND term: never a member, whatever the time
        except (ZeroDivisionError, OverflowError, ValueError):
            return None, True
    if plan.sweep is not None:
        return now_ms + sweep_ms, False  # swept: a re-check, not a known change
    return _search(plan, ctx, limit)


def _search(plan: _Plan, ctx: _Context, limit: int | None) -> tuple[int | None, bool]:
    """_segment_walk past its checks that need no search (a separate function: entering this one, with its
    closures' cells, costs more, and most calls stop before it)."""
    now_ms = ctx.now_ms
    predicate = plan.member
    assert predicate is not None  # every non-static plan has one

    def member(t: int) -> bool:
        return predicate(ctx.row_at(t, plan), t)

    was_now: list[bool] = []  # membership at now, computed when first needed

    def was() -> bool:
        if not was_now:
            was_now.append(member(now_ms))
        return was_now[0]

    # top_category is not walked change by change (two nearly tied categories can swap places at almost
    # every rounding step, hundreds of thousands of times). A probe that reads it is searched once per
    # category it could take; between the window breakpoints and all these flips, membership is then a
    # function of top_category alone, and only a change to a category that gives another membership matters
    # (found by next_top_in, which jumps over the changes among the others).
    free_top = plan.reads_top and len(ctx.state.affinity) >= 2

    def top_change(s: int, e: int) -> int | None:
        """The first instant in (s, e] at which top_category makes membership differ from was() (it does
        not at s), with everything else as at s; or a capped search's instant (nothing changes before)."""
        if e <= s:
            return None
        first = ctx.next_top_change(s, e)
        if first is None or first > e:
            return None  # no change of top_category at all: no need to evaluate the predicate
        state = was()
        row = ctx.row_at(s, plan)
        held = row[TOP]
        wanted = set()
        for category in ctx.state.affinity:
            row[TOP] = category
            if predicate(row, s) != state:
                wanted.add(category)
        row[TOP] = held
        return ctx.next_top_in(wanted, s, e) if wanted else None

    points = ctx.breakpoints(plan.windows) if plan.windows else []
    if plan.reads_now:
        end = now_ms + HORIZON_MS
    elif plan.reads_aff:
        end = max(ctx.all_settled_at(), now_ms)
    else:
        end = now_ms
    if free_top:
        end = max(end, ctx.all_settled_at())  # top_category is constant once every affinity is 0
    index = bisect_right(points, now_ms)
    bound = None if limit is None else limit - 1  # the last instant that matters
    lo = now_ms
    for _ in range(MAX_PIECES):
        nxt = points[index] if index < len(points) else None
        hi = nxt - 1 if nxt is not None else max(end, lo)
        done = False
        if bound is not None and hi >= bound:  # nothing after bound matters
            hi, done = bound, True
        unbounded = False
        flips: set[int] = set()
        if plan.probes and hi > lo:
            row = ctx.row_at(lo, plan)
            held = row.get(TOP)
            for probe in plan.probes:
                for category in (ctx.state.affinity if free_top and probe.reads_top else (held,)):
                    row[TOP] = category  # monotone with top_category held: searched for each value it can take
                    value = probe.value(row, ctx, lo)
                    first = bool(value)
                    top = (hi if probe.reads_now or not probe.reads_aff
                           else min(hi, ctx.settled_keys_at(probe.aff_keys)))
                    if top > lo and _flip(probe, row, ctx, lo, top, first, flips):
                        continue
                    if nxt is None and plan.reads_now and value is not None and first != (probe.direction > 0):
                        unbounded = True  # not at its final value, but no flip within the horizon
            row[TOP] = held
        starts = sorted(flips)  # in time order: the piece from lo, then from each flip
        if free_top:
            found = top_change(lo, starts[0] - 1 if starts else hi)
            if found is not None:
                return found, member(found) != was()  # a capped top search reaches an unchanged instant
        for i, start in enumerate(starts):
            if member(start) != was():
                return start, True
            if free_top:
                found = top_change(start, starts[i + 1] - 1 if i + 1 < len(starts) else hi)
                if found is not None:
                    return found, member(found) != was()
        if done:
            return None, True
        if nxt is None:
            return (hi, False) if unbounded else (None, True)
        if member(nxt) != was():
            return nxt, True
        lo = nxt
        while index < len(points) and points[index] <= lo:
            index += 1
    return lo, False  # cap reached: nothing changes before lo (it was checked there)


_ORDER: dict[int, tuple[tuple[Segment, ...], list[tuple[Segment, _Plan]]]] = {}


def _cost(plan: _Plan) -> tuple[int, int]:
    """Cheapest first: now() alone (its answer, usually days away, then bounds the others), windows only,
    then decaying affinities, then top_category."""
    return (3 if plan.reads_top else 2 if plan.reads_aff else 1 if not plan.reads_now else 0, len(plan.probes))


def _ordered(segments: Sequence[Segment]) -> list[tuple[Segment, _Plan]]:
    """The segments that read a time-dependent input, with their plans, cheapest first (cached per
    list, as the worker passes the same one every time; checked against its current items, so a list
    changed in place is planned again)."""
    items = tuple(segments)
    cached = _ORDER.get(id(segments))
    if cached is not None and cached[0] == items:  # identical items: one identity check each
        return cached[1]
    plans = [(segment, plan_of(segment.predicate)) for segment in items]
    chosen = sorted(((s, p) for s, p in plans if not p.static), key=lambda sp: _cost(sp[1]))
    if len(_ORDER) > 64:
        _ORDER.clear()
    _ORDER[id(segments)] = (items, chosen)
    return chosen


def next_check_at(state: ProfileState, segments: Sequence[Segment], now_ms: int, *, half_life_days: float,
                  sweep_ms: int = 60_000, row: Mapping[str, Any] | None = None) -> int | None:
    """The earliest instant (epoch ms, > now_ms) at which the membership of any of ``segments``
    for this profile may change with no new event, or None when it never can.

    Membership is constant on [now_ms, result). ``row`` may pass ``columns(state, now_ms,
    half_life_days=...)`` when the caller already has it (saves one computation).

    Segments are searched cheapest first, each only up to the earliest answer found so far (a later
    one cannot be the result), sharing what one instant costs (``_Context``).
    """
    plans = _ordered(segments)
    if not plans:
        return None
    if row is None:
        row = columns(state, now_ms, half_life_days=half_life_days)
    ctx = _Context(state, now_ms, half_life_days, row, _set_inputs(plans).dt_columns)
    best: int | None = None
    for segment, plan in plans:
        due = _segment_deadline(segment, plan, ctx, sweep_ms, best)
        if due is not None and (best is None or due < best):
            best = due
            if best <= now_ms + 1:
                break  # nothing can come earlier
    return best


# --- across calls: a segment's answer is kept while its inputs stay the same -------------------------


ORDERS = "#orders"  # tokens for the inputs that are not columns: any order, any affinity, one affinity
ANY_AFFINITY = "#affinity"


def _affinity_token(key: str) -> str:
    return f"#affinity:{key}"


@dataclass(frozen=True)
class _Inputs:
    """What a segment's next change depends on, besides the instant it is asked at, as tokens: the
    columns it reads that do not move with time (and consent when it requires it), ORDERS when it reads
    a window, and the affinities it reads (one token per key, or ANY_AFFINITY for the whole map)."""

    tokens: frozenset[str]


@lru_cache(maxsize=4096)
def _affinity_keys(text: str) -> frozenset[str] | None:
    """The category_affinity keys a predicate reads, when every use of the map is a subscript or a
    mapContains with a string literal key; None when it reads the map any other way (its size, its
    keys, a computed key)."""
    keys = set()
    for node in sqlglot.parse_one(text, read="clickhouse").walk():
        if not _is_affinity(node):
            continue
        parent = node.parent
        if isinstance(parent, exp.Bracket) and parent.this is node and len(parent.expressions) == 1:
            key = parent.expressions[0]
        elif (isinstance(parent, exp.Anonymous) and str(parent.this) == "mapContains"
              and len(parent.expressions) == 2 and parent.expressions[0] is node):
            key = parent.expressions[1]
        else:
            return None
        if not (isinstance(key, exp.Literal) and key.is_string):
            return None
        keys.add(str(key.this))
    return frozenset(keys)


def _inputs_of(segment: Segment, plan: _Plan) -> _Inputs:
    read = segment.predicate.columns
    tokens = set(read - TIME_COLUMNS)
    if segment.requires_consent is not None:
        tokens.add("consent_marketing")
    if plan.windows:
        tokens.add(ORDERS)
    if TOP in read:
        tokens.add(ANY_AFFINITY)  # top_category: every category counts
    elif AFFINITY in read:
        keys = _affinity_keys(segment.predicate.text)
        tokens |= {ANY_AFFINITY} if keys is None else {_affinity_token(k) for k in keys}
    return _Inputs(frozenset(tokens))


@dataclass(frozen=True)
class _SetInputs:
    plans: list[tuple[Segment, _Plan]]  # the _ordered list they belong to (held: its identity is the check)
    tokens: tuple[frozenset[str], ...]  # each segment's _Inputs, aligned with plans
    columns: tuple[str, ...]  # every held column any of them reads
    orders: bool
    affinity: bool
    dt_columns: tuple[str, ...]  # the date-time columns any of them reads (converted to epoch ms per call)

    getter: Callable[[Mapping[str, Any]], Any] | None = None  # itemgetter of columns, when there are 2 or more
    users: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # token -> the segments (indexes) reading it

    def stale(self, dirty: set[str]) -> set[int]:
        """The indexes of the segments that read one of the ``dirty`` inputs."""
        out: set[int] = set()
        users = self.users
        for token in dirty:
            found = users.get(token)
            if found:
                out.update(found)
        return out

    def values_of(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row's values of ``columns`` (None for a missing one)."""
        if self.getter is not None:
            try:
                return self.getter(row)  # type: ignore[no-any-return]
            except KeyError:
                pass
        return tuple(row.get(c) for c in self.columns)


_SET_INPUTS: dict[int, _SetInputs] = {}


def _set_inputs(plans: list[tuple[Segment, _Plan]]) -> _SetInputs:
    found = _SET_INPUTS.get(id(plans))
    if found is not None and found.plans is plans:
        return found
    tokens = tuple(_inputs_of(segment, plan).tokens for segment, plan in plans)
    every = set().union(*tokens)
    read = set().union(*(segment.predicate.columns for segment, _ in plans))
    held = tuple(sorted(t for t in every if not t.startswith("#")))
    users = {token: tuple(i for i, mine in enumerate(tokens) if token in mine) for token in every}
    found = _SetInputs(plans, tokens, held, ORDERS in every, any(t.startswith(ANY_AFFINITY) for t in every),
                       tuple(c for c in DT_COLUMNS if c in read), operator.itemgetter(*held) if len(held) > 1 else None,
                       users)
    if len(_SET_INPUTS) > 64:
        _SET_INPUTS.clear()
    _SET_INPUTS[id(plans)] = found
    return found


def _same(a: Any, b: Any) -> bool:
    """Equal as a predicate sees them: same type, and for floats the same sign of zero."""
    return a == b and type(a) is type(b) and (type(a) is not float or math.copysign(1.0, a) == math.copysign(1.0, b))


# (asked at t0, instant or bound, exact): membership is constant on [t0, instant); when exact it differs
# there; instant None: it never changes
_Entry = tuple[int, int | None, bool]


@dataclass
class _Memo:
    inputs: _SetInputs
    half_life_days: float
    sweep_ms: int
    values: tuple[Any, ...]  # of inputs.columns
    orders: tuple[tuple[float, ...], ...] | None
    affinity: dict[str, tuple[float, float]] | None
    entries: list[_Entry | None]  # aligned with inputs.plans


def _dirty(info: _SetInputs, memo: _Memo, values: tuple[Any, ...], orders: tuple[tuple[float, ...], ...] | None,
           affinity: dict[str, tuple[float, float]] | None) -> set[str]:
    """The tokens of the inputs that differ from the memo's."""
    # the same object is the same input (most held values: strings, None, small ints), no call needed
    dirty = {c for c, a, b in zip(info.columns, values, memo.values, strict=True) if a is not b and not _same(a, b)}
    if orders != memo.orders:
        dirty.add(ORDERS)
    if affinity != memo.affinity:
        assert affinity is not None and memo.affinity is not None
        dirty.add(ANY_AFFINITY)
        old = memo.affinity
        dirty.update(_affinity_token(k) for k in affinity.keys() | old.keys() if affinity.get(k) != old.get(k))
    return dirty


class DeadlineCache:
    """``next_check_at`` for profiles asked again and again (the worker asks once per changed profile
    per batch): the same answer, reusing per segment what the last call found while that segment's
    inputs are unchanged.

    A segment's next change depends only on its ``_Inputs`` (the values of the held columns it reads,
    the orders, some or all affinities) and on the instant it is asked at. So an answer found at t0
    (membership constant on [t0, d), and different at d when exact) holds at any t1 in [t0, d) if
    those inputs are equal: the same d, or "not before d" for an answer bounded by a search limit, a
    sweep, the horizon or a cap (such a segment is searched again only when its bound could be the
    result). An event changes a few columns (``touched_columns``): most segments are not searched.

    Kept per customer id, at most ``max_profiles`` (least recently asked dropped first); every entry
    is checked against the profile's current values, never trusted: a miss searches as next_check_at
    does. Not thread-safe (one per worker's event loop)."""

    def __init__(self, max_profiles: int = 4096) -> None:  # ~2.8 KB each with segments_50 (tracemalloc)
        self.max_profiles = max_profiles
        self._memos: dict[str, _Memo] = {}
        self.reused = 0  # segment answers taken from a previous call
        self.searched = 0  # segment answers searched

    def __len__(self) -> int:
        return len(self._memos)

    def clear(self) -> None:
        self._memos.clear()

    def next_check_at(self, state: ProfileState, segments: Sequence[Segment], now_ms: int, *,
                      half_life_days: float, sweep_ms: int = 60_000,
                      row: Mapping[str, Any] | None = None) -> int | None:
        """As ``next_check_at`` (same arguments, same answer)."""
        memo = self._memos.pop(state.customer_id, None)
        plans = _ordered(segments)
        if not plans:
            return None
        info = _set_inputs(plans)
        if row is None:
            row = columns(state, now_ms, half_life_days=half_life_days)
        values = info.values_of(row)
        orders = tuple(map(tuple, state.orders)) if info.orders else None  # a snapshot: they change in place
        affinity = {k: (v[0], v[1]) for k, v in state.affinity.items()} if info.affinity else None
        entries: list[_Entry | None] = [None] * len(plans)
        best: int | None = None
        todo: list[int] = []
        bounded: list[int] = []
        if (memo is not None and memo.inputs is info and memo.half_life_days == half_life_days
                and memo.sweep_ms == sweep_ms):
            stale = info.stale(_dirty(info, memo, values, orders, affinity))
            for i, entry in enumerate(memo.entries):
                if entry is not None and entry[0] <= now_ms and i not in stale:
                    due = entry[1]
                    if due is None:
                        entries[i] = entry  # never changes
                        continue
                    if due > now_ms:
                        entries[i] = entry
                        if not entry[2]:
                            bounded.append(i)
                        elif best is None or due < best:
                            best = due
                        continue
                todo.append(i)
            self.reused += len(plans) - len(todo)
        else:
            todo = list(range(len(plans)))
        ctx: _Context | None = None
        # then the segments to search (cheapest first), then those whose bound could be the result
        for i in todo + bounded:
            if best is not None and best <= now_ms + 1:
                break  # nothing can come earlier
            entry = entries[i]
            if entry is not None and entry[1] is not None and best is not None and entry[1] >= best:
                continue  # not before its bound, which is not before the best: it cannot be the result
            if ctx is None:
                ctx = _Context(state, now_ms, half_life_days, row, info.dt_columns)
            segment, plan = plans[i]
            due, exact = _segment_walk(segment, plan, ctx, sweep_ms, best)
            self.searched += 1
            if due is None:  # never, or (searched up to best) not before best
                entries[i] = (now_ms, best, False) if best is not None else (now_ms, None, True)
            else:
                entries[i] = (now_ms, due, exact)
                if best is None or due < best:
                    best = due
        self._memos[state.customer_id] = _Memo(info, half_life_days, sweep_ms, values, orders, affinity, entries)
        if len(self._memos) > self.max_profiles:
            del self._memos[next(iter(self._memos))]
        return best
