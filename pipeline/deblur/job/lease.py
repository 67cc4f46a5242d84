"""Who may work on a job root: the planner's claim, the running driver's lease, its keeper.

claim.json is created first when planning (put-if-absent): of two drivers planning into one
job root, the one that loses the claim writes nothing.

lease.json says a driver is working on the job: holder id, the process that holds it (host,
pid, the process's start time) and expiry (now + ttl), renewed every ttl/3 by a
``LeaseKeeper`` and deleted when the run ends. Another driver's lease is

- stale at once when its holder ran on this host (same kernel boot and pid namespace) and
  that process no longer exists, or its pid now belongs to another process (another start
  time): a driver killed here (SIGKILL, a crashed terminal) is taken over without waiting;
- otherwise (another host, or a process that is still there) waited out, with a countdown,
  when the caller waits (`rerun`, `run --resume`): a live driver renews within ttl/3, and a
  renewal seen while waiting refuses; a lease that runs out unrenewed is taken over. Without
  waiting (``--no-wait``) a live lease refuses at once.

Takeovers and renewals are a compare-and-swap on the version read (``Storage.put_if_match``):
of two takers exactly one wins, and a driver presumed dead cannot renew over its successor's
lease.

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
from pathlib import Path
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


def this_machine() -> str | None:
    """This kernel boot and pid namespace, or None where /proc cannot say (not Linux).

    Two processes with the same value see the same pids, so one can tell whether the other
    still runs. A host name alone cannot: a container or a restarted pod may share it.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22), or
    None when no such process exists. Raises OSError when /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (the command name, in parentheses) may hold spaces: count after the last ")".
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        raise OSError(f"cannot read the start time of process {pid}") from None


def holder_gone(lease: Lease) -> str | None:
    """Why ``lease``'s driver certainly no longer runs, or None when that cannot be told
    from here (another host, no process identity recorded) or it still runs."""
    if lease.pid is None or lease.machine is None or lease.machine != this_machine():
        return None
    try:
        started = process_started(lease.pid)
    except OSError:
        return None
    if started is None:
        return f"its process {lease.pid} on this host no longer exists"
    if lease.pid_started is not None and started != lease.pid_started:
        return f"pid {lease.pid} on this host is another process now"
    return None


@dataclass(frozen=True)
class Lease:
    """The content of lease.json: which driver works on the job, and until when."""

    holder: str
    job_id: str
    destination: str
    acquired_at: float
    expires_at: float
    host: str = ""
    """The holder's host name (for people: ``holder_gone`` compares ``machine``)."""
    machine: str | None = None
    """``this_machine()`` of the holder: its kernel boot and pid namespace."""
    pid: int | None = None
    pid_started: int | None = None
    """``process_started(pid)`` when the lease was taken: a reused pid starts at another time."""

    @property
    def live(self) -> bool:
        return self.expires_at > time.time()

    def describe(self) -> str:
        return f"{self.holder} (lease expires {when(self.expires_at)})"

    def to_json(self) -> bytes:
        return json.dumps({"holder": self.holder, "job_id": self.job_id,
                           "destination": self.destination, "acquired_at": self.acquired_at,
                           "expires_at": self.expires_at, "host": self.host,
                           "machine": self.machine, "pid": self.pid,
                           "pid_started": self.pid_started}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease:
        """Parse lease.json; an unreadable one reads as expired (it can be taken over)."""
        found = json_object(data) or {}
        try:
            pid, started = found.get("pid"), found.get("pid_started")
            return cls(holder=str(found["holder"]), job_id=str(found.get("job_id", "")),
                       destination=str(found.get("destination", "")),
                       acquired_at=float(found.get("acquired_at", 0.0)),
                       expires_at=float(found["expires_at"]), host=str(found.get("host", "")),
                       machine=found.get("machine") or None,
                       pid=int(pid) if pid is not None else None,
                       pid_started=int(started) if started is not None else None)
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
        """The lease of a driver working on the job now, or None: an expired lease, or one
        whose holder is gone from this host (``holder_gone``), is no driver's."""
        lease = self.read()
        if lease is None or not lease.live or holder_gone(lease) is not None:
            return None
        return lease

    def acquire(self, ttl: float, *, job_id: str | None = None,
                destination: str | None = None, wait: bool = False,
                on_wait: Callable[[float | None], None] | None = None) -> Lease:
        """Hold lease.json for ``ttl`` seconds (renew it if this process holds it already).

        Another driver's lease is taken over at once when it expired or its holder is gone
        from this host (``holder_gone``). A live one refuses with ConfigError, unless
        ``wait`` (rerun, run --resume): then it is watched until it runs out unrenewed (taken
        over, at most one ttl later) or is renewed (a live driver renews every ttl/3; refused
        then), ``on_wait(seconds_left)`` called about once a second meanwhile and
        ``on_wait(None)`` when the wait ends. A takeover, like a renewal, is a
        compare-and-swap on the version read: of two takers exactly one wins, and a renewal
        after another driver took over fails.
        """
        holder = self.holder or new_holder()
        current, current_tag = self.read_tagged()
        gone: str | None = None
        if current is not None and current.holder != holder and current.live:
            gone = holder_gone(current)
            if gone is None and wait:
                current, current_tag, gone = self._wait_out(current, on_wait)
        if current is not None and current.holder != holder:
            if current.live and gone is None:
                until = when(current.expires_at)
                advice = ("its lease was renewed while this one waited, so that driver is "
                          "alive: let it finish" if wait else
                          f"without --no-wait, rerun and run --resume wait for it (a dead "
                          f"driver's lease runs out by {until})")
                raise ConfigError(
                    f"another driver is running this job ({self.job_root}): {current.holder} "
                    f"holds its lease until {until}; {advice} "
                    f"(`deblur cancel {self.job_root}` stops a live one)")
            if gone is not None:
                log.warning("taking over the lease of %s at once: %s", current.holder, gone)
            else:
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
        pid = os.getpid()
        try:
            started = process_started(pid)
        except OSError:
            started = None
        lease = Lease(holder=holder, job_id=job_id, destination=destination,
                      acquired_at=now, expires_at=now + ttl, host=socket.gethostname(),
                      machine=this_machine(), pid=pid, pid_started=started)
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

    def _wait_out(self, current: Lease, on_wait: Callable[[float | None], None] | None,
                  poll_s: float = 1.0) -> tuple[Lease | None, str | None, str | None]:
        """Watch another driver's live lease until it expires, its holder is gone from this
        host, or it changes (renewed, released or taken: returned as found, so the caller
        decides on what is there). Returns (lease, its tag, why its holder is gone)."""
        log.info("the job at %s is held by %s until %s: waiting to see whether that driver "
                 "is alive (a live one renews its lease)", self.job_root, current.describe(),
                 when(current.expires_at))
        expires = current.expires_at
        try:
            while True:
                left = max(0.0, expires - time.time())
                if on_wait is not None:
                    on_wait(left)
                time.sleep(min(poll_s, left + 0.1))
                found, found_tag = self.read_tagged()
                if (found is None or found.holder != current.holder
                        or found.expires_at != expires):
                    return found, found_tag, None
                gone = holder_gone(found)
                if gone is not None or not found.live:
                    return found, found_tag, gone
        finally:
            if on_wait is not None:
                on_wait(None)

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
