import Foundation
import Logging
import StarlingAPI
import StarlingPostgres
import StarlingSASL
import StarlingSQLite
import StarlingStorage
import XCTest

/// The contract every storage backend fulfils. Each backend's test class runs all of it; every run
/// uses a host of its own so runs never see each other's data.
struct StoreContract {
    let store: any StarlingStore
    let host = "t\(UUID().uuidString.prefix(8).lowercased()).example"

    func jid(_ user: String) -> JID { JID("\(user)@\(host)")! }

    func accounts() async throws {
        try await store.register(username: "alice", host: host, password: "one", iterations: 4096)
        let credentials = try await store.credentials(username: "alice", host: host)
        XCTAssertEqual(Set(credentials?.map(\.hash) ?? []), [.sha1, .sha256])
        XCTAssertTrue(credentials?.allSatisfy { $0.verify(password: "one") } ?? false)
        let elsewhere = try await store.credentials(username: "alice", host: "other-" + host)
        XCTAssertNil(elsewhere, "accounts are per host")
        let exists = try await store.accountExists(username: "alice", host: host)
        XCTAssertTrue(exists)
        do {
            try await store.register(username: "alice", host: host, password: "two", iterations: 4096)
            XCTFail("duplicate account")
        } catch { XCTAssertEqual(error, .accountExists) }

        try await store.changePassword(username: "alice", host: host, password: "two", iterations: 4096)
        let changed = try await store.credentials(username: "alice", host: host)
        XCTAssertEqual(changed?.count, 2)
        XCTAssertTrue(changed?.allSatisfy { $0.verify(password: "two") && !$0.verify(password: "one") } ?? false)

        try await store.register(username: "bob", host: host, password: "b", iterations: 4096)
        let listed = try await store.accounts(host: host)
        XCTAssertEqual(listed, ["alice", "bob"])
        try await store.deleteAccount(username: "alice", host: host)
        let gone = try await store.credentials(username: "alice", host: host)
        XCTAssertNil(gone)
        do {
            try await store.deleteAccount(username: "alice", host: host)
            XCTFail("deleting twice")
        } catch { XCTAssertEqual(error, .accountNotFound) }
        do {
            try await store.changePassword(username: "nobody", host: host, password: "x", iterations: 4096)
            XCTFail("changing a missing account")
        } catch { XCTAssertEqual(error, .accountNotFound) }
    }

