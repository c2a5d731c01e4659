"""The one exception type for mistakes a user can fix (bad path, bad shape, bad config).

The main scripts turn it into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or files; the message names the file or key."""
