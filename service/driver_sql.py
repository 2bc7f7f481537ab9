"""Hot-path statements run on the database driver's own cursor (issue 15).

A warm lease is a handful of small statements, and on SQLite each one cost SQLAlchemy
about 45 us of execution machinery (the execution context, parameter processing,
result set-up, events) against 10-20 us in the database: the lease transaction was 6x
the same work written for the plain driver. :class:`DriverStatement` keeps the
statement in Core (one definition, both dialects, the invariants unchanged) but
compiles it once per dialect to the driver's SQL, and runs it on the cursor of the
SQLAlchemy connection's own DBAPI connection: inside the same transaction (the engine's
``begin`` listener has already taken SQLite's write lock, or psycopg has opened one),
with the same types on the way in and out (the column types' own bind and result
processors), and with the driver's errors raised as SQLAlchemy's (``IntegrityError``
from the unique indexes, ``OperationalError``), the connection invalidated on a
disconnect as SQLAlchemy would.

Only for statements that run on every lease; the rest of the service stays on the
ORM and Core, where the machinery costs less than it saves.
"""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

Processor = Callable[[Any], Any]


_UNSET: Any = object()


@dataclass(frozen=True)
class _Compiled:
    """One statement as one dialect's driver takes it."""

    sql: str
    # The driver's parameters from the statement's (``_arguments``): a list (qmark,
    # SQLite) or a dict (named, psycopg).
    arguments: Callable[[Mapping[str, Any]], Any]
    make_row: Callable[[Sequence[Any]], Any] | None  # None: the statement returns no rows
    dbapi_error: type[Exception]


