"""The one exception type for mistakes a user can fix (bad config, missing path)."""


class UserError(Exception):
    """Raised for bad input. The CLI prints its message on one line and exits with 2."""
