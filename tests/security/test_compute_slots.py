"""The compute limit (the weighted fair queue) is held while a request computes, not while it waits for its
function to wake: requests waiting for a cold start must not keep a warm function's requests waiting."""

from __future__ import annotations

import threading
import time

from tests.conftest import deploy, example, make_tenant, oip_body


def test_a_warm_functions_request_is_not_queued_behind_requests_waiting_for_a_wake_up(
    platform_factory, models
):
    # One worker slot, held by globex's warm (and resident) function; one request computes at a time.
    p = platform_factory("--pool-size", "0", "--max-workers", "1", PADDLEFN_MAX_IN_FLIGHT="1",
                         PADDLEFN_MIN_RESIDENCY_S="600")  # fmt: skip
    acme, globex = make_tenant(p, "acme"), make_tenant(p, "globex")
    deploy(globex, "classify", models["mlp"], {"idle_timeout_s": 600})
    # acme's function cannot wake: no slot can be had (classify is resident); its requests wait 3 s, then fail.
    deploy(acme, "waiting", models["mlp"], {"cold_start_timeout_s": 3})
    body = oip_body(example(models["mlp"])[0])
    done: dict[str, float] = {}
    statuses: dict[str, int] = {}

    def call(name: str, client, url: str) -> None:  # type: ignore[no-untyped-def]
        r = client.post(url, json=body)
        done[name], statuses[name] = time.monotonic(), r.status_code

    waiting = [threading.Thread(target=call, args=(f"waiting{i}", acme.http, "/t/acme/v2/models/waiting/infer"))
               for i in range(3)]  # fmt: skip
    for t in waiting:
        t.start()
    time.sleep(0.5)  # they wait for a slot now
    call("classify", globex.http, "/t/globex/v2/models/classify/infer")
    for t in waiting:
        t.join()
    assert statuses["classify"] == 200
    assert {statuses[f"waiting{i}"] for i in range(3)} <= {503, 504}, statuses
    # Held through the wake-up wait, the one compute slot kept classify waiting until those requests gave up.
    assert done["classify"] < min(done[f"waiting{i}"] for i in range(3)), done
