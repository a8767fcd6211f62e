"""soups: fine-tune many image classifiers, track them in MLflow, average the best into a soup."""


class SoupsError(Exception):
    """A user's mistake or a bad input: the message names the file, run or parameter at fault
    and what to do about it. Entry points print it on one line and exit non-zero."""


class Stopped(Exception):
    """Training stopped on purpose before its last epoch (a pruned sweep trial): the run ends
    KILLED with the reason in a tag, and never becomes a soup ingredient."""
