"""An independent Micronets peer on Python's `websockets` (what the original peers use).

Usage: peer.py URL CERT KEY CA. Connects with a client certificate, sends a HELLO, prints
the partner's HELLO and the negotiated extensions, then echoes every message (text stays
text, binary stays binary) until the proxy closes the connection, and prints the close code
and reason. Exit status 0 when all of that went as expected.
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def main(url, cert, key, ca):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    # Like the original peers: permessage-deflate offered (the default), 1 MiB messages.
    async with connect(url, ssl=context, max_size=1 << 20) as ws:
        hello = {
            "message": {
                "messageId": 0,
                "messageType": "CONN:HELLO",
                "requiresResponse": False,
                "peerClass": "python-websockets",
                "peerId": "py",
            }
        }
        await ws.send(json.dumps(hello))
        partner = json.loads(await ws.recv())
        assert partner["message"]["messageType"] == "CONN:HELLO", partner
        extensions = [type(e).__name__ for e in ws.protocol.extensions]
        print("HELLO", partner["message"]["peerId"], "extensions", extensions, flush=True)
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        print("CLOSED", ws.close_code, ws.close_reason, flush=True)


asyncio.run(main(*sys.argv[1:]))
