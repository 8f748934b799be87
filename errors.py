"""The one exception type for mistakes a user can make (bad path, unknown target, nonsense workload).

The CLI turns it into a single sentence on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class ShrinkError(Exception):
    """A problem with the user's input, stated as one sentence that says what to do about it."""
