"""The run context every import, export and copy is built on, with no orchestrator in sight.

A :class:`Run` holds what one flow run needs across its steps: the SDK clients, the settings
and the worker VM's shape, the run's identity (its id, its attempt, how to ask whether
another run is alive), the :class:`~diskimport.ledger.Ledger` of undos, the retry tokens of
its creates, the tags every resource it makes carries, its SSH keys, and the steps that
every job shares: a worker VM launched, reached over SSH, given volumes to attach, and
terminated; PARs named so a dead run's are found again. The jobs (:mod:`diskimport.importer`,
:mod:`diskimport.machine_import`, :mod:`diskimport.export`, :mod:`diskimport.regions`) each
hold a run and add their own steps.

Used as a context manager, a run unwinds its ledger when the block fails: what it created is
removed (or kept, tagged failed, where the settings say so), newest first.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol, TypeVar

from . import cloud, contract, naming, pool
from .keys import SshKeyPair, cloud_init_host_keys
from .ledger import Ledger, Undo
from .objects import ObjectReader
from .ocids import COMPARTMENT_KINDS, check_ocid, check_placement
from .records import Subject, WorkerVM
from .worker_vm import transfer
from .worker_vm.session import WorkerSession

log = logging.getLogger(__name__)
T = TypeVar("T")


class ImportSettingsLike(Protocol):
    """The settings a run reads (the ``ImportSettings`` block has them)."""

    compartment_id: str
    vpus_during_import: int
    vpus_after_import: int
    backup_policy: str | None
    volume_name_template: str
    max_virtual_size_bytes: int
    extra_tags: dict[str, str]
    keep_failed_volume: bool
    transfer_connections: int
    transfer_chunk_mib: int
    unchecked_filesystems: str  # "allow" or "fail"


class WorkerShapeLike(Protocol):
    """Where and how worker VMs are launched (the ``WorkerShape`` block has it)."""

    compartment_id: str
    subnet_id: str
    image_id: str
    shape: str
    ocpus: float | None
    memory_in_gbs: float | None
    boot_volume_size_gb: int | None
    availability_domains: list[str]
    assign_public_ip: bool
    ssh_user: str
    ssh_port: int
    use_sudo: bool
    attachment_type: str
    boot_timeout_seconds: float


class Yielding(Exception):
    """This run gives way to another live run doing the same work: what it made is removed, and
    nothing is kept for inspection (it did not fail)."""


def step(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Count the seconds a step of a run, or of a job on one (its ``run``), takes into the run's
    ``steps[name]``; a job that keeps steps of its own (a machine's disk, which runs beside the others) counts them there too."""
    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def timed(self: Any, *args: Any, **kwargs: Any) -> T:
            start = time.monotonic()
            try:
                return method(self, *args, **kwargs)
            finally:
                run = self if isinstance(self, Run) else self.run
                own = self.steps if getattr(self, "keeps_own_steps", False) else None
                run.count_step(name, time.monotonic() - start, own)
        return timed
    return decorate