class DriverStatement:
    """A Core statement compiled once per dialect and run on the driver's cursor.

    ``first``/``all`` return named tuples (attribute access, as SQLAlchemy's ``Row``),
    ``run`` the row count, ``run_many`` one ``executemany``."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def first(self, connection: Connection, params: Mapping[str, Any]) -> Any | None:
        compiled = self._for(connection.dialect)
        make_row = compiled.make_row
        assert make_row is not None, "the statement returns no rows"
        row = _run(connection, compiled, params, _first_row)
        return None if row is None else make_row(row)

    def all(self, connection: Connection, params: Mapping[str, Any]) -> list[Any]:
        compiled = self._for(connection.dialect)
        make_row = compiled.make_row
        assert make_row is not None, "the statement returns no rows"
        return [make_row(row) for row in _run(connection, compiled, params, _all_rows)]

    def run(self, connection: Connection, params: Mapping[str, Any]) -> int:
        compiled = self._for(connection.dialect)
        rowcount: int = _run(connection, compiled, params, _rowcount)
        return rowcount

    def run_many(self, connection: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        compiled = self._for(connection.dialect)
        arguments = [compiled.arguments(row) for row in rows]
        cursor = _cursor(connection)
        try:
            cursor.executemany(compiled.sql, arguments)
        except compiled.dbapi_error as exc:
            raise _failed(connection, compiled.sql, arguments, exc) from exc

    def _for(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _compile(self.statement, dialect)
        return compiled


def _run(
    connection: Connection,
    compiled: _Compiled,
    params: Mapping[str, Any],
    fetch: Callable[[Any, Connection], Any],
) -> Any:
    """The statement on the connection's cursor, and what ``fetch`` takes of its result;
    the driver's errors of either raised as SQLAlchemy's."""
    arguments = compiled.arguments(params)
    cursor = _cursor(connection)
    try:
        cursor.execute(compiled.sql, arguments)
        return fetch(cursor, connection)
    except compiled.dbapi_error as exc:
        raise _failed(connection, compiled.sql, arguments, exc) from exc


def _first_row(cursor: Any, connection: Connection) -> Any:
    row = cursor.fetchone()
    if row is not None and cursor.fetchone() is not None:
        _end(connection)  # rows left: their statement would stay open
    return row


def _all_rows(cursor: Any, _connection: Connection) -> list[Any]:
    rows: list[Any] = cursor.fetchall()
    return rows


def _rowcount(cursor: Any, _connection: Connection) -> int:
    rowcount: int = cursor.rowcount
    return rowcount


def _compile(statement: ClauseElement, dialect: Dialect) -> _Compiled:
    compiled = statement.compile(dialect=dialect)
    if compiled.escaped_bind_names:  # type: ignore[attr-defined]
        raise ValueError("driver statements take plain parameter names")
    binds = compiled.binds  # type: ignore[attr-defined]
    # Expanding parameters (``IN`` of a fixed list) become one parameter per value: the
    # expanded form's SQL and values, computed once (the required values are not needed
    # for it, so placeholders stand in).
    placeholders = {name: None for name, bind in binds.items() if bind.required}
    expanded = compiled.construct_expanded_state(placeholders)  # type: ignore[attr-defined]
    defaults = {
        name: value
        for name, value in expanded.parameters.items()
        if name not in placeholders and (name not in binds or not binds[name].expanding)
    }
    bind: dict[str, Processor] = {}
    for name, parameter in binds.items():
        processor = parameter.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            bind[name] = processor
            if name in defaults:
                defaults[name] = processor(defaults[name])
    positional: bool = compiled.positional  # type: ignore[attr-defined]
    names = expanded.positiontup if positional else expanded.parameters
    slots = [(name, bind.get(name), defaults.get(name, _UNSET)) for name in names]
    return _Compiled(
        sql=expanded.statement,
        arguments=_arguments(slots, positional),
        make_row=_row_maker(statement, dialect),
        dbapi_error=dialect.loaded_dbapi.Error,
    )


_Slot = tuple[str, Processor | None, Any]


def _arguments(slots: list[_Slot], positional: bool) -> Callable[[Mapping[str, Any]], Any]:
    """The driver's parameters: per slot (a position, or a name), the statement's
    parameter of that name through its type's bind processor, or the value fixed in the
    statement (``LIMIT 1``, an IN list's items; processed already) when none is given.
    A parameter without either raises ``KeyError``."""
    namespace: dict[str, Any] = {}
    items = []
    for index, (name, processor, fixed) in enumerate(slots):
        item = f"params[{name!r}]"
        if processor is not None:
            namespace[f"p{index}"] = processor
            item = f"p{index}({item})"
        if fixed is not _UNSET:
            namespace[f"f{index}"] = fixed
            item = f"({item} if {name!r} in params else f{index})"
        items.append(item if positional else f"{name!r}: {item}")
    listed = ", ".join(items)
    return _generated("params", f"[{listed}]" if positional else f"{{{listed}}}", namespace)


def _row_maker(statement: ClauseElement, dialect: Dialect) -> Callable[[Sequence[Any]], Any] | None:
    columns = list(getattr(statement, "exported_columns", ()))
    if not columns:
        return None
    row_type = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]
    if not any(processors):
        return functools.partial(tuple.__new__, row_type)
    namespace: dict[str, Any] = {"new": tuple.__new__, "Row": row_type}
    items = []
    for index, processor in enumerate(processors):
        if processor is None:
            items.append(f"values[{index}]")
        else:
            namespace[f"p{index}"] = processor
            items.append(f"p{index}(values[{index}])")
    return _generated("values", f"new(Row, ({', '.join(items)},))", namespace)


def _generated(argument: str, expression: str, namespace: dict[str, Any]) -> Callable[[Any], Any]:
    """``lambda argument: expression`` as Python source, compiled once per statement.

    What ``arguments`` and the row makers do is fixed when the statement compiles: a
    loop over its slots or columns, run for every statement (~50,000 argument lists and
    ~22,000 rows a simulated day), took twice as long as the same work written out
    (5 parameters, 2 of them datetimes: 2.9 us against 1.5 us; a replayed request
    7.30 M -> 7.06 M instructions, callgrind). As ``namedtuple`` does, the source is
    built from our own statement's names (``repr``) and indexes only.
    """
    exec(f"def generated({argument}):\n    return {expression}\n", namespace)
    generated: Callable[[Any], Any] = namespace["generated"]
    return generated


_CURSOR = "workerlease_driver_cursor"


def _cursor(connection: Connection) -> Any:
    """The driver's cursor of the connection, one for all its driver statements.

    A cursor made and closed for each statement cost about as much as a small statement
    itself on in-memory SQLite (a replayed request: 7.40 M -> 7.33 M instructions with
    one kept, callgrind; ~32 statements a request). One is enough: each statement has
    fetched all it will before the next one runs, and SQLite's cursor ends its statement
    once its last row is fetched (``first`` ends it otherwise, see ``_end``). Kept in the
    connection's ``info``, which lives exactly as long as the DBAPI connection (cleared
    when it is invalidated and replaced)."""
    info = connection.info
    cursor = info.get(_CURSOR)
    if cursor is None:
        cursor = info[_CURSOR] = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    return cursor


def _end(connection: Connection) -> None:
    """Close the connection's cursor, and with it its statement: a statement with rows
    left would otherwise hold on in SQLite until the cursor's next one (a read snapshot,
    or an ``UPDATE ... RETURNING`` that keeps ``COMMIT`` from completing)."""
    cursor = connection.info.pop(_CURSOR, None)
    if cursor is not None:
        cursor.close()


def _failed(connection: Connection, sql: str, arguments: Any, exc: Any) -> BaseException:
    """``_translated``, with the connection's cursor closed afterwards (as each statement's
    own cursor was): nothing of a failed statement is carried into the next."""
    cursor = connection.info.pop(_CURSOR)  # before ``_translated`` may invalidate
    try:
        return _translated(connection, sql, arguments, exc, cursor)
    finally:
        cursor.close()


def _translated(
    connection: Connection, sql: str, arguments: Any, exc: Any, cursor: Any
) -> BaseException:
    """The driver's error as SQLAlchemy raises it; a lost connection invalidated, as
    SQLAlchemy does, so the pool does not hand it out again."""
    dialect = connection.dialect
    dbapi_connection = connection.connection.driver_connection
    disconnected = dialect.is_disconnect(exc, dbapi_connection, cursor)
    if disconnected:
        connection.invalidate(exc)
    return DBAPIError.instance(
        sql,
        arguments,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=disconnected,
        dialect=dialect,
    )
