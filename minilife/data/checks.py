"""Checks the data modules share (one home, no copies): a bad argument fails at the call, named; a bad
line of a user's JSONL file fails naming file and line."""
from __future__ import annotations

import json
import numbers
from typing import Any, Callable


def check_text(text: object, where: str = "text") -> str:
    """``text`` if it is a str, else TypeError "<where> must be a str, got <type>"."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    return text


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (numpy ints too, bool not), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def read_records(path, parse: Callable[[Any, str], Any], *, skip_bad: bool = False,
                 what: str = "records") -> tuple[list, int]:
    """(records, number of bad lines skipped) of a JSONL file a user brings: ``parse(value, where)`` turns
    each line's JSON value into a record or raises ValueError; ``where`` is "file:line". A bad line (not
    UTF-8, not JSON, refused by ``parse``) raises unless ``skip_bad``; a file without any record is an
    error either way. Blank lines are ignored."""
    records, n_bad, first_error = [], 0, None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    value = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                records.append(parse(value, where))
            except ValueError as e:
                if not skip_bad:
                    raise
                n_bad, first_error = n_bad + 1, first_error or str(e)
    if not records:
        raise ValueError(f"{path}: no {what}" + (f" ({n_bad} bad lines, first: {first_error})" if n_bad else ""))
    return records, n_bad
