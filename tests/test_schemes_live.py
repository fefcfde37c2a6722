"""Every scheme runs tasks and honours dependencies; pure refuses them up front."""

from __future__ import annotations

import ipylb
import pytest
from ipylb import depend

SCHEMES = ["lru", "plainrandom", "twobin", "leastload", "weighted"]


def engine_id():
    from IPython import get_ipython

    return get_ipython().user_ns["ipylb_engine_id"]


@pytest.fixture(scope="module", params=SCHEMES)
def scheme_view(request):
    rc = ipylb.Client(engines=2, scheme=request.param)
    yield rc.load_balanced_view()
    rc.shutdown()


def test_scheme_runs_maps_and_dependencies(scheme_view):
    view = scheme_view
    assert view.map_sync(lambda x: x * 3, range(20)) == [x * 3 for x in range(20)]
    first = view.apply_async(engine_id)
    with view.temp_flags(after=first, follow=first, retries=1, timeout=30):
        follower = view.apply_async(engine_id)
    assert follower.get(30) == first.get(30)
    with view.temp_flags(after=["unknown-id"]):
        with pytest.raises(ipylb.error.InvalidDependency):
            view.apply_async(lambda: 1).get(30)


def test_pure_is_fast_path_without_dependencies():
    with ipylb.Client(engines=2, scheme="pure") as rc:
        view = rc.load_balanced_view()
        # the default hwm, "auto" since issue 14 item 2 (it was 1)
        assert rc.scheme == "pure" and rc.cluster_info["hwm"] == "auto"
        assert view.map_sync(lambda x: -x, range(50)) == [-x for x in range(50)]
        ar = view.apply_async(lambda: 1)
        for flags in ({"after": ar}, {"follow": ar}, {"retries": 1}, {"timeout": 3}):
            with view.temp_flags(**flags), pytest.raises(ValueError, match="pure"):
                view.apply_async(lambda: 2)
        with pytest.raises(ValueError, match="pure"):
            view.apply_async(depend(lambda: True)(lambda: 3))
        assert ar.get(30) == 1
        assert rc.queue_status()["unassigned"] == 0
