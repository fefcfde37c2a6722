"""Graph and functional dependencies, impossible dependencies and timeouts on real engines."""

from __future__ import annotations

import time

import pytest
from ipylb import Dependency, depend, dependent, require
from ipylb.error import (
    DependencyTimeout,
    ImpossibleDependency,
    InvalidDependency,
    RemoteError,
    UnmetDependency,
)


def engine_id():
    from IPython import get_ipython

    return get_ipython().user_ns["ipylb_engine_id"]  # set in every engine's namespace


def sleep_then(x, delay):
    import time

    time.sleep(delay)
    return x


def fail():
    raise ValueError("planned failure")


def stamp():
    import time

    return time.time()


# -- after / follow -----------------------------------------------------------------


def test_after_runs_after(view):
    a = view.apply_async(sleep_then, "a", 0.3)
    with view.temp_flags(after=[a]):
        b = view.apply_async(stamp)
    assert b.get(30) >= a.metadata.completed.timestamp()


@pytest.mark.parametrize("form", ["ar", "msg_id", "dependency", "list"])
def test_after_accepts_every_form(view, form):
    a = view.apply_async(sleep_then, 1, 0.1)
    dep = {"ar": a, "msg_id": a.msg_ids[0], "dependency": Dependency(a), "list": [a.msg_ids[0]]}[form]
    with view.temp_flags(after=dep):
        assert view.apply_async(lambda: "ok").get(30) == "ok"


def test_follow_runs_where_the_dependency_ran(view):
    first = view.apply_async(engine_id)
    where = first.get(30)
    with view.temp_flags(follow=[first]):
        amr = view.map_async(lambda _: engine_id(), range(6))
    assert amr.get(30) == [where] * 6


def test_follow_any_of_several_engines(view):
    deps = [view.apply_async(sleep_then, i, 0.2) for i in range(2)]
    engines = {d.get(30) is not None and d.metadata.engine_id for d in deps}
    with view.temp_flags(follow=Dependency(deps, all=False)):
        ran = view.map_async(lambda _: engine_id(), range(4)).get(30)
    assert set(ran) <= engines


def test_finished_dependencies_count_at_once(view):
    a = view.apply_async(lambda: 1)
    a.get(30)
    with view.temp_flags(after=a, timeout=5):
        assert view.apply_sync(lambda: 2) == 2


def test_success_false_failure_true_runs_only_on_failure(view):
    bad = view.apply_async(fail)
    good = view.apply_async(lambda: 1)
    with view.temp_flags(after=Dependency(bad, success=False, failure=True)):
        cleanup = view.apply_async(lambda: "cleaned up")
    with view.temp_flags(after=Dependency(good, success=False, failure=True)):
        never = view.apply_async(lambda: "never")
    assert cleanup.get(30) == "cleaned up"
    with pytest.raises(ImpossibleDependency):
        never.get(30)


def test_dependencies_across_views_and_clients(rc):
    v1, v2 = rc.load_balanced_view(), rc.load_balanced_view()
    a = v1.apply_async(sleep_then, "x", 0.1)
    with v2.temp_flags(after=a):
        assert v2.apply_sync(lambda: "y") == "y"


def test_map_flags_apply_to_every_chunk(view):
    a = view.apply_async(sleep_then, 0, 0.3)
    with view.temp_flags(after=a):
        amr = view.map_async(lambda x: __import__("time").time(), range(6), chunksize=2)
    done = a.get(30) is not None and a.metadata.completed.timestamp()
    assert all(t >= done for t in amr.get(30))


# -- impossible dependencies ----------------------------------------------------------


def test_unknown_ids_are_invalid(view):
    with view.temp_flags(after=["no-such-task"]):
        ar = view.apply_async(lambda: 1)
    with pytest.raises(InvalidDependency, match="no-such-task"):
        ar.get(30)
    assert isinstance(InvalidDependency("x"), ImpossibleDependency)


