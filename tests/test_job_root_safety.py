"""Data safety of the job root, on a local folder and on moto S3: the planning claim, the
driver's lease, one live job per destination, and readers that survive a corrupt job file."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from deblur.cli import app
from deblur.errors import AlreadyExistsError, ConfigError
from deblur.job.lease import claim
from deblur.job.ledger import CLAIM_NAME, LEASE_NAME, Ledger, default_job_root, list_jobs
from deblur.io.storage import Storage, join
from deblur.run.driver import open_or_plan
from tests.conftest import image_bytes, job_config, noise


def _inputs(storage: Storage, prefix: str, names: list[str]) -> str:
    for name in names:
        storage.put(join(prefix, name), b"x")
    return prefix


def _keys_under(storage: Storage, prefix: str) -> list[str]:
    try:
        return sorted(i.key for i in storage.list(prefix))
    except Exception:  # noqa: BLE001 - nothing there
        return []


# -- 1. the claim ------------------------------------------------------------------------------

def test_racing_planners_one_wins_and_the_loser_writes_nothing(storage: Storage,
                                                               root: str) -> None:
    # Different row counts, so a loser's shard writes would show as foreign keys or extra shards.
    src_a = _inputs(storage, join(root, "a"), [f"a{i:02d}.jpg" for i in range(12)])
    src_b = _inputs(storage, join(root, "b"), [f"b{i:02d}.jpg" for i in range(20)])
    for rnd in range(8):
        job_root = join(root, f"round{rnd}/job")
        configs = {"A": job_config(src_a, join(root, "outa"), job_root, shard_size=2),
                   "B": job_config(src_b, join(root, "outb"), job_root, shard_size=2)}
        barrier = threading.Barrier(2)
        won: dict[str, Ledger] = {}
        lost: dict[str, Exception] = {}

        def plan(name: str) -> None:
            barrier.wait()
            try:
                won[name] = Ledger.create(storage, configs[name], job_id=f"job{name}{rnd}",
                                          model_info={})
            except ConfigError as exc:
                lost[name] = exc

        threads = [threading.Thread(target=plan, args=(n,)) for n in configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 1, (won, lost)
        (winner, ledger), = won.items()
        (_, error), = lost.items()
        prefix = "a" if winner == "A" else "b"
        expected_shards = 6 if winner == "A" else 10
        assert ledger.job()["shards"] == expected_shards
        for shard in ledger.shard_ids():
            keys = ledger.read_shard(shard)["key"].to_pylist()
            assert keys and all(k.rsplit("/", 1)[-1].startswith(prefix) for k in keys), keys
        names = _keys_under(storage, job_root)
        assert names == sorted([CLAIM_NAME, "job.json"]
                               + [f"shards/{i:05d}.parquet" for i in range(expected_shards)])
        assert "claimed by" in str(error) or "already exists" in str(error)
        claim = json.loads(storage.get(join(job_root, CLAIM_NAME)))
        assert claim["job_id"] == f"job{winner}{rnd}"


class _LostReply(Storage):
    """The first conditional PUT of the claim lands, but its reply is lost and the retry
    finds the object: AlreadyExistsError for a write that was ours."""

    def put_if_absent(self, uri: str, data: bytes) -> None:
        super().put_if_absent(uri, data)
        if uri.endswith(CLAIM_NAME):
            raise AlreadyExistsError(f"{uri} already exists", uri)


def test_a_retried_claim_that_finds_its_own_claim_wins(moto_server: str, root: str) -> None:
    storage = _LostReply()
    src = _inputs(storage, join(root, "in"), ["x.jpg", "y.jpg"])
    ledger = Ledger.create(storage, job_config(src, join(root, "out"), join(root, "job")),
                           job_id="mine", model_info={})
    assert ledger.job()["rows"] == 2


def test_a_claimed_root_refuses_another_job_and_a_failed_plan_frees_it(storage: Storage,
                                                                       root: str) -> None:
    src = _inputs(storage, join(root, "in"), ["x.jpg"])
    job_root = join(root, "job")
    storage.put_if_absent(join(job_root, CLAIM_NAME), json.dumps(
        {"job_id": "other", "host": "h", "pid": 1, "time": 0, "token": "t"}).encode())
    with pytest.raises(ConfigError, match="already claimed by job 'other'"):
        Ledger.create(storage, job_config(src, join(root, "out"), job_root), job_id="me",
                      model_info={})
    assert _keys_under(storage, job_root) == [CLAIM_NAME]
    storage.put(join(root, "empty/readme.txt"), b"x")
    empty_root = join(root, "job2")
    with pytest.raises(Exception, match="lists no images"):
        Ledger.create(storage, job_config(join(root, "empty"), join(root, "out"), empty_root),
                      job_id="me", model_info={})
    assert not storage.exists(join(empty_root, CLAIM_NAME))


# -- 2. the lease ------------------------------------------------------------------------------

def _planned(storage: Storage, root: str, job_id: str = "j1", dest: str = "out",
             job_root: str | None = None, **overrides: object) -> tuple[Ledger, object]:
    src = join(root, "in")
    if not _keys_under(storage, src):
        _inputs(storage, src, [f"{i}.jpg" for i in range(4)])
    destination = join(root, dest)
    job_root = job_root or default_job_root(destination, job_id)
    config = job_config(src, destination, job_root, **overrides)
    return Ledger.create(storage, config, job_id=job_id, model_info={}), config


def test_a_live_lease_refuses_resume_and_rerun_but_not_cancel(storage: Storage,
                                                              root: str) -> None:
    running, config = _planned(storage, root)
    keeper = running.keep_lease(9.0)  # a live driver: renews every 3 s
    first_expiry = running.read_lease().expires_at
    with pytest.raises(ConfigError, match="another driver is running this job .* its lease "
                                          "was renewed while this one waited"):
        open_or_plan(config, storage, resume=True)
    # Refused on the renewal it saw, before the lease it first found could have run out.
    assert time.time() < first_expiry
    keeper.stop()
    running.acquire_lease(60.0)
    cli = CliRunner()
    rerun = cli.invoke(app, ["rerun", running.job_root, "-q", "--no-wait"])  # a script's way
    assert rerun.exit_code == 2 and "another driver is running this job" in rerun.output
    assert "without --no-wait" in rerun.output
    assert running.holder in rerun.output
    cancel = cli.invoke(app, ["cancel", running.job_root])
    assert cancel.exit_code == 0 and "live driver" in cancel.output, cancel.output
    assert running.cancel_requested()  # the refused rerun did not clear it
    running.release_lease()
    assert not storage.exists(join(running.job_root, LEASE_NAME))
    resumed = open_or_plan(config, storage, resume=True)
    assert resumed.holder and resumed.read_lease().holder == resumed.holder


def test_an_expired_lease_is_taken_over_and_the_old_holder_notices(storage: Storage,
                                                                   root: str) -> None:
    dead, config = _planned(storage, root)
    dead.acquire_lease(0.3)
    time.sleep(0.5)
    taker = open_or_plan(config, storage, resume=True)
    assert taker.read_lease().holder == taker.holder != dead.holder
    with pytest.raises(ConfigError, match="lost the lease"):
        dead.renew_lease(60.0)
    dead.release_lease()  # must not delete the taker's lease
    assert taker.live_lease() is not None


def test_resume_waits_out_a_silent_lease_and_takes_it_over(storage: Storage,
                                                           root: str) -> None:
    """A driver killed without releasing its lease (a pod gone, a resubmitted job): --resume
    watches the lease, sees nobody renew it, and takes over when it runs out, instead of
    refusing while it is live."""
    dead, config = _planned(storage, root)
    dead.acquire_lease(2.0)
    expires = dead.read_lease().expires_at
    taker = open_or_plan(config, storage, resume=True)
    assert time.time() >= expires  # it waited for the expiry ...
    assert taker.read_lease().holder == taker.holder != dead.holder  # ... then took over


def test_the_keeper_renews_releases_and_reports_a_takeover(storage: Storage,
                                                           root: str) -> None:
    ledger, _ = _planned(storage, root)
    keeper = ledger.keep_lease(0.6)
    first = ledger.read_lease().expires_at
    time.sleep(0.9)
    assert ledger.read_lease().expires_at > first and keeper.lost is None
    keeper.stop()
    assert ledger.read_lease() is None
    keeper = ledger.keep_lease(0.6)
    other = Ledger(storage, ledger.job_root)
    storage.put(join(ledger.job_root, LEASE_NAME), json.dumps(
        {"holder": "someone-else", "expires_at": time.time() + 60}).encode())
    deadline = time.time() + 5
    while keeper.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert keeper.lost and "someone-else" in keeper.lost
    keeper.stop()
    assert other.read_lease().holder == "someone-else"


# -- 3. one live job per destination -----------------------------------------------------------

@pytest.mark.parametrize("relation", ["equal", "inside", "containing"])
def test_a_new_job_on_a_live_destination_needs_force(storage: Storage, root: str,
                                                     relation: str) -> None:
    area = join(root, "out/_deblur")
    live_dest = {"equal": "out", "inside": "out", "containing": "out/sub"}[relation]
    new_dest = {"equal": "out", "inside": "out/sub", "containing": "out"}[relation]
    live, _ = _planned(storage, root, "live1", dest=live_dest, job_root=join(area, "live1"))
    live.acquire_lease(60.0)
    new_root = join(area, "new1")
    config = job_config(join(root, "in"), join(root, new_dest), new_root)
    with pytest.raises(ConfigError, match=r"job live1 .* is running on .* --force"):
        open_or_plan(config, storage, resume=False, job_id="new1")
    assert _keys_under(storage, new_root) == []
    ledger = open_or_plan(config, storage, resume=False, job_id="new1", force=True)
    assert ledger.job()["job_id"] == "new1"


def test_a_finished_or_unrelated_job_does_not_block(storage: Storage, root: str) -> None:
    live, _ = _planned(storage, root, "live1", dest="out")
    live.acquire_lease(60.0)
    config = job_config(join(root, "in"), join(root, "out2"), None)  # a sibling, no overlap
    assert open_or_plan(config, storage, resume=False, job_id="new1").job()["job_id"] == "new1"
    live.release_lease()
    config = job_config(join(root, "in"), join(root, "out"), None)
    assert open_or_plan(config, storage, resume=False, job_id="new2").job()["job_id"] == "new2"


# -- 4. readers survive a corrupt job file ------------------------------------------------------

def test_status_and_list_survive_a_corrupt_job_file(storage: Storage, root: str) -> None:
    good, _ = _planned(storage, root, "20260101-000000-aaaaaa")
    bad, _ = _planned(storage, root, "20260101-000001-bbbbbb")
    png = image_bytes(noise(8, 8), "PNG")
    storage.put(join(bad.job_root, "job.json"), png)
    with pytest.raises(ConfigError, match="is not a deblur job file"):
        Ledger.open(storage, bad.job_root)
    cli = CliRunner()
    status = cli.invoke(app, ["status", bad.job_root])
    assert status.exit_code == 2, status.output
    assert f"job.json at {join(bad.job_root, 'job.json')} is not a deblur job file (corrupt " \
           "or overwritten)" in status.output
    assert len(status.output.strip().splitlines()) == 1
    assert "bytes, unknown binary)" in status.output and "x89" not in status.output  # no bytes
    listed = cli.invoke(app, ["list", join(root, "out"), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.strip().splitlines()]
    assert [r["job_id"] for r in rows] == ["20260101-000001-bbbbbb", "20260101-000000-aaaaaa"]
    assert "corrupt" in rows[0] and rows[1]["rows"] == 4
    storage.put(join(bad.job_root, "job.json"), b'{"job_id": "x"}')  # JSON, but not a job
    assert "corrupt" in list_jobs(storage, join(root, "out"))[0]


def test_a_planner_killed_mid_plan_leaves_a_claim_that_a_later_try_takes_over(
        storage: Storage, root: str) -> None:
    """A driver SIGKILLed while planning leaves claim.json (and a lease nobody renews) but no
    job.json. With the job id fixed by its deployment, the next try must be able to plan it;
    a claim whose planner is alive (a live lease) is still refused."""
    src, dest = join(root, "in"), join(root, "out")
    _inputs(storage, src, [f"{i}.jpg" for i in range(3)])
    job_root = default_job_root(dest, "fixed")
    config = job_config(src, dest, job_root, **{"scheduler.lease_ttl_s": 1.0})
    killed = Ledger(storage, job_root)
    # what a killed planner leaves behind
    claim(storage, killed._path(CLAIM_NAME), killed._path("job.json"), killed.lease, "fixed", 1.0)
    killed.acquire_lease(1.0, job_id="fixed", destination=dest)
    with pytest.raises(ConfigError, match="already claimed"):  # its lease is still live
        Ledger.create(storage, config, job_id="fixed", model_info={}, hold_lease=True)
    time.sleep(1.2)  # the lease runs out unrenewed and the claim is older than the ttl
    ledger = Ledger.create(storage, config, job_id="fixed", model_info={}, hold_lease=True)
    assert ledger.job()["rows"] == 3
    assert ledger.read_lease().holder == ledger.holder


def test_planning_renews_its_lease(storage: Storage, root: str, monkeypatch) -> None:
    """Planning 100 M rows takes minutes: the lease taken with the claim is renewed meanwhile,
    so no other driver sees it expire and takes the job while it is being planned."""
    src, dest = join(root, "in"), join(root, "out")
    _inputs(storage, src, [f"{i}.jpg" for i in range(3)])
    config = job_config(src, dest, default_job_root(dest, "slow"),
                        **{"scheduler.lease_ttl_s": 0.6})
    plan = Ledger._plan
    seen: list[float] = []

    def slow_plan(self, *args, **kwargs):
        first = self.read_lease().expires_at
        time.sleep(1.5)  # longer than the ttl
        seen.append(self.read_lease().expires_at - first)
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "_plan", slow_plan)
    ledger = Ledger.create(storage, config, job_id="slow", model_info={}, hold_lease=True)
    assert seen and seen[0] > 0  # renewed while planning
    assert ledger.live_lease() is not None and ledger.live_lease().job_id == "slow"
