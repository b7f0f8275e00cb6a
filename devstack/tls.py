"""A throw-away certificate authority and server certificates, made with the openssl CLI.

For the TLS listeners of the test cluster (``rabbitmq.RabbitCluster``): the
clients verify the server against this CA and its host name, as production
does with a real CA. ``other_ca`` gives a CA that signed nothing here, for
the tests of a certificate that does not verify.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()[-400:]}")


@dataclass(frozen=True)
class ServerCert:
    """A server's certificate and key (PEM files) and the CA that signed it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_ca(directory: Path, name: str = "cvmfs-publisher test CA") -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) valid for a day, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    key.chmod(0o600)
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path],
                     names: tuple[str, ...] = ("DNS:localhost", "IP:127.0.0.1")) -> ServerCert:
    """A server certificate for ``names`` (subjectAltName entries), signed by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = ca
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName={','.join(names)}\n"
                   "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", str(key), "-out", str(csr), cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert),
             cwd=directory)
    # readable by the broker, which runs as the caller here
    key.chmod(0o600)
    return ServerCert(ca_cert, cert, key)
