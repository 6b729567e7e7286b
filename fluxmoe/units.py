"""Byte quantities as users write them ("46GiB", "80 GB", "4.5e10") and as we print them."""

import re

from fluxmoe.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

GiB = 2**30


def parse_bytes(text: str | int | float, field: str = "size") -> int:
    """Parse '46GiB', '46 GB', '4.5e10' or a number into bytes; errors name the field."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{field}: must be >= 0 bytes, got {text!r}")
        return int(text)
    match = _PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"{field}: cannot read {text!r} as a size; write e.g. '46GiB', '80GB' or '4.5e10'")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes as GiB/MiB with two decimals, the unit users budget in."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.2f} KiB"
    return f"{n:.0f} B"


def format_bytes_up(n: float) -> str:
    """Like format_bytes, rounded up at the last digit shown: a minimum that, as printed, still works."""
    import math

    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{math.ceil(n / size * 100 - 1e-9) / 100:.2f} {unit}"
    return f"{math.ceil(n):.0f} B"
