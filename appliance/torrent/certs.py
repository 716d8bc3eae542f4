"""The site certificate libtorrent accepts for SSL torrents, issued by the site CA.

An SSL torrent (its info dict holds the site CA certificate, ``ssl-cert``) is joined only by
peers whose certificate chains to that CA; libtorrent ALSO requires the certificate to name
the torrent (a DNS SubjectAltName or CN equal to the torrent's name, or ``*``). The host
certificates of ``appliance site enroll`` name the host, so libtorrent refuses them with
"certificate verify failed". ``enroll_torrent`` issues a second key and certificate from the
same site CA into the host's TLS directory, with the host's name as CN and the DNS SAN ``*``
(any torrent whose root is this site's CA)::

    torrent.key   the key libtorrent presents (mode 0600)
    torrent.crt   CN = hostname, DNS SAN "*", signed by the site CA

The CA key is needed once per host, as for ``site enroll``. ``DH_PARAMS`` is RFC 7919's
ffdhe2048 group: libtorrent's SSL context wants DH parameters, and a fixed standard group
needs no generation (which takes minutes) and no file to carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import fsutil
from appliance.errors import UsageError
from appliance.peer import tls

TORRENT_KEY = "torrent.key"
TORRENT_CERT = "torrent.crt"
ANY_TORRENT = "*"
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class TorrentIdentity:
    """What libtorrent needs for an SSL torrent: our certificate, key, and the site CA."""

    cert_pem: str
    key_pem: str
    ca_pem: str


def enroll_torrent(ca_dir: Path, tls_dir: Path, *, days: int = tls.DEFAULT_HOST_DAYS,
                   now: datetime | None = None) -> Path:
    """Issue ``torrent.key`` + ``torrent.crt`` into ``tls_dir`` (a host's, from site enroll)."""
    if days <= 0:
        raise UsageError("--days must be positive")
    host = tls.load_identity(tls_dir, now=now)
    ca_cert, ca_key = tls.load_ca(ca_dir)
    if tls.fingerprint(ca_cert) != host.ca_fingerprint:
        raise UsageError(f"{ca_dir} is not the CA that issued {host.cert_path}")
    moment = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, host.hostname),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance"),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - timedelta(minutes=5))
        .not_valid_after(min(moment + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ANY_TORRENT)]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = tls_dir / TORRENT_KEY, tls_dir / TORRENT_CERT
    for existing in (key_path, cert_path):
        if existing.exists():
            raise UsageError(f"{existing} already exists; refusing to overwrite it")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        fsutil.create_exclusive(key_path, key_pem, 0o600)
        fsutil.create_exclusive(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise UsageError(f"cannot write into {tls_dir}: {e}") from e
    return cert_path


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text("ascii")
    except FileNotFoundError as e:
        raise UsageError(
            f"{what} {path} does not exist: SSL torrents need a torrent certificate from the "
            "site CA ('appliance torrent enroll --ca CA_DIR --tls-dir DIR'), or --insecure"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {e}") from e


def load_torrent_identity(tls_dir: Path) -> TorrentIdentity:
    """The torrent certificate of ``tls_dir``, checked: issued by its ca.crt, names ``*``."""
    ca_pem = _read(tls_dir / tls.CA_CERT, "site CA certificate")
    cert_pem = _read(tls_dir / TORRENT_CERT, "torrent certificate")
    key_pem = _read(tls_dir / TORRENT_KEY, "torrent key")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise UsageError(f"{tls_dir / TORRENT_CERT} is not issued by the site CA in "
                         f"{tls_dir / tls.CA_CERT}: {e}") from e
    return TorrentIdentity(cert_pem, key_pem, ca_pem)


def same_certificate(pem_a: str | bytes, pem_b: str | bytes) -> bool:
    """Two PEM certificates are the same certificate (whitespace and line ends aside)."""
    def der(pem: str | bytes) -> bytes | None:
        try:
            raw = pem.encode() if isinstance(pem, str) else pem
            return x509.load_pem_x509_certificate(raw).public_bytes(serialization.Encoding.DER)
        except ValueError:
            return None

    a = der(pem_a)
    return a is not None and a == der(pem_b)