    func concurrentRegistrations() async throws {
        let credentials = [SCRAMCredentials.generate(password: "p", hash: .sha256, iterations: 4096)]
        let (store, host) = (self.store, self.host)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<40 {
                group.addTask { try await store.createAccount(username: "user\(index)", host: host, credentials: credentials) }
            }
            try await group.waitForAll()
        }
        let count = try await store.accounts(host: host).count
        XCTAssertEqual(count, 40)
    }

    func roster() async throws {
        let user = jid("romeo")
        let empty = try await store.roster(of: user)
        XCTAssertEqual(empty.items, [])
        let item = RosterItem(jid: jid("juliet"), name: "Juliet & co", groups: ["Capulets", "Verona"], subscription: .to, askSubscribe: false, preApproved: true)
        let v1 = try await store.put(item, for: user)
        let v2 = try await store.put(RosterItem(jid: jid("nurse"), subscription: .none, askSubscribe: true), for: user)
        XCTAssertGreaterThan(v2, v1, "every change bumps the version")
        let roster = try await store.roster(of: user)
        XCTAssertEqual(roster.version, v2)
        XCTAssertEqual(roster.items.map(\.jid.description), [jid("juliet").description, jid("nurse").description])
        XCTAssertEqual(roster.items.first, item)
        var updated = item
        updated.subscription = .both
        updated.groups = []
        _ = try await store.put(updated, for: user)
        let fetched = try await store.item(of: user, contact: jid("juliet"))
        XCTAssertEqual(fetched, updated)
        let v4 = try await store.remove(contact: jid("nurse"), for: user)
        let awaited1 = try await store.roster(of: user).items.count
        XCTAssertEqual(awaited1, 1)
        let awaited2 = try await store.roster(of: user).version
        XCTAssertEqual(awaited2, v4)
        let otherUser = try await store.roster(of: jid("mercutio"))
        XCTAssertEqual(otherUser.items, [], "rosters are per account")

        try await store.addPendingSubscription(from: jid("tybalt"), to: user, stanza: "<presence type='subscribe'/>")
        try await store.addPendingSubscription(from: jid("benvolio"), to: user, stanza: "<presence type='subscribe'><status>hi</status></presence>")
        let pending = try await store.pendingSubscriptions(to: user)
        XCTAssertEqual(pending.map(\.contact.description), [jid("benvolio").description, jid("tybalt").description])
        XCTAssertEqual(pending.first?.stanza, "<presence type='subscribe'><status>hi</status></presence>")
        try await store.removePendingSubscription(from: jid("tybalt"), to: user)
        let awaited3 = try await store.pendingSubscriptions(to: user).count
        XCTAssertEqual(awaited3, 1)
        try await store.removeAll(of: user)
        let awaited4 = try await store.roster(of: user).items
        XCTAssertEqual(awaited4, [])
        let awaited5 = try await store.pendingSubscriptions(to: user).count
        XCTAssertEqual(awaited5, 0)
    }

    func offline() async throws {
        let user = jid("offline")
        for index in 1...3 {
            let stored = try await store.storeOffline("<message><body>\(index)</body></message>", for: user, limit: 3)
            XCTAssertTrue(stored)
        }
        let full = try await store.storeOffline("<message><body>4</body></message>", for: user, limit: 3)
        XCTAssertFalse(full, "the quota holds")
        let awaited6 = try await store.offlineCount(for: user)
        XCTAssertEqual(awaited6, 3)
        let taken = try await store.takeOffline(for: user)
        XCTAssertEqual(taken, (1...3).map { "<message><body>\($0)</body></message>" }, "oldest first")
        let awaited7 = try await store.takeOffline(for: user)
        XCTAssertEqual(awaited7, [], "handed out once")

        // Concurrent stores never exceed the quota.
        let (store, limit) = (self.store, 10)
        let accepted = try await withThrowingTaskGroup(of: Bool.self) { group in
            for index in 0..<30 { group.addTask { try await store.storeOffline("<message><body>\(index)</body></message>", for: user, limit: limit) } }
            var count = 0
            for try await ok in group where ok { count += 1 }
            return count
        }
        XCTAssertEqual(accepted, limit)
        let awaited8 = try await store.offlineCount(for: user)
        XCTAssertEqual(awaited8, limit)
    }

    func blocklist() async throws {
        let user = jid("blocker")
        try await store.block([jid("spam"), JID("evil.example")!, JID("x@y.example/r")!], for: user)
        try await store.block([jid("spam")], for: user)
        let blocked = try await store.blocklist(of: user)
        XCTAssertEqual(Set(blocked.map(\.description)), [jid("spam").description, "evil.example", "x@y.example/r"])
        try await store.unblock([JID("evil.example")!], for: user)
        let awaited9 = try await store.blocklist(of: user).count
        XCTAssertEqual(awaited9, 2)
        try await store.unblock([], for: user)
        let awaited10 = try await store.blocklist(of: user)
        XCTAssertEqual(awaited10, [])
    }

    func documents() async throws {
        let user = jid("docs")
        let awaited11 = try await store.privateXML(of: user, name: "prefs", namespace: "urn:x")
        XCTAssertNil(awaited11)
        try await store.setPrivateXML("<prefs xmlns='urn:x'>1</prefs>", of: user, name: "prefs", namespace: "urn:x")
        try await store.setPrivateXML("<prefs xmlns='urn:x'>2</prefs>", of: user, name: "prefs", namespace: "urn:x")
        let awaited12 = try await store.privateXML(of: user, name: "prefs", namespace: "urn:x")
        XCTAssertEqual(awaited12, "<prefs xmlns='urn:x'>2</prefs>")
        let awaited13 = try await store.privateXML(of: user, name: "prefs", namespace: "urn:y")
        XCTAssertNil(awaited13)

        let awaited14 = try await store.vCard(of: user)
        XCTAssertNil(awaited14)
        try await store.setVCard("<vCard xmlns='vcard-temp'/>", photoHash: "abc", of: user)
        let card = try await store.vCard(of: user)
        XCTAssertEqual(card?.xml, "<vCard xmlns='vcard-temp'/>")
        XCTAssertEqual(card?.photoHash, "abc")
        try await store.setVCard("<vCard xmlns='vcard-temp'><FN>x</FN></vCard>", photoHash: nil, of: user)
        let awaited15 = try await store.vCard(of: user)?.photoHash
        XCTAssertNil(awaited15)

        let awaited16 = try await store.lastActivity(of: user)
        XCTAssertNil(awaited16)
        try await store.setLastActivity(of: user, at: 1_700_000_000, status: "gone")
        let last = try await store.lastActivity(of: user)
        XCTAssertEqual(last?.seconds, 1_700_000_000)
        XCTAssertEqual(last?.status, "gone")
    }

    func deletionRemovesEverything() async throws {
        try await store.register(username: "leaver", host: host, password: "p", iterations: 4096)
        let user = jid("leaver")
        _ = try await store.put(RosterItem(jid: jid("friend")), for: user)
        _ = try await store.storeOffline("<message/>", for: user, limit: 10)
        try await store.block([jid("foe")], for: user)
        try await store.setVCard("<vCard xmlns='vcard-temp'/>", photoHash: nil, of: user)
        try await store.setPrivateXML("<a xmlns='urn:a'/>", of: user, name: "a", namespace: "urn:a")
        try await store.setLastActivity(of: user, at: 1, status: "")
        try await store.deleteAccount(username: "leaver", host: host)
        let awaited17 = try await store.roster(of: user).items
        XCTAssertEqual(awaited17, [])
        let awaited18 = try await store.offlineCount(for: user)
        XCTAssertEqual(awaited18, 0)
        let awaited19 = try await store.blocklist(of: user)
        XCTAssertEqual(awaited19, [])
        let awaited20 = try await store.vCard(of: user)
        XCTAssertNil(awaited20)
        let awaited21 = try await store.privateXML(of: user, name: "a", namespace: "urn:a")
        XCTAssertNil(awaited21)
        let awaited22 = try await store.lastActivity(of: user)
        XCTAssertNil(awaited22)
    }

    /// XEP-0484 tokens: two slots per client, promotion, the client limit (oldest issue loses), expired tokens
    /// dropped, revocation per client or for all, and a password change or account deletion revoking them.
    func fastTokens() async throws {
        try await store.register(username: "phone", host: host, password: "p", iterations: 4096)
        let user = jid("phone")
        func token(_ client: String, _ slot: StoredFASTToken.Slot, issued: Int, expires: Int = 2_000_000_000, nonce: UInt8 = 1) -> StoredFASTToken {
            StoredFASTToken(client: client, slot: slot, mechanism: "HT-SHA-256-NONE", nonce: Array(repeating: nonce, count: 32), issuedAt: issued,
                            expiresAt: expires, software: slot == .new ? "Talk" : nil, device: "Pixel & co")
        }
        try await store.storeFASTToken(token("a", .new, issued: 100), for: user, clientLimit: 3, now: 100)
        var stored = try await store.fastTokens(of: user, client: "a")
        XCTAssertEqual(stored, [token("a", .new, issued: 100)])
        try await store.promoteFASTToken(of: user, client: "a")
        stored = try await store.fastTokens(of: user, client: "a")
        XCTAssertEqual(stored.map(\.slot), [.current])
        XCTAssertEqual(stored.first?.nonce, Array(repeating: 1, count: 32))
        // A rotation: the new slot fills, the current stays until the new one is used; an unused new one is replaced.
        try await store.storeFASTToken(token("a", .new, issued: 200, nonce: 2), for: user, clientLimit: 3, now: 200)
        try await store.storeFASTToken(token("a", .new, issued: 300, nonce: 3), for: user, clientLimit: 3, now: 300)
        stored = try await store.fastTokens(of: user, client: "a")
        XCTAssertEqual(Set(stored.map { "\($0.slot.rawValue):\($0.nonce[0])" }), ["current:1", "new:3"])
        try await store.promoteFASTToken(of: user, client: "a")
        stored = try await store.fastTokens(of: user, client: "a")
        XCTAssertEqual(stored.map { "\($0.slot.rawValue):\($0.nonce[0])" }, ["current:3"])
        try await store.promoteFASTToken(of: user, client: "a")
        stored = try await store.fastTokens(of: user, client: "a")
        XCTAssertEqual(stored.map(\.slot), [.current], "promoting with an empty new slot keeps the current token")

        // Three clients at most: a fourth takes the place of the one issued longest ago; expired ones go first.
        try await store.storeFASTToken(token("b", .new, issued: 400), for: user, clientLimit: 3, now: 400)
        try await store.storeFASTToken(token("c", .new, issued: 500, expires: 600), for: user, clientLimit: 3, now: 500)
        try await store.storeFASTToken(token("d", .new, issued: 700), for: user, clientLimit: 3, now: 700)
        var all = try await store.fastTokens(of: user)
        XCTAssertEqual(all.map(\.client), ["a", "b", "d"], "c expired")
        try await store.storeFASTToken(token("e", .new, issued: 800), for: user, clientLimit: 3, now: 800)
        all = try await store.fastTokens(of: user)
        XCTAssertEqual(all.map(\.client), ["b", "d", "e"], "a was issued longest ago")
        XCTAssertEqual(all.first?.device, "Pixel & co")
        XCTAssertEqual(all.first?.software, "Talk")
        let elsewhere = try await store.fastTokens(of: JID("phone@other-\(host)")!)
        XCTAssertEqual(elsewhere, [])

        var revoked = try await store.revokeFASTTokens(of: user, client: "b")
        XCTAssertEqual(revoked, 1)
        revoked = try await store.revokeFASTTokens(of: user, client: "b")
        XCTAssertEqual(revoked, 0)
        try await store.changePassword(username: "phone", host: host, password: "new", iterations: 4096)
        all = try await store.fastTokens(of: user)
        XCTAssertEqual(all, [], "a new password revokes every token")
        try await store.storeFASTToken(token("f", .new, issued: 900), for: user, clientLimit: 3, now: 900)
        try await store.storeFASTToken(token("g", .new, issued: 900), for: user, clientLimit: 3, now: 900)
        revoked = try await store.revokeFASTTokens(of: user, client: nil)
        XCTAssertEqual(revoked, 2)
        try await store.storeFASTToken(token("h", .new, issued: 900), for: user, clientLimit: 3, now: 900)
        try await store.deleteAccount(username: "phone", host: host)
        all = try await store.fastTokens(of: user)
        XCTAssertEqual(all, [], "deleting the account deletes its tokens")
        do {
            try await store.storeFASTToken(token("i", .new, issued: 900), for: jid("nobody"), clientLimit: 3, now: 900)
            XCTFail("a token for an account that does not exist")
        } catch {}
    }

    /// XEP-0357 registrations: order kept, options replaced for the same service and node, the per-account
    /// limit, disabling one node or a whole service, and deletion with the account.
    func pushRegistrations() async throws {
        try await store.register(username: "pusher", host: host, password: "p", iterations: 4096)
        let user = jid("pusher")
        let service = JID("push.example.net")!
        var stored = try await store.enablePush(PushRegistration(service: service, node: "n1", publishOptions: "<x/>"), for: user, limit: 2)
        XCTAssertTrue(stored)
        stored = try await store.enablePush(PushRegistration(service: JID("other.example.net")!, node: "n2"), for: user, limit: 2)
        XCTAssertTrue(stored)
        stored = try await store.enablePush(PushRegistration(service: service, node: "n1", publishOptions: "<x secret='2'/>"), for: user, limit: 2)
        XCTAssertTrue(stored, "the same service and node replaces its options, whatever the limit")
        stored = try await store.enablePush(PushRegistration(service: service, node: "n3"), for: user, limit: 2)
        XCTAssertFalse(stored, "a third registration over the limit")
        var all = try await store.pushRegistrations(of: user)
        XCTAssertEqual(all, [PushRegistration(service: service, node: "n1", publishOptions: "<x secret='2'/>"), PushRegistration(service: JID("other.example.net")!, node: "n2")])
        _ = try await store.enablePush(PushRegistration(service: service, node: "n3"), for: user, limit: 5)
        var removed = try await store.disablePush(service: service, node: "n3", for: user)
        XCTAssertEqual(removed, 1)
        _ = try await store.enablePush(PushRegistration(service: service, node: "n4"), for: user, limit: 5)
        removed = try await store.disablePush(service: service, node: nil, for: user)
        XCTAssertEqual(removed, 2, "a whole service")
        all = try await store.pushRegistrations(of: user)
        XCTAssertEqual(all.map(\.node), ["n2"])
        let elsewhere = try await store.pushRegistrations(of: JID("pusher@other-\(host)")!)
        XCTAssertEqual(elsewhere, [])
        try await store.deleteAccount(username: "pusher", host: host)
        all = try await store.pushRegistrations(of: user)
        XCTAssertEqual(all, [])
    }

    func mucRooms() async throws {
        let service = "conference." + host
        let room = JID("lobby@\(service)")!
        var options = MUCRoomOptions()
        options.name = "Lobby & co"
        options.persistent = true
        options.membersOnly = true
        options.presenceBroadcast = [.moderator]
        var stored = StoredMUCRoom(jid: room, options: options, subject: "Hello", subjectNick: "Owner", subjectTime: 1_700_000_000, salt: "pepper",
                                   affiliations: [jid("owner"): MUCAffiliationRecord(affiliation: .owner),
                                                  jid("member"): MUCAffiliationRecord(affiliation: .member, nick: "Mem")])
        try await store.replaceMUCRoom(stored)
        try await store.saveMUCRoom(StoredMUCRoom(jid: JID("other@\(service)")!, options: MUCRoomOptions(), salt: "s"))
        var loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.map(\.jid), [JID("lobby@\(service)")!, JID("other@\(service)")!], "sorted by name")
        XCTAssertEqual(loaded.first, stored)
        let elsewhere = try await store.mucRooms(service: "conference.other-" + host)
        XCTAssertEqual(elsewhere, [], "rooms are per service")

        // Affiliations one at a time: set, change, remove.
        try await store.setMUCAffiliation(room: room, user: jid("troll"), MUCAffiliationRecord(affiliation: .outcast, reason: "spam"))
        try await store.setMUCAffiliation(room: room, user: jid("member"), MUCAffiliationRecord(affiliation: .admin, nick: "Mem"))
        try await store.setMUCAffiliation(room: room, user: jid("owner"), MUCAffiliationRecord(affiliation: .none))
        loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.first?.affiliations, [jid("troll"): MUCAffiliationRecord(affiliation: .outcast, reason: "spam"),
                                                    jid("member"): MUCAffiliationRecord(affiliation: .admin, nick: "Mem")])
        // Saving the options leaves the affiliations; replacing replaces them.
        stored.options.name = "Renamed"
        stored.subject = ""
        stored.subjectNick = nil
        stored.subjectTime = nil
        try await store.saveMUCRoom(stored)
        loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.first?.options.name, "Renamed")
        XCTAssertNil(loaded.first?.subjectNick)
        XCTAssertEqual(loaded.first?.affiliations.count, 2)
        try await store.replaceMUCRoom(stored)
        loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.first?.affiliations, stored.affiliations)
        // Deleting removes the room and its affiliations; the other room stays.
        try await store.deleteMUCRoom(room)
        loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.map(\.jid), [JID("other@\(service)")!])
        try await store.replaceMUCRoom(StoredMUCRoom(jid: room, options: options, salt: "again"))
        loaded = try await store.mucRooms(service: service)
        XCTAssertEqual(loaded.first { $0.jid == room }?.affiliations, [:], "no affiliation outlives its room")
    }

    func pubsub() async throws {
        let owner = jid("publisher")
        var config = PubSubNodeConfig()
        config.accessModel = "whitelist"
        config.maxItems = 3
        config.affiliations = [jid("friend").description: "member"]
        try await store.savePubSubNode(StoredPubSubNode(service: owner, name: "urn:xmpp:bookmarks:1", config: config))
        try await store.savePubSubNode(StoredPubSubNode(service: owner, name: "http://jabber.org/protocol/nick", config: PubSubNodeConfig()))
        let service = JID("pubsub." + host)!
        try await store.savePubSubNode(StoredPubSubNode(service: service, name: "news", config: PubSubNodeConfig()))
        var nodes = try await store.pubsubNodes(of: owner)
        XCTAssertEqual(nodes.map(\.name), ["http://jabber.org/protocol/nick", "urn:xmpp:bookmarks:1"])
        XCTAssertEqual(nodes.last?.config, config)
        let serviceNodes = try await store.pubsubNodes(of: service)
        XCTAssertEqual(serviceNodes.map(\.name), ["news"], "a service's nodes are its own")

        let node = "urn:xmpp:bookmarks:1"
        for (index, id) in ["a", "b", "c", "d"].enumerated() {
            try await store.publishPubSubItem(StoredPubSubItem(id: id, publisher: owner.description, payload: "<conference xmlns='urn:xmpp:bookmarks:1' n='\(index)'/>",
                                                               published: 1_700_000_000 + index), to: node, service: owner, keep: 3)
        }
        var items = try await store.pubsubItems(of: node, service: owner, ids: nil, limit: nil)
        XCTAssertEqual(items.map(\.id), ["d", "c", "b"], "newest first, only the newest three kept")
        XCTAssertEqual(items.first?.published, 1_700_000_003)
        // Publishing an id again replaces it and makes it the newest.
        try await store.publishPubSubItem(StoredPubSubItem(id: "b", publisher: owner.description, payload: "<x xmlns='urn:x'/>", published: 1_800_000_000),
                                          to: node, service: owner, keep: 3)
        items = try await store.pubsubItems(of: node, service: owner, ids: nil, limit: 2)
        XCTAssertEqual(items.map(\.id), ["b", "d"])
        XCTAssertEqual(items.first?.payload, "<x xmlns='urn:x'/>")
        items = try await store.pubsubItems(of: node, service: owner, ids: ["c", "missing", "b"], limit: nil)
        XCTAssertEqual(Set(items.map(\.id)), ["b", "c"])
        let none = try await store.pubsubItems(of: node, service: owner, ids: [], limit: nil)
        XCTAssertEqual(none, [])

        let retracted = try await store.retractPubSubItem("c", from: node, service: owner)
        XCTAssertTrue(retracted)
        let again = try await store.retractPubSubItem("c", from: node, service: owner)
        XCTAssertFalse(again)
        try await store.purgePubSubNode(node, of: owner)
        items = try await store.pubsubItems(of: node, service: owner, ids: nil, limit: nil)
        XCTAssertEqual(items, [])

        try await store.publishPubSubItem(StoredPubSubItem(id: "n", publisher: owner.description, payload: "<nick xmlns='http://jabber.org/protocol/nick'>P</nick>",
                                                           published: 1), to: "http://jabber.org/protocol/nick", service: owner, keep: 1)
        try await store.deletePubSubNode("http://jabber.org/protocol/nick", of: owner)
        nodes = try await store.pubsubNodes(of: owner)
        XCTAssertEqual(nodes.map(\.name), [node])
        let orphaned = try await store.pubsubItems(of: "http://jabber.org/protocol/nick", service: owner, ids: nil, limit: nil)
        XCTAssertEqual(orphaned, [], "no item outlives its node")

        // Subscriptions (a service's nodes), gone with their node.
        try await store.setPubSubSubscription("reader@\(host)", state: "pending", node: "news", service: service)
        try await store.setPubSubSubscription("reader@\(host)", state: "subscribed", node: "news", service: service)
        try await store.setPubSubSubscription("other@\(host)/phone", state: "subscribed", node: "news", service: service)
        try await store.setPubSubSubscription("leaver@\(host)", state: "subscribed", node: "news", service: service)
        try await store.setPubSubSubscription("leaver@\(host)", state: nil, node: "news", service: service)
        var subscriptions = try await store.pubsubSubscriptions(of: service)
        XCTAssertEqual(subscriptions, ["news": [StoredPubSubSubscription(jid: "other@\(host)/phone", state: "subscribed"),
                                                StoredPubSubSubscription(jid: "reader@\(host)", state: "subscribed")]])
        try await store.deletePubSubNode("news", of: service)
        subscriptions = try await store.pubsubSubscriptions(of: service)
        XCTAssertEqual(subscriptions, [:])

        // Deleting the account takes its PEP nodes with it.
        try await store.register(username: "publisher", host: host, password: "p", iterations: 4096)
        try await store.publishPubSubItem(StoredPubSubItem(id: "z", publisher: owner.description, payload: "", published: 1), to: node, service: owner, keep: 3)
        try await store.deleteAccount(username: "publisher", host: host)
        let afterDeletion = try await store.pubsubNodes(of: owner)
        XCTAssertEqual(afterDeletion, [])
        let itemsAfterDeletion = try await store.pubsubItems(of: node, service: owner, ids: nil, limit: nil)
        XCTAssertEqual(itemsAfterDeletion, [])
    }

    func privacy() async throws {
        let user = jid("private")
        let rules = [PrivacyRule(type: "jid", value: "spammer@example.org", action: "deny", order: 1),
                     PrivacyRule(type: "group", value: "Work", action: "deny", order: 2, stanzas: ["presence-out"]),
                     PrivacyRule(type: nil, value: nil, action: "allow", order: 3)]
        try await store.setPrivacyList("public", rules: rules, of: user)
        try await store.setPrivacyList("quiet", rules: [PrivacyRule(type: nil, value: nil, action: "deny", order: 1, stanzas: ["message"])], of: user)
        try await store.setDefaultPrivacyList("public", of: user)
        var stored = try await store.privacyLists(of: user)
        XCTAssertEqual(stored.lists["public"], rules)
        XCTAssertEqual(Set(stored.lists.keys), ["public", "quiet"])
        XCTAssertEqual(stored.defaultList, "public")
        try await store.setPrivacyList("public", rules: Array(rules.prefix(1)), of: user)
        stored = try await store.privacyLists(of: user)
        XCTAssertEqual(stored.lists["public"]?.count, 1, "a list is replaced whole")
        // Removing the default list leaves no default.
        try await store.setPrivacyList("public", rules: nil, of: user)
        stored = try await store.privacyLists(of: user)
        XCTAssertEqual(Array(stored.lists.keys), ["quiet"])
        XCTAssertNil(stored.defaultList)
        try await store.setDefaultPrivacyList("quiet", of: user)
        try await store.setDefaultPrivacyList(nil, of: user)
        stored = try await store.privacyLists(of: user)
        XCTAssertNil(stored.defaultList)
        // Deleting the account deletes its lists.
        try await store.register(username: "private", host: host, password: "p", iterations: 4096)
        try await store.setDefaultPrivacyList("quiet", of: user)
        try await store.deleteAccount(username: "private", host: host)
        stored = try await store.privacyLists(of: user)
        XCTAssertTrue(stored.lists.isEmpty)
        XCTAssertNil(stored.defaultList)
    }

    /// Options stored by an older version (fewer fields) load with defaults for the rest.
    func mucOptionsFromAnOlderVersion() throws {
        let options = try MUCOptionsCoding.decode(#"{"name":"Old","persistent":true}"#, room: "old@conference.example")
        var expected = MUCRoomOptions()
        expected.name = "Old"
        expected.persistent = true
        XCTAssertEqual(options, expected)
        XCTAssertThrowsError(try MUCOptionsCoding.decode("not json", room: "bad@conference.example"))
    }
}

