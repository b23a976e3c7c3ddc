"""The joblib backend against the lab: joblib's Parallel, and scikit-learn's GridSearchCV, on the hosts."""

from __future__ import annotations

import getpass

import joblib
import pytest
from joblib import Parallel, delayed, parallel_config

import sshjobs.joblib  # noqa: F401  (registers "sshjobs")
from sshjobs import Executor, RemoteError

from .conftest import quiet, wait_no_processes


def square_where(x):
    import getpass

    return x * x, getpass.getuser()


def test_parallel_runs_on_every_slot_of_every_host(lab, inv):
    quiet([h.user for h in inv.hosts])
    with parallel_config(backend="sshjobs", inventory=lab.inventory_path):
        assert joblib.effective_n_jobs(-1) == 10  # ten hosts of one slot each
        out = Parallel(n_jobs=-1)(delayed(square_where)(i) for i in range(1000))
    assert [v for v, _ in out] == [i * i for i in range(1000)]
    assert {user for _, user in out} == {h.user for h in inv.hosts}
    assert getpass.getuser() not in {h.user for h in inv.hosts}
    # the Executor made for the call closed with it: nothing is left on the hosts
    assert wait_no_processes([h.user for h in inv.hosts], timeout=10) == {}


def test_the_backend_is_refused_without_an_inventory():
    with pytest.raises(TypeError, match="inventory"):
        with parallel_config(backend="sshjobs"):
            Parallel()(delayed(abs)(-1) for _ in range(2))


def test_a_tasks_exception_is_raised_by_parallel_as_its_own_type(inv):
    def check(i):
        if i == 7:
            raise ValueError(f"bad item {i}")
        return i

    with Executor(inv) as ex, parallel_config(backend="sshjobs", executor=ex):
        with pytest.raises(ValueError, match="bad item 7") as info:
            Parallel(n_jobs=-1)(delayed(check)(i) for i in range(100))
        assert isinstance(info.value, RemoteError)
        # the Executor goes on serving after the failed call
        assert Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(5)) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_grid_search_cv_runs_on_the_hosts_with_scikit_learn_installed_by_sshjobs(fresh_inv):
    import numpy
    import sklearn
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01, 0.1]}
    local = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)

    inv = fresh_inv("node[07-08]")
    # the controller's versions, so that estimators unpickle alike on both sides
    installed = inv.install([f"scikit-learn=={sklearn.__version__}", f"numpy=={numpy.__version__}"])
    assert all(r.ok for r in installed), [r.error for r in installed]
    ran_on: dict[str, int] = {}

    def record(host, event, info):
        if event == "done":
            ran_on[host] = ran_on.get(host, 0) + info["jobs"]

    with parallel_config(backend="sshjobs", inventory=inv, on_event=record):
        remote = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert list(remote.cv_results_["mean_test_score"]) == list(local.cv_results_["mean_test_score"])
    assert set(ran_on) == {"node07", "node08"} and sum(ran_on.values()) >= 2
