"""The one base of every error meant for the user: `python -m pipeline` prints it as one `error:` line and exits
with code 2, whichever verb raised it. Anything else is a bug in the pipeline and keeps its traceback.

Each module names its own kind (ConfigError, CheckpointError, DataError, ...) as a subclass of `UserError`; most
of them are also ValueErrors, because callers catch `ValueError` around the code that raises them."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or pointed at; the message is one line, shown as is."""
