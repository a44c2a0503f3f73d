import StarlingAPI
import StarlingLua
import StarlingMAM
import StarlingMUC
import StarlingPubSub

/// Every module compiled into the server, by name.
public enum BuiltinModules {
    public static let all: [any ServerModule.Type] = [
        DiscoModule.self, PingModule.self, VersionModule.self, TimeModule.self, RosterModule.self, PresenceModule.self,
        OfflineModule.self, BlockingModule.self, PrivacyModule.self, PrivateXMLModule.self, VCardModule.self, LastActivityModule.self, CarbonsModule.self,
        ClientStateModule.self, StreamManagementModule.self, PushModule.self, RegistrationModule.self, ExternalServicesModule.self, HTTPUploadModule.self, AnnounceModule.self, LuaHooks.self, MUCModule.self, MAMModule.self, PEPModule.self, PubSubServiceModule.self,
    ]

    public static var catalog: [String: any ServerModule.Type] {
        Dictionary(uniqueKeysWithValues: all.map { ($0.descriptor.name, $0) })
    }

    public static var descriptors: [ModuleDescriptor] { all.map { $0.descriptor } }
}
