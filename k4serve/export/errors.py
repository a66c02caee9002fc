"""The error every export command raises for a request it cannot carry out."""


class ExportError(ValueError):
    """An export that cannot be done as asked (or a tool that is missing); the message says what to change."""
