"""The project's exception hierarchy.

Every message quotes the bad value and says what is allowed or what to do, so the CLI can
print it as one line. A bad *image* is never raised out of a shard: the worker turns an
``ImageError`` into a failed result row (``reason`` is the short class used for grouping).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A job configuration value is missing or invalid; the message names the field."""


class ManifestError(PipelineError):
    """The manifest as a whole cannot be used (unreadable, no key column, empty)."""


class WeightsError(PipelineError):
    """Model weights cannot be loaded or do not fit the chosen model."""


class ModelError(PipelineError):
    """Unknown model name or an input the network cannot take."""


class StorageError(PipelineError):
    """An object-storage or filesystem operation failed; ``uri`` names the object."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


class NotFoundError(StorageError):
    """The object or bucket does not exist."""


class AccessDeniedError(StorageError):
    """The credentials in use may not read or write the object."""


class ThrottledError(StorageError):
    """The store kept answering SlowDown/503 after every retry."""


class AlreadyExistsError(StorageError):
    """A put-if-absent found the object already there."""


class ConflictError(StorageError):
    """A conditional write lost: the object changed (or vanished) since the writer read it.

    The writer re-reads, merges and retries (``Storage.put_if_match``)."""


class StoreUnavailableError(StorageError):
    """The store could not be reached (connection refused or reset, timeouts, 5xx) after
    every client retry: an outage, not a problem of the object or of the shard."""


def is_outage(exc: BaseException) -> bool:
    """The store was unreachable or overloaded (after the client's retries): a shard that
    failed so is retried without spending an attempt. Looks through Ray's wrapper too (a
    RayTaskError keeps the worker's exception as ``cause``)."""
    cause = getattr(exc, "cause", None)
    return any(isinstance(e, (StoreUnavailableError, ThrottledError))
               for e in (exc, cause) if e is not None)


class SubmitError(PipelineError):
    """The Ray cluster could not be reached, refused the token, or refused the job."""


class WorkerStartError(PipelineError):
    """No worker could start (its constructor raised: bad weights, no GPU, …).

    Raised by a worker's ``ready()`` with where it failed (``node_id``, ``host``) and the full
    traceback (``trace``), so the driver can retry on another node and keep the traceback in
    the job's log; raised by the driver, one line, when the job gives up.
    """

    def __init__(self, message: str, node_id: str = "", host: str = "",
                 trace: str = "") -> None:
        super().__init__(message)
        self.node_id, self.host, self.trace = node_id, host, trace

    def __reduce__(self) -> tuple[object, ...]:  # keeps the fields across Ray's pickling
        return (type(self), (self.args[0], self.node_id, self.host, self.trace))


class ImageError(PipelineError):
    """One image cannot be processed. ``reason`` is a short stable class for grouping.

    Reasons: ``empty``, ``corrupt``, ``truncated``, ``unsupported_format``, ``too_large``,
    ``unsupported_mode``, ``fetch_failed``, ``upload_failed``, ``inference_failed``,
    ``invalid_key``, ``duplicate_key``, ``output_collision``, ``unsupported_depth``,
    ``multi_frame``, ``outside_source``, ``broken_link``, ``would_overwrite_input``,
    ``reserved_output``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


def one_line(exc: BaseException) -> str:
    """The line of an exception's text that carries its message, for one-line reports.

    Most exceptions put it first (pyarrow adds detail lines below it); an error relayed by Ray
    carries the remote traceback first and the original message last.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if any(line.startswith("Traceback") for line in lines) else lines[0]


class DeviceFaultError(PipelineError):
    """The accelerator failed in a way that poisons the process (illegal address, device-side
    assert, ECC): nothing more can run on it, so the worker exits and its shards go elsewhere."""


class WorkerUnhealthyError(PipelineError):
    """The worker's engine stopped (a device fault or a bug in its thread); the shards it held
    must be retried on another worker, never committed from this one."""


class SceneError(ImageError):
    """A scene (a DeblurGS unit of work) cannot be fitted; every view of it becomes a failed
    row with this reason.

    Reasons: ``no_poses``, ``too_few_views``, ``bad_scene``, ``corrupt`` (a view that does not
    decode), ``non_finite_loss``, ``out_of_memory``.
    """
