"""Who may work on a job root: the planner's claim, the running driver's lease, its keeper.

claim.json is created first when planning (put-if-absent): of two drivers planning into one
job root, the one that loses the claim writes nothing.

lease.json says a driver is working on the job: holder id and expiry (now + ttl), renewed
every ttl/3 by a ``LeaseKeeper`` and deleted when the run ends. Resume and rerun refuse a
live lease held by another driver and take over an expired one (a killed driver). Takeovers
and renewals are a compare-and-swap on the version read (``Storage.put_if_match``): of two
takers exactly one wins, and a driver presumed dead cannot renew over its successor's lease.

The ledger (``job/ledger.py``) names the objects; this module only knows how to hold them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deblur.errors import AlreadyExistsError, ConfigError, ConflictError, NotFoundError
from deblur.io.storage import Storage

log = logging.getLogger("deblur.job.lease")


def when(epoch: float) -> str:
    """A time as the lease and claim messages show it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def json_object(data: bytes) -> dict[str, Any] | None:
    """A stored JSON object (claim, lease, job.json, attempts), or None if it is not one."""
    try:
        value = json.loads(data)
    except ValueError:  # not UTF-8 or not JSON
        return None
    return value if isinstance(value, dict) else None


def new_holder() -> str:
    """A driver's lease holder id: host, pid and a random token (unique per driver run)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Lease:
    """The content of lease.json: which driver works on the job, and until when."""

    holder: str
    job_id: str
    destination: str
    acquired_at: float
    expires_at: float

    @property
    def live(self) -> bool:
        return self.expires_at > time.time()

    def describe(self) -> str:
        return f"{self.holder} (lease expires {when(self.expires_at)})"

    def to_json(self) -> bytes:
        return json.dumps({"holder": self.holder, "job_id": self.job_id,
                           "destination": self.destination, "acquired_at": self.acquired_at,
                           "expires_at": self.expires_at}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease:
        """Parse lease.json; an unreadable one reads as expired (it can be taken over)."""
        found = json_object(data) or {}
        try:
            return cls(holder=str(found["holder"]), job_id=str(found.get("job_id", "")),
                       destination=str(found.get("destination", "")),
                       acquired_at=float(found.get("acquired_at", 0.0)),
                       expires_at=float(found["expires_at"]))
        except (KeyError, TypeError, ValueError):
            return cls(holder="(unreadable lease.json)", job_id="", destination="",
                       acquired_at=0.0, expires_at=0.0)


class LeaseFile:
    """One job's lease.json, and this process's hold on it.

    Args:
        storage: where the job root lies.
        uri: lease.json's URI (the ledger names it).
        job_root: the job root, for messages.
        job_of: (job_id, destination) of the job, read only when a new lease needs them.
    """

    def __init__(self, storage: Storage, uri: str, job_root: str,
                 job_of: Callable[[], tuple[str, str]]) -> None:
        self.storage, self.uri, self.job_root = storage, uri, job_root
        self._job_of = job_of
        self.holder: str | None = None
        """This driver's holder id while it holds the lease (``acquire``)."""

    def read_tagged(self) -> tuple[Lease | None, str | None]:
        try:
            data, tag = self.storage.get_tagged(self.uri)
        except NotFoundError:
            return None, None
        return Lease.from_json(data), tag

    def read(self) -> Lease | None:
        """lease.json, or None; an unreadable one reads as expired (it can be taken over)."""
        return self.read_tagged()[0]

    def live(self) -> Lease | None:
        """The lease of a driver working on the job now (unexpired), or None."""
        lease = self.read()
        return lease if lease is not None and lease.live else None

    def acquire(self, ttl: float, *, job_id: str | None = None,
                destination: str | None = None, wait_silent: bool = False) -> Lease:
        """Hold lease.json for ``ttl`` seconds (renew it if this process holds it already).

        Raises ConfigError while another driver holds a live lease; takes over an expired one
        with a compare-and-swap on the version read (of two takers exactly one wins), and
        renews its own the same way (a renewal after another driver took over fails).

        ``wait_silent`` (resuming): a live lease is watched until it expires instead of being
        refused at once. A live driver renews every ttl/3, so a renewal seen while waiting
        refuses within that time; a lease that runs out unrenewed belonged to a dead driver
        (a killed pod, a resubmitted job) and is taken over, at most one ttl later.
        """
        holder = self.holder or new_holder()
        current, current_tag = self.read_tagged()
        if (wait_silent and current is not None and current.holder != holder
                and current.live):
            current, current_tag = self._wait_for_silent(current)
        if current is not None and current.holder != holder:
            if current.live:
                until = when(current.expires_at)
                raise ConfigError(
                    f"another driver is running this job ({self.job_root}): {current.holder} "
                    f"holds its lease until {until}; wait or, if it is dead, wait until "
                    f"{until} and retry (`deblur cancel {self.job_root}` stops a live one)")
            log.warning("taking over the lease of %s, which expired at %s (driver gone)",
                        current.holder, when(current.expires_at))
        now = time.time()
        if current is not None and current.holder == holder:
            # A renewal names the same job; while planning there is no job.json to read yet.
            job_id = current.job_id if job_id is None else job_id
            destination = current.destination if destination is None else destination
        if job_id is None or destination is None:
            recorded_id, recorded_destination = self._job_of()
            job_id = recorded_id if job_id is None else job_id
            destination = recorded_destination if destination is None else destination
        lease = Lease(holder=holder, job_id=job_id, destination=destination,
                      acquired_at=now, expires_at=now + ttl)
        try:
            if current is None:
                self.storage.put_if_absent(self.uri, lease.to_json())
            else:  # a renewal of ours, or a takeover of an expired one: only that version
                self.storage.put_if_match(self.uri, lease.to_json(), current_tag or "")
        except (AlreadyExistsError, ConflictError):
            found = self.read()
            # A retried conditional PUT can find its own first attempt.
            if found is None or found.holder != holder:
                who = found.describe() if found else "another driver"
                raise ConfigError(f"another driver took over the job at {self.job_root} "
                                  f"at the same time: {who}; wait for it or retry "
                                  f"after its lease expires") from None
        self.holder = holder
        return lease

    def _wait_for_silent(self, current: Lease, poll_s: float = 1.0
                         ) -> tuple[Lease | None, str | None]:
        """Watch another driver's live lease until it expires or is renewed (then returned
        as found: live, so the caller refuses)."""
        log.warning("the job at %s is held by %s until %s: waiting to see whether that driver "
                    "is alive (a live one renews its lease)", self.job_root, current.describe(),
                    when(current.expires_at))
        expires = current.expires_at
        while True:
            time.sleep(min(poll_s, max(0.0, expires - time.time()) + 0.1))
            found, found_tag = self.read_tagged()
            if found is None or found.holder != current.holder or found.expires_at != expires:
                return found, found_tag  # renewed, released or taken: decide on what is there
            if not found.live:
                return found, found_tag

    def renew(self, ttl: float) -> Lease:
        """Push our lease's expiry to now + ttl; ConfigError if another driver took it."""
        current = self.read()
        if current is not None and current.holder != self.holder:
            raise ConfigError(f"lost the lease of {self.job_root} to {current.describe()} "
                              f"(this driver was presumed dead): stopping dispatch")
        return self.acquire(ttl)

    def release(self) -> None:
        """Delete lease.json if this process holds it."""
        if self.holder is None:
            return
        current = self.read()
        if current is not None and current.holder == self.holder:
            self.storage.delete(self.uri)
        self.holder = None

    def keep(self, ttl: float) -> LeaseKeeper:
        """Acquire the lease and renew it every ttl/3 until ``LeaseKeeper.stop``."""
        self.acquire(ttl)
        return LeaseKeeper(self, ttl).start()


