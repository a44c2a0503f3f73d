#!/usr/bin/env python3
"""An independent XMPP client (slixmpp) for Starling's integration tests.

Modes (each prints one result line and exits 0 on success, 1 on failure, bounded by --timeout):
  chat     log in as A and B, A sends to B's bare JID, B answers A's full JID: prints OK
  echo     log in as A, print READY, answer each chat message with "echo: <body>" until --count done
  badauth  log in as A with the given (wrong) password: prints AUTH-FAILED when the server refuses
"""
import argparse
import asyncio
import logging
import ssl
import sys

import slixmpp


def make_client(jid, password, args):
    client = slixmpp.ClientXMPP(jid, password)
    client.enable_direct_tls = args.tls == "direct"
    client.enable_starttls = args.tls == "starttls"
    client.enable_plaintext = False
    # The test server uses a self-signed certificate.
    client.ssl_context.check_hostname = False
    client.ssl_context.verify_mode = ssl.CERT_NONE
    if args.mechanism:
        client.plugin['feature_mechanisms'].use_mech = args.mechanism
    return client


async def connect_and_start(client, args):
    started = asyncio.get_running_loop().create_future()
    failed = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    client.add_event_handler("failed_auth", lambda _: failed.done() or failed.set_result(True))
    client.connect(args.host, args.port)
    done, _ = await asyncio.wait([started, failed], timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
    if started in done:
        client.send_presence()
        return "started"
    if failed in done:
        return "failed"
    return "timeout"


async def chat(args):
    a = make_client(args.jid_a, args.password_a, args)
    b = make_client(args.jid_b, args.password_b, args)
    got_b = asyncio.get_running_loop().create_future()
    got_a = asyncio.get_running_loop().create_future()
    b.add_event_handler("message", lambda m: got_b.done() or got_b.set_result(m))
    a.add_event_handler("message", lambda m: got_a.done() or got_a.set_result(m))
    for client in (a, b):
        state = await connect_and_start(client, args)
        if state != "started":
            print(f"LOGIN-{state.upper()} {client.boundjid}")
            return 1
    await asyncio.sleep(0.2)  # let both available presences reach the server
    body = "hello from slixmpp <&> \u00e9\u2603"
    a.send_message(mto=args.jid_b, mbody=body, mtype="chat")
    message = await asyncio.wait_for(got_b, args.timeout)
    if message["body"] != body or message["from"].bare != args.jid_a:
        print(f"WRONG-MESSAGE {message}")
        return 1
    b.send_message(mto=message["from"], mbody="reply", mtype="chat")
    reply = await asyncio.wait_for(got_a, args.timeout)
    if reply["body"] != "reply" or reply["from"].bare != args.jid_b:
        print(f"WRONG-REPLY {reply}")
        return 1
    for client in (a, b):
        client.disconnect()
    print("OK")
    return 0


async def echo(args):
    a = make_client(args.jid_a, args.password_a, args)
    remaining = args.count
    finished = asyncio.get_running_loop().create_future()

    def on_message(message):
        nonlocal remaining
        if message["type"] in ("chat", "normal"):
            a.send_message(mto=message["from"], mbody="echo: " + message["body"], mtype="chat")
            remaining -= 1
            if remaining <= 0 and not finished.done():
                finished.set_result(True)

    a.add_event_handler("message", on_message)
    state = await connect_and_start(a, args)
    if state != "started":
        print(f"LOGIN-{state.upper()}")
        return 1
    await asyncio.sleep(0.2)
    print("READY", flush=True)
    await asyncio.wait_for(finished, args.timeout)
    await asyncio.sleep(0.2)
    a.disconnect()
    print("OK")
    return 0


async def badauth(args):
    a = make_client(args.jid_a, args.password_a, args)
    state = await connect_and_start(a, args)
    a.disconnect()
    print("AUTH-FAILED" if state == "failed" else f"UNEXPECTED-{state.upper()}")
    return 0 if state == "failed" else 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["chat", "echo", "badauth"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", choices=["starttls", "direct"], default="starttls")
    parser.add_argument("--mechanism")
    parser.add_argument("--jid-a", required=True)
    parser.add_argument("--password-a", required=True)
    parser.add_argument("--jid-b")
    parser.add_argument("--password-b")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.CRITICAL)
    modes = {"chat": chat, "echo": echo, "badauth": badauth}
    try:
        code = asyncio.run(asyncio.wait_for(modes[args.mode](args), args.timeout + 5))
    except asyncio.TimeoutError:
        print("TIMEOUT")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
