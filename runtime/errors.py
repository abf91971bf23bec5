"""The one error type users see: a sentence saying what is wrong and what to do.

The CLI turns it into a message and exit code, the server into OpenAI error JSON.
Anything else that escapes is a bug and keeps its traceback.
"""


class ArleError(Exception):
    """A user-facing failure; str(err) is a complete sentence."""

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
