"""Exception types for problems a user can fix (bad input, bad arguments, damaged shards)."""


class DataError(ValueError):
    """A user-facing problem, described in one line that names the file (and line) at fault."""


class ShardError(DataError):
    """A shard that is missing, truncated, corrupt or does not match its manifest."""


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so a message always fits on one line, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
