"""Site membership by mutual TLS: the site CA, host certificates, and the ssl contexts peers use.

A site has one CA (``appliance site init``), kept off the LAN by the operator. Each host gets a
key and a certificate signed by it (``appliance site enroll``), written with a copy of the CA
certificate into one *TLS directory*::

    ca.crt     the site CA certificate (the only trust anchor peers accept)
    host.key   this host's private key (mode 0600)
    host.crt   this host's certificate: CN and DNS SAN = hostname, IP SANs 127.0.0.1, ::1, ...

Both sides of every peer connection present a certificate and require one from the site CA,
so a host without a site certificate can neither list nor fetch, and a certificate from
another CA is refused during the handshake.

Hostname checking is off by default on the client: a member is trusted as a member, not as a
particular host, because every byte a peer sends is checked against the signed manifest, and
discovered peers are reached by whatever address DHCP gave them, which a certificate issued
at enrolment cannot predict. ``client_context(check_hostname=True)`` turns it on.

Keys are ECDSA P-256, which every TLS stack (OpenSSL, curl, browsers) accepts.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import fsutil
from appliance.errors import PeerError, UsageError

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
HOST_KEY = "host.key"
HOST_CERT = "host.crt"
DEFAULT_CA_DAYS = 3650
DEFAULT_HOST_DAYS = 825
LOOPBACK_IPS = ("127.0.0.1", "::1")
_MAX_PEM_BYTES = 64 * 1024
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"\A{_LABEL}(?:\.{_LABEL})*\Z")


@dataclass(frozen=True)
class SiteCA:
    """A site CA on disk: where its files are and the SHA-256 fingerprint of its certificate."""

    directory: Path
    subject: str
    fingerprint: str
    not_after: datetime

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY


@dataclass(frozen=True)
class HostIdentity:
    """A host's TLS directory: its certificate's facts and the files a context loads."""

    directory: Path
    hostname: str
    fingerprint: str
    ca_fingerprint: str
    ips: tuple[str, ...]
    not_after: datetime

    @property
    def cert_path(self) -> Path:
        return self.directory / HOST_CERT

    @property
    def key_path(self) -> Path:
        return self.directory / HOST_KEY

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def check_hostname_text(hostname: str) -> str:
    if len(hostname) > 253 or not _HOSTNAME.match(hostname):
        raise UsageError(
            f"{hostname!r} is not a valid host name (letters, digits, hyphens, dot-separated)"
        )
    return hostname.lower()


def _parse_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in (*LOOPBACK_IPS, *ips):
        try:
            ip = ipaddress.ip_address(text)
        except ValueError as e:
            raise UsageError(f"{text!r} is not an IP address") from e
        if ip not in out:
            out.append(ip)
    return out


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite: a second init must not clobber a site's CA key)."""
    try:
        fsutil.create_exclusive(path, data, mode)
    except FileExistsError as e:
        raise UsageError(f"{path} already exists; refusing to overwrite it") from e
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e}") from e


def _read_pem(path: Path, what: str) -> bytes:
    return fsutil.read_capped(path, _MAX_PEM_BYTES, what, error=UsageError, special=UsageError,
                              too_big=UsageError)


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_pem(path, what))
    except ValueError as e:
        raise UsageError(f"{what} {path} is not a PEM certificate: {e}") from e


