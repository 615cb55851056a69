"""The ledger, prices and invoices on a real SQLite store, with the clock passed in: exact amounts, rounding,
month boundaries, frozen months, idempotence and replay of a journal left behind by a crash."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from functions.billing import invoices
from functions.billing.ledger import Ledger
from functions.billing.pricing import (
    Prices,
    billed_ms,
    compute_charge,
    divide_half_up,
    format_money,
    request_charge,
)
from functions.billing.service import Account, Billing
from functions.plans import PlanBook
from functions.store import Store
from functions.usage import UsageEvent

NOV_2 = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
ACME = Account(1, "acme", "default")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def event(request_id: str, *, at: datetime = NOV_2, compute_ms: float = 2.5, status: int = 200,
          device: str = "cpu", function: str = "classify", tenant: Account = ACME) -> UsageEvent:  # fmt: skip
    return UsageEvent(request_id=request_id, tenant_id=tenant.id, tenant=tenant.name, function=function,
                      started_at=at, duration_ms=4.0, compute_ms=compute_ms, device=device, cold_start=False,
                      status=status, bytes_in=100, bytes_out=40)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield s
    s.close()


def run(coro):
    return asyncio.run(coro)


async def started(store: Store, folder: Path, clock: Clock) -> tuple[Ledger, Billing]:
    ledger = Ledger(store, folder, clock=clock, flush_interval_s=3600)  # flushed by hand or by queries
    await ledger.start()
    return ledger, Billing(ledger, PlanBook(store), clock=clock)


# ---------------------------------------------------------------------------- arithmetic


def test_compute_rounds_up_to_whole_milliseconds_per_request_from_the_reported_value():
    reported = (0.0, 0.001, 0.999, 1.0, 1.001, 2.5, 29.0001, 29.0000001, 29.0, 86_400_000.0)
    assert [billed_ms(ms) for ms in reported] == [0, 1, 1, 1, 2, 3, 30, 30, 29, 86_400_000]


def test_a_ledger_row_bills_the_round_up_of_the_reported_compute_not_of_a_rounded_one():
    from functions.billing.ledger import row_of

    row = row_of(event("r", compute_ms=29.0001))
    assert (row["compute_us"], row["billed_ms"]) == (29000, 30)


def test_money_rounds_half_up_once_per_line_item():
    prices = Prices()  # 200,000 micros per million requests; cpu 40 micros per second
    assert [divide_half_up(n, 10) for n in (4, 5, 6, 14, 15)] == [0, 1, 1, 1, 2]
    assert request_charge(2, prices) == 0  # 0.4 micro
    assert request_charge(3, prices) == 1  # 0.6 micro
    assert request_charge(1_000_000, prices) == 200_000
    assert compute_charge(12, "cpu", prices) == 0  # 0.48 micro
    assert compute_charge(13, "cpu", prices) == 1  # 0.52 micro
    assert compute_charge(1000, "gpu", prices) == 600
    assert format_money(1_234_567, "USD") == "1.234567 USD"
    assert format_money(5, "EUR") == "0.000005 EUR"


def test_bad_prices_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="tpu"):
        Prices(compute_second_micros={"tpu": 1})
    with pytest.raises(ValueError, match="request_per_million_micros"):
        Prices(request_per_million_micros=-1)


def test_periods_are_calendar_months_in_utc():
    assert invoices.parse_period("2026-12") == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    for bad in ("2026-13", "2026-1", "26-11", "november"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            invoices.parse_period(bad)


# ---------------------------------------------------------------------------- the ledger


def test_known_traffic_gives_exact_counts_and_amounts(store, tmp_path):
    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        for i in range(1000):
            await ledger.record(event(f"cpu-{i}", compute_ms=2.5))  # 3 ms each
        for i in range(10):
            await ledger.record(event(f"gpu-{i}", compute_ms=1000.0, device="gpu", function="detect"))
        await ledger.record(event("bad-input", status=400))  # reached the function, not billed
        await ledger.record(event("worker-died", status=503, compute_ms=0))
        invoice = await billing.invoice(ACME, "2026-11")
        usage = await billing.usage(ACME, None, None, "function")
        await ledger.close()
        return invoice, usage

    invoice, usage = run(scenario())
    lines = {(i["function"], i["device"]): i for i in invoice["lines"]}
    assert lines[("classify", "cpu")]["requests"] == 1000
    assert lines[("classify", "cpu")]["compute_ms"] == 3000
    assert lines[("classify", "cpu")]["compute_charge_micros"] == 120  # 3 s x 40
    assert lines[("classify", "cpu")]["request_charge_micros"] == 200  # 1000 x 0.2
    assert lines[("detect", "gpu")]["compute_charge_micros"] == 6000  # 10 s x 600
    assert lines[("detect", "gpu")]["request_charge_micros"] == 2  # 10 x 0.2
    assert invoice["subtotal_micros"] == 120 + 200 + 6000 + 2
    assert invoice["free_allowance_micros"] == invoice["subtotal_micros"]  # under the $1 credit
    assert invoice["total_micros"] == 0 and invoice["status"] == "open"

    by_function = {row["function"]: row for row in usage["rows"]}
    assert by_function["classify"]["requests"] == 1002
    assert by_function["classify"]["billable_requests"] == 1000
    assert by_function["classify"]["errors"] == 2
    assert by_function["detect"]["billed_ms"] == 10_000


def test_the_free_allowance_never_takes_a_total_below_zero_and_applies_once(store, tmp_path):
    PlanBook(store).put("default", {"prices": {"free_micros_per_month": 5000}})

    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        for i in range(10):
            await ledger.record(event(f"r{i}", compute_ms=1000.0, device="gpu"))
        invoice = await billing.invoice(ACME, "2026-11")
        await ledger.close()
        return invoice

    invoice = run(scenario())
    assert invoice["subtotal_micros"] == 6002
    assert invoice["free_allowance_micros"] == 5000
    assert invoice["total_micros"] == 1002
    assert invoice["total"] == "0.001002 USD"


def test_the_same_request_id_is_counted_once(store, tmp_path):
    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        await ledger.record(event("same"))
        await ledger.flush()
        await ledger.record(event("same"))
        await ledger.record(event("same"))
        new = await ledger.add_external([ledger_row("same"), ledger_row("other")])
        invoice = await billing.invoice(ACME, "2026-11")
        await ledger.close()
        return new, invoice

    new, invoice = run(scenario())
    assert new == 1
    assert invoice["requests"] == 2


def ledger_row(request_id: str, tenant: Account = ACME):
    from functions.billing.ledger import row_of

    return row_of(event(request_id, tenant=tenant), source="edge")


def test_a_request_id_is_unique_per_tenant_not_across_tenants(store, tmp_path):
    globex = Account(2, "globex", "default")

    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        await ledger.record(event("shared"))
        await ledger.flush()
        new = [await ledger.add_external([ledger_row("shared", globex)]),
               await ledger.add_external([ledger_row("shared", globex), ledger_row("shared")])]  # fmt: skip
        invoices = [await billing.invoice(t, "2026-11") for t in (ACME, globex)]
        await ledger.close()
        return new, invoices

    new, (acme_invoice, globex_invoice) = run(scenario())
    assert new == [1, 0]
    assert acme_invoice["requests"] == 1 and globex_invoice["requests"] == 1


def test_month_boundaries_are_exact_to_the_microsecond(store, tmp_path):
    last_moment = datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC)

    async def scenario():
        ledger, billing = await started(
            store, tmp_path / "usage", Clock(datetime(2026, 11, 1, 0, 30, tzinfo=UTC))
        )
        await ledger.record(event("october", at=last_moment))
        await ledger.record(event("november", at=last_moment + timedelta(microseconds=1)))
        october = await billing.invoice(ACME, "2026-10")
        november = await billing.invoice(ACME, "2026-11")
        by_day = await billing.usage(ACME, datetime(2026, 10, 31, tzinfo=UTC),
                                     datetime(2026, 11, 2, tzinfo=UTC), "day")  # fmt: skip
        await ledger.close()
        return october, november, by_day

    october, november, by_day = run(scenario())
    assert october["requests"] == 1 and november["requests"] == 1
    assert october["status"] == "open"  # within the grace hour after the month ended
    assert [(r["day"], r["requests"]) for r in by_day["rows"]] == [("2026-10-31", 1), ("2026-11-01", 1)]


def test_a_closed_month_never_changes_and_late_records_go_to_the_open_month(store, tmp_path):
    clock = Clock(datetime(2026, 11, 1, 0, 30, tzinfo=UTC))

    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", clock)
        await ledger.record(event("on-time", at=datetime(2026, 10, 15, tzinfo=UTC)))
        clock.now = NOV_2  # past the grace hour: the first request for October closes it
        closed = await billing.invoice(ACME, "2026-10")
        await ledger.record(event("late", at=datetime(2026, 10, 31, 23, 0, tzinfo=UTC)))
        again = await billing.invoice(ACME, "2026-10")
        november = await billing.invoice(ACME, "2026-11")
        await ledger.close()
        return closed, again, november

    closed, again, november = run(scenario())
    assert closed["status"] == "closed" and closed["requests"] == 1
    assert again == closed
    assert november["requests"] == 1  # the late October record


def test_a_record_for_a_month_whose_invoice_closed_unread_goes_to_the_open_month(store, tmp_path):
    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        await ledger.record(event("dated-2001", at=datetime(2001, 5, 1, 12, tzinfo=UTC)))
        await ledger.record(
            event("last-month", at=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
        )  # grace is over
        result = [await billing.invoice(ACME, p) for p in ("2001-05", "2026-10", "2026-11")]
        await ledger.close()
        return result

    may_2001, october, november = run(scenario())
    assert (may_2001["status"], may_2001["requests"]) == ("closed", 0)
    assert (october["status"], october["requests"]) == ("closed", 0)
    assert (november["status"], november["requests"]) == ("open", 2)


def test_a_journal_left_by_a_crash_is_replayed_once_and_a_torn_last_line_is_skipped(store, tmp_path):
    folder = tmp_path / "usage"

    async def crash():
        ledger, _ = await started(store, folder, Clock(NOV_2))
        for i in range(50):
            await ledger.record(event(f"r{i}"))
        await ledger.flush()  # r0..r49 committed ...
        for i in range(50, 80):
            await ledger.record(event(f"r{i}"))  # ... r50..r79 only in the journal
        path = ledger._journal.path
        ledger._task.cancel()  # the process dies: no flush, no clean-up
        ledger._journal.close()
        with path.open("ab") as f:
            f.write(b'{"request_id": "torn", "tena')  # killed in the middle of a write
        return path

    async def restart():
        ledger, billing = await started(store, folder, Clock(NOV_2))
        invoice = await billing.invoice(ACME, "2026-11")
        await ledger.close()
        return invoice

    run(crash())
    invoice = run(restart())
    assert invoice["requests"] == 80
    assert list(folder.iterdir()) == []  # replayed files are removed once committed


def test_invoice_csv_has_exact_decimal_amounts(store, tmp_path):
    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", Clock(NOV_2))
        for i in range(3):
            await ledger.record(event(f"r{i}", compute_ms=1000.0, device="gpu"))
        invoice = await billing.invoice(ACME, "2026-11")
        await ledger.close()
        return invoice

    rows = list(csv.reader(io.StringIO(invoices.to_csv(run(scenario())))))
    assert rows[0][:4] == ["tenant", "period", "function", "device"]
    assert rows[1] == [
        "acme",
        "2026-11",
        "classify",
        "gpu",
        "3",
        "3000",
        "0.000001",
        "0.001800",
        "0.001801",
        "USD",
    ]
    assert rows[-1][2] == "total" and rows[-1][8] == "0.000000"


def test_two_tenants_of_the_same_name_are_billed_apart_and_each_month_closes_for_each(store, tmp_path):
    clock = Clock(datetime(2026, 10, 27, tzinfo=UTC))
    later_acme = Account(2, "acme", "default")  # acme deleted, then created again: another id

    async def scenario():
        ledger, billing = await started(store, tmp_path / "usage", clock)
        await ledger.record(event("first", at=datetime(2026, 10, 5, tzinfo=UTC)))
        await ledger.record(event("second-1", at=datetime(2026, 10, 25, tzinfo=UTC), tenant=later_acme))
        await ledger.record(event("second-2", at=datetime(2026, 10, 26, tzinfo=UTC), tenant=later_acme))
        await ledger.flush()
        clock.now = NOV_2
        return await billing.invoice(ACME, "2026-10"), await billing.invoice(later_acme, "2026-10"), ledger

    first, second, ledger = run(scenario())
    run(ledger.close())
    assert (first["status"], first["requests"]) == ("closed", 1)
    assert (second["status"], second["requests"]) == ("closed", 2)


def test_a_journal_written_before_records_carried_tenant_ids_is_replayed_to_the_tenant_of_its_name(
    store, tmp_path
):
    from functions.billing.journal import Journal
    from functions.billing.ledger import row_of
    from functions.store import Tenant

    with store.session() as s:
        s.add(Tenant(id=7, name="acme", created_at=datetime(2026, 11, 1, tzinfo=UTC)))
    folder = tmp_path / "usage"
    journal = Journal(folder)  # what a platform of the earlier version left when it was killed
    for i in range(3):
        row = row_of(event(f"r{i}"))
        del row["tenant_id"]
        journal.append(row)
    journal.close()

    async def restart():
        ledger, billing = await started(store, folder, Clock(NOV_2))
        invoice = await billing.invoice(Account(7, "acme", "default"), "2026-11")
        await ledger.close()
        return invoice

    assert run(restart())["requests"] == 3
