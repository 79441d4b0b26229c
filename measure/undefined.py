"""The one place that decides what an undefined value becomes: an error, or NaN with a warning.

A measure is mathematically undefined for some layers — a constant layer has no variance to
normalise by, a debiased self-HSIC can come out negative. Every caller (the store engine, the
in-memory ``compare``, the model-pair API) reports it through ``undefined_value`` with the
measure, the layer and the store (or argument) it concerns, so that the messages read alike and
the policy (``"raise"`` or ``"nan"``) is applied the same way everywhere.
"""

from __future__ import annotations

import warnings
from typing import Literal

from .errors import MeasureError

__all__ = ["API_ADVICE", "CLI_ADVICE", "Policy", "undefined_value"]

Policy = Literal["raise", "nan"]

# (what to do instead, appended to the error; what became NaN, appended to the warning)
CLI_ADVICE = (" Drop the layer with --layers, or pass --undefined nan.", " Its row/column is NaN.")
API_ADVICE = (" Pass undefined='nan' to get NaN instead.", "")


def undefined_value(measure: str, where: str, reason: str, policy: Policy = "raise", *,
                    advice: tuple[str, str] = CLI_ADVICE, stacklevel: int = 2) -> None:
    """Raise ``MeasureError``, or warn that the value becomes NaN, for ``measure`` undefined at ``where``.

    Parameters
    ----------
    measure : str
        The measure's name (``"cka"``).
    where : str
        The layer and store (``"layer 'fc1' of ZarrStore('a.zarr')"``) or the argument (``"x"``).
    reason : str
        Why the value is undefined (``"its self-HSIC is zero (a constant layer) or negative"``).
    policy : {"raise", "nan"}, default="raise"
        ``"raise"`` raises; anything else warns and lets the caller write NaN.
    advice : (str, str), default=CLI_ADVICE
        Text appended to the error (how to go on) and to the warning (what became NaN);
        ``API_ADVICE`` names the Python argument instead of the command-line flags.
    stacklevel : int, default=2
        As for ``warnings.warn``, counted from the caller of this function.

    Raises
    ------
    MeasureError
        "{measure} is undefined for {where}: {reason}." followed by ``advice[0]``, when
        ``policy == "raise"``.

    Examples
    --------
    >>> undefined_value("cka", "x", "its self-HSIC is zero")
    Traceback (most recent call last):
    ...
    measure.errors.MeasureError: cka is undefined for x: its self-HSIC is zero. Drop the layer with --layers, \
or pass --undefined nan.
    """
    message = f"{measure} is undefined for {where}: {reason}."
    fix, nan_note = advice
    if policy == "raise":
        raise MeasureError(message + fix)
    warnings.warn(message + nan_note, stacklevel=stacklevel + 1)
