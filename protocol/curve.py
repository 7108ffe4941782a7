"""CurveZMQ (RFC 26) keys: the server's certificate files, Z85 keys, and each side's options.

The server's certificate is a ZeroMQ certificate file pair as `zmq.auth.create_certificates`
writes it: `NAME.key_secret` (both keys, mode 0600) and `NAME.key` (the public key only, what
clients are given). Keys are 40-character Z85 text (32 bytes).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth

SERVER_SECRET_FILE = "server.key_secret"
SERVER_PUBLIC_FILE = "server.key"
Z85_KEY_CHARS = 40


class CurveError(Exception):
    """A key or certificate that cannot be used (the message is one clear line, never a key)."""


def z85_key(value: str | bytes, what: str) -> bytes:
    """A 40-character Z85 key as bytes, or CurveError naming `what`."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    raw = raw.strip()
    try:
        ok = len(raw) == Z85_KEY_CHARS and len(zmq.utils.z85.decode(raw)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise CurveError(f"{what} is not a CURVE key (40 characters of Z85)")
    return raw


def public_path(secret_path: Path) -> Path:
    """`server.key` for `server.key_secret` (zmq's naming); PATH.public for any other name."""
    if secret_path.name.endswith("_secret"):
        return secret_path.with_name(secret_path.name[: -len("_secret")])
    return secret_path.with_name(secret_path.name + ".public")


def create_server_cert(secret_path: Path) -> None:
    """Write a new certificate pair: the secret file mode 0600 (its folder 0700), the public half
    beside it. Both are written in a private temporary folder and moved into place."""
    folder = secret_path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".cert-") as tmp:
        os.chmod(tmp, 0o700)
        public_file, secret_file = zmq.auth.create_certificates(tmp, "server")
        os.chmod(secret_file, 0o600)
        os.chmod(public_file, 0o644)
        os.replace(public_file, public_path(secret_path))
        os.replace(secret_file, secret_path)


def load_server_cert(secret_path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file that only its owner may read."""
    try:
        mode = secret_path.stat().st_mode & 0o777
    except OSError as exc:
        raise CurveError(f"cannot read server certificate {secret_path}: {exc.strerror}") from None
    if mode & 0o077:
        raise CurveError(
            f"server certificate {secret_path} is open to group or others (mode {mode:o}): "
            f"chmod 600 {secret_path}"
        )
    try:
        public, secret = zmq.auth.load_certificate(secret_path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read server certificate {secret_path}: {exc}") from None
    if secret is None:
        raise CurveError(f"{secret_path} holds no secret key (is it the public half?)")
    return z85_key(public, f"the public key in {secret_path}"), z85_key(
        secret, f"the secret key in {secret_path}"
    )


def read_public_key(text_or_path: str) -> bytes:
    """A server's public key given as Z85 text or as the path of its `server.key` file."""
    if len(text_or_path.strip()) == Z85_KEY_CHARS and not os.path.exists(text_or_path):
        return z85_key(text_or_path, "the server key")
    try:
        public, _ = zmq.auth.load_certificate(text_or_path)
    except (OSError, ValueError):
        raise CurveError(
            f"the server key {text_or_path!r} is neither a Z85 key nor a readable server.key file"
        ) from None
    return z85_key(public, f"the public key in {text_or_path}")


class ClientCurve(NamedTuple):
    """What a client socket needs for CURVE: the server's public key and the client's keypair
    (a fresh one unless the client is bound to its own). The repr never shows the secret."""

    serverkey: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return (
            f"ClientCurve(serverkey={self.serverkey.decode()!r}, public={self.public.decode()!r})"
        )

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Set before connect: the handshake then checks the server's identity."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.serverkey)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def client_curve(
    serverkey: str | bytes | None, keypair: tuple[str | bytes, str | bytes] | None = None
) -> ClientCurve | None:
    """None without a server key (plaintext); else the checked keys, with a fresh keypair when
    none is given."""
    if serverkey is None:
        if keypair is not None:
            raise CurveError("a CURVE keypair needs the server's key (curve_serverkey)")
        return None
    server = z85_key(serverkey, "curve_serverkey")
    if keypair is None:
        public, secret = zmq.curve_keypair()
    else:
        public = z85_key(keypair[0], "the client's CURVE public key")
        secret = z85_key(keypair[1], "the client's CURVE secret key")
        if zmq.curve_public(secret) != public:
            raise CurveError("the client's CURVE public key is not the secret key's")
    return ClientCurve(server, public, secret)


def client_keypair_from_file(path: str) -> tuple[bytes, bytes]:
    """A client's own keypair from a secret certificate file (as `create_certificates` writes)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise CurveError(f"cannot read the CURVE certificate {path}") from None
    if secret is None:
        raise CurveError(f"{path} holds no secret key (give the .key_secret file)")
    return public, secret


def create_client_cert(folder: Path, name: str) -> tuple[Path, bytes]:
    """A client's own certificate pair `NAME.key_secret` (mode 0600) and `NAME.key` in `folder`;
    the secret file's path and the public key. An existing pair is never overwritten."""
    secret_path = folder / f"{name}.key_secret"
    if secret_path.exists() or public_path(secret_path).exists():
        raise CurveError(f"{secret_path} exists already: keep it, or move it away first")
    create_server_cert(secret_path)  # the same files, under the client's name
    public, _ = client_keypair_from_file(str(secret_path))
    return secret_path, public


def apply_server(sock: zmq.Socket[bytes], public: bytes, secret: bytes, domain: str) -> None:
    """Make a bound socket a CURVE server whose handshakes the ZAP handler for `domain` admits."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