def _load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_pem(path, what), password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{what} {path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{what} {path} is not an ECDSA key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(out_dir: Path, key_name: str, key: ec.EllipticCurvePrivateKey,
                cert_name: str, cert: x509.Certificate) -> None:
    """Key (owner only) and certificate into ``out_dir``; refused before writing either when
    one exists already."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out_dir}: {e}") from e
    for existing in (key_name, cert_name):
        if (out_dir / existing).exists():
            raise UsageError(f"{out_dir / existing} already exists; refusing to overwrite it")
    _write_new(out_dir / key_name, _key_pem(key), 0o600)
    _write_new(out_dir / cert_name, _cert_pem(cert), 0o644)


def _subject(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance"),
    ])


def _same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


def init_site(
    out_dir: Path,
    *,
    name: str = "appliance site CA",
    days: int = DEFAULT_CA_DAYS,
    now: datetime | None = None,
) -> SiteCA:
    """Make a site CA (key + self-signed certificate) in ``out_dir``; never overwrites."""
    if days <= 0:
        raise UsageError("--days must be positive")
    moment = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject(name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - timedelta(minutes=5))
        .not_valid_after(moment + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(out_dir, CA_KEY, key, CA_CERT, cert)
    return SiteCA(out_dir, name, fingerprint(cert), cert.not_valid_after_utc)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The site CA's certificate and key; UsageError when they do not belong together."""
    cert = _load_cert(ca_dir / CA_CERT, "site CA certificate")
    key = _load_key(ca_dir / CA_KEY, "site CA key")
    if not _same_key(key, cert):
        raise UsageError(f"{ca_dir / CA_KEY} is not the key of {ca_dir / CA_CERT}")
    return cert, key


def enroll_host(
    hostname: str,
    ca_dir: Path,
    out_dir: Path,
    *,
    ips: Sequence[str] = (),
    days: int = DEFAULT_HOST_DAYS,
    now: datetime | None = None,
) -> HostIdentity:
    """Issue a host key + certificate signed by the site CA into ``out_dir`` (with ca.crt)."""
    hostname = check_hostname_text(hostname)
    if days <= 0:
        raise UsageError("--days must be positive")
    addresses = _parse_ips(ips)
    ca_cert, ca_key = load_ca(ca_dir)
    moment = now or datetime.now(UTC)
    not_after = min(moment + timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    names += [x509.IPAddress(ip) for ip in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(hostname))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(out_dir, HOST_KEY, key, HOST_CERT, cert)
    ca_copy = out_dir / CA_CERT
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        if ca_copy.exists():
            if _load_cert(ca_copy, "site CA certificate") != ca_cert:
                raise UsageError(f"{ca_copy} is the certificate of another CA")
        else:
            _write_new(ca_copy, _cert_pem(ca_cert), 0o644)
    return HostIdentity(
        out_dir, hostname, fingerprint(cert), fingerprint(ca_cert),
        tuple(str(ip) for ip in addresses), cert.not_valid_after_utc,
    )


def load_identity(tls_dir: Path, *, now: datetime | None = None) -> HostIdentity:
    """Read and check a TLS directory: the host certificate is signed by ca.crt and current."""
    ca_cert = _load_cert(tls_dir / CA_CERT, "site CA certificate")
    cert = _load_cert(tls_dir / HOST_CERT, "host certificate")
    key = _load_key(tls_dir / HOST_KEY, "host key")
    if not _same_key(key, cert):
        raise UsageError(f"{tls_dir / HOST_KEY} is not the key of {tls_dir / HOST_CERT}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise UsageError(
            f"{tls_dir / HOST_CERT} is not issued by the site CA in {tls_dir / CA_CERT}"
        ) from e
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment < cert.not_valid_after_utc:
        raise UsageError(
            f"host certificate {tls_dir / HOST_CERT} is valid from {cert.not_valid_before_utc} "
            f"to {cert.not_valid_after_utc}; this host's clock says {moment}"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        ips = ()
    return HostIdentity(
        tls_dir, _common_name(cert), fingerprint(cert), fingerprint(ca_cert), ips,
        cert.not_valid_after_utc,
    )


def _tls_error(tls_dir: Path, e: Exception) -> UsageError:
    return UsageError(f"cannot load the TLS directory {tls_dir}: {e}")


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """Server side: present the host certificate, require a client certificate of the site."""
    load_identity(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 client may ask for handshake after handshake on one connection, each costing
    # the server a signature: refused, as nginx refuses client-initiated renegotiation.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(tls_dir / HOST_CERT, tls_dir / HOST_KEY)
        ctx.load_verify_locations(cafile=tls_dir / CA_CERT)
    except (ssl.SSLError, OSError) as e:
        raise _tls_error(tls_dir, e) from e
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls_dir: Path, *, check_hostname: bool = False) -> ssl.SSLContext:
    """Client side: present the host certificate, accept only servers of the site CA."""
    load_identity(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls_dir / HOST_CERT, tls_dir / HOST_KEY)
        ctx.load_verify_locations(cafile=tls_dir / CA_CERT)
    except (ssl.SSLError, OSError) as e:
        raise _tls_error(tls_dir, e) from e
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_tls_failure(url: str, e: BaseException) -> PeerError:
    """A handshake failure as a PeerError that says it is about site membership."""
    return PeerError(
        f"TLS handshake with {url} failed: {e}. Both hosts need certificates from the same "
        "site CA ('appliance site enroll')"
    )
