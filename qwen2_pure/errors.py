"""The one exception type users see.

Every error a user can cause (a bad file, a bad argument, a prompt that does not fit) is raised as
`Qwen2PureError` with a message that names the file, key or argument at fault. The CLI prints such an
error as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


import json
from pathlib import Path


class Qwen2PureError(Exception):
    """A user-facing error with a message that says what is wrong and where."""


def read_json_object(path, expected: str = "a JSON object") -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or another JSON type is a Qwen2PureError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Qwen2PureError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Qwen2PureError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise Qwen2PureError(f"{path}: expected {expected}, found {type(data).__name__}")
    return data
