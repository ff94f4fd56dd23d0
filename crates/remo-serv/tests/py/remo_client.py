#!/usr/bin/env python3
"""Independent remo_serv 0.6.0 protocol client, written from the specification only
(shared/specs/remo-serv.md and remo-serv-test-vectors.md).  Used by the Rust integration
tests and benchmarks to prove wire compatibility.  Needs Python 3.11 + `cryptography`.

Wire summary: POST /auth with a JSON body -> X448 key agreement, Ed448-signed both ways ->
Fernet key b64u(SHA-256(00000001 || Z || "remo_serv")).  Every later request: cookie
SESSION_ID, `Host: x`, argument as a raw Fernet token in the path, body made of Fernet
tokens  magic(2) | int16 req_no | int16 tok_no | [SHA-384(path) on the first] | payload.
Responses: Fernet tokens, one per CRLF-terminated line, first payload starts with "200".

Usage: see `remo_client.py --help` (selftest, roundtrip, bench-cmd, bench-login, get, put, exec).
"""
import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import secrets
import shlex
import ssl
import statistics
import struct
import sys
import tempfile
import time
import urllib.parse
from contextlib import closing

from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey, Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.x448 import X448PrivateKey, X448PublicKey
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

TTL = 10               # seconds, Fernet TTL of every body token
UPLOAD_PIECE = 8192    # file bytes per upload token (original client)
KDF_LABEL = b"remo_serv"


# ----------------------------------------------------------------------------- primitives

class HttpError(Exception):
    """Non-2xx HTTP answer."""

    def __init__(self, status, body=b""):
        super().__init__(f"HTTP status {status} (body {body[:120]!r})")
        self.status = status
        self.body = body


class ProtocolError(Exception):
    """The peer violated the remo_serv 0.6.0 protocol."""


def b64u(data: bytes) -> str:  # URL-safe base64 WITH '=' padding
    return base64.urlsafe_b64encode(data).decode("ascii")


def unb64u(text) -> bytes:  # padding mandatory; non-alphabet characters (CRLF) are dropped
    return base64.urlsafe_b64decode(text)


def session_key(shared: bytes) -> bytes:
    """NIST Concat KDF (one SHA-256 round): SHA-256(00000001 || Z || "remo_serv")."""
    return hashlib.sha256(b"\x00\x00\x00\x01" + shared + KDF_LABEL).digest()


def fernet_key(shared: bytes) -> bytes:
    return base64.urlsafe_b64encode(session_key(shared))


def path_hash(path: str) -> bytes:
    """SHA-384 of the application path (e.g. "/cmd/<token>"), without any base prefix."""
    return hashlib.sha384(path.encode("utf-8")).digest()


def token_plain(magic: bytes, req_no: int, tok_no: int, payload: bytes, phash: bytes = b"") -> bytes:
    """Token plaintext: magic | int16 BE signed req_no | int16 tok_no | [hash] | payload."""
    assert len(magic) == 2
    return magic + struct.pack(">hh", req_no, tok_no) + phash + payload


def load_key(pem_path, private, passphrase=None):
    """Ed448 key from a PKCS#8 (optionally PBES2-encrypted) or SubjectPublicKeyInfo PEM."""
    with open(pem_path, "rb") as f:
        data = f.read()
    if private:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed448PrivateKey if private else Ed448PublicKey):
        raise ValueError(f"{pem_path}: not an Ed448 {'private' if private else 'public'} key")
    return key


