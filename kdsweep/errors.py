"""The one exception type for mistakes a user can fix.

Anything raised as a :class:`UserError` is printed by the CLI as a plain message
(no traceback) and ends the process with exit status 2. Everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a config key, a file, a value.

    The message must name what is wrong and how to fix it.
    """

    exit_code = 2