final class SQLiteStoreConformanceTests: XCTestCase {
    var path = ""

    override func setUp() {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("starling-store-\(UUID().uuidString).sqlite").path
    }

    override func tearDown() {
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
    }

    func contract(_ body: (StoreContract) async throws -> Void) async throws {
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        do { try await body(StoreContract(store: store)) } catch {
            await store.close()
            throw error
        }
        await store.close()
    }

    func testAccounts() async throws { try await contract { try await $0.accounts() } }
    func testConcurrentRegistrations() async throws { try await contract { try await $0.concurrentRegistrations() } }
    func testRoster() async throws { try await contract { try await $0.roster() } }
    func testOffline() async throws { try await contract { try await $0.offline() } }
    func testBlocklist() async throws { try await contract { try await $0.blocklist() } }
    func testDocuments() async throws { try await contract { try await $0.documents() } }
    func testDeletionRemovesEverything() async throws { try await contract { try await $0.deletionRemovesEverything() } }
    func testMUCRooms() async throws { try await contract { try await $0.mucRooms() } }
    func testPubSub() async throws { try await contract { try await $0.pubsub() } }
    func testPrivacy() async throws { try await contract { try await $0.privacy() } }
    func testFASTTokens() async throws { try await contract { try await $0.fastTokens() } }
    func testPushRegistrations() async throws { try await contract { try await $0.pushRegistrations() } }
    func testMUCOptionsFromAnOlderVersion() async throws { try await contract { try $0.mucOptionsFromAnOlderVersion() } }

