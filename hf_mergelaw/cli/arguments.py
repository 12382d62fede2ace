"""Argument types shared by the command groups: each turns bad text into a one-line usage error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ..errors import UserError
from ..k_values import parse_k


def k_values(text: str) -> list[int]:
    """``"1-9"``, ``"1,2,4"``, ``"1-3,8"`` -> sorted distinct k values (each >= 1)."""
    try:
        return parse_k(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sizes(text: str) -> list[float]:
    """Base sizes in billions: ``"0.5,7,72"`` -> [0.5, 7.0, 72.0]."""
    values = [positive(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes in billions, e.g. 7 or 7,72")
    return values


def level(text: str) -> float:
    """An interval coverage strictly between 0 and 1."""
    value = finite(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a coverage level lies in (0, 1), e.g. 0.9")
    return value


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    value = finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share in (0, 1], e.g. 0.25")
    return value


def finite(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def positive(text: str) -> float:
    """A finite number above 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def names(text: str) -> list[str]:
    """``"method,domain"`` -> ["method", "domain"]."""
    return [v.strip() for v in text.split(",") if v.strip()]


def count(minimum: int, option: str, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number in [``minimum``, ``maximum``] for ``option``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            top = "" if maximum is None else f" and <= {maximum}"
            raise argparse.ArgumentTypeError(
                f"{option} {text!r}: give a whole number >= {minimum}{top}"
            )
        return value

    return parse


def param(text: str) -> tuple[str, tuple[float | None, float | None, float | None]]:
    """``"c=0:10"`` -> ("c", (0.0, 10.0, None)); ``"a=0:"`` -> ("a", (0.0, None, None))."""
    name, _, spec = text.partition("=")
    fields = spec.split(":") if spec else []
    if not name.strip().isidentifier() or len(fields) > 3 or len(fields) == 1:
        raise argparse.ArgumentTypeError(
            f"bad --param {text!r}: use NAME=LO:HI or NAME=LO:HI:START"
        )
    try:
        values = [float(v) if v.strip() else None for v in fields] + [None] * (3 - len(fields))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --param {text!r}: bounds must be numbers") from None
    return name.strip(), (values[0], values[1], values[2])


def group(text: str) -> dict[str, str]:
    """``"method=ties,domain=code"`` -> {"method": "ties", "domain": "code"}."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"bad --group {text!r}: use field=value[,field=value]")
        out[key.strip()] = value.strip()
    return out
