#!/usr/bin/env python3
"""An independent XMPP client (slixmpp) for Starling's integration tests.

Modes (each prints one result line and exits 0 on success, 1 on failure, bounded by --timeout):
  chat     log in as A and B, A sends to B's bare JID, B answers A's full JID: prints OK
  echo     log in as A, print READY, answer each chat message with "echo: <body>" until --count done
  badauth  log in as A with the given (wrong) password: prints AUTH-FAILED when the server refuses
  im       A subscribes to B (B approves and subscribes back), both rosters end at 'both'; A writes to
           offline C, who gets it with a delay stamp at login: prints OK
  muc      with the xep_0045 plugin: A creates --room and configures it through the form, B joins, they
           exchange groupchat messages, A kicks B, makes the room moderated, and B comes back as a
           visitor: prints OK
  mam      with the xep_0313 plugin: B sends A --count messages; A pages through its archive forwards
           and backwards, filters by B, reads the metadata and finds the stanza-ids it got live; then
           A makes --room persistent, talks in it, and B reads the room's archive: prints OK
  sm       with the xep_0198 plugin: A enables stream management with resumption and gets B's message
           with acknowledgements flowing; A's connection is cut without closing the stream, B writes
           again, and A reconnects and resumes, receiving what B wrote meanwhile: prints OK
  pep      with the xep_0115/0163/0172/0084/0223/0402 plugins: A and B subscribe to each other; B says
           +notify for nicknames and avatars through its entity capabilities; A publishes a nickname and
           an avatar (data, then metadata) which B is notified of and fetches, and A stores XEP-0402
           bookmarks with the persistent-storage publish options and reads them back; then with
           xep_0060 B creates a node on --service, A subscribes, and B's publication reaches A: prints OK
"""
import argparse
import asyncio
import logging
import ssl
import sys

import slixmpp
from slixmpp.exceptions import IqError


def make_client(jid, password, args):
    client = slixmpp.ClientXMPP(jid, password)
    client.enable_direct_tls = args.tls == "direct"
    client.enable_starttls = args.tls == "starttls"
    client.enable_plaintext = False
    client.register_plugin("xep_0203")
    client.register_plugin("xep_0045")
    client.register_plugin("xep_0313")
    client.register_plugin("xep_0359")
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


async def befriend(a, b, args):
    """A asks for B's presence; B (auto_authorize, auto_subscribe) approves and asks back. Returns both
    sides' subscription once B is seen online and both say 'both', or what they say after five seconds."""
    b_online = asyncio.get_running_loop().create_future()

    def on_available(presence):
        if presence["from"].bare == args.jid_b and not b_online.done():
            b_online.set_result(presence)

    a.add_event_handler("got_online", on_available)
    a.send_presence_subscription(pto=args.jid_b)
    await asyncio.wait_for(b_online, args.timeout)
    for _ in range(50):
        if a.client_roster[args.jid_b]["subscription"] == "both" and b.client_roster[args.jid_a]["subscription"] == "both":
            break
        await asyncio.sleep(0.1)
    return a.client_roster[args.jid_b]["subscription"], b.client_roster[args.jid_a]["subscription"]


async def im(args):
    """Subscriptions, roster and offline delivery between two slixmpp clients and a third account."""
    a = make_client(args.jid_a, args.password_a, args)
    b = make_client(args.jid_b, args.password_b, args)
    # B approves and subscribes back on its own, as most clients offer to.
    b.auto_authorize = True
    b.auto_subscribe = True
    a.auto_authorize = True
    for client in (a, b):
        state = await connect_and_start(client, args)
        if state != "started":
            print(f"LOGIN-{state.upper()} {client.boundjid}")
            return 1
        await client.get_roster()
    subscriptions = await befriend(a, b, args)
    if subscriptions != ("both", "both"):
        print(f"WRONG-SUBSCRIPTIONS {subscriptions[0]} {subscriptions[1]}")
        return 1
    # An offline message for C, delivered with a delay stamp at C's login.
    a.send_message(mto=args.jid_c, mbody="stored for later", mtype="chat")
    await asyncio.sleep(0.3)
    c = make_client(args.jid_c, args.password_c, args)
    got_c = asyncio.get_running_loop().create_future()
    c.add_event_handler("message", lambda m: got_c.done() or got_c.set_result(m))
    if await connect_and_start(c, args) != "started":
        print("LOGIN-C-FAILED")
        return 1
    stored = await asyncio.wait_for(got_c, args.timeout)
    if stored["body"] != "stored for later" or not stored["delay"]["stamp"]:
        print(f"WRONG-OFFLINE {stored}")
        return 1
    for client in (a, b, c):
        client.disconnect()
    print("OK")
    return 0