def raw_pub(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def auth_body(user: str, user_key: Ed448PrivateKey, eph_pub: bytes) -> bytes:
    """JSON body of POST /auth, exactly like the original client (json.dumps defaults)."""
    sign = user_key.sign(user.encode("utf-8") + eph_pub)
    return json.dumps({"user": user, "key": b64u(eph_pub), "sign": b64u(sign)}).encode("ascii")


def parse_auth_response(body: bytes, server_pub: Ed448PublicKey) -> bytes:
    """Check the 76 + CRLF + 152 answer, verify the server signature, return S_pub (56 B)."""
    if len(body) != 230 or body[76:78] != b"\r\n":
        raise ProtocolError(f"/auth answer is not 76+CRLF+152 bytes: {body[:300]!r}")
    s_pub, sig = unb64u(body[0:76]), unb64u(body[78:])
    if len(s_pub) != 56:
        raise ProtocolError("server ephemeral key is not 56 bytes")
    try:
        server_pub.verify(sig, s_pub)
    except InvalidSignature:
        raise ProtocolError("server signature over its ephemeral X448 key does not verify "
                            "(wrong --server-key?)") from None
    return s_pub


def decode_response(lines, fernet: Fernet, req_no: int, now=None):
    """Yield the payload pieces of an encrypted answer read from an iterable of lines.

    Blank lines are skipped, a missing final E token is accepted, zero tokens is a valid
    (empty) answer.  Everything else is checked strictly (no fail-open): first token `B?`,
    tok 0, our req_no, payload starting with "200"; later tokens `.?`, tok = previous + 1.
    `now` fixes the clock (self-test only).
    """
    expected, ended = 0, False
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if ended:
            raise ProtocolError("data after the final E token")
        try:
            plain = (fernet.decrypt(line, TTL) if now is None
                     else fernet.decrypt_at_time(line, TTL, now))
        except InvalidToken:
            raise ProtocolError(f"undecryptable response token {line[:60]!r}") from None
        if len(plain) < 6:
            raise ProtocolError("response token shorter than its 6-byte header")
        magic, (rno, tno), payload = plain[:2], struct.unpack(">hh", plain[2:6]), plain[6:]
        first = expected == 0
        if magic[:1] != (b"B" if first else b".") or magic[1:2] not in (b"E", b"."):
            raise ProtocolError(f"bad magic {magic!r} in response token #{expected}")
        if tno & 0xFFFF != expected & 0xFFFF or rno != req_no:
            raise ProtocolError(f"response token req/tok {rno}/{tno}, expected {req_no}/{expected}")
        if first:
            if not payload.startswith(b"200"):
                raise ProtocolError(f"first response token lacks '200': {payload[:20]!r}")
            payload = payload[3:]
        expected += 1
        ended = magic[1:2] == b"E"
        yield payload


def upload_tokens(fernet: Fernet, req_no: int, phash: bytes, stream, piece=UPLOAD_PIECE):
    """Lazily yield the tokens of a streamed upload: B.(hash+piece) .. .. .E(empty);
    an empty stream gives a single BE(hash).  Each token is encrypted just before use."""
    data = stream.read(piece)
    if not data:
        yield fernet.encrypt(token_plain(b"BE", req_no, 0, b"", phash))
        return
    yield fernet.encrypt(token_plain(b"B.", req_no, 0, data, phash))
    tok = 1
    while data := stream.read(piece):
        yield fernet.encrypt(token_plain(b"..", req_no, tok, data))
        tok += 1
    yield fernet.encrypt(token_plain(b".E", req_no, tok, b""))


# ----------------------------------------------------------------------------- session

class Session:
    """One logged-in remo_serv session (new TCP connection per request)."""

    def __init__(self, timeout=120.0, ssl_context=None):
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.fernet = None
        self.cookie = None   # SESSION_ID value
        self.req_no = 0      # last request number used
        self.base_url = None

    # --- HTTP plumbing
    def _set_base(self, base_url):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"unsupported base URL {base_url!r}")
        self.base_url, self.scheme, self.host = base_url, u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")   # prepended to the target, never hashed
        default = self.port == (443 if u.scheme == "https" else 80)
        self.real_host = u.hostname if default else f"{u.hostname}:{self.port}"

    def _store_cookie(self, resp):
        for value in resp.headers.get_all("Set-Cookie") or ():
            name, _, rest = value.partition("=")
            if name.strip() == "SESSION_ID":
                self.cookie = rest.split(";", 1)[0].strip()

    def _request(self, target, headers, body=b"", chunks=None, host="x"):
        """Send one POST; returns (conn, resp) for a 2xx answer, raises HttpError otherwise.
        `chunks`: iterable of bytes sent as a Transfer-Encoding: chunked body."""
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.putrequest("POST", target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("User-Agent", "remo-client-py/0.6.0")
            conn.putheader("Connection", "close")
            if self.cookie:
                conn.putheader("Cookie", "SESSION_ID=" + self.cookie)
            for name, value in headers.items():
                conn.putheader(name, value)
            if chunks is None:
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            else:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                try:
                    for chunk in chunks:
                        if chunk:
                            conn.send(b"%X\r\n%s\r\n" % (len(chunk), chunk))
                    conn.send(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server may have answered early (e.g. 403); read it below
            resp = conn.getresponse()
            self._store_cookie(resp)
            if not 200 <= resp.status < 300:
                try:
                    err_body = resp.read()
                except (http.client.HTTPException, OSError):
                    err_body = b""
                raise HttpError(resp.status, err_body)
            return conn, resp
        except BaseException:
            conn.close()
            raise

    def _call(self, endpoint, arg=None, payload=b"", stream=None, headers=None):
        """One authenticated request.  Returns (conn, resp, req_no).  The counter advances
        even when the request fails, like the original client's."""
        if self.fernet is None:
            raise ProtocolError("not logged in")
        path = endpoint
        if arg is not None:  # Fernet token of the UTF-8 argument, raw in the path
            path += self.fernet.encrypt(arg.encode("utf-8")).decode("ascii")
        self.req_no += 1
        req, phash, target = self.req_no, path_hash(path), self.prefix + path
        if stream is None:  # Content-Length mode: exactly one BE token, no line break
            body = self.fernet.encrypt(token_plain(b"BE", req, 0, payload, phash))
            conn, resp = self._request(target, headers or {}, body=body)
        else:  # chunked mode: tokens separated by a single CRLF, none after the last
            toks = upload_tokens(self.fernet, req, phash, stream)
            chunks = (t if i == 0 else b"\r\n" + t for i, t in enumerate(toks))
            conn, resp = self._request(target, headers or {}, chunks=chunks)
        return conn, resp, req

    def _payloads(self, resp, req):
        """Payload pieces of a 2xx answer.  Encrypted answers must come WITHOUT a
        Content-Length (the original client would return them raw); CL: 0 means empty."""
        length = resp.getheader("Content-Length")
        if length is not None:
            if int(length) != 0:
                raise ProtocolError(f"encrypted answer carries Content-Length: {length}")
            resp.read()
            return iter(())
        return decode_response(resp, self.fernet, req)

    def _simple(self, endpoint, arg=None, payload=b"", headers=None):
        conn, resp, req = self._call(endpoint, arg, payload, headers=headers)
        with closing(conn):
            return b"".join(self._payloads(resp, req)), resp.headers

    # --- public API
    def login(self, base_url, user, user_key_pem_path, server_pub_pem_path, passphrase=None):
        self._set_base(base_url)
        user_key = load_key(user_key_pem_path, True, passphrase)
        server_pub = load_key(server_pub_pem_path, False)
        eph = X448PrivateKey.generate()
        body = auth_body(user, user_key, raw_pub(eph))
        conn, resp = self._request(self.prefix + "/auth",
                                   {"Content-Type": "application/x-www-form-urlencoded"},
                                   body=body, host=self.real_host)
        with closing(conn):
            answer = resp.read()
        s_pub = parse_auth_response(answer, server_pub)
        if not self.cookie:
            raise ProtocolError("/auth answer did not set SESSION_ID")
        self.fernet = Fernet(fernet_key(eph.exchange(X448PublicKey.from_public_bytes(s_pub))))
        self.req_no = 0

    def info(self, base_url=None) -> str:
        """Logged in: encrypted /info.  Otherwise the plain text answer (needs base_url)."""
        if base_url:
            self._set_base(base_url)
        if self.fernet is None:
            conn, resp = self._request(self.prefix + "/info", {}, host=self.real_host)
            with closing(conn):
                return resp.read().decode("utf-8")
        return self._simple("/info")[0].decode("utf-8")

    def cmd(self, cmdline, stdin=b""):
        """Run a command; returns (merged output bytes, response headers)."""
        return self._simple("/cmd/", cmdline, stdin)

    def get(self, remote, local_path) -> int:
        """Download `remote` into `local_path`, streaming token by token. Returns bytes."""
        conn, resp, req = self._call("/get/", remote)
        written = 0
        with closing(conn):
            try:
                with open(local_path, "wb") as f:
                    for piece in self._payloads(resp, req):
                        f.write(piece)
                        written += len(piece)
            except BaseException:
                try:
                    os.unlink(local_path)
                except OSError:
                    pass
                raise
        return written

    def put(self, local_path, remote) -> int:
        """Upload a local file (chunked, 8192 bytes per token, streamed). Returns bytes."""
        with open(local_path, "rb") as f:
            if os.fstat(f.fileno()).st_size > 32767 * UPLOAD_PIECE:  # int16 token numbers
                raise ValueError("file too large for one remo_serv upload (> 32767 tokens)")
            conn, resp, req = self._call("/put/", remote, stream=f)
            size = f.tell()
        with closing(conn):
            out = b"".join(self._payloads(resp, req))
        if out:
            raise ProtocolError(f"/put answered a non-empty payload {out[:60]!r}")
        return size

    def icm(self, cmdline) -> bytes:
        """Start an interactive command; returns its first output (maybe empty)."""
        return self._simple("/icm/", cmdline)[0]

    def idt(self, text="") -> bytes:
        """Send `text` + "\\n" to the interactive command (empty text = pure poll, no
        payload), return the output available."""
        payload = (text + "\n").encode("utf-8") if text else b""
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if payload else None
        return self._simple("/idt", payload=payload, headers=headers)[0]

    def edt(self) -> bytes:
        """Close the interactive command's stdin and return all its remaining output."""
        return self._simple("/edt")[0]

    def logout(self) -> bytes:
        """POST /auth whose body is one BE token of the session for the path /auth (our
        server ignores the original's empty body: it needs nothing but the cookie).  The
        local key is kept so that tests can check that later requests are refused (403)."""
        self.req_no += 1
        body = self.fernet.encrypt(token_plain(b"BE", self.req_no, 0, b"", path_hash("/auth")))
        conn, resp = self._request(self.prefix + "/auth", {}, body=body)
        with closing(conn):
            return resp.read()


# ----------------------------------------------------------------------------- self-test

V = {  # remo-serv-test-vectors.md
    "user_priv": "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233343536373839",
    "user_pub": "da918ba3e57fdca0326f46c7ec843ba8fcb0d57fa15f2588a57bae9df558210351e7e15581b24459c0a7cde1e835582d717c0699ea72e8c900",
    "user_pem": "-----BEGIN PUBLIC KEY-----\nMEMwBQYDK2VxAzoA2pGLo+V/3KAyb0bH7IQ7qPyw1X+hXyWIpXuunfVYIQNR5+FV\ngbJEWcCnzeHoNVgtcXwGmepy6MkA\n-----END PUBLIC KEY-----\n",
    "serv_priv": "65666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d",
    "serv_pub": "fbc41a38058dea187d5dcce4f9f65681dfedc7c3d08b69a9f84e23ef4b30190c7dee45c791bb0e264cf126da6d42ff6dd0656e656aae54bf80",
    "c_eph_priv": "c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff07",
    "c_eph_pub": "507f546d22632d55e0a3ccc9b1e4cdab7b0d879e9468a1c2512d486d7fe371887edd621ab6d8c8c183390328f0ba23da10264e4dcdc915f3",
    "s_eph_priv": "030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d141b222930373e454c535a61686f767d84",
    "s_eph_pub": "c5b1596ece3d97d391115a0493e8f3284466a6fc69b9baefe5321dc2d408dab2378dca8b03da2862898123f7b5ee8e09f112b26aa998af1a",
    "signed_msg": "616c696365507f546d22632d55e0a3ccc9b1e4cdab7b0d879e9468a1c2512d486d7fe371887edd621ab6d8c8c183390328f0ba23da10264e4dcdc915f3",
    "user_sig": "186a8dcbc2d717a88fdba8f799142e91b722baeda29e527563b337bd52d9805671d69f550c45e47487d063af381c4561ee94e0e1c69c7f910069c517cc1e4b82e7e105951d47cc7167dbc3e39cc0c19ba2e20c12aae2a27a46a5da657380a426065d48199b42785d77f6fd439e424f910500",
    "auth_body": '{"user": "alice", "key": "UH9UbSJjLVXgo8zJseTNq3sNh56UaKHCUS1IbX_jcYh-3WIattjIwYM5AyjwuiPaECZOTc3JFfM=", "sign": "GGqNy8LXF6iP26j3mRQukbciuu2inlJ1Y7M3vVLZgFZx1p9VDEXkdIfQY684HEVh7pTg4cacf5EAacUXzB5LgufhBZUdR8xxZ9vD45zAwZui4gwSquKiekal2mVzgKQmBl1IGZtCeF139v1DnkJPkQUA"}',
    "serv_sig": "93113f5d5bda389a455f5c99b28a921ea03f7f9ba3623d91f9daa744b4b51a5edab34855810c5abe1aa6df7341da8cfe9b99aa887a1e1063806976161a480bde2428b888793b400d91558c07a23b86624adbe48a3b47167b9f69fdf02c5ad9c7994f3cdb2399c6d550425a784bcf56f12600",
    "auth_resp": "xbFZbs49l9OREVoEk-jzKERmpvxpubrv5TIdwtQI2rI3jcqLA9ooYomBI_e17o4J8RKyaqmYrxo=\r\nkxE_XVvaOJpFX1yZsoqSHqA_f5ujYj2R-dqnRLS1Gl7as0hVgQxavhqm33NB2oz-m5mqiHoeEGOAaXYWGkgL3iQouIh5O0ANkVWMB6I7hmJK2-SKO0cWe59p_fAsWtnHmU882yOZxtVQQlp4S89W8SYA",
    "z": "5a5fd961d1ceb0a8e16f6dbb6f4848c45cb251f1b06d4b3158ba035b030774544d2a4aa7ffa2aef3680832d85b43ba8f2594829aca3e1600",
    "key": "142e4f0490edbc08982d258dc2f661e6c2e41c2d8b55e7a9533e201b2e3ea5d0",
    "fernet_key": "FC5PBJDtvAiYLSWNwvZh5sLkHC2LVeepUz4gGy4-pdA=",
    "cmd_token": "gAAAAABlU_EAAAECAwQFBgcICQoLDA0OD_Kqd3uut6iwFjEo4_dyEoLNRapNq5ZpbBaFaI3pk__IWAGZu9WKUnwITfxm7m3A1Q==",
    "path_hash": "e6b6374c8559864a40d3677dc6618cf63779f3777bde47b3797d391f269c8e83a983845e9c48071463f0d2f10bffe5f8",
    "req_plain": "424500010000e6b6374c8559864a40d3677dc6618cf63779f3777bde47b3797d391f269c8e83a983845e9c48071463f0d2f10bffe5f8",
    "req_token": "gAAAAABlU_EAAAECAwQFBgcICQoLDA0OD7gNp4XaIpEJz_YIn3ArepGxXwca2qn6lIJFL-H31NOq7nTI-ipydBZnMtFtu8ZkTcS-vSN1ki93TWFCmVv4-MP07wkvxrLZywQtDiLf0yldZD5Yw9Z1UchJRnTrTz9y4g==",
    "resp_plain": "422e0001000032303068656c6c6f0a",
    "resp_token": "gAAAAABlU_EAAAECAwQFBgcICQoLDA0ODw2v8qVy-JEB74NtxtvpwkzKjC5EU8iFAh_3HJgC2UtvTPEqhKus63Y0q5l1hnvBjA==",
    "empty_plain": "424500010000323030",
}
TS, IV = 1700000000, bytes(range(16))


def selftest() -> int:
    failures = []

    def check(name, got, want):
        ok = got == want
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)
            print(f"     got  {got!r}\n     want {want!r}")

    h = bytes.fromhex
    user_key = Ed448PrivateKey.from_private_bytes(h(V["user_priv"]))
    serv_key = Ed448PrivateKey.from_private_bytes(h(V["serv_priv"]))
    c_eph = X448PrivateKey.from_private_bytes(h(V["c_eph_priv"]))
    s_eph = X448PrivateKey.from_private_bytes(h(V["s_eph_priv"]))
    check("user public key", raw_pub(user_key), h(V["user_pub"]))
    check("user public PEM", user_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        V["user_pem"])
    check("server public key", raw_pub(serv_key), h(V["serv_pub"]))
    check("client ephemeral public", raw_pub(c_eph), h(V["c_eph_pub"]))
    check("server ephemeral public", raw_pub(s_eph), h(V["s_eph_pub"]))
    check("signed message", "alice".encode() + raw_pub(c_eph), h(V["signed_msg"]))
    check("user signature", user_key.sign(h(V["signed_msg"])), h(V["user_sig"]))
    body = auth_body("alice", user_key, raw_pub(c_eph))
    check("/auth request body", body, V["auth_body"].encode())
    check("/auth request body length", len(body), 268)
    serv_sig = serv_key.sign(raw_pub(s_eph))
    check("server signature", serv_sig, h(V["serv_sig"]))
    answer = (b64u(raw_pub(s_eph)) + "\r\n" + b64u(serv_sig)).encode()
    check("/auth response body", answer, V["auth_resp"].encode())
    s_pub = parse_auth_response(V["auth_resp"].encode(), serv_key.public_key())
    check("/auth response parsed + verified", s_pub, h(V["s_eph_pub"]))
    try:
        parse_auth_response(V["auth_resp"].encode(), user_key.public_key())
        check("/auth response with wrong server key rejected", False, True)
    except Exception:
        check("/auth response with wrong server key rejected", True, True)
    z_c = c_eph.exchange(X448PublicKey.from_public_bytes(s_pub))
    z_s = s_eph.exchange(X448PublicKey.from_public_bytes(raw_pub(c_eph)))
    check("shared secret (client side)", z_c, h(V["z"]))
    check("shared secret (server side)", z_s, h(V["z"]))
    check("session key", session_key(z_c), h(V["key"]))
    check("session key = ConcatKDFHash", ConcatKDFHash(hashes.SHA256(), 32, KDF_LABEL).derive(z_c),
          h(V["key"]))
    check("Fernet key", fernet_key(z_c), V["fernet_key"].encode())
    fer = Fernet(fernet_key(z_c))

    cmd_tok = fer._encrypt_from_parts(b"echo hello", TS, IV).decode()
    check("command token", cmd_tok, V["cmd_token"])
    check("command token length", len(cmd_tok), 100)
    path = "/cmd/" + cmd_tok
    check("path hash", path_hash(path), h(V["path_hash"]))
    plain = token_plain(b"BE", 1, 0, b"", path_hash(path))
    check("first request token plaintext", plain, h(V["req_plain"]))
    req_tok = fer._encrypt_from_parts(plain, TS, IV)
    check("first request token", req_tok, V["req_token"].encode())
    check("first request token length", len(req_tok), 164)
    resp_plain = token_plain(b"B.", 1, 0, b"200hello\n")
    check("response token plaintext", resp_plain, h(V["resp_plain"]))
    check("response token", fer._encrypt_from_parts(resp_plain, TS, IV), V["resp_token"].encode())
    check("empty answer plaintext", token_plain(b"BE", 1, 0, b"200"), h(V["empty_plain"]))

    # Response decoder: the vector itself (no .E), blank lines, multi-token, errors.
    def dec(lines, req=1):
        return list(decode_response(lines, fer, req, now=TS + 1))
    check("decode response vector", dec([V["resp_token"].encode() + b"\r\n"]), [b"hello\n"])
    enc = lambda p: fer._encrypt_from_parts(p, TS, IV) + b"\r\n"
    multi = [enc(token_plain(b"B.", 7, 0, b"200ab")), b"\r\n", enc(token_plain(b"..", 7, 1, b"cd")),
             enc(token_plain(b".E", 7, 2, b""))]
    check("decode multi-token + blank line", b"".join(dec(multi, 7)), b"abcd")
    check("decode zero tokens", dec([], 3), [])
    check("decode empty BE", dec([enc(token_plain(b"BE", 2, 0, b"200"))], 2), [b""])
    for name, lines in [("wrong req_no", [enc(token_plain(b"BE", 2, 0, b"200"))]),
                        ("missing 200", [enc(token_plain(b"BE", 1, 0, b"404"))]),
                        ("tok gap", [multi[0], multi[3]]),
                        ("after E", [enc(token_plain(b"BE", 1, 0, b"200")), multi[2]]),
                        ("expired", None)]:
        try:
            if lines is None:
                list(decode_response([V["resp_token"].encode()], fer, 1, now=TS + TTL + 5))
            else:
                dec(lines)
            check(f"decoder rejects {name}", False, True)
        except ProtocolError:
            check(f"decoder rejects {name}", True, True)

    # Upload framing: B.(hash+8192) .. .E for 8192+100 bytes; empty file -> single BE.
    ph = path_hash("/put/x")
    toks = [fer.decrypt(t) for t in upload_tokens(fer, 5, ph, io.BytesIO(b"a" * 8292))]
    check("upload framing", [(t[:2], struct.unpack(">hh", t[2:6])) for t in toks],
          [(b"B.", (5, 0)), (b"..", (5, 1)), (b".E", (5, 2))])
    check("upload payloads", (toks[0][6:54], len(toks[0]) - 54, toks[1][6:], toks[2][6:]),
          (ph, 8192, b"a" * 100, b""))
    check("upload empty file", [fer.decrypt(t) for t in upload_tokens(fer, 5, ph, io.BytesIO())],
          [token_plain(b"BE", 5, 0, b"", ph)])
    check("int16 signed big-endian", token_plain(b"BE", -2, 258, b""), b"BE\xff\xfe\x01\x02")

    # Encrypted PKCS#8 key loading with a passphrase.
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "alice_key.pem")
        with open(p, "wb") as f:
            f.write(user_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"foo")))
        check("encrypted key loading", raw_pub(load_key(p, True, "foo")), h(V["user_pub"]))

    print(f"selftest: {len(failures)} failure(s)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- CLI

def roundtrip(s: Session, args) -> dict:
    steps = []

    def step(name, cond, detail=""):
        if not cond:
            raise AssertionError(f"step {name!r} failed {detail}")
        steps.append(name)

    def step_http_error(name, status, fn, *fn_args):
        try:
            fn(*fn_args)
        except HttpError as e:
            return step(name, e.status == status, f"(status {e.status})")
        step(name, False, "(no error)")

    t0 = time.perf_counter()
    s.login(args.url, args.user, args.key, args.server_key, args.passphrase)
    step("login", True)
    text = s.info()
    step("info", text.startswith("remo_serv "), repr(text))
    out, hdr = s.cmd("echo hello")
    step("cmd echo", out == b"hello\n", repr(out))
    step("cmd exit status 0", hdr.get("X-Remo-Exit-Status") == "0", repr(hdr.get("X-Remo-Exit-Status")))
    out, hdr = s.cmd("sh -c 'exit 3'")
    step("cmd exit status 3", hdr.get("X-Remo-Exit-Status") == "3", repr(hdr.get("X-Remo-Exit-Status")))
    out, _ = s.cmd("cat", stdin=b"fed through stdin")
    step("cmd stdin", out == b"fed through stdin", repr(out))

    tag = f"{os.getpid()}_{secrets.token_hex(4)}"
    remote_big, remote_empty = f"remo_rt_{tag}.bin", f"remo_rt_{tag}.empty"
    src, back = os.path.join(args.dir, f"src_{tag}.bin"), os.path.join(args.dir, f"back_{tag}.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(1024 * 1024 + 123))
    step("put 1MiB+123", s.put(src, remote_big) == 1024 * 1024 + 123)
    step("get 1MiB+123", s.get(remote_big, back) == 1024 * 1024 + 123)
    step("sha256 equal", sha256_file(src) == sha256_file(back))
    esrc, eback = os.path.join(args.dir, f"empty_{tag}"), os.path.join(args.dir, f"empty_back_{tag}")
    open(esrc, "wb").close()
    step("put empty", s.put(esrc, remote_empty) == 0)
    step("get empty", s.get(remote_empty, eback) == 0 and os.path.getsize(eback) == 0)

    got = s.icm("cat")
    got += s.idt("one")
    deadline = time.monotonic() + 2.0
    while b"one\n" not in got and time.monotonic() < deadline:
        got += s.idt("")
    step("icm/idt cat", b"one\n" in got, repr(got))
    s.edt()
    step("edt", True)

    missing = os.path.join(args.dir, f"missing_{tag}")
    step_http_error("get missing -> 404", 404, s.get, f"remo_rt_{tag}.missing", missing)
    step("no local file for 404", not os.path.exists(missing))
    out, hdr = s.cmd(shlex.join(["rm", "-f", remote_big, remote_empty]))
    step("remote cleanup", hdr.get("X-Remo-Exit-Status") in (None, "0"), repr(out))

    s.logout()
    step("logout", True)
    step_http_error("cmd after logout -> 403", 403, s.cmd, "true")
    return {"ok": True, "steps": steps, "seconds": round(time.perf_counter() - t0, 3)}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bench_cmd(s: Session, args) -> dict:
    t0 = time.perf_counter()
    s.login(args.url, args.user, args.key, args.server_key, args.passphrase)
    login_ms = (time.perf_counter() - t0) * 1000
    times = []
    for _ in range(args.count):
        t = time.perf_counter()
        out, _ = s.cmd("true")
        times.append((time.perf_counter() - t) * 1000)
        if out:
            raise ProtocolError(f"`true` printed {out!r}")
    s.logout()
    ordered = sorted(times)
    p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)] if ordered else None  # nearest rank
    return {"count": args.count, "median_ms": statistics.median(times) if times else None,
            "p99_ms": p99, "login_ms": login_ms}


