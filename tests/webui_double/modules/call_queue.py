"""Double of modules/call_queue.py: ``queue_lock`` (a plain threading.Lock) that generations and model loads hold;
``wrap_queued_call(func)`` runs ``func`` under it."""
import threading
from functools import wraps

queue_lock = threading.Lock()


def wrap_queued_call(func):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f
