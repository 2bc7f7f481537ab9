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


@dataclass(frozen=True)
class _Compiled:
    """One statement as one dialect's driver takes it."""

    sql: str
    positions: tuple[str, ...] | None  # qmark (SQLite): the parameters' order; else named
    defaults: dict[str, Any]  # values fixed in the statement (``LIMIT 1``, IN lists)
    bind: dict[str, Processor]
    make_row: Callable[[Sequence[Any]], Any] | None  # None: the statement returns no rows


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
        with self._cursor(connection, compiled, params) as cursor:
            cursor.execute(compiled.sql, _arguments(compiled, params))
            rowcount: int = cursor.rowcount
        return rowcount

    def run_many(self, connection: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        compiled = self._for(connection.dialect)
        arguments = [_arguments(compiled, row) for row in rows]
        with self._cursor(connection, compiled, arguments) as cursor:
            cursor.executemany(compiled.sql, arguments)

    def _execute(
        self, connection: Connection, params: Mapping[str, Any], *, fetch_all: bool
    ) -> list[Any]:
        compiled = self._for(connection.dialect)
        assert compiled.make_row is not None, "the statement returns no rows"
        with self._cursor(connection, compiled, params) as cursor:
            cursor.execute(compiled.sql, _arguments(compiled, params))
            fetched = cursor.fetchall() if fetch_all else [cursor.fetchone()]
        return [compiled.make_row(row) for row in fetched if row is not None]

    def _cursor(self, connection: Connection, compiled: _Compiled, params: Any) -> _DriverCursor:
        return _DriverCursor(connection, compiled.sql, params)

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
    return _Compiled(
        sql=expanded.statement,
        positions=tuple(expanded.positiontup) if compiled.positional else None,  # type: ignore[attr-defined]
        defaults=defaults,
        bind=bind,
        make_row=_row_maker(statement, dialect),
    )


def _row_maker(statement: ClauseElement, dialect: Dialect) -> Callable[[Sequence[Any]], Any] | None:
    columns = list(getattr(statement, "exported_columns", ()))
    if not columns:
        return None
    row_type = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
    processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]
    if not any(processors):
        return lambda values: row_type._make(values)

    def make(values: Sequence[Any]) -> Any:
        return row_type._make(
            value if processor is None else processor(value)
            for processor, value in zip(processors, values, strict=True)
        )

    return make


def _arguments(compiled: _Compiled, params: Mapping[str, Any]) -> Any:
    values = dict(compiled.defaults)
    bind = compiled.bind
    for name, value in params.items():
        processor = bind.get(name)
        values[name] = value if processor is None else processor(value)
    if compiled.positions is None:
        return values
    return [values[name] for name in compiled.positions]


class _DriverCursor:
    """The DBAPI connection's cursor; the driver's errors raised as SQLAlchemy's."""

    def __init__(self, connection: Connection, sql: str, params: Any) -> None:
        self.connection = connection
        self.sql = sql
        self.params = params
        self.dbapi_connection: Any = connection.connection.driver_connection

    def __enter__(self) -> Any:
        self.cursor = self.dbapi_connection.cursor()
        return self.cursor

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        self.cursor.close()
        dialect = self.connection.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        if exc is None or not isinstance(exc, dbapi_error):
            return
        disconnected = dialect.is_disconnect(exc, self.dbapi_connection, self.cursor)
        if disconnected:
            self.connection.invalidate(exc)
        raise DBAPIError.instance(
            self.sql,
            self.params,
            exc,
            dbapi_error,
            connection_invalidated=disconnected,
            dialect=dialect,
        ) from exc
