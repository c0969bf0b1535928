"""User-facing errors: each becomes one line on stderr and a non-zero exit, never a traceback."""


def one_line(said: object, limit: int = 300) -> str:
    """``said`` (an exception, or another library's message) as one line of at most ``limit``
    characters, for quoting inside a one-line error."""
    return " ".join(str(said).split())[:limit]


class UserError(Exception):
    """A problem with the user's input (profile, behavior file, manifest, missing table)."""


class ConfigError(UserError):
    """A profile or behavior file is malformed, has an unknown key, or names an unknown profile."""


class ChecksumError(UserError):
    """A downloaded source artifact does not match the sha256 recorded in its manifest."""


class MissingInputError(UserError):
    """A stage needs a table that its upstream stage has not written yet."""


class CorruptOutputError(UserError):
    """A stage's output no longer matches what its record says (truncated, edited, replaced)."""


class LockedError(UserError):
    """Another run holds the profile's results."""
