"""Errors the driver reports to the user as one line (exit code 2 for bad input)."""


class SweepError(Exception):
    """Base of the driver's own errors."""


class ManifestError(SweepError):
    """The manifest (or a file it names) is invalid; message names the file and the key."""


class RunDirError(SweepError):
    """The run directory is missing, locked, or does not hold what a rerun needs."""
