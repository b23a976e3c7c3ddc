"""Environments that last: what an Inventory or a Cluster installed, the inventory's
`requirements` key, and calls whose environment exists starting straight in it."""

from __future__ import annotations

import asyncio
import os

import pytest

from sshjobs import Inventory, InventoryError
from sshjobs.provisioning import EnvSpec, merge_requirements, requirement_name



def where():
    """The job's interpreter, its environment's folder and its worker's pid."""
    import os
    import sys

    return sys.executable, os.path.realpath(sys.prefix), os.getpid()


def uses_humanize():
    import sys

    import humanize

    return humanize.__name__, sys.prefix


def importable(*names):
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is not None]


# -- requirement sets ------------------------------------------------------------------------
def test_merged_requirements_replace_a_project_named_again():
    assert requirement_name("NumPy>=2") == requirement_name("numpy") == requirement_name("numpy[extra] ; python_version>'3'")
    assert requirement_name("Foo_Bar.baz==1") == "foo-bar-baz"
    assert merge_requirements(["numpy<2", "six"], None, ["numpy>=2", "attrs"]) == ["six", "numpy>=2", "attrs"]
    assert merge_requirements(["--index-url http://a/simple", "six"], ["--index-url http://a/simple"]) == [
        "six", "--index-url http://a/simple"]


def test_an_environments_alias_depends_on_the_interpreter_the_set_and_the_index():
    spec = EnvSpec.parse(["six", "attrs"])
    same = EnvSpec.parse(["attrs", "six", "six"])
    assert spec.alias("python3", {}) == same.alias("python3", {"OTHER": "x"})
    assert spec.alias("python3", {}) != spec.alias("/opt/py/bin/python3", {})
    assert spec.alias("python3", {}) != spec.alias("python3", {"UV_INDEX_URL": "http://mirror/simple"})
    assert spec.alias("python3", {}) != EnvSpec.parse(["six"]).alias("python3", {})


def write(tmp_path, text):
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    return path


def test_the_requirements_key_in_defaults_groups_and_hosts_adds_up(tmp_path):
    (tmp_path / "reqs.txt").write_text("# for node03\nidna  # a comment\n\n")
    inv = Inventory.load(write(tmp_path, """
[defaults]
requirements = ["six"]

[groups.web]
requirements = ["attrs"]
env = { A = "1" }

[hosts.node01]
[hosts.node02]
groups = ["web"]
env = { B = "2" }
[hosts.node03]
requirements = "reqs.txt"
"""))
    assert [h.requirements for h in inv] == [("six",), ("six", "attrs"), ("six", "idna")]
    assert dict(inv["node02"].env) == {"A": "1", "B": "2"}


def test_requirements_key_errors_name_the_table(tmp_path):
    with pytest.raises(InventoryError, match=r"host 'a': 'requirements' must be a list of requirements or a"):
        Inventory.load(write(tmp_path, "[hosts.a]\nrequirements = 3\n"))
    with pytest.raises(InventoryError, match=r"host 'a': 'requirements': cannot read the requirements file .*nope.txt"):
        Inventory.load(write(tmp_path, '[hosts.a]\nrequirements = "nope.txt"\n'))
    with pytest.raises(InventoryError, match=r"\[groups.gpu\]: no host is in group 'gpu'"):
        Inventory.load(write(tmp_path, '[groups.gpu]\nrequirements = ["six"]\n[hosts.a]\n'))
    with pytest.raises(InventoryError, match=r"\[groups.web\]: unknown key 'address'"):
        Inventory.load(write(tmp_path, '[groups.web]\naddress = "x"\n[hosts.a]\ngroups = ["web"]\n'))


# -- on the lab ------------------------------------------------------------------------------
@pytest.mark.slow
def test_install_lasts_for_the_inventorys_later_calls_and_adds_up(lab, fresh_inv):
    inv = fresh_inv("node01,node02")
    assert all(not r.ok and r.error.type == "ModuleNotFoundError" for r in inv.gather(uses_humanize))
    assert all(r.ok for r in inv.install(["humanize"]))
    assert inv.installed == ["humanize"]
    ran = inv.gather(uses_humanize)
    assert all(r.ok and r.value[0] == "humanize" and "/envs/" in r.value[1] for r in ran), ran
    mapped = inv.map(lambda x: (__import__("humanize").__name__, x), range(6))
    assert [r.value for r in mapped] == [("humanize", x) for x in range(6)]
    # a second install adds to the first: both are importable in the calls after it
    assert all(r.ok for r in inv.install(["iniconfig"]))
    assert inv.installed == ["humanize", "iniconfig"]
    assert [r.value for r in inv.gather(importable, "humanize", "iniconfig")] == [["humanize", "iniconfig"]] * 2
    # a Cluster of this Inventory runs in it too
    async def go():
        async with inv.connect() as cluster:
            return await cluster.gather(importable, "humanize", "iniconfig")

    assert [r.value for r in asyncio.run(go())] == [["humanize", "iniconfig"]] * 2


