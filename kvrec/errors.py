"""Errors written for the person running kvrec: the CLI prints them as one line,
`kvrec: error: ...`, and exits with the error's `exit_status` (2 unless it says otherwise)."""


class KvrecError(Exception):
    """Base of the errors that carry a message written for the person running kvrec."""

    exit_status = 2


class ConfigError(KvrecError):
    """A flag, an environment variable or a setting is wrong."""


class DataError(KvrecError):
    """An input file is missing or malformed; the message names the file and line."""


class ArtifactError(KvrecError):
    """A model artifact is missing, incomplete, or fails its manifest check."""


class RunFailed(KvrecError):
    """The command started but did not do its job (e.g. the demo's worker died): exit status 1."""

    exit_status = 1
