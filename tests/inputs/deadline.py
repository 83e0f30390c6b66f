"""``within(seconds, fn, ...)``: run a call that must return in bounded time (a hang fails the test, it does not
hang the suite)."""
import threading
import time
import warnings


def within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread; fails the test if it has not returned after ``seconds``."""
    out = {}

    def target():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out["value"] = fn(*args, **kwargs)
            out["warnings"] = [str(w.message) for w in caught]
        except BaseException as err:  # re-raised in the test's thread
            out["error"] = err

    start = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    out["seconds"] = time.perf_counter() - start
    return out
