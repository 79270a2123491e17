"""Double of modules/errors.py: exceptions in callbacks are reported and swallowed; tests can read them."""
import sys
import traceback

reported = []


def report(message, *, exc_info=False):
    text = message
    if exc_info:
        text += "\n" + traceback.format_exc()
    reported.append(text)
    print("***", text, file=sys.stderr)


def display(e, task, *, full_traceback=False):
    report(f"{task}: {type(e).__name__}: {e}", exc_info=True)


def print_error(message, exc_info=False):
    report(message, exc_info=exc_info)