class phase:
    """Adds the seconds a block takes to ``phases[name]``."""

    def __init__(self, phases: dict[str, float], name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.phases[self.name] = round(self.phases.get(self.name, 0.0) + time.monotonic() - self.start, 3)


class Run:
    """One flow run's context. ``run_id`` names the run in tags; ``attempt`` counts its tries."""

    def __init__(self, clients: cloud.Clients, settings: ImportSettingsLike, shape: WorkerShapeLike, *,
                 run_id: str, attempt: int = 1, run_is_active: Callable[[str], bool] = lambda run: False,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 pool_keys: pool.KeyStore | None = None, pool_name: str = "default") -> None:
        # A block's OCID of the wrong kind would reach OCI only at the first create, as a bare 404.
        check_placement("WorkerShape", shape.compartment_id, shape.subnet_id, shape.image_id)
        check_ocid("ImportSettings.compartment_id", settings.compartment_id, COMPARTMENT_KINDS, code="invalid-setting")
        self.clients = clients
        self.settings = settings
        self.shape = shape
        self.run_id = run_id
        self.attempt = attempt
        self.run_is_active = run_is_active
        self.log = logger or log
        self.ledger = Ledger(self.log)
        self.objects = ObjectReader(clients)
        self.client_key = SshKeyPair.generate()
        self.host_key = SshKeyPair.generate()
        # worker VMs launched ahead (docs/worker-pool.md): taken instead of launched, when there is one
        self.pool = (pool.Pool(clients, shape, pool_keys, settings, self.log, pool_name)
                     if pool_keys is not None and pool.PoolSettings.of(shape).size > 0 else None)
        self._worker_keys: dict[str, tuple[SshKeyPair, SshKeyPair]] = {}  # a pooled worker's: (client, host)
        self._taken_ahead: dict[str, pool.Taken | None] = {}  # by AD: what take_ahead found, for launch_worker
        self.refills: list[threading.Thread] = []
        self.steps: dict[str, float] = {}
        self.yielding = False  # unwinding because another run goes on: nothing is kept for inspection
        self.keeps_volumes = False  # a failure that leaves the volumes as written (a failed guest adaptation)
        self._generations: collections.Counter[str] = collections.Counter()
        self._unwound = 0  # after an unwind, creates are new creates (new retry tokens)
        self._steps_lock = threading.Lock()
        self._attach_lock = threading.Lock()

    # -- identity ----------------------------------------------------------------------------------

    def retry_token(self, step: str) -> str:
        """The ``opc-retry-token`` of one create: the same for retries of that create, new after its undo."""
        scope = f"{self.run_id}/{self.attempt}/{self._unwound}/{step}/{self._generations[step]}"
        return hashlib.sha256(scope.encode()).hexdigest()

    def undone(self, step: str) -> None:
        """The create ``step`` was undone: its next try is a new create, with a new retry token."""
        self._generations[step] += 1

    def tags(self, subject: Subject) -> dict[str, str]:
        """The tags of every resource this run makes for ``subject`` (a sweep finds them by these)."""
        return naming.run_tags(subject, self.run_id, self.settings.extra_tags)

    def count_step(self, name: str, seconds: float, also: dict[str, float] | None = None) -> None:
        with self._steps_lock:
            for steps in (self.steps, also) if also is not None else (self.steps,):
                steps[name] = round(steps.get(name, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Count the seconds the block takes as the step ``name`` (work the orchestrator runs side by side)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.count_step(name, time.monotonic() - start)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, Yielding):
            self.log.info("%s; this run yields and removes what it created", exc)
            self.yielding = True
            try:
                self.ledger.unwind()
            finally:
                self.yielding = False
            self._unwound += 1
        elif exc is not None:
            self.log.warning("run failed (%s); removing what it created", exc)
            self.ledger.unwind()
            self._unwound += 1

    # -- where -------------------------------------------------------------------------------------

    def availability_domains(self, ad_number: int | None = None) -> list[str]:
        """The ADs to try, in order: the one ``ad_number`` names, else the shape's preferred ones, else all."""
        names = [ad.name for ad in cloud.with_backoff(self.clients.identity.list_availability_domains,
                                                      self.shape.compartment_id).data]
        if ad_number is not None:
            if not 1 <= ad_number <= len(names):
                raise contract.InvalidRequest("invalid-ad-number", f"ad_number {ad_number} is out of range: the "
                                              f"region has {len(names)} availability domains")
            return [names[ad_number - 1]]
        preferred = [ad for ad in self.shape.availability_domains if ad in names]
        return preferred or names

    # -- the worker VM -----------------------------------------------------------------------------

    def launch_worker(self, subject: Subject, availability_domain: str) -> WorkerVM:
        """A worker VM for ``subject``: one of the pool's when it has one idle in ``availability_domain``,
        else one launched with this run's host key; running, its address known."""
        step = f"launch-worker/{subject.id}/{availability_domain}"
        if availability_domain in self._taken_ahead:
            taken = self._taken_ahead.pop(availability_domain)
        else:
            taken = self.take_pooled_worker(subject, availability_domain)
            if taken is not None and taken.volume_id:  # its blank volume: nobody here uses it
                self.delete_when_available(taken.volume_id)
        if taken is not None:
            with self.timed("take-pooled-worker"):
                return self._running_worker(taken.instance, availability_domain, step)
        shape = self.shape
        with self.timed("launch-worker"):
            instance = cloud.launch_worker(
                self.clients, compartment_id=shape.compartment_id, availability_domain=availability_domain,
                subnet_id=shape.subnet_id, image_id=shape.image_id, shape=shape.shape, ocpus=shape.ocpus,
                memory_in_gbs=shape.memory_in_gbs, boot_volume_size_gb=shape.boot_volume_size_gb,
                assign_public_ip=shape.assign_public_ip, display_name=f"{subject.kind}-worker-{subject.id[:12]}",
                ssh_public_key=self.client_key.public_openssh, user_data=cloud_init_host_keys(self.host_key),
                tags=self.tags(subject), retry_token=self.retry_token(step))
            return self._running_worker(instance, availability_domain, step)

    def _running_worker(self, instance: Any, availability_domain: str, step: str) -> WorkerVM:
        """The worker VM ``instance`` this run made or took, its terminate registered, once it runs."""
        undo = self.ledger.find("worker VM", instance.id) or self._register_worker(instance.id)
        try:
            cloud.wait_instance_running(self.clients, instance.id)
            address = cloud.worker_address(self.clients, self.shape.compartment_id, instance.id,
                                           self.shape.assign_public_ip)
        except BaseException:
            self.ledger.release(undo)
            cloud.terminate_worker(self.clients, instance.id, wait=False)
            self.undone(step)
            raise
        self.log.info("worker VM %s runs in %s at %s", instance.id, availability_domain, address)
        return WorkerVM(instance.id, address, availability_domain)

    def _register_worker(self, instance_id: str) -> Undo:
        return self.ledger.register("worker VM", instance_id, lambda: cloud.terminate_worker(self.clients, instance_id))

    def take_ahead(self, subject: Subject, availability_domain: str) -> str | None:
        """Take a pooled VM for ``subject`` now (the next ``launch_worker`` there uses it), before its
        volume is made; its blank volume's OCID, now the caller's to use or delete, if it has one."""
        taken = self.take_pooled_worker(subject, availability_domain)
        self._taken_ahead[availability_domain] = taken
        return taken.volume_id if taken is not None else None

    def take_pooled_worker(self, subject: Subject, availability_domain: str) -> pool.Taken | None:
        """An idle VM of the worker pool in ``availability_domain``, made this run's worker (its
        tags and its keys), or None; a take starts the pool's refill beside the import."""
        if self.pool is None:
            return None
        with self.timed("take-pooled-worker"):
            taken = self.pool.take(availability_domain, self.tags(subject), f"{subject.kind}-worker-{subject.id[:12]}")
        if not self.refills:
            self.refill_pool()  # for the next import: behind this take, or into a pool found empty
        if taken is None:
            self.log.info("the worker pool has no idle VM in %s: launching one", availability_domain)
            return None
        self._register_worker(taken.instance.id)  # ours from the take on, whatever comes before its launch step
        self._worker_keys[taken.instance.id] = (taken.client_key, taken.host_key)
        return taken

    def delete_when_available(self, volume_id: str) -> None:
        """Delete a volume once it can be (one being created cannot), in a thread of its own; if
        this process ends first, the pool's trim deletes it."""
        def delete() -> None:
            try:
                cloud.wait_volume_available(self.clients, volume_id, timeout=600)
                cloud.delete_volume(self.clients, volume_id)
            except Exception as exc:  # the trim deletes it later
                self.log.info("the pooled worker VM's unused blank volume %s is left to the pool's trim: %s",
                              volume_id, exc)
        threading.Thread(target=delete, name="blank-volume-delete", daemon=True).start()

    def refill_pool(self) -> None:
        """Refill the worker pool in a thread of its own (the import does not wait for it)."""
        def refill() -> None:
            try:
                self.pool.refill()
            except Exception as exc:  # the scheduled sweep refills too
                self.log.warning("the worker pool's refill failed: %s", exc)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(refill,), name="pool-refill",
                                  daemon=True)
        thread.start()
        self.refills.append(thread)

    def session(self, worker: WorkerVM) -> WorkerSession:
        """An SSH session to the worker VM that accepts only the host key this run gave it."""
        client_key, host_key = self._worker_keys.get(worker.id, (self.client_key, self.host_key))
        return WorkerSession(worker.address, self.shape.ssh_port, self.shape.ssh_user, client_key, host_key,
                             sudo=self.shape.use_sudo)

    @step("prepare-worker")
    def prepare_worker(self, session: WorkerSession) -> str:
        """Connect (retrying while the VM boots) and make sure its tools are there; qemu-img's version."""
        session.connect(timeout=self.shape.boot_timeout_seconds)
        version = transfer.ensure_tools(session)
        self.log.info("worker VM reached over SSH (its host key pinned); %s", version)
        return version

    @step("terminate-worker")
    def terminate_worker(self, worker: WorkerVM) -> None:
        """Terminate the worker VM (and its boot volume) now that its work is done."""
        undo = self.ledger.find("worker VM", worker.id)
        if undo is not None:
            self.ledger.undo(undo)
        else:
            cloud.terminate_worker(self.clients, worker.id)

    @step("remove-stale-workers")
    def remove_stale_workers(self, subject: Subject) -> list[str]:
        """Terminate worker VMs this subject's dead runs (or this run's killed attempt) left: their
        SSH keys died with the process that made them, so they cannot be used."""
        removed = []
        for stale in cloud.find_instances(self.clients, self.shape.compartment_id,
                                          {contract.TAG_IMPORT_ID: subject.id}):
            owner = (stale.freeform_tags or {}).get(contract.TAG_FLOW_RUN) or ""
            if owner == self.run_id or not self.run_is_active(owner):
                cloud.terminate_worker(self.clients, stale.id)
                removed.append(stale.id)
        if removed:
            self.log.info("terminated %d worker VM(s) a dead run left: %s", len(removed), ", ".join(removed))
        return removed

    def attach(self, worker: WorkerVM, volume_id: str, read_only: bool = False) -> tuple[Any, Undo]:
        """Attach a volume to the worker VM (or find it attached), its detach registered; the
        attachment once ATTACHED, and its undo."""
        with self._attach_lock:  # one free device path per attachment
            made = cloud.existing_attachment(self.clients, worker.id, volume_id) or cloud.attach_volume(
                self.clients, worker.id, volume_id, self.shape.attachment_type,
                self.retry_token(f"attach/{volume_id}"), read_only=read_only)
        undo = self.ledger.register("attachment", made.id, lambda: cloud.detach_volume(self.clients, made.id))
        return cloud.wait_attached(self.clients, made.id), undo

    # -- PARs --------------------------------------------------------------------------------------

    def par_name(self, subject: Subject, part: str = "") -> str:
        """The name of this run's PAR for ``subject`` (``part``: which object or byte range, where
        a run holds several at once): a PAR lost by a failed create is found and deleted by its
        name, which must not be another live transfer's."""
        return f"{naming.par_prefix(subject)}{self.run_id}-{self.retry_token('par' + part)[:12]}"

    def remove_stale_pars(self, subject: Subject, namespace: str, bucket: str, object_name: str) -> list[str]:
        """Delete the PARs ``subject``'s dead runs (or this run's killed attempt) left on the
        object: a bearer secret nobody will use again. The run is in each PAR's name."""
        removed = []
        prefix = naming.par_prefix(subject)
        for par in cloud.pars_of(self.clients, namespace, bucket, object_name):
            owner = par.name[len(prefix):-13] if par.name.startswith(prefix) else None
            if owner and (owner == self.run_id or not self.run_is_active(owner)):
                cloud.delete_par(self.clients, namespace, bucket, par.id)
                removed.append(par.id)
        return removed