def test_failed_dependency_is_impossible_and_cascades_with_its_chain(view):
    a = view.apply_async(fail)
    with view.temp_flags(after=a):
        b = view.apply_async(lambda: "b")
    with view.temp_flags(after=b):
        c = view.apply_async(lambda: "c")
    with pytest.raises(ImpossibleDependency) as info:
        c.get(30)
    msg = str(info.value)
    assert c.msg_ids[0] in msg and b.msg_ids[0] in msg and a.msg_ids[0] in msg
    assert info.value.ename == "ImpossibleDependency"
    with pytest.raises(ImpossibleDependency, match=a.msg_ids[0]):
        b.get(30)


def test_all_failed_with_any_is_impossible(view):
    bad = [view.apply_async(fail) for _ in range(2)]
    with view.temp_flags(after=Dependency(bad, all=False)):
        ar = view.apply_async(lambda: 1)
    with pytest.raises(ImpossibleDependency):
        ar.get(30)


def test_one_success_satisfies_any(view):
    deps = [view.apply_async(fail), view.apply_async(lambda: 1)]
    with view.temp_flags(after=Dependency(deps, all=False)):
        assert view.apply_async(lambda: "ran").get(30) == "ran"


def test_a_dependency_in_a_list_keeps_its_settings(view):
    deps = [view.apply_async(fail), view.apply_async(lambda: 1)]
    with view.temp_flags(after=[Dependency(deps, all=False)]):
        assert view.apply_async(lambda: "ran").get(30) == "ran"
    with pytest.raises(ValueError, match="different"):
        view.set_flags(after=[Dependency(deps[:1], all=False), deps[1]])


def test_follow_on_two_engines_with_all_is_impossible(view):
    a = view.apply_async(sleep_then, 0, 0.3)
    b = view.apply_async(sleep_then, 0, 0.3)  # hwm=1: the two run on different engines
    a.get(30), b.get(30)
    assert a.metadata.engine_id != b.metadata.engine_id
    with view.temp_flags(follow=[a, b]):
        ar = view.apply_async(lambda: 1)
    with pytest.raises(ImpossibleDependency, match="more than one engine|engines"):
        ar.get(30)


def test_impossibility_detected_while_waiting(view):
    slow_fail = view.apply_async(lambda: (__import__("time").sleep(0.3), 1 / 0))
    with view.temp_flags(after=slow_fail):
        ar = view.apply_async(lambda: 1)
    assert not ar.ready()
    with pytest.raises(ImpossibleDependency):
        ar.get(30)


def test_story_tells_why_a_task_waited(rc, view):
    a = view.apply_async(sleep_then, 1, 0.2)
    with view.temp_flags(after=a):
        b = view.apply_async(lambda: 2)
    assert b.get(30) == 2
    states = [row[2] for row in rc.story(b.msg_ids[0])]
    assert states[0] == "waiting" and "assigned" in states


def test_failures_are_listed_on_the_client(rc, view):
    with view.temp_flags(after=["missing-for-failures"]):
        ar = view.apply_async(lambda: 1)
    ar.wait(30)
    assert any(m.msg_id == ar.msg_ids[0] and m.error.ename == "InvalidDependency" for m in rc.failures)


# -- timeout ----------------------------------------------------------------------------


def test_timeout_fails_a_waiting_task(view):
    blocker = view.apply_async(sleep_then, 0, 2.0)
    with view.temp_flags(after=blocker, timeout=0.3):
        ar = view.apply_async(lambda: 1)
    t0 = time.monotonic()
    with pytest.raises(DependencyTimeout, match="0.3"):
        ar.get(30)
    assert time.monotonic() - t0 < 1.5


def test_timeout_is_not_an_execution_limit(view):
    with view.temp_flags(timeout=0.2):
        assert view.apply_sync(sleep_then, "long", 0.6) == "long"


# -- functional dependencies ---------------------------------------------------------


def test_require_imports_modules_into_the_namespace(view):
    @require("json", "os.path")
    def use_json():
        return json.dumps({"a": os.path.basename("/x/y")})  # noqa: F821

    assert view.apply_sync(use_json) == '{"a": "y"}'


