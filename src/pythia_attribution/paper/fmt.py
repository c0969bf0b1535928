"""How numbers are written in the paper: one place, so prose, tables and captions agree."""

from __future__ import annotations

import math

MINUS = "\u2212"  # the minus sign: a hyphen where a line wraps before it would read as a dash


def _signed(text: str) -> str:
    return MINUS + text[1:] if text.startswith("-") else text


def pct(x: float | None) -> str:
    """A share as a percentage: one decimal below 10%, none above."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    v = 100 * x
    return _signed(f"{v:.1f}%" if abs(v) < 10 and v != 0 else f"{v:.0f}%")


def dec(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return _signed(f"{x:.{digits}f}")


def interval(lo: float | None, hi: float | None, digits: int = 3, as_pct: bool = False) -> str:
    if lo is None or hi is None:
        return "[n/a]"
    if as_pct:
        return f"[{pct(lo)}, {pct(hi)}]"
    return f"[{dec(lo, digits)}, {dec(hi, digits)}]"


def sci(x: float | None, digits: int = 2) -> str:
    """A small signed quantity (a log-probability change) in significant digits: 0.0012, −3.4e-05."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return _signed(f"{x:.{digits}g}")


def interval_sci(lo: float | None, hi: float | None, digits: int = 2) -> str:
    if lo is None or hi is None:
        return "[n/a]"
    return f"[{sci(lo, digits)}, {sci(hi, digits)}]"


def count(n: int) -> str:
    return f"{int(n):,}"


def ratio(k: int, n: int) -> str:
    return f"{int(k)}/{int(n)}"


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} million"


def listing(values, conjunction: str = "and") -> str:
    """'1, 2 and 4' for [1, 2, 4] ('1, 2 or 4' with ``conjunction="or"``)."""
    items = [str(v) for v in values]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def compare(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """How estimate a (value, lo, hi) stands against b: 'above', 'below' or 'indistinguishable from'.

    Decided by whether the two intervals overlap (a conservative reading of two marginal intervals).
    """
    if a[1] > b[2]:
        return "above"
    if a[2] < b[1]:
        return "below"
    return "indistinguishable from"
