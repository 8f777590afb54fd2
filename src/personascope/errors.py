"""User-facing errors.

Anything a user can fix (bad input, unknown alias, layer out of range, mismatched vector) raises
:class:`PersonascopeError` with a one-line message that names what is wrong and how to fix it. The CLI turns it
into that line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class PersonascopeError(ValueError):
    """A problem with the user's input or set-up, reported as one line."""
