"""A network's TLS certificates, made with the `openssl` command (standard library only, as the launcher): one CA
per network, a certificate per broker (its host names and addresses in subjectAltName, so peers and bridges check
them) and, for mutual TLS, one per client (its common name is its login: `use_identity_as_username`).

    python -m scripts.certs DIR broker-1=127.0.0.1,localhost peer-1 peer-2 bridge

Everything lands in one private folder (0700, keys 0600): `ca.pem` (give it to every peer: --tls-ca), `ca.key`
(keep it there: it signs more certificates), `<name>.pem` and `<name>.key`. What exists is kept: certificates already
handed out stay valid.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DAYS = 825  # the most a server certificate may be valid for clients that follow the CA/Browser rules
KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class CertError(RuntimeError):
    """A certificate could not be made; the message says why and what to install."""


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A network's CA, in `folder`."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    def of(self, name: str) -> Certificate:
        return Certificate(self.folder / f"{name}.pem", self.folder / f"{name}.key")


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise CertError("making TLS certificates needs the openssl command (e.g. sudo apt-get install -y openssl)")
    done = subprocess.run([binary, *args], capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise CertError(f"openssl {args[0]} failed: {detail[-1] if detail else done.returncode}")


def authority(folder: Path, name: str = "sdfl") -> Authority:
    """The CA of the network whose certificates live in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca = Authority(folder)
    if not (ca.ca.is_file() and ca.ca_key.is_file()):
        _openssl(
            "req", "-x509", *KEY, "-keyout", str(ca.ca_key), "-out", str(ca.ca), "-days", str(DAYS),
            "-subj", f"/CN={name} federation CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        ca.ca_key.chmod(0o600)
    return ca


def certificate(ca: Authority, name: str, hosts: Sequence[str] = ()) -> Certificate:
    """The certificate `name` signed by `ca` (made if missing): a broker's with `hosts` (names and addresses it is
    reached by; both server and client use, so a bridge presents it too), or a client's (common name `name`)."""
    made = ca.of(name)
    if made.cert.is_file() and made.key.is_file():
        return made
    with tempfile.TemporaryDirectory() as work:
        request, extensions = Path(work) / "req.csr", Path(work) / "ext.cnf"
        _openssl("req", "-new", *KEY, "-keyout", str(made.key), "-out", str(request), "-subj", f"/CN={name}")
        made.key.chmod(0o600)
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if hosts:
            alt = ",".join(f"IP:{h}" if _is_address(h) else f"DNS:{h}" for h in hosts)
            lines += [f"subjectAltName={alt}", "extendedKeyUsage=serverAuth,clientAuth"]
        else:
            lines.append("extendedKeyUsage=clientAuth")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(ca.ca), "-CAkey", str(ca.ca_key), "-CAcreateserial",
            "-out", str(made.cert), "-days", str(DAYS), "-extfile", str(extensions),
        )  # fmt: skip
    return made


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0].startswith("-"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        ca = authority(Path(args[0]))
        for spec in args[1:]:
            name, _, hosts = spec.partition("=")
            made = certificate(ca, name, [h for h in hosts.split(",") if h])
            print(f"{made.cert} {made.key}")
    except (CertError, OSError) as err:
        print(f"python -m scripts.certs: error: {err}", file=sys.stderr)
        return 1
    print(f"CA (give it to every peer: --tls-ca): {ca.ca}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