def test_require_pushes_functions(view):
    def helper(x):
        return x + 100

    @require(helper)
    def uses_helper(x):
        return helper(x)

    assert view.apply_sync(uses_helper, 1) == 101


def test_require_pushes_keyword_objects_under_their_names(view):
    table = {"a": 1, "b": 2}

    @require("math", scale=2.5, table=table)
    def uses_pushed(x):
        return math.floor(x * scale) + table["b"]  # noqa: F821 - pushed by @require

    assert view.map_sync(uses_pushed, [1, 3]) == [4, 9]
    with pytest.raises(TypeError, match="by keyword: require"):
        require(3.5)
    with pytest.raises(ValueError, match="'not a name' is not a Python name"):
        require(**{"not a name": 1})


def _third():
    return str(fractions.Fraction(1, 3))  # noqa: F821 - @require imports it on the engine


def _calls_third():
    return _third()


for _f in (_third, _calls_third):
    _f.__module__ = "__main__"  # as if defined in a notebook: pickled by value, together


def test_interactive_helpers_see_the_engine_namespace(view):
    """The specification's example: a required module used by a helper the task calls."""
    assert view.apply_sync(require("fractions")(_calls_third)) == "1/3"


def test_require_missing_everywhere_fails_instead_of_hanging(view):
    @require("no_such_module_anywhere")
    def f():
        return 1

    with pytest.raises(ImpossibleDependency, match="refused by all") as info:
        view.apply_async(f).get(30)
    assert "cannot import 'no_such_module_anywhere'" in str(info.value)  # what the engines said


def test_depend_false_is_unmet_everywhere(view):
    @depend(lambda: False)
    def never():
        return 1

    with pytest.raises(ImpossibleDependency):
        view.apply_async(never).get(30)


def test_depend_runs_where_the_check_holds(view):
    target = view.apply_async(engine_id).get(30)

    def on_engine(eid):
        return engine_id() == eid

    @depend(on_engine, target)
    def where():
        return engine_id()

    assert view.map_async(lambda _: where(), range(4)).get(30) == [target] * 4
    assert view.apply_sync(where) == target


def test_depend_only_false_is_unmet(view):
    @depend(lambda: None)
    def runs():
        return "ran"

    assert view.apply_sync(runs) == "ran"


def test_dependent_wraps_one_function_twice(view):
    def task():
        return engine_id()

    def is_engine(eid):
        return engine_id() == eid

    on0, on1 = dependent(task, is_engine, 0), dependent(task, is_engine, 1)
    assert view.apply_sync(on0) == 0
    assert view.apply_sync(on1) == 1


def test_raising_unmet_dependency_reschedules(view):
    def only_engine_1():
        if engine_id() != 1:
            raise UnmetDependency()
        return engine_id()

    assert {view.apply_sync(only_engine_1) for _ in range(4)} == {1}


def test_depend_check_that_raises_fails_the_task_clearly(view):
    def broken_check():
        raise RuntimeError("check exploded")

    @depend(broken_check)
    def f():
        return 1

    with pytest.raises(RemoteError) as info:
        view.apply_sync(f)
    assert info.value.ename == "RuntimeError"
    assert "broken_check" in info.value.evalue and "check exploded" in info.value.evalue


# -- Dependency objects -------------------------------------------------------------------


def test_dependency_object_rules():
    d = Dependency(["a", "b"])
    assert d == {"a", "b"} and d.all and d.success and not d.failure
    assert d.check({"a", "b"}) and not d.check({"a"})
    assert d.unreachable({"a"}, {"b"}) and not d.unreachable({"a"})
    anyd = Dependency(["a", "b"], all=False)
    assert anyd.check({"a"}) and anyd.unreachable(set(), {"a", "b"})
    with pytest.raises(ValueError):
        Dependency(["a"], success=False, failure=False)
    with pytest.raises(ValueError):
        Dependency([3])


@pytest.mark.parametrize("bad", [3, 2.5, object(), [None]])
def test_bad_after_values_are_type_errors(view, bad):
    with pytest.raises(TypeError):
        with view.temp_flags(after=bad):
            view.apply_async(lambda: 1)
