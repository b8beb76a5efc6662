"""The one exception type for bad input (data, flags, model folders)."""


class AttrclfError(Exception):
    """Bad input a user can fix: the message says what, where and what to do.

    Raised anywhere in attrclf; the CLIs catch it and print the message without a traceback.
    """
