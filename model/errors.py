"""Errors that mean "the user must fix something": the CLI prints them as one line, exit 2."""


class KvrecError(Exception):
    """Base of the errors that carry a message written for the person running kvrec."""


class ConfigError(KvrecError):
    """A flag, an environment variable or a setting is wrong."""


class DataError(KvrecError):
    """An input file is missing or malformed; the message names the file and line."""


class ArtifactError(KvrecError):
    """A model artifact is missing, incomplete, or fails its manifest check."""