    func testReopeningKeepsDataAndMigratesOnce() async throws {
        let first = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        try await first.register(username: "kept", host: "example.com", password: "p", iterations: 4096)
        await first.close()
        let second = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        let accounts = try await second.accounts(host: "example.com")
        XCTAssertEqual(accounts, ["kept"])
        await second.close()
    }

    func testUnopenableDatabaseIsAClearError() async {
        do {
            _ = try await SQLiteStore.open(path: "/nonexistent-dir/x/y.sqlite", logger: Logger(label: "test"))
            XCTFail("opened an impossible path")
        } catch {
            XCTAssertTrue(error.description.contains("/nonexistent-dir/x/y.sqlite"), error.description)
        }
    }
}

/// Runs against the PostgreSQL that `scripts/test` starts (STARLING_TEST_POSTGRES_URL).
final class PostgresStoreConformanceTests: XCTestCase {
    static var url: String? { ProcessInfo.processInfo.environment["STARLING_TEST_POSTGRES_URL"] }

    static func requireURL() throws -> String {
        guard let url else {
            if ProcessInfo.processInfo.environment["CI"] != nil { XCTFail("CI must provide STARLING_TEST_POSTGRES_URL (scripts/test does)") }
            throw XCTSkip("set STARLING_TEST_POSTGRES_URL, or run scripts/test")
        }
        return url
    }