@pytest.mark.slow
def test_a_call_whose_environment_exists_starts_its_first_worker_in_it(lab, fresh_inv):
    inv = fresh_inv("node03,node04")
    first = inv.gather(where, requirements=["humanize"])  # builds it: the workers start again in it
    assert all(r.ok for r in first), first
    env = {r.host: r.value[1] for r in first}  # each host's environment, in its user's cache
    events = []

    def in_env(results):
        return all(r.ok and r.value[1] == f.value[1] for r, f in zip(results, first))

    # a one-shot call: its first worker starts through the environment's alias, nothing installs
    again = inv.gather(where, requirements=["humanize"], on_event=lambda host, event, info: events.append(event))
    assert in_env(again) and all("/envs/@" in r.value[0] for r in again), again
    assert "connected" in events and "installing" not in events, events

    async def session(**options):
        async with inv.connect(**options) as cluster:
            hello = [s.hello["pid"] for s in cluster.hosts]
            got = await cluster.gather(where, requirements=["humanize"])
            warm = await cluster.gather(where, requirements=["humanize"])
            sub = await cluster.submit(where)
            return hello, got, warm, sub

    # a session that names its requirements: the workers that said hello run the jobs
    hello, got, warm, sub = asyncio.run(session(requirements=["humanize"]))
    assert in_env(got) and [r.value[2] for r in got] == hello
    assert [r.value for r in warm] == [r.value for r in got]
    assert sub.ok and sub.value[1] == env[sub.host]
    # a session that learns them from its first call: later calls pay nothing again
    hello, got, warm, sub = asyncio.run(session())
    assert in_env(got) and in_env(warm) and [r.value for r in warm] == [r.value for r in got]
    assert sub.ok and sub.value[1] == env[sub.host]
    # a host whose alias was removed meanwhile gets it again
    envs = fresh_inv.workdir(2) / "envs"
    for p in envs.iterdir():
        if p.name.startswith("@"):
            p.unlink()
    redo = inv.gather(where, requirements=["humanize"])
    assert all(r.ok for r in redo) and all(r.value[1] == env[r.host] for r in redo)
    assert [p for p in envs.iterdir() if p.name.startswith("@")], "the alias is made again"


@pytest.mark.slow
def test_inventory_requirements_key_runs_every_call_in_its_environment(lab, fresh_inv):
    base = fresh_inv("node05,node06,node07")
    from dataclasses import replace

    hosts = [replace(h, requirements=r) for h, r in zip(base.hosts, [("humanize",), ("humanize", "iniconfig"), ()])]
    inv = Inventory(hosts)
    got = inv.gather(importable, "humanize", "iniconfig")
    assert [r.value for r in got] == [["humanize"], ["humanize", "iniconfig"], []], got
    mapped = inv.map(lambda x: __import__("importlib.util").util.find_spec("humanize") is not None, range(30))
    by_host = {}
    for r in mapped:
        by_host.setdefault(r.host, set()).add(r.value)
    assert by_host.get("node05", {True}) == {True} and by_host.get("node07", {False}) == {False}
    # the call's own requirements add to the host's
    assert [r.value for r in inv.gather(importable, "humanize", "iniconfig", requirements=["iniconfig"])] == [
        ["humanize", "iniconfig"], ["humanize", "iniconfig"], ["iniconfig"]]


@pytest.mark.slow
def test_prune_removes_an_environments_alias_with_it(lab, fresh_inv):
    inv = fresh_inv("node08")
    assert inv.gather(where, requirements=["humanize"])[0].ok
    envs = fresh_inv.workdir(7) / "envs"
    assert any(p.name.startswith("@") for p in envs.iterdir())
    (pruned,) = inv.prune_envs(0)
    assert len(pruned.value["removed"]) == 1
    assert [p.name for p in envs.iterdir() if not p.name.endswith(".lock")] == []
    ran = inv.gather(where)  # no requirements: the host's own python
    assert ran[0].ok and "/envs/" not in ran[0].value[1]
    assert os.path.isdir(envs)
