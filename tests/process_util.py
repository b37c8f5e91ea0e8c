"""Process checks shared by the end-to-end tests."""

import os


def gone(pid: int) -> bool:
    """Whether no process has this pid any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