    func contract(_ body: (StoreContract) async throws -> Void) async throws {
        let store = try await PostgresStore.open(.init(url: try Self.requireURL()), logger: Logger(label: "test"))
        do { try await body(StoreContract(store: store)) } catch {
            await store.close()
            throw error
        }
        await store.close()
    }

    func testAccounts() async throws { try await contract { try await $0.accounts() } }
    func testConcurrentRegistrations() async throws { try await contract { try await $0.concurrentRegistrations() } }
    func testRoster() async throws { try await contract { try await $0.roster() } }
    func testOffline() async throws { try await contract { try await $0.offline() } }
    func testBlocklist() async throws { try await contract { try await $0.blocklist() } }
    func testDocuments() async throws { try await contract { try await $0.documents() } }
    func testDeletionRemovesEverything() async throws { try await contract { try await $0.deletionRemovesEverything() } }
    func testMUCRooms() async throws { try await contract { try await $0.mucRooms() } }
    func testPubSub() async throws { try await contract { try await $0.pubsub() } }
    func testPrivacy() async throws { try await contract { try await $0.privacy() } }
    func testFASTTokens() async throws { try await contract { try await $0.fastTokens() } }
    func testPushRegistrations() async throws { try await contract { try await $0.pushRegistrations() } }

    func testTwoNodesMigratingAtOnceBothSucceed() async throws {
        let url = try Self.requireURL()
        async let first = PostgresStore.open(.init(url: url), logger: Logger(label: "a"))
        async let second = PostgresStore.open(.init(url: url), logger: Logger(label: "b"))
        let stores = try await [first, second]
        for store in stores { await store.close() }
    }

    func testBadURLAndUnreachableDatabaseAreClearErrors() async throws {
        do {
            _ = try await PostgresStore.open(.init(url: "mysql://x@y/z"), logger: Logger(label: "test"))
            XCTFail("accepted a non-PostgreSQL URL")
        } catch { XCTAssertTrue(error.description.contains("postgresql://"), error.description) }
        do {
            _ = try await PostgresStore.open(.init(url: "postgresql://starling:secret@127.0.0.1:1/nothing", timeout: 2), logger: Logger(label: "test"))
            XCTFail("connected to nothing")
        } catch {
            XCTAssertTrue(error.description.contains("127.0.0.1:1"), error.description)
            XCTAssertFalse(error.description.contains("secret"), "passwords never reach the logs")
        }
    }
}
