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
    # qmark (SQLite): per position, the parameter's name, its type's bind processor and
    # the value fixed in the statement (``LIMIT 1``, an IN list's items), processed
    # already; named (psycopg): the same per name, handed over as a dict.
    slots: tuple[tuple[str, Processor | None, Any], ...]
    positional: bool
    make_row: Callable[[Sequence[Any]], Any] | None  # None: the statement returns no rows
    dbapi_error: type[Exception]

    def arguments(self, params: Mapping[str, Any]) -> Any:
        values = []
        for name, processor, fixed in self.slots:
            if name in params:
                value = params[name]
                values.append(value if processor is None else processor(value))
            elif fixed is _UNSET:
                raise KeyError(f"no value for parameter {name!r}")
            else:
                values.append(fixed)
        if self.positional:
            return values
        return {slot[0]: value for slot, value in zip(self.slots, values, strict=True)}


class DriverStatement:
    """A Core statement compiled once per dialect and run on the driver's cursor.

    ``first``/``all`` return named tuples (attribute access, as SQLAlchemy's ``Row``),
    ``run`` the row count, ``run_many`` one ``executemany``."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def first(self, connection: Connection, params: Mapping[str, Any]) -> Any | None:
        rows = self._execute(connection, params, fetch_all=False)
        return rows[0] if rows else None

    def all(self, connection: Connection, params: Mapping[str, Any]) -> list[Any]:
        return self._execute(connection, params, fetch_all=True)

    def run(self, connection: Connection, params: Mapping[str, Any]) -> int:
        compiled = self._for(connection.dialect)
        arguments = compiled.arguments(params)
        cursor = _cursor(connection)
        try:
            cursor.execute(compiled.sql, arguments)
        except compiled.dbapi_error as exc:
            raise _failed(connection, compiled.sql, arguments, exc) from exc
        rowcount: int = cursor.rowcount
        return rowcount

    def run_many(self, connection: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        compiled = self._for(connection.dialect)
        arguments = [compiled.arguments(row) for row in rows]
        cursor = _cursor(connection)
        try:
            cursor.executemany(compiled.sql, arguments)
        except compiled.dbapi_error as exc:
            raise _failed(connection, compiled.sql, arguments, exc) from exc

    def _execute(
        self, connection: Connection, params: Mapping[str, Any], *, fetch_all: bool
    ) -> list[Any]:
        compiled = self._for(connection.dialect)
        make_row = compiled.make_row
        assert make_row is not None, "the statement returns no rows"
        arguments = compiled.arguments(params)
        cursor = _cursor(connection)
        try:
            cursor.execute(compiled.sql, arguments)
            if fetch_all:
                fetched = cursor.fetchall()
            else:
                fetched = [cursor.fetchone()]
                if fetched[0] is not None and cursor.fetchone() is not None:
                    _end(connection)  # rows left: their statement would stay open
        except compiled.dbapi_error as exc:
            raise _failed(connection, compiled.sql, arguments, exc) from exc
        return [make_row(row) for row in fetched if row is not None]

    def _for(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _compile(self.statement, dialect)
        return compiled


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
    names = expanded.positiontup if compiled.positional else expanded.parameters  # type: ignore[attr-defined]
    slots = tuple((name, bind.get(name), defaults.get(name, _UNSET)) for name in names)
    return _Compiled(
        sql=expanded.statement,
        slots=slots,
        positional=compiled.positional,  # type: ignore[attr-defined]
        make_row=_row_maker(statement, dialect),
        dbapi_error=dialect.loaded_dbapi.Error,
    )


def _row_maker(statement: ClauseElement, dialect: Dialect) -> Callable[[Sequence[Any]], Any] | None:
    columns = list(getattr(statement, "exported_columns", ()))
    if not columns:
        return None
    row_type = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]
    # Only the columns that have a processor are visited: a generator over every column
    # took as long as the processors themselves (simulate's profile).
    processed = [(index, processor) for index, processor in enumerate(processors) if processor]
    if not processed:
        return row_type._make

    def make(values: Sequence[Any]) -> Any:
        row = list(values)
        for index, processor in processed:
            row[index] = processor(row[index])
        return row_type._make(row)

    return make


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
