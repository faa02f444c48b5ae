"""Parse context lengths ("2k" = 2048) and lists of them, including "2k,4k,...,64k" ranges."""

from __future__ import annotations

UNITS = {"k": 1024, "m": 1024 * 1024}
ELLIPSIS = "..."


def parse_length(text: str) -> int:
    """Parse one length: a positive integer with an optional k (x1024) or m (x1024^2) suffix."""
    s = text.strip().lower()
    multiplier = 1
    if s and s[-1] in UNITS:
        multiplier, s = UNITS[s[-1]], s[:-1]
    if not s.isdigit():
        raise ValueError(f"bad length {text.strip()!r}: expected a positive integer with an optional k/m suffix, e.g. 2048 or 2k")
    value = int(s) * multiplier
    if value < 1:
        raise ValueError(f"bad length {text.strip()!r}: must be at least 1")
    return value


def _expand_geometric(first: int, second: int, last: int) -> list[int]:
    """The series first, second, second*r, ... up to last, where r = second / first."""
    if second <= first or second % first != 0:
        raise ValueError(f"'{ELLIPSIS}' needs two lengths before it whose ratio is a whole number > 1, e.g. 2k,4k,...,64k")
    ratio, values = second // first, [first, second]
    while values[-1] < last:
        values.append(values[-1] * ratio)
    if values[-1] != last:
        raise ValueError(f"'{ELLIPSIS}' range {first},{second},...,{last}: {last} is not reached by repeated x{ratio}")
    return values


def parse_lengths(text: str) -> list[int]:
    """Parse a comma-separated list of lengths into sorted unique ints; "a,b,...,c" repeats the ratio b/a up to c."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("no lengths given: pass e.g. --lengths 2k,4k,8k")
    if "" in parts:
        raise ValueError(f"bad length list {text!r}: empty item")
    values: list[int] = []
    i = 0
    while i < len(parts):
        if parts[i] != ELLIPSIS:
            values.append(parse_length(parts[i]))
            i += 1
            continue
        if len(values) < 2 or i + 1 >= len(parts) or parts[i + 1] == ELLIPSIS:
            raise ValueError(f"bad length list {text!r}: '{ELLIPSIS}' must sit between two lengths and a last one, e.g. 2k,4k,...,64k")
        last = parse_length(parts[i + 1])
        values[-2:] = _expand_geometric(values[-2], values[-1], last)
        i += 2
    return sorted(set(values))


def format_length(value: int) -> str:
    """Short label for a length: 65536 -> "64K", 100 -> "100"."""
    for suffix, unit in (("M", UNITS["m"]), ("K", UNITS["k"])):
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)
