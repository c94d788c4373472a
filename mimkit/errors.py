"""The one base class of every error a user can fix: the command line prints it as one line
(`mimkit: error: ...`) and exits with 2, instead of a traceback."""


class MimkitError(Exception):
    """A problem with the user's input (a file, a config key, a value, the machine), named in the message."""
