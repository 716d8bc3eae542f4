"""Plain words for every refusal and failure the operator can meet, with what to do next.

The library's messages are precise but written for logs; the operator inside the site gets a
title, what happened, and the next step. The exact library message is kept underneath for
the person they call. Most specific class first: the first ``isinstance`` match wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import (
    ApplianceError,
    AuditChainError,
    DecompressionError,
    DiskFullError,
    DoctorError,
    ExpiredError,
    FingerprintMismatchError,
    FormatError,
    IntegrityError,
    KeyFileError,
    MediaError,
    MissingVolumeError,
    ModelNotFoundError,
    NoTrustRootError,
    PeerError,
    RecipeError,
    RefusalError,
    RollbackError,
    RotationError,
    ScopeError,
    ServeError,
    SignatureError,
    StoreError,
    ThresholdError,
    TruncatedError,
    TrustError,
    UsageError,
    WorkerCrashedError,
)


@dataclass(frozen=True)
class Explanation:
    title: str
    what: str
    next_step: str
    detail: str  # the library's own message
    refused: bool  # a safety refusal (red), not a plain failure

    def text(self) -> str:
        return f"{self.title}\n\n{self.what}\n\nWhat to do: {self.next_step}\n\n({self.detail})"


_TABLE: tuple[tuple[type[BaseException], str, str, str], ...] = (
    (RollbackError, "Refused: older bundle (rollback)",
     "This host already accepted a newer bundle on the same channel, or the same sequence "
     "with different contents. Installing it would roll the models back.",
     "Ask the publisher for the current bundle of this channel. Do not try to force it."),
    (ExpiredError, "Refused: expired",
     "The bundle (or the trust root it relies on) is past its expiry date, or this host's "
     "clock is wrong.",
     "Check the clock first. If the date is right and you must use it anyway, use 'Allow "
     "expired' and type a reason: it is written to the audit log."),
    (ScopeError, "Refused: signer not allowed for this model",
     "The bundle is signed, but by a publisher key that the trust root does not allow to "
     "sign models of this name.",
     "Do not import it. Tell the publisher which model and key; they must sign with a key "
     "that is allowed, or rotate the trust root."),
    (ThresholdError, "Refused: not enough valid signatures",
     "The bundle is not signed by enough publisher keys that this host trusts (unknown "
     "signer, revoked key, or a signature that does not match the contents).",
     "Do not import it. Get a bundle signed by the site's publishers, or a newer trust "
     "root on the same media if keys were rotated."),
    (SignatureError, "Refused: bad signature",
     "A signature on the media is malformed or does not match.",
     "Do not import it. Get a fresh copy of the bundle from the publisher."),
    (FingerprintMismatchError, "Refused: fingerprint does not match",
     "The trust root file is not the one whose fingerprint you typed.",
     "Do not install it. Get the root file and the paper fingerprint from the signing "
     "ceremony again, and type the fingerprint from the paper."),
    (NoTrustRootError, "No trust root installed",
     "This host does not trust any publisher yet, so no bundle can be checked.",
     "Go to the Trust screen (key 7) and install the site's root with the fingerprint "
     "from the signing ceremony's paper."),
    (RotationError, "Refused: trust root update is not valid",
     "The media carries a trust root update that is not signed by enough of the current "
     "root keys, skips a version, or conflicts with what this host accepted.",
     "Do not import it. Report it to whoever runs the site's signing ceremony."),
    (TrustError, "Refused: trust root problem",
     "The trust root is invalid or a key acts outside its role.",
     "Do not import it. Report the details below to the site's signing team."),
    (TruncatedError, "Refused: media cut short",
     "A file on the media is shorter than the signed manifest says: the copy is incomplete.",
     "Copy the bundle onto the media again (or try another volume), then retry."),
    (DecompressionError, "Refused: damaged data",
     "Compressed data on the media is invalid or larger than declared (possibly hostile).",
     "Do not import it. Get a fresh copy of the bundle."),
    (IntegrityError, "Refused: tampered or damaged chunk",
     "Some bytes on the media do not match the signed manifest: the media was altered or "
     "damaged. Nothing from it was made visible in the store.",
     "Do not use this media. Get a fresh copy and verify again; report it if it repeats."),
    (FormatError, "Refused: malformed bundle",
     "A file on the media is malformed or breaks a safety limit.",
     "Do not import it. Get a fresh copy of the bundle from the publisher."),
    (AuditChainError, "Audit log broken",
     "The audit log's hash chain does not check out: a record was edited, removed or "
     "reordered.",
     "Stop and report it to the site's security officer; keep the store as it is."),
    (MissingVolumeError, "Another volume is needed",
     "Some chunks are on a volume that is not inserted.",
     "Insert the next volume (see the list of missing volumes) and add its path."),
    (MediaError, "Media unreadable",
     "The media could not be read, or it holds no bundle.",
     "Check that the media is mounted and that the path points at the bundle."),
    (DiskFullError, "Disk full",
     "The store's disk does not have enough free space.",
     "Free space (remove unused models on the Models screen) and resume: nothing is lost."),
    (ModelNotFoundError, "No such model",
     "The store has no model by that name.",
     "Refresh the Models screen; import the model first."),
    (StoreError, "Store problem",
     "The store could not do this (busy, locked, or an I/O error).",
     "Wait for other work on the store to finish and retry; see the details below."),
    (PeerError, "Peer problem",
     "A peer did not answer, or answered wrongly; it was dropped.",
     "Try another peer, or retry later. Bytes already verified are kept."),
    (WorkerCrashedError, "The model crashed",
     "The llama.cpp worker died; the server restarts it.",
     "Retry; if it repeats, this model may not suit this CPU. Run 'appliance doctor'."),
    (ServeError, "Server problem",
     "The inference server could not do what was asked.",
     "See the details below; stop and start the server if it persists."),
    (RefusalError, "Refused",
     "A safety check refused this input.",
     "Do not use it. Report the details below to whoever supplied it."),
    (RecipeError, "Bundle recipe problem", "The bundle recipe is invalid.",
     "Correct the recipe as the details below say, then build again."),
    (DoctorError, "Host check failed",
     "An essential check of this host failed, so models may not run here.",
     "Run 'appliance doctor' for the full report and fix what it names."),
    (KeyFileError, "Key file problem", "A key file is unreadable or the passphrase is wrong.",
     "Check the file and the passphrase."),
    (UsageError, "Check the input",
     "What was typed or asked cannot be done as given (a path that does not exist, a "
     "missing value, a step that must come first). Nothing was refused for safety.",
     "Read the details below and correct the input."),
)


def explain(error: BaseException) -> Explanation:
    """The plain-words explanation of ``error`` (any exception; unknown ones say 'bug')."""
    for cls, title, what, next_step in _TABLE:
        if isinstance(error, cls):
            return Explanation(title, what, next_step, f"{type(error).__name__}: {error}",
                               refused=isinstance(error, RefusalError))
    if isinstance(error, ApplianceError):
        return Explanation("Failed", "The operation failed.", "See the details below.",
                           f"{type(error).__name__}: {error}", refused=False)
    return Explanation(
        "Unexpected error",
        "Something failed that appliance did not expect (a bug).",
        "Note the details below and report them; the store is left as it was.",
        f"{type(error).__name__}: {error}", refused=False,
    )