def transfer(s: Session, args) -> dict:
    s.login(args.url, args.user, args.key, args.server_key, args.passphrase)
    t0 = time.perf_counter()
    if args.command == "get":
        n = s.get(args.remote, args.local)
    else:
        n = s.put(args.local, args.remote)
    secs = time.perf_counter() - t0
    s.logout()
    return {"bytes": n, "seconds": secs, "mb_per_s": n / 1e6 / secs if secs > 0 else None}


def bench_login(args) -> dict:
    """Logins in fresh sessions; the first (imports, key parsing warm-up) is not counted."""
    times = []
    for i in range(args.count + 1):
        s = Session(timeout=args.timeout)
        t = time.perf_counter()
        s.login(args.url, args.user, args.key, args.server_key, args.passphrase)
        if i:
            times.append((time.perf_counter() - t) * 1000)
        s.logout()
    ordered = sorted(times)
    p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]
    return {"count": args.count, "median_ms": statistics.median(times), "p99_ms": p99}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Independent remo_serv 0.6.0 test client")
    p.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--user")
    p.add_argument("--key", help="user Ed448 private key (PKCS#8 PEM)")
    p.add_argument("--server-key", help="server Ed448 public key (PEM)")
    p.add_argument("--passphrase", default=None, help="passphrase of an encrypted --key")
    p.add_argument("--timeout", type=float, default=120.0, help="socket timeout, seconds")
    p.add_argument("--insecure", action="store_true", help="https: do not verify the certificate")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("selftest", help="check the test vectors (no server needed)")
    rt = sub.add_parser("roundtrip", help="end-to-end check of every endpoint (JSON summary)")
    rt.add_argument("--dir", required=True, help="local scratch directory")
    bc = sub.add_parser("bench-cmd", help="N sequential `cmd true` (JSON timings)")
    bc.add_argument("--count", type=int, required=True)
    bl = sub.add_parser("bench-login", help="N sequential logins after a warm-up (JSON timings)")
    bl.add_argument("--count", type=int, required=True)
    for name, first, second in (("get", "remote", "local"), ("put", "local", "remote")):
        sp = sub.add_parser(name, help=f"copy {first.upper()} to {second.upper()} (JSON throughput)")
        sp.add_argument(first)
        sp.add_argument(second)
    ex = sub.add_parser("exec", help="run CMD, raw output on stdout, exit with its status")
    ex.add_argument("cmd", nargs="+")
    args = p.parse_args(argv)

    if args.command == "selftest":
        return selftest()
    missing = [o for o in ("url", "user", "key", "server_key") if not getattr(args, o)]
    if missing:
        p.error("missing options: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    ctx = ssl._create_unverified_context() if args.insecure else None
    s = Session(timeout=args.timeout, ssl_context=ctx)
    try:
        if args.command == "roundtrip":
            result = roundtrip(s, args)
        elif args.command == "bench-cmd":
            result = bench_cmd(s, args)
        elif args.command == "bench-login":
            result = bench_login(args)
        elif args.command in ("get", "put"):
            result = transfer(s, args)
        else:  # exec
            s.login(args.url, args.user, args.key, args.server_key, args.passphrase)
            line = args.cmd[0] if len(args.cmd) == 1 else shlex.join(args.cmd)
            out, hdr = s.cmd(line)
            s.logout()
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
            status = hdr.get("X-Remo-Exit-Status") or "0"
            code = int(status) if status.lstrip("-").isdigit() else 1
            return code if 0 <= code <= 255 else 1
    except Exception as e:  # noqa: BLE001 - report every failure the same way
        print(f"remo_client: {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
