"""TLS material for the services: gRPC server and channel credentials (mutual TLS), and uvicorn's TLS settings.

Each process has one certificate and key (PEM) and one CA bundle. A gRPC server built from them asks
every client for a certificate signed by that CA (require_client_auth); a channel built from them
presents the certificate as its client certificate and trusts only that CA for the server's. Usage::

    tls = TLSFiles.from_config("RECSYS_RANKING_", config.tls_cert_file, config.tls_key_file, config.tls_ca_file)
    server.add_secure_port(address, tls.server_credentials())       # mutual TLS
    channel = grpc.secure_channel(address, tls.channel_credentials())
    uvicorn.Config(app, **tls.uvicorn_kwargs())                       # HTTPS for REST

Files are parsed with `cryptography` when loaded, so a wrong file is a startup error that names the
setting and the file (not a handshake failure later), and the key must belong to the certificate.
The server re-reads changed files on the next handshake (grpc's dynamic credentials), so renewed
certificates take effect without a restart; channels and uvicorn read them once, at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from recsys_common.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSMaterial:
    """PEM bytes, checked: the certificate chain parses, the key is the certificate's, the CA bundle parses."""

    cert_chain: bytes
    private_key: bytes
    ca_certs: bytes | None


def _read(var: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config {var!r} has value '{path}'. Cannot read it ({exc.strerror}).") from None


def _certificates(var: str, path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"Config {var!r} has value '{path}'. Not a PEM certificate file.")
    return certs


@dataclass(frozen=True)
class TLSFiles:
    """Where one process's TLS material lives; prefix names its settings in errors (e.g. "RECSYS_RANKING_")."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    prefix: str = "RECSYS_"

    @classmethod
    def from_config(
        cls, prefix: str, cert_file: Path | None, key_file: Path | None, ca_file: Path | None
    ) -> TLSFiles | None:
        """None when no TLS is configured; the files are loaded and checked once here."""
        check_tls_settings(prefix, cert_file, key_file, ca_file)
        if cert_file is None or key_file is None:
            return None
        files = cls(Path(cert_file), Path(key_file), Path(ca_file) if ca_file is not None else None, prefix)
        files.load()
        return files

    def _var(self, field: str) -> str:
        return f"{self.prefix}{field.upper()}"

    def load(self) -> TLSMaterial:
        chain = _read(self._var("tls_cert_file"), self.cert_file)
        key_pem = _read(self._var("tls_key_file"), self.key_file)
        cert = _certificates(self._var("tls_cert_file"), self.cert_file, chain)[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"Config {self._var('tls_key_file')!r} has value '{self.key_file}'. "
                "Not a PEM private key without a passphrase."
            ) from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise ConfigError(
                f"Config {self._var('tls_key_file')!r} has value '{self.key_file}'. "
                f"It is not the key of the certificate in {self.cert_file}."
            )
        ca = None
        if self.ca_file is not None:
            ca = _read(self._var("tls_ca_file"), self.ca_file)
            _certificates(self._var("tls_ca_file"), self.ca_file, ca)
        return TLSMaterial(chain, key_pem, ca)

    # -- gRPC ----------------------------------------------------------------------------------------
    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Server credentials; with require_client_auth (needs ca_file) a client without a certificate signed
        by the CA fails the handshake. Changed files are picked up on the next handshake."""
        if require_client_auth and self.ca_file is None:
            raise ConfigError(f"Config {self._var('tls_ca_file')!r} is not set. Mutual TLS needs the client CA.")
        material = self.load()
        stamp = [self._stamp()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            now = self._stamp()
            if now == stamp[0]:
                return None
            try:
                fresh = self.load()
            except ConfigError as exc:  # half-written during a rotation: keep the current material
                log.error("TLS files changed but cannot be used yet: %s", exc)
                return None
            stamp[0] = now
            log.info("TLS: serving the renewed certificate from %s", self.cert_file)
            return _server_config(fresh, require_client_auth)

        return grpc.dynamic_ssl_server_credentials(
            _server_config(material, require_client_auth), fetch, require_client_authentication=require_client_auth
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side of mutual TLS: trust only ca_file for the server, present cert_file as the client."""
        material = self.load()
        if material.ca_certs is None:
            raise ConfigError(f"Config {self._var('tls_ca_file')!r} is not set. A TLS channel needs the server's CA.")
        return grpc.ssl_channel_credentials(
            root_certificates=material.ca_certs,
            private_key=material.private_key,
            certificate_chain=material.cert_chain,
        )

    # -- REST ----------------------------------------------------------------------------------------
    def uvicorn_kwargs(self) -> dict[str, Any]:
        """HTTPS for uvicorn.Config (server certificate only: REST clients authenticate with keys or tokens)."""
        return {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.cert_file, self.key_file, self.ca_file):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size) if st is not None else (0, 0))
        return tuple(out)


def _server_config(material: TLSMaterial, require_client_auth: bool) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)],
        root_certificates=material.ca_certs if require_client_auth else None,
    )


def check_tls_settings(prefix: str, cert_file: Path | None, key_file: Path | None, ca_file: Path | None) -> None:
    """Certificate and key come together; a CA alone means nothing (a config's __post_init__ calls this)."""
    if (cert_file is None) != (key_file is None):
        have, missing = ("TLS_CERT_FILE", "TLS_KEY_FILE")
        if cert_file is None:
            have, missing = missing, have
        raise ConfigError(f"Config '{prefix}{have}' is set but '{prefix}{missing}' is not. TLS needs both.")
    if ca_file is not None and cert_file is None:
        raise ConfigError(
            f"Config '{prefix}TLS_CA_FILE' is set without '{prefix}TLS_CERT_FILE' / '{prefix}TLS_KEY_FILE'."
        )


def check_service_security(prefix: str, config: Any) -> None:
    """A gRPC service config's mode, TLS and bundle-key settings (called from its __post_init__).

    Production mode needs mutual TLS material and the bundle public key; the message names every one missing.
    """
    if config.mode not in ("dev", "production"):
        raise ConfigError(f"Config '{prefix}MODE' has value {config.mode!r}. Must be one of dev, production.")
    check_tls_settings(prefix, config.tls_cert_file, config.tls_key_file, config.tls_ca_file)
    if config.mode == "production":
        fields = ("tls_cert_file", "tls_key_file", "tls_ca_file", "bundle_public_key_file")
        missing = [f"{prefix}{f.upper()}" for f in fields if getattr(config, f) is None]
        if missing:
            raise ConfigError(f"Production mode refuses to start; missing: {', '.join(missing)}.")