async def pep(args):
    """Personal eventing as slixmpp's plugins use it."""
    a = make_client(args.jid_a, args.password_a, args)
    b = make_client(args.jid_b, args.password_b, args)
    for client in (a, b):
        for plugin in ("xep_0115", "xep_0163", "xep_0172", "xep_0084", "xep_0223", "xep_0402"):
            client.register_plugin(plugin)
        client.auto_authorize = True
        client.auto_subscribe = True
    loop = asyncio.get_running_loop()
    nick_seen = loop.create_future()
    avatar_seen = loop.create_future()

    def on_nick(message):
        if message["from"].bare == args.jid_a and not nick_seen.done():
            nick_seen.set_result(message["pubsub_event"]["items"]["item"]["nick"]["nick"])

    def on_avatar(message):
        if message["from"].bare == args.jid_a and not avatar_seen.done():
            avatar_seen.set_result(message["pubsub_event"]["items"]["item"])

    b.add_event_handler("user_nick_publish", on_nick)
    b.add_event_handler("avatar_metadata_publish", on_avatar)
    for client in (a, b):
        if await connect_and_start(client, args) != "started":
            print(f"LOGIN-FAILED {client.boundjid}")
            return 1
        await client.get_roster()
    if await befriend(a, b, args) != ("both", "both"):
        print("WRONG-SUBSCRIPTIONS")
        return 1
    # Capabilities travel with presence; make sure B's current ones (with +notify) reached the server.
    await b.plugin["xep_0115"].update_caps()
    await asyncio.sleep(0.5)

    await a.plugin["xep_0172"].publish_nick("Alpha")
    nick = await asyncio.wait_for(nick_seen, args.timeout)
    if nick != "Alpha":
        print(f"WRONG-NICK {nick}")
        return 1

    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    avatar_id = a.plugin["xep_0084"].generate_id(image)
    await a.plugin["xep_0084"].publish_avatar(image)
    await a.plugin["xep_0084"].publish_avatar_metadata(items=[{"id": avatar_id, "type": "image/png", "bytes": len(image)}])
    item = await asyncio.wait_for(avatar_seen, args.timeout)
    if item["id"] != avatar_id:
        print(f"WRONG-AVATAR-METADATA {item}")
        return 1
    fetched = await b.plugin["xep_0084"].retrieve_avatar(args.jid_a, avatar_id)
    data = fetched["pubsub"]["items"]["item"]["avatar_data"]["value"]
    if data != image:
        print(f"WRONG-AVATAR-DATA {len(data)} bytes")
        return 1

    from slixmpp.plugins.xep_0402.stanza import Conference
    # What XEP-0402 §3 asks of a client: the persistent-storage profile plus as many items as allowed,
    # readable by the account only.
    a.plugin["xep_0223"].node_profiles["urn:xmpp:bookmarks:1"] = {"pubsub#max_items": "max", "pubsub#access_model": "whitelist"}
    for room, name in (("lobby@conference.localhost", "Lobby"), ("den@conference.localhost", "Den")):
        conference = Conference()
        conference["name"] = name
        conference["autojoin"] = True
        conference["nick"] = "alpha"
        await a.plugin["xep_0223"].store(conference, node="urn:xmpp:bookmarks:1", id=room)
    stored = await a.plugin["xep_0060"].get_items(a.boundjid.bare, "urn:xmpp:bookmarks:1")
    rooms = {item["id"]: item["conference"]["name"] for item in stored["pubsub"]["items"]}
    if rooms != {"lobby@conference.localhost": "Lobby", "den@conference.localhost": "Den"}:
        print(f"WRONG-BOOKMARKS {rooms}")
        return 1
    try:
        await b.plugin["xep_0060"].get_items(args.jid_a, "urn:xmpp:bookmarks:1")
        print("BOOKMARKS-VISIBLE-TO-A-CONTACT")
        return 1
    except IqError as error:
        if error.condition != "not-allowed":
            print(f"WRONG-REFUSAL {error.condition}")
            return 1
    # A node of the PubSub service: B creates it, A subscribes, B publishes.
    from slixmpp.xmlstream import ET
    published = loop.create_future()
    a.add_event_handler("pubsub_publish", lambda m: m["from"] == args.service and not published.done() and published.set_result(m))
    await b.plugin["xep_0060"].create_node(args.service, "slixmpp-news")
    subscription = await a.plugin["xep_0060"].subscribe(args.service, "slixmpp-news")
    if subscription["pubsub"]["subscription"]["subscription"] != "subscribed":
        print(f"WRONG-SUBSCRIPTION {subscription}")
        return 1
    entry = ET.fromstring("<entry xmlns='http://www.w3.org/2005/Atom'><title>from slixmpp</title></entry>")
    await b.plugin["xep_0060"].publish(args.service, "slixmpp-news", id="one", payload=entry)
    message = await asyncio.wait_for(published, args.timeout)
    if message["pubsub_event"]["items"]["item"]["id"] != "one":
        print(f"WRONG-EVENT {message}")
        return 1
    for client in (a, b):
        client.disconnect()
    print("OK")
    return 0


