import StarlingAPI

/// A `ModuleHost` for unit tests of one module: everything the test does not look at does nothing, so
/// each test host implements only what it records.
protocol QuietModuleHost: ModuleHost {}

extension QuietModuleHost {
    func route(_ stanza: XMLElement) {}
    func log(_ level: ModuleLogLevel, _ message: String) {}
    func features(for target: IQTarget) -> [String] { [] }
    func identities(for target: IQTarget) -> [DiscoIdentity] { [] }
    func discoItems(_ request: IQRequest) async -> [XMLElement]? { [] }
    func resources(of bare: JID) -> [ResourceInfo] { [] }
    func boundResources() -> [ResourceInfo] { [] }
    func setAvailability(of full: JID, available: Bool, priority: Int) {}
    func setFlag(_ flag: String, _ on: Bool, for full: JID) {}
    func broadcastToCluster(_ message: XMLElement) {}
    func setPresence(_ presence: XMLElement?, of full: JID) {}
    func isLocal(_ domain: String) -> Bool { domain == self.domain }
    func service<Service>(_ type: Service.Type) -> Service? { nil }
    func run<Event>(_ point: HookPoint<Event>, _ event: Event) -> HookResult { .pass }
    func closeSessions(of bare: JID) {}
    func allows(_ rule: String, user: JID?, address: String?) -> Bool { rule != "none" }
}
