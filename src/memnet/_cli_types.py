"""Typed argparse values: a bad value names the option and what it accepts (argparse prefixes the
option: "argument --halo: expected 'exact' or a whole number of pixels >= 0, got 'abc'")."""

from __future__ import annotations

import argparse


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def count(minimum: int = 1, what: str = "a whole number"):
    """An integer >= ``minimum``."""
    def parse(text: str) -> int:
        v = _int(text)
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
        return v
    parse.__name__ = "count"
    return parse


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def fraction(text: str, *, one: bool = False) -> float:
    """A number in (0, 1); with ``one``, in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not (0 < v <= 1 if one else 0 < v < 1):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}" if one else
                                         f"expected a fraction between 0 and 1 (exclusive), got {text!r}")
    return v


def fraction_or_one(text: str) -> float:
    return fraction(text, one=True)


def halo(text: str) -> str | int:
    if text == "exact":
        return text
    v = _int(text)
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"expected 'exact' or a whole number of pixels >= 0, got {text!r}")
    return v


def auto_or(parse):
    """``auto`` or whatever ``parse`` accepts."""
    def parse_auto(text: str):
        return text if text == "auto" else parse(text)
    parse_auto.__name__ = parse.__name__
    return parse_auto


def batch_size(text: str) -> str | int:
    if text == "auto":
        return text
    v = _int(text)
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of tiles >= 1, got {text!r}")
    return v


def sr_scale(text: str) -> int:
    v = _int(text)
    if v not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"expected a super-resolution factor of 2, 3 or 4, got {text!r}")
    return v
