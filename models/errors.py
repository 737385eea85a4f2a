"""Exceptions that biozoo raises for bad input.

Every message is one line that says what was wrong and what to do. The CLI prints it without a traceback.
"""

import difflib
from collections.abc import Iterable


class BiozooError(Exception):
    """Base class: a user error with a one-line explanation."""


class UnknownNameError(BiozooError, KeyError):
    """An unknown model, pretrained tag, loss, converter or task name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(BiozooError):
    """A checkpoint that is missing, corrupt, unsafe, or does not match the model."""


class ShapeError(BiozooError, ValueError):
    """An input tensor whose shape the model cannot take."""


class DataNotFoundError(BiozooError, FileNotFoundError):
    """A dataset that is not on disk and could not be downloaded."""


def check_shape(name: str, x, expected: str, ok: bool) -> None:
    """Raise a ShapeError naming the model, the expected layout and the shape it got."""
    if not ok:
        raise ShapeError(f"{name} expects input of shape {expected}, got {tuple(x.shape)}")


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean: a, b?' for the closest names, or ''."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    """Raise an UnknownNameError naming the closest and all known choices when `value` is not one of them."""
    choices = list(choices)
    if value not in choices:
        raise UnknownNameError(f"unknown {what} {value!r}.{suggest(str(value), choices)} Known: {', '.join(choices)}")
