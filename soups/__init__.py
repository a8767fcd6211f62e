"""soups: fine-tune many image classifiers, track them in MLflow, average the best into a soup."""


class SoupsError(Exception):
    """A user's mistake or a bad input: the message names the file, run or parameter at fault
    and what to do about it. Entry points print it on one line and exit non-zero."""


class Stopped(Exception):
    """Training stopped on purpose before its last epoch (a pruned sweep trial): the run ends
    KILLED with the reason in a tag, and never becomes a soup ingredient."""


def one_line(error: BaseException) -> str:
    """The error's message on one line. A SoupsError raised in a DataLoader worker process (an
    unreadable image decoded there) arrives wrapped in the worker's whole traceback; its own
    message is that traceback from the line that starts with the exception's name to its end."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        own = f"{type(error).__module__}.{type(error).__qualname__}: "
        start = max((j for j, line in enumerate(lines) if line.startswith(own)), default=len(lines) - 1)
        lines = [lines[start].removeprefix(own), *lines[start + 1 :]]
    return " ".join(" ".join(lines).split())
