"""Errors a `gatekeeper` command ends with: one line on stderr and exit code 2, never a traceback.

A leaf module: it imports nothing from the project, so every command module — in `service/` and in
`models/` — can raise these without importing the `gatekeeper` command itself (`service.commands.main`).
"""

from __future__ import annotations


class UsageError(Exception):
    """The user asked for something impossible; shown as `gatekeeper COMMAND: error: <message>`, exit code 2."""


class DatabaseNotReady(UsageError):
    """The database cannot be used: unreachable, or without the gatekeeper's tables at the newest revision.

    Not a mistake in the command line but in the installation, so it is shown like an invalid setting:
    `gatekeeper: <message>`, exit code 2. The message names the database URL with its password masked.
    """
