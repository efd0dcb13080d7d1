"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""


class PipelineError(Exception):
    """A problem with the user's input (recipe, data, paths) that they can fix."""


class StageFailed(PipelineError):
    """Training went wrong (for example a NaN loss); the stage stopped and kept its last good checkpoint."""
