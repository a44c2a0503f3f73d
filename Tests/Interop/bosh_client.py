#!/usr/bin/env python3
"""An independent BOSH client (XEP-0124/0206) for Starling's integration tests, on Python's standard
library only: creates a session at --url, logs in with SCRAM-SHA-1 or PLAIN, binds, fetches the roster,
sends --count chat messages to --peer and waits for each answer "echo: <body>". Prints OK and exits 0 on
success; prints what went wrong and exits 1 otherwise.
"""
import argparse
import base64
import hashlib
import hmac
import os
import random
import sys
import urllib.request
import xml.etree.ElementTree as ET

HTTPBIND = "http://jabber.org/protocol/httpbind"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
CLIENT = "jabber:client"


class Session:
    def __init__(self, url, domain, headers):
        self.url, self.domain, self.headers = url, domain, headers
        self.rid = random.randint(1_000_000, 9_000_000)
        self.sid = None

    def post(self, payload="", **attributes):
        self.rid += 1
        attrs = {"rid": str(self.rid), "xmlns": HTTPBIND}
        if self.sid:
            attrs["sid"] = self.sid
        attrs.update(attributes)
        text = "<body " + " ".join(f"{k}='{v}'" for k, v in attrs.items()) + ">" + payload + "</body>"
        request = urllib.request.Request(self.url, data=text.encode(), headers={"Content-Type": "text/xml; charset=utf-8", **self.headers})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = ET.fromstring(response.read())
        if body.get("type") == "terminate":
            raise RuntimeError(f"session terminated: {body.get('condition')} {ET.tostring(body).decode()}")
        return body

    def expect(self, predicate, what, first=(), polls=20):
        """The first element matching `predicate` in `first` (an answer already in hand) or in the next polls."""
        for child in first:
            if predicate(child):
                return child
        for _ in range(polls):
            for child in self.post():
                if predicate(child):
                    return child
        raise RuntimeError(f"no {what}")


def scram_sha1(session, username, password):
    nonce = base64.b64encode(os.urandom(18)).decode()
    bare = f"n={username},r={nonce}"
    first = session.post(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>{base64.b64encode(('n,,' + bare).encode()).decode()}</auth>")
    challenge = first.find(f"{{{SASL}}}challenge")
    if challenge is None:
        raise RuntimeError("no SCRAM challenge: " + ET.tostring(first).decode())
    server_first = base64.b64decode(challenge.text).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha1).digest()
    without_proof = f"c=biws,r={fields['r']}"
    message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha1(client_key).digest(), message, hashlib.sha1).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    outcome = session.post(f"<response xmlns='{SASL}'>{base64.b64encode(f'{without_proof},p={proof}'.encode()).decode()}</response>")
    success = outcome.find(f"{{{SASL}}}success")
    if success is None:
        raise RuntimeError("SCRAM failed: " + ET.tostring(outcome).decode())
    server_key = hmac.new(salted, b"Server Key", hashlib.sha1).digest()
    expected = base64.b64encode(hmac.new(server_key, message, hashlib.sha1).digest()).decode()
    if base64.b64decode(success.text).decode() != f"v={expected}":
        raise RuntimeError("the server's SCRAM signature is wrong")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--forwarded-proto", default=None, help="X-Forwarded-Proto to send, as a TLS-terminating proxy would")
    args = parser.parse_args()
    headers = {"X-Forwarded-Proto": args.forwarded_proto} if args.forwarded_proto else {}
    session = Session(args.url, args.domain, headers)
    created = session.post(to=args.domain, wait="5", hold="1", ver="1.11", **{"xmpp:version": "1.0", "xmlns:xmpp": "urn:xmpp:xbosh"})
    session.sid = created.get("sid")
    if not session.sid or created.get("requests") != "2":
        raise RuntimeError("no session: " + ET.tostring(created).decode())
    features = created.find("{http://etherx.jabber.org/streams}features")
    mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")] if features is not None else []
    if "SCRAM-SHA-1" not in mechanisms:
        raise RuntimeError(f"SCRAM-SHA-1 not offered: {mechanisms}")
    scram_sha1(session, args.username, args.password)
    restarted = session.post(to=args.domain, **{"xmpp:restart": "true", "xmlns:xmpp": "urn:xmpp:xbosh"})
    if restarted.find("{http://etherx.jabber.org/streams}features/{urn:ietf:params:xml:ns:xmpp-bind}bind") is None:
        raise RuntimeError("no bind feature after the restart: " + ET.tostring(restarted).decode())
    bound = session.post(f"<iq xmlns='{CLIENT}' type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    jid = bound.find(f"{{{CLIENT}}}iq/{{urn:ietf:params:xml:ns:xmpp-bind}}bind/{{urn:ietf:params:xml:ns:xmpp-bind}}jid")
    if jid is None or not jid.text.startswith(f"{args.username}@{args.domain}/"):
        raise RuntimeError("bind failed: " + ET.tostring(bound).decode())
    session.post(f"<iq xmlns='{CLIENT}' type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq><presence xmlns='{CLIENT}'/>")
    for index in range(1, args.count + 1):
        sent = session.post(f"<message xmlns='{CLIENT}' to='{args.peer}' type='chat'><body>ping {index}</body></message>")
        answer = session.expect(lambda e: e.tag == f"{{{CLIENT}}}message" and e.findtext(f"{{{CLIENT}}}body") == f"echo: ping {index}",
                                f"echo of ping {index}", first=list(sent))
        if not answer.get("from", "").startswith(args.peer):
            raise RuntimeError("the echo came from " + answer.get("from", "?"))
    try:
        session.post(f"<presence xmlns='{CLIENT}' type='unavailable'/>", type="terminate")
    except RuntimeError:
        pass  # the answer to a terminate is a terminate
    print("OK", jid.text)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # one line for the test to show
        print("FAILED:", error)
        sys.exit(1)
