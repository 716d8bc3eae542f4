"""The one exception tree of appliance.

Every error the library raises on purpose is an ``ApplianceError``; third-party errors
(cryptography, zstandard, yaml, sqlite3, httpx, OSError) are translated at the edge that
calls them, with ``raise ... from e``.

Exit codes follow one rule (docs/CLI.md, "Exit codes", says the same to operators):

    0  ok
    1  usage: the command cannot run as given. Bad arguments, or something it needs is not
       there yet: a file named on the command line (recipe, key, root, media), the store, the
       trust root. The message says what to do first. Each such error is a ``UsageError`` or
       sets ``exit_code = EXIT_USAGE`` while staying in its family (``MissingKeyFileError`` is
       a ``KeyFileError``, ``NoTrustRootError`` a ``TrustError``), so callers catch it as before.
    2  refused: the input was checked and must not be used (``RefusalError``: integrity,
       signature, trust, rollback, expiry, audit chain). Worth a call to the security officer.
    3  any other error: I/O, disk full, a peer unreachable, volumes still needed, a bug.

The tree:

    ApplianceError                      exit 3 unless a subclass says otherwise
    ├── UsageError                      exit 1: bad arguments, missing files named by the user
    ├── RefusalError                    exit 2: integrity, signature or trust refusal
    │   ├── IntegrityError              bytes differ from what the signed manifest says
    │   │   ├── TruncatedError          fewer bytes than declared (media cut short)
    │   │   └── DecompressionError      zstd frame invalid or bigger than declared (bomb)
    │   ├── FormatError                 hostile or malformed input (manifest, index, YAML, GGUF)
    │   │   ├── LimitExceededError      a cap from appliance.limits was exceeded
    │   │   ├── UnsafePathError         absolute path, "..", duplicate, bad characters
    │   │   └── SpecialFileError        a file on media is a FIFO, device, socket or directory
    │   ├── SignatureError              a signature is malformed or does not verify
    │   │   └── ThresholdError          fewer distinct valid signers than the role's threshold
    │   ├── TrustError                  trust root invalid, wrong role, unknown key
    │   │   ├── RotationError           chain gap, version down, missing old/new root signatures
    │   │   ├── FingerprintMismatchError  operator's fingerprint does not match the root
    │   │   ├── ScopeError              a publisher signed a model outside its name patterns
    │   │   └── NoTrustRootError        nothing installed to verify against (exit 1)
    │   ├── RollbackError               older channel sequence, or same sequence, other bytes
    │   ├── ExpiredError                bundle or root past its expiry (says both clocks)
    │   └── AuditChainError             audit log edited, removed or reordered
    ├── KeyFileError                    unreadable key, wrong passphrase, not Ed25519
    │   └── MissingKeyFileError         the key file named does not exist (exit 1)
    ├── RecipeError                     a bundle recipe is invalid
    │   ├── SourceUnavailableError      a source is not there: not in the HF cache, unknown
    │   │                               revision, download not allowed or failed
    │   └── QuantizeError               quantize: cannot be done (already quantized, llama.cpp)
    ├── MediaError                      media unreadable or incomplete
    │   └── MissingVolumeError          a volume the operation needs is not present
    ├── StoreError                      store unusable: I/O, disk full, locked, inconsistent
    │   ├── DiskFullError               not enough space (says how much is needed)
    │   ├── StoreNotFoundError          no store at that path yet (exit 1; never created)
    │   └── ModelNotFoundError          no such model in the store
    ├── PeerError                       a peer is unreachable, misbehaves or lies
    │   └── PeerProtocolError           a peer's response breaks the protocol
    ├── ServeError                      the inference server cannot do what was asked
    │   ├── WorkerCrashedError          the llama.cpp worker died (signal named)
    │   ├── BadRequestError             an API request is malformed or too long (HTTP 400)
    │   └── QueueFullError              the bounded request queue is full (HTTP 429)
    └── DoctorError                     an essential doctor check failed

Subclasses carry the facts a caller acts on as attributes (``IntegrityError.chunk``,
``.file``, ``.volume``, ``.offset``), and the message names them too.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_REFUSED = 2
EXIT_ERROR = 3


class ApplianceError(Exception):
    """Root of every error appliance raises on purpose."""

    exit_code: int = EXIT_ERROR


class UsageError(ApplianceError):
    """The command line or a file named on it is wrong."""

    exit_code = EXIT_USAGE


class RefusalError(ApplianceError):
    """Integrity, signature or trust refusal: the input must not be used."""

    exit_code = EXIT_REFUSED


class IntegrityError(RefusalError):
    """Bytes do not match what the signed manifest says.

    Attributes name where: ``chunk`` (hex hash), ``file`` (path in the model), ``volume``
    (volume name), ``offset`` (byte offset in the pack or file). Any may be None.
    """

    def __init__(
        self,
        message: str,
        *,
        chunk: str | None = None,
        file: str | None = None,
        volume: str | None = None,
        offset: int | None = None,
    ) -> None:
        where = [
            f"{label} {value}"
            for label, value in (
                ("chunk", chunk),
                ("file", file),
                ("volume", volume),
                ("offset", offset),
            )
            if value is not None
        ]
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.chunk = chunk
        self.file = file
        self.volume = volume
        self.offset = offset


class TruncatedError(IntegrityError):
    """Fewer bytes than declared: media cut short or a file truncated."""


class DecompressionError(IntegrityError):
    """A zstd frame is invalid or would expand beyond its declared length."""


class FormatError(RefusalError):
    """Hostile or malformed input: manifest, volume index, trust root, YAML, GGUF."""


class LimitExceededError(FormatError):
    """A cap from ``appliance.limits`` was exceeded."""


class UnsafePathError(FormatError):
    """A path is absolute, climbs with "..", repeats, or has forbidden characters."""


class SpecialFileError(FormatError):
    """A file the reader would open (from media, usually) is not a regular file: a FIFO, a
    device, a socket or a directory, or a symlink to one. Refused before it is read, so a
    FIFO cannot block and /dev/zero cannot be read without end."""


class SignatureError(RefusalError):
    """A signature is malformed or does not verify."""


class ThresholdError(SignatureError):
    """Fewer distinct valid signers than the role's threshold."""


