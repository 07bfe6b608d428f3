"""The one exception type users see.

Every error a user can cause (a bad file, a bad argument, a prompt that does not fit) is raised as
`Qwen2PureError` with a message that names the file, key or argument at fault. The CLI prints such an
error as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


class Qwen2PureError(Exception):
    """A user-facing error with a message that says what is wrong and where."""
