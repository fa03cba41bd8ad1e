"""Certificate fingerprints, at the bottom of the layers: the daemon computes them for its listener (api/tls.py)
and the CLI pins them (`corral remote add`), and the CLI must not import the API to do so."""

from __future__ import annotations

import hashlib
import ssl

from corral.errors import InvalidInput


def fingerprint_of_pem(pem: str | bytes) -> str:
    """SHA-256 of the certificate's DER form, as colon-separated hex (what browsers and openssl show)."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode() if isinstance(pem, bytes) else pem)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    hexits = text.replace(":", "").replace(" ", "").upper()
    if len(hexits) != 64 or any(c not in "0123456789ABCDEF" for c in hexits):
        raise InvalidInput(
            f"invalid certificate fingerprint {text!r}", "give the SHA-256 fingerprint the daemon printed"
        )
    return ":".join(hexits[i : i + 2] for i in range(0, 64, 2))
