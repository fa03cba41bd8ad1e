"""The HTTPS listener's certificate: the user's own, or a self-signed one made on first start.

A self-signed certificate proves nothing by itself; clients trust it by its SHA-256 fingerprint instead, which the
daemon prints at start and ``corral remote add`` shows and pins (as ``ssh`` does with host keys). The key is an
EC P-256 key: fast handshakes, small certificates, supported everywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidInput
from corral.tlsutil import fingerprint_of_pem


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    fingerprint: str
    generated: bool = False


def _names(listen_host: str | None) -> tuple[list[str], list[str]]:
    dns = {"localhost", socket.gethostname(), socket.getfqdn()}
    ips = {"127.0.0.1", "::1"}
    if listen_host and listen_host not in ("0.0.0.0", "::", ""):
        try:
            ipaddress.ip_address(listen_host)
            ips.add(listen_host)
        except ValueError:
            dns.add(listen_host)
    return sorted(n for n in dns if n), sorted(ips)


def generate(cert_path: Path, key_path: Path, listen_host: str | None = None) -> None:
    """A self-signed certificate for this host's names and addresses, valid for ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = _names(listen_host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"corral {socket.gethostname()}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def ensure(home: Path, cert: Path | None = None, key: Path | None = None, listen_host: str | None = None) -> TLSFiles:
    """The certificate to serve: ``cert``/``key`` if given, else CORRAL_HOME/tls/server.{crt,key}, made if missing."""
    if (cert is None) != (key is None):
        raise InvalidInput("--cert and --key go together", "pass both, or neither for a self-signed certificate")
    generated = False
    if cert is None or key is None:
        cert, key = home / "tls" / "server.crt", home / "tls" / "server.key"
        if not (cert.exists() and key.exists()):
            generate(cert, key, listen_host)
            generated = True
    for path, what in ((cert, "certificate"), (key, "key")):
        if not path.is_file():
            raise InvalidInput(f"TLS {what} {path} does not exist", f"give the path of a PEM {what}")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidInput(f"cannot use {cert} and {key}: {exc}", "give a PEM certificate and its private key") from exc
    text = cert.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n"
    return TLSFiles(cert=cert, key=key, fingerprint=fingerprint_of_pem(first), generated=generated)
