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

    def __reduce__(self):
        # Pickled whole (subclass, param, code): the engine process sends its errors to the server's.
        return _rebuild, (type(self), self.message, self.param, self.code)


def _rebuild(cls: type, message: str, param: str | None, code: str | None) -> ArleError:
    err = Exception.__new__(cls)
    ArleError.__init__(err, message, param=param, code=code)
    return err
