"""Glob patterns over dotted module names, shared by layer selection and reduction rules."""

from __future__ import annotations

import fnmatch
import re

__all__ = ["GLOB_CHARS", "glob_regex", "matches"]

GLOB_CHARS = set("*?[")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob over dotted module names: ``*`` and ``?`` stay within one name part, ``**`` crosses dots."""
    translated = fnmatch.translate(pattern.replace("**", "\0").replace("?", "\1"))
    # fnmatch turns '*' into '.*' and '?' into '.'; keep both inside one dotted part
    translated = translated.replace(".*", "[^.]*").replace("\0", ".*").replace("\1", "[^.]")
    return re.compile(translated)


def matches(pattern: str, layer: str) -> bool:
    """Whether ``layer`` is ``pattern`` itself or matches it as a glob."""
    return layer == pattern or bool(glob_regex(pattern).fullmatch(layer))
