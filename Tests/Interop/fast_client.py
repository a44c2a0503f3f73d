#!/usr/bin/env python3
"""An independent XEP-0484 (FAST) client for Starling's integration tests, on Python's standard library only.

Over direct TLS to --port: logs in with SASL2 PLAIN and the password, asking for a token for --mechanism
(HT-SHA-256-NONE, or HT-SHA-256-ENDP bound to the server certificate's SHA-256, RFC 5929), then opens a
second connection and logs in with the token alone (draft-schmaus-kitten-sasl-ht: `user NUL
HMAC-SHA-256(token, "Initiator" || cb-data)`), checks the server's `HMAC(token, "Responder" || cb-data)`,
binds with Bind2 and sends one chat message to --peer. Prints a JSON line (token, bound JID) and exits 0;
prints what went wrong and exits 1 otherwise.
"""
import argparse
import base64
import hashlib
import hmac
import json
import socket
import ssl
import sys
import uuid
import xml.etree.ElementTree as ET

SASL2 = "urn:xmpp:sasl:2"
FAST = "urn:xmpp:fast:0"
BIND2 = "urn:xmpp:bind:0"


class Stream:
    def __init__(self, port, domain):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock = context.wrap_socket(raw, server_hostname=domain)
        self.endpoint = hashlib.sha256(self.sock.getpeercert(binary_form=True)).digest()
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.ready = []
        self.send(f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                  f"to='{domain}' version='1.0'>")

    def send(self, text):
        self.sock.sendall(text.encode())

    def next(self):
        """The next top-level element of the stream."""
        while not self.ready:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the server closed the connection")
            self.parser.feed(data)
            for event, element in self.parser.read_events():
                if event == "start":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 1:
                        self.ready.append(element)
        return self.ready.pop(0)

    def close(self):
        try:
            self.send("</stream:stream>")
            self.sock.close()
        except OSError:
            pass


def authenticate(stream, mechanism, initial, extra):
    features = stream.next()
    offered = features.find(f"{{{SASL2}}}authentication")
    if offered is None:
        raise RuntimeError("no SASL2 offered")
    fast = offered.find(f"{{{SASL2}}}inline/{{{FAST}}}fast")
    fast_mechanisms = [m.text for m in fast.findall(f"{{{FAST}}}mechanism")] if fast is not None else []
    stream.send(f"<authenticate xmlns='{SASL2}' mechanism='{mechanism}'><initial-response>{base64.b64encode(initial).decode()}"
                f"</initial-response>{extra}</authenticate>")
    outcome = stream.next()
    if outcome.tag != f"{{{SASL2}}}success":
        raise RuntimeError("authentication failed: " + ET.tostring(outcome).decode())
    return outcome, fast_mechanisms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--mechanism", default="HT-SHA-256-NONE")
    args = parser.parse_args()
    agent = f"<user-agent id='{uuid.uuid4()}'><software>fast_client.py</software></user-agent>"

    first = Stream(args.port, args.domain)
    success, offered = authenticate(first, "PLAIN", b"\0" + args.user.encode() + b"\0" + args.password.encode(),
                                    agent + f"<request-token xmlns='{FAST}' mechanism='{args.mechanism}'/>")
    if args.mechanism not in offered:
        raise RuntimeError(f"{args.mechanism} not offered: {offered}")
    issued = success.find(f"{{{FAST}}}token")
    if issued is None:
        raise RuntimeError("no token in " + ET.tostring(success).decode())
    token = issued.get("token")
    first.close()

    second = Stream(args.port, args.domain)
    cb = second.endpoint if args.mechanism.endswith("-ENDP") else b""
    proof = hmac.new(token.encode(), b"Initiator" + cb, hashlib.sha256).digest()
    success, _ = authenticate(second, args.mechanism, args.user.encode() + b"\0" + proof,
                              agent + f"<fast xmlns='{FAST}'/><bind xmlns='{BIND2}'><tag>fast_client</tag></bind>")
    answer = base64.b64decode(success.find(f"{{{SASL2}}}additional-data").text)
    if not hmac.compare_digest(answer, hmac.new(token.encode(), b"Responder" + cb, hashlib.sha256).digest()):
        raise RuntimeError("the server's proof does not match the token")
    if success.find(f"{{{BIND2}}}bound") is None:
        raise RuntimeError("not bound: " + ET.tostring(success).decode())
    jid = success.find(f"{{{SASL2}}}authorization-identifier").text
    second.send(f"<message to='{args.peer}' type='chat'><body>FAST from Python</body></message>")
    # A ping answered proves the message before it was taken (the server handles a stream's stanzas in order).
    second.send(f"<iq type='get' id='p1' to='{args.domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
    while True:
        element = second.next()
        if element.tag == "{jabber:client}iq" and element.get("id") == "p1":
            break
    second.close()
    print(json.dumps({"token_expiry": issued.get("expiry"), "jid": jid}))


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # noqa: BLE001 - the test prints whatever went wrong
        print(f"FAILED: {error}")
        sys.exit(1)
