"""The client's TLS material, read and checked as OpenSSL will use it before any channel
gets it: gRPC's core aborts the whole process on a certificate without its key, and only
fails each handshake (UNAVAILABLE, the reason in its log) on material it cannot use (a key
of another certificate, a garbled PEM block, an encrypted key)."""

from __future__ import annotations

import os
import ssl
from contextlib import contextmanager

# What each kind of PEM material holds (a key's header names its type: "RSA PRIVATE KEY",
# "EC PRIVATE KEY", "PRIVATE KEY").
CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"


def read_pem(material, name: str, marker: bytes) -> bytes | None:
    """PEM bytes as given, or read from a path; refused (ValueError naming it) where they
    hold no PEM block of their kind."""
    if material is None:
        return None
    pem = material
    if not isinstance(material, bytes):
        with open(material, "rb") as f:
            pem = f.read()
    if marker not in pem:
        kind = "private key" if marker == PRIVATE_KEY else "certificate"
        found = f"{marker.decode()!r} not found"
        raise ValueError(f"{described(name, material)}: no PEM {kind} ({found})")
    return pem


def described(name: str, material) -> str:
    """An option's name, and its path where it was given one."""
    return name if isinstance(material, bytes) else f"{name} ({material})"


def check_usable(root_pem: bytes | None, cert_pem: bytes | None, key_pem: bytes | None,
                 given: dict) -> None:  # fmt: skip
    """Load the material into an OpenSSL context as gRPC will: certificates that do not
    parse, and a key that is not the certificate's own or is encrypted, are refused
    (ValueError naming the options as `given`: option name -> the caller's bytes or path)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name, pem in (("root_certificates", root_pem), ("client_certificate", cert_pem)):
        if pem is not None:
            try:
                context.load_verify_locations(cadata=pem.decode("latin-1"))
            except ssl.SSLError as e:
                reason = f"a certificate that does not parse; OpenSSL: {e.reason or e}"
                raise ValueError(f"{described(name, given[name])}: unusable ({reason})") from None
    if cert_pem is None or key_pem is None:
        return
    if not hasattr(os, "memfd_create"):
        return  # not Linux: gRPC's handshakes are the check
    try:
        with _in_memory_file(cert_pem) as cert_path, _in_memory_file(key_pem) as key_path:
            # An empty password: an encrypted key fails here, which gRPC cannot read
            # either, rather than OpenSSL prompting on the terminal.
            context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as e:
        pair = (f"{described('client_certificate', given['client_certificate'])} / "
                f"{described('client_key', given['client_key'])}")  # fmt: skip
        raise ValueError(
            f"{pair}: unusable ({e.reason or e}); the key must be the certificate's own, "
            "unencrypted"
        ) from None
    except OSError:
        pass  # no /proc to reach the memory file by: gRPC's handshakes are the check


@contextmanager
def _in_memory_file(data: bytes):
    """A path to `data` that exists in memory only (a Linux memfd), for OpenSSL, which
    loads a certificate chain from files alone: a private key given as bytes is never
    written to a disk."""
    fd = os.memfd_create("gradserve-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