async def sm(args):
    """Stream management and resumption as slixmpp's xep_0198 plugin does them."""
    a = make_client(args.jid_a, args.password_a, args)
    a.register_plugin("xep_0198")
    b = make_client(args.jid_b, args.password_b, args)
    loop = asyncio.get_running_loop()
    enabled = loop.create_future()
    resumed = loop.create_future()
    bodies = []
    arrived = asyncio.Event()
    a.add_event_handler("sm_enabled", lambda _: enabled.done() or enabled.set_result(True))
    a.add_event_handler("session_resumed", lambda _: resumed.done() or resumed.set_result(True))

    def on_message(message):
        bodies.append(message["body"])
        arrived.set()

    a.add_event_handler("message", on_message)
    for client in (a, b):
        if await connect_and_start(client, args) != "started":
            print(f"LOGIN-FAILED {client.boundjid}")
            return 1
    await asyncio.wait_for(enabled, args.timeout)
    sm_id = a.plugin["xep_0198"].sm_id
    if not sm_id:
        print("NOT-RESUMABLE")
        return 1
    full = a.boundjid.full

    async def wait_for_body(body):
        while body not in bodies:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), args.timeout)

    b.send_message(mto=full, mbody="before the drop", mtype="chat")
    await wait_for_body("before the drop")
    a.plugin["xep_0198"].request_ack()
    for _ in range(50):
        if a.plugin["xep_0198"].last_ack > 0:
            break
        await asyncio.sleep(0.1)
    if a.plugin["xep_0198"].last_ack == 0:
        print("NO-ACK-FROM-SERVER")
        return 1
    # Cut the connection as a phone losing its network does, then write to the detached session.
    a.abort()
    await asyncio.sleep(0.3)
    b.send_message(mto=full, mbody="while away", mtype="chat")
    a.connect(args.host, args.port)
    await asyncio.wait_for(resumed, args.timeout)
    await wait_for_body("while away")
    if a.boundjid.full != full:
        print(f"NEW-RESOURCE {a.boundjid.full} instead of {full}")
        return 1
    for client in (a, b):
        client.disconnect()
    print("OK")
    return 0


async def badauth(args):
    a = make_client(args.jid_a, args.password_a, args)
    state = await connect_and_start(a, args)
    a.disconnect()
    print("AUTH-FAILED" if state == "failed" else f"UNEXPECTED-{state.upper()}")
    return 0 if state == "failed" else 1


