#!/usr/bin/env python3
"""Independent secure-talk client, written from the specification only
(shared/specs/secure-talk.md §2-§5, §10, §13).  It behaves like the original Node
`SecuredWebsocketClient`: `GET /` with a `token` header (the saved token, or the literal
string `null`), the body saved to ./token.txt, then a websocket upgrade on `/` (admin) or
`/data` with the same header.  Plain http/ws over a Unix socket (`--unix`) or https/wss
with a client certificate (`--host/--port --ca --cert --key`, host name not checked, as the
original).  Binary uploads: `headers JSON | 0x01 | payload | 0x01 | md5 hex`.

Needs Python 3.11 and `websockets` >= 13 (asyncio API).
Usage: talk_client.py [--unix PATH | --host H --port P --ca CA --cert C --key K] selftest
Prints one JSON line per check; exits 1 on the first failure.
"""
import argparse
import asyncio
import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import sys
import time

import websockets
from websockets.asyncio.client import connect, unix_connect
from websockets.exceptions import InvalidStatus

STEP = 10.0  # seconds allowed for any single expected message


class Failure(Exception):
    pass


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=STEP):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Client:
    """Transport options plus the token file, like the original client's constructor."""

    def __init__(self, args):
        self.args = args
        self.token_file = args.token_file
        self.ssl = None
        if not args.unix:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
            ctx.check_hostname = False  # checkServerIdentity: () => undefined
            ctx.load_cert_chain(args.cert, args.key)
            self.ssl = ctx

    def http(self):
        if self.args.unix:
            return UnixHTTPConnection(self.args.unix)
        return http.client.HTTPSConnection(self.args.host, self.args.port, timeout=STEP,
                                           context=self.ssl)

    def get(self, path, token, verb="GET"):
        conn = self.http()
        try:
            headers = {} if token is None else {"token": token}
            conn.request(verb, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def saved_token(self):
        try:
            with open(self.token_file) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def fetch_token(self):
        """§10: GET / with the saved token (or "null"); on 200 the body is saved."""
        saved = self.saved_token()
        status, body = self.get("/", "null" if saved is None else saved)
        if status != 200:
            raise Failure(f"token GET answered {status}: {body!r}")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        return saved, body

    async def websocket(self, route="", token=None):
        headers = {} if token is None else {"token": token}
        opts = dict(additional_headers=headers, open_timeout=STEP)
        if self.args.unix:
            ws = await unix_connect(self.args.unix, f"ws://localhost/{route}", **opts)
        else:
            url = f"wss://{self.args.host}:{self.args.port}/{route}"
            ws = await connect(url, ssl=self.ssl, **opts)
        return Conn(ws, route or "admin")

    async def open(self, route=""):
        _, token = self.fetch_token()
        return await self.websocket(route, token)


def frame(headers, payload, checksum=None):
    """§5.2 binary framed message, as fragments (header, payload, trailer) like the original."""
    md5 = checksum or hashlib.md5(payload).hexdigest()
    return [json.dumps(headers).encode() + b"\x01", payload, b"\x01" + md5.encode()]


def parse(raw):
    if isinstance(raw, str):
        return json.loads(raw)
    head, rest = raw.split(b"\x01", 1)
    payload, checksum = rest.rsplit(b"\x01", 1)
    return {"headers": json.loads(head), "payload": payload, "checkSum": checksum.decode(),
            "checkSumPass": hashlib.md5(payload).hexdigest() == checksum.decode()}


def method(msg):
    return (msg.get("headers") or {}).get("method")


class Conn:
    """A websocket whose incoming messages can be awaited by predicate (others are kept)."""

    def __init__(self, ws, name):
        self.ws, self.name, self.backlog = ws, name, []

    async def send(self, obj):
        await self.ws.send(obj if isinstance(obj, (list, bytes)) else json.dumps(obj))

    async def recv(self, timeout=STEP):
        """Next message, skipping connect-time `checkSum` pushes (§4.1)."""
        while True:
            try:
                msg = parse(await asyncio.wait_for(self.ws.recv(), timeout))
            except TimeoutError:
                raise Failure(f"{self.name}: nothing within {timeout}s; "
                              f"unmatched so far: {self.backlog}") from None
            if method(msg) != "checkSum":
                return msg

    async def wait_for(self, pred, what):
        for i, msg in enumerate(self.backlog):
            if pred(msg):
                return self.backlog.pop(i)
        deadline = time.monotonic() + STEP
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"{self.name}: no {what}; got {self.backlog}")
            msg = await self.recv(left)
            if pred(msg):
                return msg
            self.backlog.append(msg)

    async def close(self):
        await self.ws.close()


def b64json(part):
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def check(name, ok, **detail):
    print(json.dumps({"check": name, "ok": bool(ok), **detail}), flush=True)
    if not ok:
        raise Failure(name)


def is_text(code):
    return lambda m: method(m) == "text" and m["headers"].get("code") == code


