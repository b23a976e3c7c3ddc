"""The jobs both sides run.  The baseline runs the very same source through ``python3 -c``."""

import inspect


def eigen(job_id):
    """Top-3 |eigenvalues| of a 200x200 standard-normal matrix seeded by the job id."""
    import numpy as np

    rng = np.random.default_rng(seed=job_id)
    values = np.abs(np.linalg.eigvals(rng.standard_normal((200, 200))))
    return sorted(values.tolist(), reverse=True)[:3]


def noop():
    return None


def echo_stamped(data):
    """Echo a bytes argument, with the moment it arrived (the lab shares the controller's clock)."""
    import time

    return time.time(), data


def make_double():
    factor = 2

    def double(x):
        return x * factor

    return double


def source(fn) -> str:
    return inspect.getsource(fn)