async def muc(args):
    """Multi-user chat as slixmpp's xep_0045 plugin does it."""
    room = args.room
    a = make_client(args.jid_a, args.password_a, args)
    b = make_client(args.jid_b, args.password_b, args)
    for client in (a, b):
        state = await connect_and_start(client, args)
        if state != "started":
            print(f"LOGIN-{state.upper()} {client.boundjid}")
            return 1
    muc_a, muc_b = a.plugin["xep_0045"], b.plugin["xep_0045"]

    def codes(presence):
        return {int(code) for code in presence["muc"]["status_codes"]}

    # A creates the room: status 201, then configures it through the form the room sends.
    own, _, _, _ = await muc_a.join_muc_wait(room, "Alpha", maxstanzas=0, timeout=args.timeout)
    if 201 not in codes(own) or own["muc"]["affiliation"] != "owner":
        print(f"WRONG-CREATION {own}")
        return 1
    form = await muc_a.get_room_config(room)
    fields = form.get_fields()
    if "muc#roomconfig_roomname" not in fields or "muc#roomconfig_persistentroom" not in fields:
        print(f"WRONG-FORM {sorted(fields)}")
        return 1
    submission = a.plugin["xep_0004"].make_form(ftype="submit")
    submission.add_field(var="FORM_TYPE", value="http://jabber.org/protocol/muc#roomconfig")
    submission.add_field(var="muc#roomconfig_roomname", value="Slixmpp room")
    await muc_a.set_room_config(room, submission)

    # B joins and sees A; then they talk.
    own_b, _, occupants, _ = await muc_b.join_muc_wait(room, "Bravo", maxstanzas=0, timeout=args.timeout)
    # (slixmpp's list of occupants includes the self-presence, which comes last.)
    if [p["muc"]["nick"] for p in occupants] != ["Alpha", "Bravo"] or own_b["muc"]["role"] != "participant":
        print(f"WRONG-JOIN {[str(p) for p in occupants]} {own_b}")
        return 1
    got_b, got_a = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
    b.add_event_handler("groupchat_message", lambda m: m["mucnick"] == "Alpha" and not got_b.done() and got_b.set_result(m))
    a.add_event_handler("groupchat_message", lambda m: m["mucnick"] == "Bravo" and not got_a.done() and got_a.set_result(m))
    a.send_message(mto=room, mbody="hello from slixmpp", mtype="groupchat")
    heard = await asyncio.wait_for(got_b, args.timeout)
    b.send_message(mto=room, mbody="hello back", mtype="groupchat")
    answered = await asyncio.wait_for(got_a, args.timeout)
    if heard["body"] != "hello from slixmpp" or answered["body"] != "hello back":
        print(f"WRONG-MESSAGES {heard} {answered}")
        return 1

    # A kicks B, who learns it with 307 and the reason.
    kicked = asyncio.get_running_loop().create_future()

    def on_presence(presence):
        if presence["type"] == "unavailable" and presence["muc"]["nick"] == "Bravo" and not kicked.done():
            kicked.set_result(presence)

    b.add_event_handler("groupchat_presence", on_presence)
    await muc_a.set_role(room, "Bravo", "none", reason="bye for now")
    removal = await asyncio.wait_for(kicked, args.timeout)
    if not {110, 307} <= codes(removal):
        print(f"WRONG-KICK {removal}")
        return 1

    # A makes the room moderated; B comes back as a visitor.
    moderated = a.plugin["xep_0004"].make_form(ftype="submit")
    moderated.add_field(var="FORM_TYPE", value="http://jabber.org/protocol/muc#roomconfig")
    moderated.add_field(var="muc#roomconfig_moderatedroom", value=True)
    await muc_a.set_room_config(room, moderated)
    again, _, _, _ = await muc_b.join_muc_wait(room, "Bravo", maxstanzas=0, timeout=args.timeout)
    if again["muc"]["role"] != "visitor":
        print(f"WRONG-MODERATION {again}")
        return 1
    for client in (a, b):
        client.disconnect()
    print("OK")
    return 0


