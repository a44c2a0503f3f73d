"""A hostile server for tests: authenticates evil.test to a Starling with dialback (it is evil.test's
authoritative server too, so it vouches for its own key), sends one honest message from evil.test, then
one whose 'from' claims another domain, and reports how the stream ended.

Usage: s2s_spoofer.py TARGET_PORT AUTHORITATIVE_PORT LOCAL_USER_JID SPOOFED_DOMAIN
Prints VERIFIED once the target asked about the key, AUTHENTICATED, then the stream error it got, or
CLOSED-WITHOUT-ERROR. Plaintext only: the target must run with s2s.require_tls false."""
import re
import socket
import sys
import threading

HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
          "xmlns:db='jabber:server:dialback' {attrs} version='1.0'>")


def read_until(sock, buffer, pattern, timeout=20):
    sock.settimeout(timeout)
    while not re.search(pattern, buffer[0], re.S):
        data = sock.recv(65536)
        if not data:
            return None
        buffer[0] += data.decode()
    match = re.search(pattern, buffer[0], re.S)
    buffer[0] = buffer[0][match.end():]
    return match


def authoritative(listener, verified):
    """Answers the target's db:verify for evil.test: valid, whatever the key."""
    connection, _ = listener.accept()
    buffer = [""]
    read_until(connection, buffer, r"<stream:stream[^>]*>")
    connection.sendall((HEADER.format(attrs="id='auth-1' from='evil.test'") +
                        "<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>").encode())
    match = read_until(connection, buffer, r"<db:verify[^>]*id='([^']*)'[^>]*>")
    if match:
        print("VERIFIED", flush=True)
        connection.sendall(f"<db:verify from='evil.test' to='{sys.argv[3].split('@')[1].split('/')[0]}' id='{match.group(1)}' type='valid'/>".encode())
    verified.set()
    read_until(connection, buffer, r"</stream:stream>")
    connection.close()


def main():
    target_port, authoritative_port, user, spoofed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    domain = user.split("@")[1].split("/")[0]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", authoritative_port))
    listener.listen(1)
    verified = threading.Event()
    threading.Thread(target=authoritative, args=(listener, verified), daemon=True).start()

    stream = socket.create_connection(("127.0.0.1", target_port))
    buffer = [""]
    stream.sendall(HEADER.format(attrs=f"from='evil.test' to='{domain}'").encode())
    read_until(stream, buffer, r"</stream:features>")
    stream.sendall(f"<db:result from='evil.test' to='{domain}'>not-a-real-key</db:result>".encode())
    if not read_until(stream, buffer, r"<db:result[^>]*type='valid'"):
        print("NOT-AUTHENTICATED", buffer[0], flush=True)
        return
    print("AUTHENTICATED", flush=True)
    stream.sendall(f"<message from='mallory@evil.test/x' to='{user}' type='chat'><body>honest</body></message>".encode())
    stream.sendall(f"<message from='mallory@{spoofed}/x' to='{user}' type='chat'><body>spoofed</body></message>".encode())
    match = read_until(stream, buffer, r"<stream:error><([a-z-]+)")
    print(match.group(1) if match else "CLOSED-WITHOUT-ERROR", flush=True)


if __name__ == "__main__":
    main()
