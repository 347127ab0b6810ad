"""The one exception type for bad input (config, job file, hosts, data, checkpoint).

The CLI prints its message as one paragraph and exits with code 2, without a traceback; everything else that goes
wrong is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Input the user can fix: the message says what is wrong and how to fix it."""

    exit_code = 2
