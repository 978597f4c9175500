"""Bad input data: one exception type, and recovering it from Ray's task-error wrappers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and column and row)."""


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError behind an exception (Ray Data's failed-task wrappers included), if any.

    A DataError that came back from a Ray task carries the remote traceback in its text; the
    one returned holds only the original message.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            if type(e) is DataError:
                return e
            text, marker = str(e), "DataError: "
            if marker in text:
                text = text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]
            return DataError(text)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


@contextmanager
def data_errors_as_raised() -> Iterator[None]:
    """Within: a DataError raised in a Ray task or Ray Data task reaches the caller as itself,
    its message alone, not wrapped in Ray's UserCodeException and its traceback. A dataset keeps
    the context it was made in: make the datasets inside."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True
    try:
        yield
    except Exception as e:
        found = find_data_error(e)
        if found is None or found is e:
            raise
        raise found from None
    finally:
        ctx.raise_original_map_exception = saved
