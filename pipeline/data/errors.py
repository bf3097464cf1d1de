"""The two ways data goes wrong: the user's input is unusable (`DataError`, shown as one line and the job
stops), or one sample is (`BadSample`, skipped and counted by reason)."""
from __future__ import annotations

from pipeline.errors import UserError


class DataError(UserError, ValueError):
    """A problem with the data the user pointed at; the message is meant to be shown as is."""


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
