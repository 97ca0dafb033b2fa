"""The one exception type for user mistakes; the server maps it to an HTTP 400."""


class Ovis2Error(ValueError):
    """A bad input or configuration, with a message that says what to change."""


class StructuredOutputError(Ovis2Error):
    """A structured-output constraint the engine cannot enforce: a bad JSON schema, regex, choice or grammar."""
