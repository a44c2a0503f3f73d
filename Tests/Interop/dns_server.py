"""A name server on loopback for tests: answers from a zone file (dnslib), NXDOMAIN for names it
does not hold. Usage: dns_server.py ZONE_FILE PORT; prints READY once it listens (UDP and TCP)."""
import os
import signal
import sys
import time

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSServer


class ZoneResolver(BaseResolver):
    def __init__(self, zone):
        self.records = RR.fromZone(zone)

    def resolve(self, request, handler):
        reply = request.reply()
        name = request.q.qname
        matching = [rr for rr in self.records if rr.rname == name]
        for rr in matching:
            if rr.rtype == request.q.qtype:
                reply.add_answer(rr)
        if not matching:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def main():
    # The test runner's children inherit its signal mask (SIGTERM blocked) and may inherit SIGTERM
    # ignored: take both back, so that Process.terminate() ends this.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    zone = open(sys.argv[1]).read()
    port = int(sys.argv[2])
    resolver = ZoneResolver(zone)
    for tcp in (False, True):
        DNSServer(resolver, port=port, address="127.0.0.1", tcp=tcp, logger=QuietLogger()).start_thread()
    print("READY", flush=True)
    while True:
        time.sleep(60)


class QuietLogger:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


if __name__ == "__main__":
    main()
