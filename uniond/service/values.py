"""Option dictionaries in, values out: the one place where D-Bus variants meet plain
Python values."""

from __future__ import annotations

from typing import Any

from dbus_next import Variant

from uniond.mounts.options import ForeignValue

_PLAIN_SIGNATURES = {"b", "s", "t", "u", "i", "x", "n", "q", "y", "d", "as"}


def unwrap_options(raw: dict[str, Variant]) -> dict[str, Any]:
    """Variants to Python values; types no option uses stay recognisably foreign."""
    return {
        key: v.value if v.signature in _PLAIN_SIGNATURES else ForeignValue(v.signature)
        for key, v in raw.items()
    }


def wrap(value: Any) -> Variant:
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("t", value)
    return Variant("s", str(value))