class LeaseKeeper:
    """Renews a held lease every ttl/3 on a daemon thread; ``lost`` says another driver took
    it over (this one was presumed dead), and the pool stops dispatching then."""

    def __init__(self, lease: LeaseFile, ttl: float) -> None:
        self.lease, self.ttl = lease, ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.lease.renew(self.ttl)
            except ConfigError as exc:
                self.lost = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again next time
                log.warning("could not renew the job lease: %s", exc)

    def stop(self, release: bool = True) -> None:
        """Stop renewing and release the lease (it stays for its ttl if the delete fails).
        ``release=False`` keeps it for its ttl: planning hands it on to the run that follows."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.ttl)
        if not release:
            return
        try:
            self.lease.release()
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the job lease (it expires by itself): %s", exc)


def claim(storage: Storage, uri: str, job_uri: str, lease: LeaseFile, job_id: str,
          ttl: float) -> None:
    """Create claim.json at ``uri`` (put-if-absent) before anything else is written in the job
    root (``job_uri``: its job.json, whose presence means "planned").

    A claim of the same job id left by a planning driver that was killed (no job.json, and no
    live lease: the planner renews one while it plans) is taken over with a compare-and-swap
    once it is older than ``ttl``, so a job whose id its deployment fixes (the chart's RayJob)
    can be planned again. Another job's claim is never taken.
    """
    token = secrets.token_hex(8)
    mine = {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.time(), "token": token}
    try:
        storage.put_if_absent(uri, json.dumps(mine).encode())
        return
    except AlreadyExistsError:
        pass
    try:
        data, tag = storage.get_tagged(uri)
        found = json_object(data) or {}
    except NotFoundError:  # the winner gave up planning and freed it: still not ours
        found, tag = {}, None
    # A retried conditional PUT can find its own first attempt (the reply was lost).
    if found.get("job_id") == job_id and found.get("token") == token:
        return
    if (found.get("job_id") == job_id and tag and not storage.exists(job_uri)
            # younger than ttl: its planner may still be between its claim and its lease
            and time.time() - float(found.get("time") or 0) >= ttl
            and lease.live() is None):
        log.warning("taking over the claim of %s: its planning driver (host %s, pid %s) "
                    "left no job.json and no live lease", lease.job_root,
                    found.get("host"), found.get("pid"))
        try:
            storage.put_if_match(uri, json.dumps(mine).encode(), tag)
            return
        except (AlreadyExistsError, ConflictError):
            found = json_object(storage.get(uri)) or {}  # another taker won
    who = (f"job {found.get('job_id')!r} (host {found.get('host')}, pid "
           f"{found.get('pid')}, {when(float(found.get('time') or 0))})"
           if found else "another driver")
    raise ConfigError(f"job root {lease.job_root} is already claimed by {who}; use a "
                      f"different --job-root (or, if that planning died, delete {uri})")