async def selftest(client):
    t0 = time.monotonic()
    if os.path.exists(client.token_file):
        os.remove(client.token_file)
    saved, token = client.fetch_token()
    head, claims, _ = token.split(".")
    header, claims = b64json(head), b64json(claims)
    check("token_new", saved is None and header.get("alg") == "HS256"
          and isinstance(claims.get("client_id"), int) and isinstance(claims.get("iat"), int)
          and isinstance(claims.get("exp"), int) and claims["exp"] > time.time() >= claims["iat"] - 5
          and client.saved_token() == token, header=header, claims=claims)
    _, again = client.fetch_token()
    check("token_same", again == token)
    check("token_same_on_data", client.get("/data", token) == (200, token))  # §2: same paths
    check("post_empty_200", client.get("/", token, "POST") == (200, ""))
    forged = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
    status, fresh = client.get("/", f"{forged}.{token.split('.')[1]}.")
    check("alg_none_new_token", status == 200 and fresh != token
          and b64json(fresh.split(".")[1])["client_id"] != claims["client_id"])

    admin = await client.websocket("", token)
    check("admin_open", True, client_id=claims["client_id"])
    sent = {"headers": {"method": "text"}, "payload": "hello"}
    await admin.send(sent)
    echo = await admin.recv()
    check("text_echo", echo == sent, got=echo)

    await admin.send(b"".join(frame({"method": "text"}, b"binary \x01 hello")))
    reply = await admin.recv()
    check("binary_echo", isinstance(reply, dict) and reply.get("checkSumPass") is True
          and method(reply) == "text", got=reply)
    await admin.send(frame({"method": "text"}, b"tampered", checksum="0" * 32))
    reply = await admin.recv()
    check("binary_bad_md5", (reply.get("headers") or {}).get("code") == 422, got=reply)

    data = await client.open("data")
    check("data_open", client.saved_token() == token)

    await admin.send(frame({"method": "create"}, b'{"launch":"echo from-python"}'))
    created = await admin.recv()
    words = str(created.get("payload")).split()
    ok = is_text(200)(created) and len(words) == 2 and words[0] == "pipe_create"
    pipe = int(words[1]) if ok and words[1].isdigit() else None
    ids = await admin.recv()
    info = await admin.recv()
    check("create_replies", ok and pipe is not None and method(ids) == "pipe_id"
          and pipe in ids.get("payload", []) and method(info) == "pipe_info"
          and info["headers"].get("pipe_id") == pipe
          and info.get("payload") == {"launch": "echo from-python"},
          pipe_create=created, pipe_id=ids, pipe_info=info)
    out = await data.wait_for(lambda m: m["headers"].get("pipe_id") == pipe, "pipe output")
    check("data_output", out == {"headers": {"type": 0, "pipe_id": pipe},
                                 "payload": "from-python\n"}, got=out)
    gone = await admin.wait_for(lambda m: method(m) == "pipe_delete", "pipe_delete")
    check("pipe_delete_on_exit", gone.get("payload") == [pipe], got=gone)

    sleeper = await create(admin, "sleep 30")
    await admin.send({"headers": {"method": "property", "pipe_id": sleeper}, "payload": {"x": 1}})
    reply = await admin.recv()
    check("property", (reply.get("headers") or {}).get("code") == 200, got=reply)
    await destroy(admin, sleeper)

    kept = await create(admin, "sleep 30")
    await admin.close()
    await data.close()
    saved, again = client.fetch_token()
    check("reconnect_token", saved == token and again == token)
    admin = await client.websocket("", again)
    first = await admin.recv()
    check("reconnect_pipe_id", method(first) == "pipe_id" and kept in first.get("payload", []),
          got=first)
    await destroy(admin, kept)
    await admin.close()

    for name, headers in [("upgrade_no_token_401", None), ("upgrade_bad_token_401", "x.y.z")]:
        try:
            ws = await client.websocket("", headers)
            await ws.close()
            check(name, False, got="upgraded")
        except InvalidStatus as err:
            check(name, err.response.status_code == 401, status=err.response.status_code)
    status, _ = client.get("/unknown", token)
    check("get_unknown_404", status == 404, status=status)
    print(json.dumps({"done": True, "seconds": round(time.monotonic() - t0, 3)}))


async def create(admin, launch):
    """Creates a pipe by a framed upload (the CLI's `c create.json`); returns its id."""
    await admin.send(frame({"method": "create"}, json.dumps({"launch": launch}).encode()))
    reply = await admin.wait_for(lambda m: str(m.get("payload")).startswith("pipe_create "),
                                 "pipe_create")
    pipe = int(reply["payload"].split()[1])
    await admin.wait_for(lambda m: method(m) == "pipe_info", "pipe_info")
    return pipe


async def destroy(admin, pipe):
    await admin.send({"headers": {"method": "destroy", "pipe_id": pipe}, "payload": {}})
    gone = await admin.wait_for(lambda m: method(m) == "pipe_delete"
                                and m.get("payload") == [pipe], "pipe_delete")
    check(f"destroy {pipe}", True, got=gone)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unix", help="Unix socket of the plain http listener")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8445)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--token-file", default="./token.txt")
    p.add_argument("command", choices=["selftest"])
    args = p.parse_args()
    if not args.unix and not (args.ca and args.cert and args.key):
        p.error("TLS needs --ca, --cert and --key (or use --unix)")
    try:
        asyncio.run(selftest(Client(args)))
    except Failure as err:
        print(f"FAILED: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    print(json.dumps({"websockets": websockets.__version__}), file=sys.stderr)
    main()
