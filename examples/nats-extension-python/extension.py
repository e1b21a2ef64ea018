#!/usr/bin/env python3
"""A nexo NATS extension (protocol 1) with two deterministic text tools.

It reads the environment the nexo operator gives an extension's Deployment
(NEXO_EXTENSION, NEXO_EXTENSION_SUBJECT, NEXO_EXTENSION_ANNOUNCE, NEXO_NATS_URLS and
the NEXO_NATS_* credentials), announces its tools on the announcement subject every
heartbeat interval and at once when a worker asks on `ext.discover`, and answers tool
calls on its call subject in a queue group shared by all its instances. On SIGTERM or
SIGINT it says goodbye, finishes the calls it has, and exits 0.

See docs/extensions/nats-protocol.md for the protocol.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import uuid

import nats

PROTOCOL = 1
DISCOVER_SUBJECT = "ext.discover"
VERSION = "1.0.0"

# The most text a call may carry: a bound on what one request makes this process do.
MAX_TEXT_CHARS = 100_000

log = logging.getLogger("nexo-extension")


def _text(arguments):
    text = arguments.get("text")
    if not isinstance(text, str):
        raise ValueError("`text` must be a string")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"`text` has more than {MAX_TEXT_CHARS} characters")
    return text


def word_count(arguments):
    return str(len(_text(arguments).split()))


def reverse(arguments):
    return _text(arguments)[::-1]


TEXT_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "description": "The text."}},
    "required": ["text"],
    "additionalProperties": False,
}
PURE = {
    "readOnlyHint": True,
    "destructiveHint": False,
    "idempotentHint": True,
    "openWorldHint": False,
}
TOOLS = {
    "word_count": (
        word_count,
        {
            "name": "word_count",
            "description": "Counts the words of a text (runs of non-blank characters).",
            "inputSchema": TEXT_SCHEMA,
            "annotations": PURE,
        },
    ),
    "reverse": (
        reverse,
        {
            "name": "reverse",
            "description": "Returns the text with its characters in reverse order.",
            "inputSchema": TEXT_SCHEMA,
            "annotations": PURE,
        },
    ),
}


def required_env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} is not set (the nexo operator sets it; see README.md)")
    return value


def connect_options():
    """nats.connect() keyword arguments from the NEXO_NATS_* variables."""
    env = os.environ.get
    options = {
        "servers": [url.strip() for url in required_env("NEXO_NATS_URLS").split(",")],
        # Keep trying through a NATS outage; the workers drop this instance meanwhile
        # and find it again with its next announcement.
        "max_reconnect_attempts": -1,
    }
    if env("NEXO_NATS_USER"):
        options["user"] = env("NEXO_NATS_USER")
        options["password"] = env("NEXO_NATS_PASSWORD", "")
    if env("NEXO_NATS_TOKEN"):
        options["token"] = env("NEXO_NATS_TOKEN")
    if env("NEXO_NATS_NKEY_SEED"):
        # Needs the `nkeys` package besides nats-py.
        options["nkeys_seed_str"] = env("NEXO_NATS_NKEY_SEED")
    if env("NEXO_NATS_CREDENTIALS_FILE"):
        options["user_credentials"] = env("NEXO_NATS_CREDENTIALS_FILE")
    if env("NEXO_NATS_TLS_CA_FILE"):
        context = ssl.create_default_context(cafile=env("NEXO_NATS_TLS_CA_FILE"))
        if env("NEXO_NATS_TLS_CERT_FILE"):
            context.load_cert_chain(
                env("NEXO_NATS_TLS_CERT_FILE"), env("NEXO_NATS_TLS_KEY_FILE")
            )
        options["tls"] = context
    return options


class Extension:
    def __init__(self, nc, heartbeat_ms):
        self.nc = nc
        self.extension = required_env("NEXO_EXTENSION")
        self.call_subject = required_env("NEXO_EXTENSION_SUBJECT")
        self.announce_subject = required_env("NEXO_EXTENSION_ANNOUNCE")
        self.instance = uuid.uuid4().hex
        self.heartbeat_ms = heartbeat_ms

    def announcement(self, **extra):
        return json.dumps(
            {
                "protocol": PROTOCOL,
                "extension": self.extension,
                "instance": self.instance,
                **extra,
            }
        ).encode()

    async def announce(self):
        await self.nc.publish(
            self.announce_subject,
            self.announcement(
                version=VERSION,
                heartbeatIntervalMs=self.heartbeat_ms,
                tools=[definition for _, definition in TOOLS.values()],
            ),
        )

    async def heartbeat(self):
        while True:
            try:
                await self.announce()
            except Exception as err:  # a publish while disconnected: the next one
                log.warning("announcement failed: %s", err)
            await asyncio.sleep(self.heartbeat_ms / 1000)

    async def on_discover(self, msg):
        try:
            wanted = json.loads(msg.data or b"{}").get("extension")
        except (ValueError, AttributeError):
            wanted = None
        if wanted in (None, self.extension):
            await self.announce()

    async def on_call(self, msg):
        await msg.respond(json.dumps(self.answer(msg.data)).encode())

    def answer(self, data):
        try:
            request = json.loads(data)
            tool, arguments = request["tool"], request.get("arguments") or {}
        except (ValueError, KeyError, TypeError):
            return {"error": "the request is not a protocol 1 call"}
        if tool not in TOOLS:
            return {"error": f"no tool named `{tool}` in {self.extension} {VERSION}"}
        if not isinstance(arguments, dict):
            return {"error": "`arguments` must be an object"}
        try:
            return {"content": TOOLS[tool][0](arguments)}
        except ValueError as err:
            return {"error": str(err)}

    async def leave(self):
        """Tells the workers this instance stops, so they drop it without waiting
        for missed heartbeats."""
        await self.nc.publish(self.announce_subject, self.announcement(leaving=True))


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heartbeat-ms",
        type=int,
        default=int(os.environ.get("EXTENSION_HEARTBEAT_MS", "10000")),
        help="announcement interval (default 10000, or EXTENSION_HEARTBEAT_MS)",
    )
    args = parser.parse_args()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    nc = await nats.connect(name="nexo-extension-python", **connect_options())
    extension = Extension(nc, args.heartbeat_ms)
    # Instances share the queue group named after the call subject: each call goes
    # to one of them.
    await nc.subscribe(
        extension.call_subject, queue=extension.call_subject, cb=extension.on_call
    )
    await nc.subscribe(DISCOVER_SUBJECT, cb=extension.on_discover)
    await nc.flush()
    heartbeat = asyncio.create_task(extension.heartbeat())
    log.info(
        "serving %s on %s as instance %s (heartbeat %d ms)",
        extension.extension,
        extension.call_subject,
        extension.instance,
        args.heartbeat_ms,
    )

    await stopping.wait()
    log.info("stopping")
    heartbeat.cancel()
    try:
        await extension.leave()
    finally:
        # Drain: stop taking calls, answer those already received, close.
        await nc.drain()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main())