async def mam(args):
    """Message archives as slixmpp's xep_0313 plugin reads them."""
    a = make_client(args.jid_a, args.password_a, args)
    b = make_client(args.jid_b, args.password_b, args)
    live = {}
    done = asyncio.get_running_loop().create_future()

    def on_message(message):
        if message["type"] == "chat" and message["body"]:
            live[message["body"]] = message["stanza_id"]["id"]
            if len(live) == args.count and not done.done():
                done.set_result(True)

    a.add_event_handler("message", on_message)
    for client in (a, b):
        state = await connect_and_start(client, args)
        if state != "started":
            print(f"LOGIN-{state.upper()} {client.boundjid}")
            return 1
    bodies = [f"archived {index}" for index in range(args.count)]
    for body in bodies:
        b.send_message(mto=a.boundjid.bare, mbody=body, mtype="chat")
    await asyncio.wait_for(done, args.timeout)

    mam_a = a.plugin["xep_0313"]
    forward = [m async for m in mam_a.iterate(rsm={"max": 10})]
    got = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in forward]
    ids = [m["mam_result"]["id"] for m in forward]
    if got != bodies:
        print(f"WRONG-FORWARD {got}")
        return 1
    if ids != [live[body] for body in bodies]:
        print(f"WRONG-IDS {ids} {live}")
        return 1
    backward = [m["mam_result"]["forwarded"]["stanza"]["body"] async for m in mam_a.iterate(rsm={"max": 7}, reverse=True)]
    if backward != list(reversed(bodies)):
        print(f"WRONG-BACKWARD {backward}")
        return 1
    filtered = await mam_a.retrieve(with_jid=b.boundjid.bare, rsm={"max": 5})
    if len(filtered["mam"]["results"]) != 5 or filtered["mam_fin"]["complete"] not in (False, "false", ""):
        print(f"WRONG-FILTER {filtered}")
        return 1
    metadata = await mam_a.get_archive_metadata()
    if metadata["mam_metadata"]["start"]["id"] != ids[0] or metadata["mam_metadata"]["end"]["id"] != ids[-1]:
        print(f"WRONG-METADATA {metadata}")
        return 1

    # A room's archive: A makes the room persistent and talks; B, who never joined, reads it.
    room = args.room
    muc_a = a.plugin["xep_0045"]
    await muc_a.join_muc_wait(room, "Alpha", maxstanzas=0, timeout=args.timeout)
    form = a.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", value="http://jabber.org/protocol/muc#roomconfig")
    form.add_field(var="muc#roomconfig_persistentroom", value=True)
    await muc_a.set_room_config(room, form)
    echoed = asyncio.get_running_loop().create_future()
    a.add_event_handler("groupchat_message", lambda m: m["body"] == "room 2" and not echoed.done() and echoed.set_result(m))
    for index in range(3):
        a.send_message(mto=room, mbody=f"room {index}", mtype="groupchat")
    await asyncio.wait_for(echoed, args.timeout)
    result = await b.plugin["xep_0313"].retrieve(jid=slixmpp.JID(room), rsm={"max": 10})
    in_room = [(str(m["mam_result"]["forwarded"]["stanza"]["from"]), m["mam_result"]["forwarded"]["stanza"]["body"]) for m in result["mam"]["results"]]
    if in_room != [(f"{room}/Alpha", f"room {index}") for index in range(3)]:
        print(f"WRONG-ROOM {in_room}")
        return 1
    for client in (a, b):
        client.disconnect()
    print("OK")
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["chat", "echo", "badauth", "im", "muc", "mam", "pep", "sm"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", choices=["starttls", "direct"], default="starttls")
    parser.add_argument("--mechanism")
    parser.add_argument("--jid-a", required=True)
    parser.add_argument("--password-a", required=True)
    parser.add_argument("--jid-b")
    parser.add_argument("--password-b")
    parser.add_argument("--jid-c")
    parser.add_argument("--password-c")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--room")
    parser.add_argument("--service", default="pubsub.localhost")
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.CRITICAL)
    modes = {"chat": chat, "echo": echo, "badauth": badauth, "im": im, "muc": muc, "mam": mam, "pep": pep, "sm": sm}
    try:
        code = asyncio.run(asyncio.wait_for(modes[args.mode](args), args.timeout + 5))
    except asyncio.TimeoutError:
        print("TIMEOUT")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
