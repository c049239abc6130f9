"""Argument checks the data modules share (one home, no copies): a bad argument fails at the call, named."""
from __future__ import annotations

import numbers


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
