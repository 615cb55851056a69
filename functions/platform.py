"""The platform: tenants, keys and functions, wired to the store, the deploy pipeline, a backend and the scaler.

Every change goes to the store first and then to the in-memory tables (key ring, function registry) that the
request path reads, so a restart rebuilds the same state. Background loops (autoscaler, bookkeeping) are owned
here and survive a failed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from functions import archive, names
from functions.activator import Activator
from functions.admission import TenantAdmission
from functions.audit import SYSTEM, AuditLog
from functions.auth import ADMIN, ENV_ADMIN_ID, KeyRing, NewKey, Principal, hash_secret, new_key, parse_scopes
from functions.autoscaler import Autoscaler
from functions.backends.base import Backend
from functions.billing.ledger import Ledger
from functions.billing.service import Billing
from functions.bounds import clip, shown
from functions.clock import SYSTEM_CLOCK, Clock
from functions.deploy import DeployFailed
from functions.deployqueue import DeployQueue
from functions.errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized
from functions.fairqueue import FairQueue
from functions.metrics import Metrics
from functions.plans import DEFAULT_PLAN, Limits, PlanBook
from functions.registry import (
    DEPLOYING,
    FAILED,
    READY,
    FunctionConfig,
    FunctionRecord,
    Registry,
)
from functions.settings import Settings
from functions.store import ApiKey, DeletedTenant, Function, Store, Tenant
from functions.store.models import utcnow
from functions.usage import UsageSink
from runtime.lite import unavailable_reason as lite_unavailable_reason
from runtime.model_files import ModelFormatError, find_model
from runtime.program_check import check_program
from runtime.spec import Manifest

log = logging.getLogger("paddlefn")
MAX_ERROR_CHARS = 4000  # a function's stored deploy error


def config_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(shown(p, 40) if len(str(p)) > 40 else str(p) for p in e['loc']) or 'config'}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()[:10]
    )


class Platform:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        usage: UsageSink | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock  # the one clock of the activator, the autoscaler and the backend
        self.store = Store(settings.database)
        self.keys = KeyRing()
        self.registry = Registry()
        self.metrics = Metrics()
        if backend is None:
            backend = self._make_backend(settings)
        self.backend = backend
        self.ledger = Ledger(
            self.store,
            settings.data_dir / "usage",
            on_billed=self.metrics.billed,
            flush_interval_s=settings.usage_flush_interval_s,
            grace=timedelta(seconds=settings.invoice_grace_s),
        )
        self.usage: UsageSink = usage or self.ledger
        self.plans = PlanBook(self.store)
        self._limits: dict[str, Limits] = {}  # by tenant; cleared whenever a plan or a tenant's plan changes
        self.admission = TenantAdmission(self.limits_of)
        self.fair = FairQueue(settings.in_flight_capacity)
        self.audit = AuditLog(self.store)
        self.billing = Billing(self.ledger, self.plans)  # the grace is the ledger's: it files by it
        self.activator = Activator(
            max_pending_per_function=settings.max_pending_per_function,
            max_pending_per_tenant=settings.max_pending_per_tenant,
            pending_of=backend.pending,
            clock=clock,
        )
        self.autoscaler = Autoscaler(
            self.registry, backend, self.activator, settings, self.metrics,
            max_replicas_of=lambda tenant: self.limits_of(tenant).max_replicas, audit=self.audit, clock=clock,
        )  # fmt: skip
        quota = getattr(backend, "set_replica_quota", None)
        if quota is not None:  # fallback=capacity answers from Lite once the tenant's max_replicas is reached
            quota(lambda tenant: self.limits_of(tenant).max_replicas)
        weights = getattr(backend, "set_slot_weights", None)
        if weights is not None:  # worker slots under pressure are shared by plan weight (functions/slots.py)
            weights(lambda tenant: self.limits_of(tenant).weight)
        self.backend.on_wake(self.activator.touch)
        self.backend.on_wake(lambda fn: self.audit.record_soon(SYSTEM, fn.tenant, "function.wake", fn.name))
        self._deploys = DeployQueue(
            settings.max_concurrent_deploys, settings.max_concurrent_deploys_per_tenant
        )
        self._unpack_turns = DeployQueue(settings.max_concurrent_unpacks, 1)
        self._unpackers = ThreadPoolExecutor(
            max(1, settings.max_concurrent_unpacks), thread_name_prefix="unpack"
        )
        self._deploying: dict[int, asyncio.Task[Any]] = {}  # by function id: cancelled when it is deleted
        # Names of functions being created (upload checked, archive unpacking, row not yet inserted), by tenant.
        # They count against max_functions and their names are taken, so a burst of deploys cannot all pass the
        # check before any is registered. See _reserve_function.
        self._creating: defaultdict[str, set[str]] = defaultdict(set)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.generated_admin_key: str | None = None  # set on a first start without PADDLEFN_ADMIN_KEY
        self.started_at = time.time()

    def _make_backend(self, settings: Settings) -> Backend:
        if settings.backend == "knative":
            from functions.backends.knative import KnativeBackend
            from functions.cluster.config import quota_from_limits

            return KnativeBackend(
                settings, quota_of=lambda tenant: quota_from_limits(self.limits_of(tenant)), clock=self.clock
            )
        if settings.backend != "local":
            raise ValueError(f"PADDLEFN_BACKEND={settings.backend!r}: use local or knative")
        from functions.backends.local import LocalBackend

        return LocalBackend(settings, clock=self.clock)

    async def tenant_created(self, name: str) -> None:
        """Let the backend provision what a tenant needs (a namespace and its guard rails on Kubernetes)."""
        hook = getattr(self.backend, "ensure_tenant", None)
        if hook is not None:
            await hook(name)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        (self.settings.data_dir / "tmp").mkdir(exist_ok=True)
        self._load_keys()
        self._load_functions()
        await self.ledger.start()
        await self.backend.start()
        if self.backend.name == "local":  # on Kubernetes, KEDA and our external scaler own scaling
            self._spawn(self.autoscaler.run(), "autoscaler")
        self._spawn(self._bookkeeping(), "bookkeeping")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unpackers.shutdown(wait=False, cancel_futures=True)
        self._flush_last_used()
        await self.backend.close()
        await self.ledger.close()
        await self.audit.drain()
        self.store.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _load_keys(self) -> None:
        with self.store.session() as s:
            if self.settings.admin_key:
                s.merge(ApiKey(id=ENV_ADMIN_ID, tenant_id=None, name="PADDLEFN_ADMIN_KEY",
                               secret_hash=hash_secret(self.settings.admin_key), scopes=ADMIN))  # fmt: skip
            else:
                s.execute(update(ApiKey).where(ApiKey.id == ENV_ADMIN_ID).values(revoked_at=utcnow()))
                has_admin = s.scalar(
                    select(ApiKey.id).where(ApiKey.tenant_id.is_(None), ApiKey.revoked_at.is_(None))
                )
                if has_admin is None:
                    key = new_key()
                    s.add(ApiKey(id=key.id, tenant_id=None, name="generated admin key",
                                 secret_hash=key.secret_hash, scopes=ADMIN))  # fmt: skip
                    self.generated_admin_key = key.token
            rows = s.execute(
                select(ApiKey, Tenant.name).outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
                .where(ApiKey.revoked_at.is_(None))
            ).all()  # fmt: skip
        for key_row, tenant in rows:
            self.keys.add(key_row.id, key_row.secret_hash, _principal(key_row, tenant))

    def _load_functions(self) -> None:
        with self.store.session() as s:
            # A deploy cut short by a restart cannot be resumed: say so rather than stay "deploying" forever.
            s.execute(
                update(Function).where(Function.status == DEPLOYING)
                .values(status=FAILED, error="the platform restarted during the deploy; deploy the model again",
                        updated_at=utcnow())
            )  # fmt: skip
            rows = s.execute(
                select(Function, Tenant.name).join(Tenant, Function.tenant_id == Tenant.id)
            ).all()
        for row, tenant in rows:
            self.registry.put(self._record(row, tenant))

    def _record(self, row: Function, tenant: str) -> FunctionRecord:
        return FunctionRecord(
            id=row.id,
            tenant=tenant,
            name=row.name,
            status=row.status,
            config=FunctionConfig.model_validate(row.config),
            version=row.version,
            artifact_dir=self.settings.data_dir / row.artifact_dir,
            manifest=Manifest.from_json(row.manifest) if row.manifest else None,
            error=row.error,
            created_at=row.created_at,
            updated_at=row.updated_at,
            last_request_at=row.last_request_at,
            tenant_id=row.tenant_id,
        )

    async def _bookkeeping(self) -> None:
        """Write key last-used and function last-request times in batches, not on every request."""
        while True:
            await asyncio.sleep(5)
            try:
                await asyncio.to_thread(self._flush_last_used)
            except Exception:
                log.exception("bookkeeping step failed; will retry")

    def _flush_last_used(self) -> None:
        used = self.keys.drain_last_used()
        functions = [(r.id, r.last_request_at) for r in self.registry.all() if r.last_request_at]
        if not used and not functions:
            return
        with self.store.session() as s:
            for key_id, when in used.items():
                s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))
            for fid, when in functions:
                s.execute(update(Function).where(Function.id == fid).values(last_request_at=when))

    # ---------------------------------------------------------------- access

    def authenticate(self, authorization: str | None) -> Principal | None:
        return self.keys.authenticate(authorization)

    def tenant_for(self, principal: Principal | None, tenant: str, scope: str) -> int:
        """The tenant's id if PRINCIPAL may act on it with SCOPE; other tenants' things are 'not found'."""
        if principal is None:
            raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
        if not principal.is_admin and principal.tenant != tenant:
            raise NotFound(f"tenant '{tenant}' not found")
        with self.store.session() as s:
            tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == tenant))
        if tenant_id is None:
            raise NotFound(f"tenant '{tenant}' not found")
        if not principal.is_admin and scope not in principal.scopes:
            raise Forbidden(
                f"this key lacks the '{scope}' scope (it has: {', '.join(sorted(principal.scopes))})"
            )
        return tenant_id

    @staticmethod
    def require_admin(principal: Principal | None) -> None:
        if principal is None:
            raise Unauthorized("this endpoint needs the admin key: send 'Authorization: Bearer <admin key>'")
        if not principal.is_admin:
            raise Forbidden("only the admin key may do this")

    # ---------------------------------------------------------------- tenants and keys

    def create_tenant(self, name: str) -> tuple[Tenant, ApiKey, NewKey]:
        names.check("tenant", name)
        key = new_key()
        try:
            with self.store.session() as s:
                tenant = Tenant(name=name)
                s.add(tenant)
                s.flush()
                row = ApiKey(id=key.id, tenant_id=tenant.id, name="first key", secret_hash=key.secret_hash,
                             scopes="invoke,manage")  # fmt: skip
                s.add(row)
        except IntegrityError:
            raise Conflict(f"tenant '{name}' already exists") from None
        self.keys.add(key.id, key.secret_hash, _principal(row, name))
        (self.settings.data_dir / "tenants" / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        return tenant, row, key

    def plan_of(self, tenant: str) -> str:
        with self.store.session() as s:
            plan = s.scalar(select(Tenant.plan).where(Tenant.name == tenant))
        return plan or DEFAULT_PLAN

    def set_plan(self, tenant: str, plan: str) -> None:
        self.plans.get(names.check("plan", plan))  # 404 for an unknown plan
        with self.store.session() as s:
            row = s.scalar(select(Tenant).where(Tenant.name == tenant))
            if row is None:
                raise NotFound(f"tenant '{tenant}' not found")
            row.plan = plan
        self._limits.clear()

    def put_plan(self, name: str, raw: dict[str, Any]) -> Any:
        plan = self.plans.put(names.check("plan", name), raw)
        self._limits.clear()
        return plan

    def limits_of(self, tenant: str) -> Limits:
        """The tenant's quotas (cached: read on every request)."""
        limits = self._limits.get(tenant)
        if limits is None:
            limits = self._limits[tenant] = self.plans.get(self.plan_of(tenant)).limits
        return limits

    def tenant_usage(self, tenant: str) -> dict[str, Any]:
        """What the tenant uses of each limit, as shown beside its plan."""
        functions = self.registry.of_tenant(tenant)
        return {
            "functions": len(functions),
            "replicas": sum(self.backend.replicas(f) for f in functions),
            "concurrent_requests": self.admission.in_flight(tenant),
            "storage_bytes": _folder_bytes(self.settings.data_dir / "tenants" / tenant),
        }

    def check_upload_size(self, tenant: str, size: int) -> None:
        limits = self.limits_of(tenant)
        if size > limits.max_model_bytes:
            raise PayloadTooLarge(
                f"the model upload is {size} bytes; tenant '{tenant}' may upload at most "
                f"{limits.max_model_bytes} (max_model_bytes of its plan)"
            )

    def _check_function_quota(self, tenant: str, config: FunctionConfig) -> None:
        limits = self.limits_of(tenant)
        creating = len(self._creating.get(tenant, ()))
        count = len(self.registry.of_tenant(tenant)) + creating
        if count >= limits.max_functions:
            counted = f" (of which {creating} still being uploaded)" if creating else ""
            raise Forbidden(
                f"tenant '{tenant}' has {count} functions{counted}, its plan's limit "
                f"(max_functions={limits.max_functions}); delete one or ask for a bigger plan"
            )
        self._check_device(tenant, config)
        self._check_min_scale(tenant, config)
        if config.uses_lite and (reason := lite_unavailable_reason()):
            raise BadRequest(f"{_lite_use(config)} needs Paddle Lite, which this platform lacks: {reason}")

    def _check_min_scale(self, tenant: str, config: FunctionConfig) -> None:
        """A min_scale that can never run: above the plan's max_replicas or this machine's worker slots."""
        limit = self.limits_of(tenant).max_replicas
        if config.min_scale > limit:
            raise BadRequest(
                f"min_scale {config.min_scale} is above the max_replicas={limit} of tenant '{tenant}' (its plan's "
                "limit across all its functions); use a lower min_scale or ask for a bigger plan"
            )
        lite = config.device == "lite"
        slots = self.backend.capacity().get("lite_total" if lite else "total")  # none on Kubernetes
        if slots is not None and config.min_scale > slots:
            setting = "PADDLEFN_LITE_WORKERS" if lite else "--max-workers / PADDLEFN_MAX_WORKERS"
            raise BadRequest(
                f"min_scale {config.min_scale} is above the {slots} worker slots of this platform ({setting}); "
                "use a lower min_scale"
            )

    def _check_device(self, tenant: str, config: FunctionConfig) -> None:
        if config.device == "gpu" and not self.limits_of(tenant).gpu_allowed:
            raise Forbidden(
                f"tenant '{tenant}' is on a plan without GPUs (gpu_allowed=false); use device cpu, lite or auto"
            )

    @staticmethod
    def lite_problem(config: FunctionConfig, manifest: Manifest | None) -> str | None:
        """Why CONFIG cannot be served for a model with MANIFEST (None: it can, or the deploy is not done)."""
        if not config.uses_lite or manifest is None:
            return None
        lite = manifest.lite or {}
        if lite.get("available") and lite.get("nb"):
            return None
        return (
            f"{_lite_use(config)} needs a Paddle Lite version of the model, and this model has none: "
            f"{lite.get('reason') or 'deploy did not convert it'}; use device auto, cpu or gpu and fallback none"
        )

    def _give_to_tenant(self, fn: FunctionRecord) -> None:
        """Hand the tenant's folder to the tenant's own user (mode 0700), so that a worker confined as that
        user reads its own models and no one else's (see runtime/isolation.py)."""
        if self.settings.worker_isolation == "off" or os.geteuid() != 0:
            return
        uid = self.settings.tenant_uid_base + fn.tenant_id
        tenant_dir = self.settings.data_dir / "tenants" / fn.tenant
        for path in [tenant_dir, *tenant_dir.rglob("*")]:
            os.chown(path, uid, uid, follow_symlinks=False)
        tenant_dir.chmod(0o700)

    def _device_for(self, fn: FunctionRecord) -> str:
        if fn.config.device == "lite":
            return "cpu"  # prepared (and golden-checked) on the CPU; Lite serves the .nb deploy converts
        if fn.config.device == "auto" and not self.limits_of(fn.tenant).gpu_allowed:
            return "cpu"
        return fn.config.device

    def _unpack_checked(
        self, upload: IO[bytes], artifact_dir: Path, limits: archive.Limits, max_storage: int
    ) -> None:
        """Unpack the upload into ARTIFACT_DIR/model and check it (blocking: run in the unpack threads)."""
        archive.unpack(upload, artifact_dir / "model", limits)
        check_program(find_model(artifact_dir / "model"))  # no file, print or network ops (400 naming it)
        tenant_dir = artifact_dir.parents[2]  # tenants/{tenant}/functions/{name}/{version}
        used = _folder_bytes(tenant_dir)
        if used > max_storage:
            raise PayloadTooLarge(
                f"with this model tenant '{tenant_dir.name}' would store {used} bytes of models, over its "
                f"plan's max_storage_bytes={max_storage}; delete a function first"
            )

    def list_tenants(self) -> list[Tenant]:
        with self.store.session() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.name)))

    def get_tenant(self, name: str) -> Tenant:
        with self.store.session() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise NotFound(f"tenant '{name}' not found")
        return tenant

    async def delete_tenant(self, name: str) -> None:
        tenant = self.get_tenant(name)
        for fn in self.registry.of_tenant(name):
            await self._remove_function(fn)
        hook = getattr(self.backend, "remove_tenant", None)
        if hook is not None:
            await hook(name)
        with self.store.session() as s:
            s.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant.id))
            s.execute(delete(Function).where(Function.tenant_id == tenant.id))
            s.execute(delete(Tenant).where(Tenant.id == tenant.id))
            # Its usage, invoices and audit entries stay, under its id, which no later tenant gets.
            s.add(DeletedTenant(id=tenant.id, name=name, plan=tenant.plan, created_at=tenant.created_at,
                                deleted_at=utcnow()))  # fmt: skip
        self._limits.pop(name, None)  # a new tenant of this name starts on the default plan
        self.keys.remove_tenant(name)
        shutil.rmtree(self.settings.data_dir / "tenants" / name, ignore_errors=True)

    def create_key(
        self, tenant: str, tenant_id: int, name: str, scopes: list[str] | None
    ) -> tuple[ApiKey, NewKey]:
        """A new key, if the tenant is below its plan's max_keys. Called on the event loop (not in a thread), so
        two creations cannot both pass the count."""
        names.check("key", name)
        try:
            parsed = parse_scopes(scopes)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        cap = self.limits_of(tenant).max_keys
        key = new_key()
        with self.store.session() as s:
            active = s.scalar(
                select(func.count()).select_from(ApiKey)
                .where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
            )  # fmt: skip
            if (active or 0) >= cap:
                raise Conflict(
                    f"tenant '{tenant}' has {active} active API keys, its plan's limit (max_keys={cap}); "
                    f"revoke one first (DELETE /v1/tenants/{tenant}/keys/{{id}})"
                )
            row = ApiKey(id=key.id, tenant_id=tenant_id, name=name, secret_hash=key.secret_hash,
                         scopes=",".join(sorted(parsed)))  # fmt: skip
            s.add(row)
        self.keys.add(key.id, key.secret_hash, _principal(row, tenant))
        return row, key

    def list_keys(self, tenant_id: int) -> list[ApiKey]:
        with self.store.session() as s:
            return list(
                s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at))
            )

    def revoke_key(self, tenant_id: int, key_id: str) -> None:
        with self.store.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))
            if row is None or row.revoked_at is not None:
                raise NotFound(f"key '{key_id}' not found")
            row.revoked_at = utcnow()
            s.flush()
            keep = self.limits_of(s.scalar(select(Tenant.name).where(Tenant.id == tenant_id)) or "").max_keys
            # The list keeps the max_keys most recently revoked keys, so that revoking and creating keys over
            # and over does not grow it without end; the audit log has the rest.
            forgotten = s.scalars(
                select(ApiKey.id).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_not(None))
                .order_by(ApiKey.revoked_at.desc(), ApiKey.id).offset(keep)
            ).all()  # fmt: skip
            if forgotten:
                s.execute(delete(ApiKey).where(ApiKey.id.in_(forgotten)))
        self.keys.remove(key_id)

    # ---------------------------------------------------------------- functions

    def function(self, tenant: str, name: str) -> FunctionRecord:
        fn = self.registry.get(tenant, name)
        if fn is None:
            raise NotFound(f"function '{name}' not found in tenant '{tenant}'")
        return fn

    def parse_config(self, raw: dict[str, Any]) -> FunctionConfig:
        try:
            return FunctionConfig.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(f"invalid config: {config_errors(exc)}") from None

    async def create_function(
        self, tenant: str, tenant_id: int, name: str, upload: IO[bytes], config: FunctionConfig
    ) -> FunctionRecord:
        names.check("function", name)
        with self._reserve_function(tenant, name, config):
            return await self._create_function(tenant, tenant_id, name, upload, config)

    @contextlib.contextmanager
    def _reserve_function(self, tenant: str, name: str, config: FunctionConfig) -> Iterator[None]:
        """Check the tenant's quotas and the name, and hold a place for the function until the block ends.

        The check and the reservation are one step of the event loop (no await between them), and the place is
        held across the awaited unpack until the function is in the registry (which then counts it) or the
        create failed (the place is given back). The control plane is one process whose registry is the count
        (the store is written first, and read back at start), so an in-process reservation is enough; on a
        store transaction alone the unpack would run before the count, or hold a lock across it."""
        if self.registry.get(tenant, name) is not None or name in self._creating.get(tenant, ()):
            raise Conflict(
                f"function '{name}' already exists in tenant '{tenant}'; delete it first or pick a name"
            )
        self._check_function_quota(tenant, config)
        self._creating[tenant].add(name)
        try:
            yield
        finally:
            places = self._creating[tenant]
            places.discard(name)
            if not places:
                del self._creating[tenant]

    async def _create_function(
        self, tenant: str, tenant_id: int, name: str, upload: IO[bytes], config: FunctionConfig
    ) -> FunctionRecord:
        version = uuid.uuid4().hex[:12]
        relative = Path("tenants") / tenant / "functions" / name / version
        artifact_dir = self.settings.data_dir / relative
        limits = archive.Limits(self.settings.max_unpacked_bytes, self.settings.max_archive_files)
        max_storage = self.limits_of(tenant).max_storage_bytes
        try:
            # Off the event loop, in threads of their own, and in turns by tenant: one tenant's burst of uploads
            # unpacks one at a time and never queues another tenant's upload behind it.
            async with self._unpack_turns.slot(tenant):
                await asyncio.get_running_loop().run_in_executor(
                    self._unpackers, self._unpack_checked, upload, artifact_dir, limits, max_storage
                )
        except ModelFormatError as exc:
            shutil.rmtree(artifact_dir.parent, ignore_errors=True)
            raise BadRequest(str(exc)) from None
        except BaseException:
            shutil.rmtree(artifact_dir.parent, ignore_errors=True)
            raise
        now = utcnow()
        try:
            with self.store.session() as s:
                row = Function(tenant_id=tenant_id, name=name, status=DEPLOYING, config=config.model_dump(),
                               version=version, artifact_dir=str(relative), created_at=now, updated_at=now)  # fmt: skip
                s.add(row)
        except IntegrityError:
            shutil.rmtree(artifact_dir, ignore_errors=True)
            raise Conflict(f"function '{name}' already exists in tenant '{tenant}'") from None
        record = self._record(row, tenant)
        self.registry.put(record)
        task = self._spawn(self._deploy(record), f"deploy-{record.label}")
        self._deploying[record.id] = task
        task.add_done_callback(lambda _: self._deploying.pop(record.id, None))
        return record

    async def _deploy(self, record: FunctionRecord) -> None:
        def on_stage(stage: str) -> None:
            current = self.registry.get(record.tenant, record.name)  # a PATCH meanwhile replaces the record
            for fn in {id(record): record, id(current): current}.values():
                if fn is not None and fn.id == record.id:
                    fn.stage = stage

        on_stage("queued")  # waiting for a fair turn (max_concurrent_deploys, and per tenant)
        try:
            async with self._deploys.slot(record.tenant):
                manifest = await self.backend.prepare(
                    record,
                    device=self._device_for(record),
                    batching=record.config.batching is not None,
                    on_stage=on_stage,
                )
        except DeployFailed as exc:
            await self._finish_deploy(record, None, str(exc))
        except Exception as exc:
            log.exception("deploy of %s failed unexpectedly", record.label)
            await self._finish_deploy(record, None, f"deploy failed unexpectedly: {exc!r}")
        else:
            await self._finish_deploy(record, manifest, None)

    async def _finish_deploy(
        self, record: FunctionRecord, manifest: Manifest | None, error: str | None
    ) -> None:
        current = self.registry.get(record.tenant, record.name)
        if current is None or current.id != record.id:
            return  # deleted while it deployed; its files went with it
        if manifest is not None and (problem := self.lite_problem(current.config, manifest)):
            # Lite was asked for (on deploy, or by a PATCH meanwhile), and this model cannot be served by it.
            manifest, error = None, problem
        status = READY if manifest else FAILED
        error = None if error is None else clip(error, MAX_ERROR_CHARS)  # it may carry a preparation's output
        if manifest is not None:
            # READY means warm: the first replica starts (and the backend waits for it) before anyone is told.
            ready = dataclasses.replace(current, status=READY, error=None, manifest=manifest)
            await asyncio.to_thread(self._give_to_tenant, ready)
            self.activator.touch(ready)
            await self.backend.deployed(ready)
            current = self.registry.get(record.tenant, record.name)
            if current is None or current.id != record.id:
                return  # deleted meanwhile (its replicas went with it)
        now = utcnow()
        with self.store.session() as s:
            s.execute(
                update(Function).where(Function.id == record.id).values(
                    status=status, error=error, updated_at=now,
                    manifest=manifest.to_json() if manifest else None)
            )  # fmt: skip
        updated = dataclasses.replace(current, status=status, error=error, manifest=manifest, updated_at=now)
        self.registry.put(updated)
        self.audit.record(SYSTEM, record.tenant, "function.deploy", record.name,
                          "ok" if manifest else "failed", error or "")  # fmt: skip
        if manifest is None:
            log.info("deploy of %s failed: %s", record.label, error)
            shutil.rmtree(record.serving_dir, ignore_errors=True)
            return
        log.info("deployed %s (%s program)", record.label, manifest.golden.get("served_program"))

    async def update_function(self, fn: FunctionRecord, patch: dict[str, Any]) -> FunctionRecord:
        merged = {**fn.config.model_dump(), **patch}
        config = self.parse_config(merged)
        self._check_device(fn.tenant, config)
        self._check_min_scale(fn.tenant, config)
        if problem := self.lite_problem(config, fn.manifest):
            raise BadRequest(problem)
        if fn.status == DEPLOYING and config.uses_lite and (reason := lite_unavailable_reason()):
            raise BadRequest(f"{_lite_use(config)} needs Paddle Lite, which this platform lacks: {reason}")
        if config.batching and fn.manifest and not fn.manifest.spec.batchable:
            raise BadRequest(
                "batching needs a free first (batch) dimension on every input and output of the model"
            )
        now = utcnow()
        with self.store.session() as s:
            s.execute(
                update(Function)
                .where(Function.id == fn.id)
                .values(config=config.model_dump(), updated_at=now)
            )
        updated = dataclasses.replace(fn, config=config, updated_at=now)
        self.registry.put(updated)
        if updated.status == READY:
            await self.backend.reconfigured(updated)
        return updated

    async def delete_function(self, fn: FunctionRecord) -> None:
        await self._remove_function(fn)
        with self.store.session() as s:
            s.execute(delete(Function).where(Function.id == fn.id))

    async def _remove_function(self, fn: FunctionRecord) -> None:
        self.registry.remove(fn.tenant, fn.name)
        deploying = self._deploying.pop(fn.id, None)
        if deploying is not None:  # stop its preparation (the process is killed), not just forget it
            deploying.cancel()
            await asyncio.gather(deploying, return_exceptions=True)
        await self.backend.removed(fn)
        self.activator.forget(fn)
        self.autoscaler.forget(fn)
        self.metrics.forget(fn.tenant, fn.name)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(shutil.rmtree, fn.artifact_dir.parent)

    def function_view(self, fn: FunctionRecord) -> dict[str, Any]:
        """The function as the API shows it."""
        replicas = self.backend.replicas(fn)
        view: dict[str, Any] = {
            "name": fn.name,
            "tenant": fn.tenant,
            "status": fn.status,
            "state": _state(fn, replicas, len(self.backend.replica_info(fn))),
            "stage": fn.stage if fn.status == DEPLOYING else None,
            "replicas": replicas,
            "url": f"{self.settings.base_url}/t/{fn.tenant}/v2/models/{fn.name}",
            "host_url": f"http://{fn.name}.{fn.tenant}.{self.settings.domain}:{self.settings.port}/v2/models/{fn.name}",
            "error": fn.error,
            "config": fn.config.model_dump(),
            "version": fn.version,
            "created_at": fn.created_at.isoformat(),
            "updated_at": fn.updated_at.isoformat(),
            "last_request_at": fn.last_request_at.isoformat() if fn.last_request_at else None,
            "in_flight": self.activator.in_flight(fn),
        }
        lite_replicas = getattr(self.backend, "lite_replicas", None)
        if lite_replicas is not None:  # Lite fallback replicas, on top of `replicas` (see config.fallback)
            view["lite_replicas"] = lite_replicas(fn)
        if fn.manifest:
            view["inputs"] = [t.to_json() for t in fn.manifest.spec.inputs]
            view["outputs"] = [t.to_json() for t in fn.manifest.spec.outputs]
            view["golden"] = fn.manifest.golden
            view["notes"] = fn.manifest.notes
            view["device"] = "lite" if fn.config.device == "lite" else fn.manifest.device
        view["lite"] = _lite_view(fn)
        return view


def _lite_use(config: FunctionConfig) -> str:
    return "device=lite" if config.device == "lite" else f"fallback={config.fallback}"


def _lite_view(fn: FunctionRecord) -> dict[str, Any]:
    """Whether the function can be served by Paddle Lite (device=lite, fallback, edge bundles), and if not why."""
    if fn.manifest is None:
        return {"available": False, "reason": "the deploy has not finished" if fn.status == DEPLOYING
                else "the deploy failed"}  # fmt: skip
    lite = fn.manifest.lite or {}
    view: dict[str, Any] = {"available": bool(lite.get("available")), "reason": lite.get("reason") or None}
    for field in ("version", "max_abs_error", "rtol", "atol"):
        if field in lite:
            view[field] = lite[field]
    return view


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _state(fn: FunctionRecord, replicas: int, ready: int) -> str:
    """deploying | failed | asleep (no replica) | waking (replicas starting, none ready yet) | warm."""
    if fn.status != READY:
        return fn.status
    if replicas == 0:
        return "asleep"
    return "warm" if ready else "waking"


def _principal(row: ApiKey, tenant: str | None) -> Principal:
    return Principal(key_id=row.id, tenant=tenant, scopes=frozenset(row.scopes.split(",")))
