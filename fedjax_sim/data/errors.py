"""The error every data loader raises for bad or missing files."""


class DataError(ValueError):
    """A data file is missing, corrupt or malformed; the message names the file and the fix."""