class TrustError(RefusalError):
    """The trust root is invalid, a key is unknown, or a key acts outside its role."""


class RotationError(TrustError):
    """A root chain has a gap, goes down, or lacks old or new root signatures."""


class FingerprintMismatchError(TrustError):
    """The fingerprint read by the operator does not match the root."""


class ScopeError(TrustError):
    """A publisher key signed a model whose name its patterns in the trust root do not allow."""


class NoTrustRootError(TrustError):
    """No trust root is installed in the store: install one first (a usage error, exit 1,
    not a refusal; still a TrustError for callers)."""

    exit_code = EXIT_USAGE


class RollbackError(RefusalError):
    """An older channel sequence, or the same sequence with different manifest bytes."""


class ExpiredError(RefusalError):
    """A bundle or root is past its expiry; the message gives its dates and the host's time."""


class AuditChainError(RefusalError):
    """The audit log's hash chain is broken: a record was edited, removed or reordered."""


class KeyFileError(ApplianceError):
    """A key file is unreadable, the passphrase is wrong, or the key is not Ed25519."""


class MissingKeyFileError(KeyFileError):
    """The key file named on the command line does not exist (exit 1, like a missing recipe)."""

    exit_code = EXIT_USAGE


class RecipeError(ApplianceError):
    """A bundle recipe is invalid."""


class SourceUnavailableError(RecipeError):
    """A recipe names a source that is not there: a Hugging Face file missing from the local
    cache (and downloading not allowed), a revision the cache does not know, a failed
    download. The message says what to run on a connected machine first."""


class QuantizeError(RecipeError):
    """A recipe's ``quantize:`` cannot be done: the source is already quantized or not a
    GGUF, the type is unknown, the importance matrix is unusable, or llama.cpp failed (its
    reason is in the message)."""


class MediaError(ApplianceError):
    """Media is unreadable or incomplete."""


class MissingVolumeError(MediaError):
    """A volume the operation needs is not present."""


class StoreError(ApplianceError):
    """The store is unusable: I/O error, disk full, locked, or inconsistent."""


class DiskFullError(StoreError):
    """Not enough free space; the message says how much is needed."""


class StoreNotFoundError(StoreError):
    """No store at the path given: a command that only reads does not create one (exit 1)."""

    exit_code = EXIT_USAGE


class ModelNotFoundError(StoreError):
    """No such model in the store."""


class PeerError(ApplianceError):
    """A peer is unreachable, misbehaves or lies."""


class PeerProtocolError(PeerError):
    """A peer's response breaks the protocol (size, shape, status)."""


class ServeError(ApplianceError):
    """The inference server cannot do what was asked."""


class WorkerCrashedError(ServeError):
    """The llama.cpp worker process died; the message names the signal."""


class BadRequestError(ServeError):
    """An API request is malformed, asks for what the model cannot do, or is too long."""


class QueueFullError(ServeError):
    """The bounded request queue is full; the client should retry later."""


class DoctorError(ApplianceError):
    """An essential doctor check failed."""
