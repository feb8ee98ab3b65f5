"""The one exception type for bad user input.

Raised at public boundaries (files, STAR labels, options) with a message that names the file or
option, what was expected and what came. The CLI prints it as one line and exits with status 1.
"""


class InputError(ValueError):
    """User input that cannot be processed (corrupt file, missing label, impossible size, ...)."""
