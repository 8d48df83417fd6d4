"""Credentials of a federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

Made with ``cryptography`` (no ``openssl``/``ssh-keygen`` needed): ECDSA P-384
throughout. Files that already exist are kept, so a restarted deployment keeps its
identity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.storage import atomic_write_bytes

SERVER_HOSTS = ("127.0.0.1", "localhost")
"""Names a local SuperLink's certificate always carries (its own processes dial 127.0.0.1)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Paths of the TLS and node-authentication files of one federation.

    Private keys (``ca.key``, ``server.key``, ``supernode-<i>``) are written with
    mode 0600. Node keys are OpenSSH-format ECDSA P-384 keys, the format
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    accept (a PEM/PKCS#8 key is rejected).
    """

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """CA certificate: SuperNodes and ``flwr`` trust the SuperLink through it."""
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """CA private key: signs server certificates; keep it off the network."""
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        """SuperLink TLS certificate (SAN: the host names SuperNodes dial)."""
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        """SuperLink TLS private key."""
        return self.directory / "server.key"

    def node_key(self, index: int) -> Path:
        """Private key of SuperNode ``index`` (stays on the silo's host)."""
        return self.directory / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        """Public key of SuperNode ``index`` (registered on the SuperLink)."""
        return self.directory / f"supernode-{index}.pub"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600), atomically.

    A key is never half-written: a full disk or a crash leaves no file (or the old one),
    so the next start does not keep a truncated key.
    """
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (0644), atomically."""
    atomic_write_bytes(path, data, mode=0o644)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_ca(directory: Path, *, days: int = 365) -> Credentials:
    """Create a self-signed CA (ECDSA P-384) in ``directory`` unless it exists.

    Parameters
    ----------
    directory : Path
        Where ``ca.crt`` and ``ca.key`` go (created with mode 0700).
    days : int
        Validity of the CA certificate.

    Returns
    -------
    Credentials
        The paths of ``directory``.
    """
    creds = Credentials(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if creds.ca_cert.exists() and creds.ca_key.exists():
        return creds
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(
        creds.ca_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_public(creds.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return creds


def create_server_certificate(
    creds: Credentials, hosts: Sequence[str] = SERVER_HOSTS, *, days: int = 365
) -> Path:
    """Sign a SuperLink certificate for ``hosts`` (IP or DNS SANs) with the CA.

    An existing ``server.crt`` is replaced only if its SANs differ from ``hosts``.

    Parameters
    ----------
    creds : Credentials
        Holds the CA made by :func:`create_ca`.
    hosts : Sequence[str]
        Names and addresses SuperNodes and ``flwr`` use to reach the SuperLink;
        TLS verification fails for any other.
    days : int
        Validity of the certificate.

    Returns
    -------
    Path
        The server certificate.
    """
    if not hosts:
        raise ValueError("hosts must name at least one IP address or DNS name")
    sans = [_san(h) for h in hosts]
    if creds.server_cert.exists() and creds.server_key.exists():
        old = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
        old_sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(old_sans) == set(sans):
            return creds.server_cert
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{creds.ca_key} is not an EC key")
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(
        creds.server_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_public(creds.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return creds.server_cert


def create_node_key(private_path: Path, comment: str = "") -> Path:
    """Create an ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``.

    Parameters
    ----------
    private_path : Path
        The private key file (mode 0600); the public key goes to ``<path>.pub``.
        An existing pair is kept.
    comment : str
        Appended to the public key line (``ssh-keygen -C``).

    Returns
    -------
    Path
        The public key file.
    """
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and public_path.exists():
        return public_path
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_public(public_path, line + (f" {comment}".encode() if comment else b"") + b"\n")
    return public_path


def create_credentials(
    directory: Path, num_nodes: int, hosts: Sequence[str] = SERVER_HOSTS
) -> Credentials:
    """CA, SuperLink certificate for ``hosts`` and ``num_nodes`` node key pairs.

    Files that already exist are kept (a restarted deployment keeps its identity).
    """
    creds = create_ca(directory)
    create_server_certificate(creds, hosts)
    for i in range(num_nodes):
        create_node_key(creds.node_key(i), comment=f"fedrec-supernode-{i}")
    return creds
