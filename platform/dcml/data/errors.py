"""Bad input data: one exception type, and recovering it from Ray's task-error wrappers."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and column and row)."""


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError behind an exception that Ray Data raised for a failed task, if any."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
