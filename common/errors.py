"""Error and warning types raised on bad user input."""


class FedrecError(Exception):
    """Base class of the errors fedrec raises for bad input or state."""


class ConfigError(FedrecError, ValueError):
    """A setting is unknown, missing, ill-typed or out of range."""


class DataError(FedrecError, ValueError):
    """An input data file or partition is malformed or unusable."""


class DataWarning(UserWarning):
    """Data is usable but something is undefined or suspicious (e.g. empty test list)."""
