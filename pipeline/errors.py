"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""


class PipelineError(Exception):
    """A problem with the user's input (recipe, data, paths) that they can fix."""


class StageFailed(PipelineError):
    """Training went wrong (for example a NaN loss); the stage stopped and kept its last good checkpoint."""


class Interrupted(BaseException):
    """SIGTERM (a scheduler's kill, a closed terminal) turned into an exception, so the stage can
    record why it stopped before the process ends. A BaseException, like KeyboardInterrupt, so no
    library's `except Exception` swallows it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))
