"""A new user's first day (issue 10): misuse gets a clear message at once, nothing given is
silently ignored, engine counts follow one rule, and ipyparallel habits say what to use.

Against real engine kernels; the CLI through the installed ``ipylb`` script in subprocesses.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import ipylb
import pytest
from ipylb import error, limits
from ipylb.error import ClientClosed, RemoteError

IPYLB = str(Path(sys.executable).with_name("ipylb"))


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([IPYLB, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A private Jupyter runtime directory for this test and the commands it runs; a
    cluster a failed test left running is stopped."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    yield tmp_path
    for path in tmp_path.glob("ipylb-*.json"):
        cli("cluster", "stop", "--profile", path.stem.removeprefix("ipylb-"))


# -- item 2: arguments that would be ignored -------------------------------------------


@pytest.mark.parametrize("kwargs, names", [
    ({"profile": "p", "engines": 2}, "profile='p'"),
    ({"url_or_file": "some/file.json", "engines": 1}, "connection file or url"),
    ({"url_or_file": "tcp://127.0.0.1:5555", "engines": 1}, "connection file or url"),
])
def test_engines_with_a_running_cluster_is_refused(kwargs, names, runtime):
    with pytest.raises(ValueError, match="starts a private cluster") as e:
        ipylb.Client(**kwargs)
    assert names in str(e.value) and "connects to a running one" in str(e.value)
    assert list(runtime.glob("ipylb-local-*.json")) == []  # nothing was started


@pytest.mark.parametrize("kwargs, names", [
    ({"profile": "p", "hwm": 4}, "hwm"),
    ({"url_or_file": "some/file.json", "restart": False}, "restart"),
    ({"scheme": "lru", "heartbeat_timeout": 5.0}, "scheme, heartbeat_timeout"),
    ({"profile": "p", "kernel": "ssh-engines"}, "kernel"),
])
def test_settings_of_a_private_cluster_with_a_running_one_are_refused(kwargs, names, runtime):
    """The same kind: what only configures a cluster this client starts is refused, not
    ignored, when the client connects to a running one (which keeps its own settings)."""
    with pytest.raises(ValueError, match="configure\\(s\\) a cluster this client starts") as e:
        ipylb.Client(**kwargs)
    assert str(e.value).startswith(f"{names} configure(s)")
    assert "ipylb cluster start --scheme S --hwm H" in str(e.value)
    assert list(runtime.glob("ipylb-*.json")) == []  # nothing was started


def test_a_file_and_a_profile_together_are_refused():
    with pytest.raises(ValueError, match="pass one of them"):
        ipylb.Client("some/file.json", profile="p")


def test_magics_that_take_no_arguments_refuse_them():
    from ipylb.magics import LbMagics
    from IPython.core.error import UsageError

    magics = LbMagics(None)
    for name in ("lb_stop", "lb_dashboard", "lb_interrupt"):
        with pytest.raises(UsageError, match="takes no arguments"):
            getattr(magics, name)("--profile p")


# -- item 3: one engine-count rule -------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 100_000, 2.0, True, "4"])
def test_bad_engine_counts_are_refused_before_anything_starts(n, runtime):
    with pytest.raises(ValueError, match=f"from 1 to {limits.MAX_ENGINES}"):
        ipylb.Client(engines=n)
    assert list(runtime.glob("ipylb-local-*.json")) == []


@pytest.mark.parametrize("n", ["0", "5000"])
def test_lb_start_follows_the_engine_count_rule(n):
    from ipylb.magics import LbMagics
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=f"-n must be an int from 1 to 1024, got {n}"):
        LbMagics(None).lb_start(f"-n {n}")


def test_engine_count_warning_threshold(monkeypatch):
    monkeypatch.setattr(limits.os, "cpu_count", lambda: 2)
    assert limits.check_engine_count(8) is None
    hint = limits.check_engine_count(9, "-n")
    assert hint.startswith("-n=9: 9 engine kernels on a machine with 2 CPU(s)")
    assert limits.check_engine_count(0, "-n", minimum=0) is None
    with pytest.raises(ValueError, match="-n must be an int from 1 to 1024, got 1025"):
        limits.check_engine_count(1025, "-n")


def test_many_engines_warn_and_show_start_up_progress(monkeypatch, capfd):
    monkeypatch.setattr(limits, "WARN_PER_CPU", 0)  # so that 2 engines are "many"
    monkeypatch.setattr(limits, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setenv("IPYLB_PROGRESS", "1")
    with pytest.warns(RuntimeWarning, match="engines=2: 2 engine kernels"):
        rc = ipylb.Client(engines=2)
    try:
        assert len(rc.ids) == 2
    finally:
        rc.shutdown()
    err = capfd.readouterr().err
    assert "ipylb: 2/2 engines up\n" in err


def test_progress_respects_ipylb_progress_0(monkeypatch, capsys):
    monkeypatch.setattr(limits, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setenv("IPYLB_PROGRESS", "0")
    p = limits.StartProgress(4)
    p.update(1)
    p.done(4)
    assert capsys.readouterr().err == ""


def test_cli_engine_counts_follow_the_rule(runtime):
    r = cli("cluster", "start", "-n", "100000", "--profile", "big")
    assert r.returncode == 1
    assert "-n must be an int from 0 to 1024, got 100000" in r.stderr
    r = cli("engine", "add", "-n", "0", "--profile", "big")
    assert r.returncode == 1 and "-n must be an int from 1 to 1024, got 0" in r.stderr
    assert list(runtime.glob("ipylb-*.json")) == []


# -- item 6: the command line --------------------------------------------------------


@pytest.mark.parametrize("argv", [[IPYLB, "--version"], [IPYLB, "-V"],
                                  [sys.executable, "-m", "ipylb", "--version"]])
def test_version(argv):
    import ipykernel
    import jupyter_client

    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ipylb {ipylb.__version__}"
    assert lines[1].startswith(f"Python {sys.version.split()[0]} ")
    assert f"ipykernel {ipykernel.__version__}" in lines
    assert f"jupyter_client {jupyter_client.__version__}" in lines


@pytest.mark.parametrize("args", [[], ["cluster"], ["engine"], ["nonsense"]])
def test_a_missing_or_unknown_subcommand_exits_2_with_usage(args):
    r = cli(*args)
    assert r.returncode == 2
    assert "usage: ipylb" in r.stderr


def test_python_m_ipylb_is_ipylb():
    r = subprocess.run([sys.executable, "-m", "ipylb", "cluster", "status", "--profile",
                        "never-started-h10"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no cluster is running for profile 'never-started-h10'" in r.stderr


def _parsers(p: argparse.ArgumentParser, path: str):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_cli_option_has_a_help_line_with_its_default():
    from ipylb import cli as ipylb_cli
    from ipylb import soak, top
    from ipylb.bench import parser as bench_parser
    from ipylb.demo import parser as demo_parser

    checked = 0
    for root in (ipylb_cli._parser(), bench_parser(), demo_parser(), soak.parser(),
                 top._parser()):
        for path, p in _parsers(root, root.prog):
            fmt = p._get_formatter()
            for action in p._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                assert action.help, f"{path} {action.option_strings}: no help line"
                if not action.option_strings:
                    continue
                checked += 1
                text = fmt._get_help_string(action)
                if action.required:  # no default to give
                    assert "%(default)" not in text, f"{path} {action.option_strings}"
                else:  # argparse's "(default: X)", or the default said in words: not both
                    words = "default" in action.help.replace("(default: %(default)s)", "")
                    appended = "%(default)" in text
                    assert words != appended, f"{path} {action.option_strings}: {text}"
    assert checked > 40
    text = " ".join(cli("engine", "join", "--help").stdout.split())
    assert "Jupyter runtime directory (default: default) --cluster-file" in text  # was: "...
    assert "controller) --timeout" in text  # (default: default) (default: None)", "...) (default: None)"


# -- item 7: a cluster without engines -------------------------------------------------


def test_empty_cluster_says_tasks_wait_and_habits_of_a_shared_cluster(runtime):
    r = cli("cluster", "start", "-n", "0", "--daemon", "--profile", "empty")
    assert r.returncode == 0, r.stderr
    assert "tasks wait until `ipylb engine add -n K --profile empty`" in r.stderr
    rc = ipylb.Client(profile="empty")
    try:
        view = rc.load_balanced_view()
        with pytest.warns(RuntimeWarning, match="no engines: tasks wait until one registers "
                                                "\\(`ipylb engine add -n K`"):
            ar = view.apply_async(pow, 2, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once is enough
            ar2 = view.apply_async(pow, 2, 9)
        assert not ar.wait(0.5)
        r = cli("engine", "add", "-n", "1", "--profile", "empty")
        assert r.returncode == 0, r.stderr
        assert (ar.get(60), ar2.get(60)) == (256, 512)
        # item 10: shutdown() of a client that did not start its cluster only disconnects
        import ipylb.client.client as client_module

        client_module._said_shutdown_disconnects = False
        with pytest.warns(UserWarning, match=r"only disconnects.*rc\.stop_cluster\(\)"):
            rc.shutdown()
        for use in (lambda: rc.ids, rc.load_balanced_view, lambda: view.apply_async(pow, 2, 2)):
            with pytest.raises(ClientClosed, match="closed") as e:
                use()
            assert isinstance(e.value, RuntimeError)  # what a closed client raised before
        rc2 = ipylb.Client(profile="empty")  # the cluster runs on
        assert len(rc2.ids) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per process
            rc2.shutdown()
    finally:
        rc.close()
    r = cli("cluster", "stop", "--profile", "empty")
    assert r.returncode == 0, r.stderr


# -- item 10: ipyparallel habits ---------------------------------------------------------


def test_ipyparallel_direct_interface_says_what_to_use(rc):
    with pytest.raises(TypeError, match=r"^rc\[:\]: ipylb has .*task interface only.*load_balanced_view"):
        rc[:]  # as written, not rc[slice(None, None, None)]
    with pytest.raises(TypeError, match=r"^rc\[1:3\]: ipylb has"):
        rc[1:3]
    with pytest.raises(TypeError, match=r"^rc\[0\]: ipylb has .*task interface only"):
        rc[0]
    with pytest.raises(AttributeError, match="task interface only"):
        rc.direct_view()
    assert not hasattr(rc, "broadcast_view")
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        _ = rc.no_such_thing
    with pytest.raises(TypeError, match=r"rc\.shutdown\(hub=True\).*rc\.stop_cluster\(\)"):
        rc.shutdown(hub=True)
    assert not rc.closed and rc.load_balanced_view().apply_sync(pow, 2, 3) == 8


# -- item 8: no error text repeats its class name --------------------------------------


def _instances():
    for name, cls in inspect.getmembers(error, inspect.isclass):
        if not issubclass(cls, BaseException) or cls.__module__ != error.__name__:
            continue
        if name == "CompositeError":
            yield cls("2 of 3 tasks failed", [("ValueError", "bad", "", {"engine_id": 0})])
        elif issubclass(cls, error._SchedulerError):
            yield cls("task 1 failed", "", {"engine_id": 0})
        elif cls is RemoteError:
            yield cls("ValueError", "bad", "", {"engine_id": 1})
            yield cls("RemoteError", "task ended with status error")
        else:
            yield cls("something went wrong")


def test_no_error_text_repeats_its_class_name():
    seen = 0
    for e in _instances():
        text = "".join(traceback.format_exception_only(type(e), e))
        assert text.count(type(e).__name__) == 1, text
        seen += 1
    assert seen >= 12


# -- items 8 and 9: the magics ------------------------------------------------------------


def test_magics_interrupt_bind_and_unload_while_tasks_run(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    assert shell.run_cell("%load_ext ipylb").success
    try:
        r = shell.run_cell("%lb_start -n 1 -o lbrc")
        assert r.success, r.error_in_exec
        assert isinstance(shell.user_ns["lbrc"], ipylb.Client)
        assert "bound to lbrc" in capsys.readouterr().out
        assert shell.run_cell("%%lb -a -o slow\nimport time\ntime.sleep(60)").success
        ar = shell.user_ns["slow"]
        deadline = time.monotonic() + 30
        while not any(row[2] == "assigned" for row in shell.user_ns["lbrc"].story(ar.msg_ids[0])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the engine has the task: let it start sleeping
        assert shell.run_cell("%lb_interrupt").success
        assert "interrupted engine(s) 0" in capsys.readouterr().out
        with pytest.raises(RemoteError, match="KeyboardInterrupt"):
            ar.get(30)
        assert shell.run_cell("%%lb -a -o slow2\nimport time\ntime.sleep(60)").success
        ar2 = shell.user_ns["slow2"]
    finally:
        assert shell.run_cell("%unload_ext ipylb").success
    out = capsys.readouterr().out
    assert "unloading the ipylb extension (%unload_ext/%reload_ext): stopped the cluster " \
           "(1 engine, scheme leastload); 1 task(s) were still running" in out
    with pytest.raises(ClientClosed) as e:
        ar2.get(5)
    assert "when unloading the ipylb extension" in str(e.value)
    assert "rc.shutdown()" not in str(e.value)
    assert "".join(traceback.format_exception_only(type(e.value), e.value)).count("ClientClosed") == 1


@pytest.mark.parametrize("args, complaint", [
    (["--core", "--rounds", "5"], "--rounds has no effect with --core"),
    (["--schemes", "--workloads", "map"], "--workloads has no effect with --schemes"),
    (["--chart", "x.png"], "--chart has no effect with the farm run"),
    (["--core", "--schemes"], "pick one"),
])
def test_bench_options_that_would_be_ignored_are_refused(args, complaint):
    r = cli("bench", *args)
    assert r.returncode == 2 and complaint in r.stderr
