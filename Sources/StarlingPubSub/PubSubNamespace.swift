import StarlingAPI

/// XEP-0060's namespaces.
public enum PubSubNamespace {
    public static let pubsub = "http://jabber.org/protocol/pubsub"
    public static let owner = "http://jabber.org/protocol/pubsub#owner"
    public static let event = "http://jabber.org/protocol/pubsub#event"
    public static let errors = "http://jabber.org/protocol/pubsub#errors"
    public static let nodeConfig = "http://jabber.org/protocol/pubsub#node_config"
    public static let publishOptions = "http://jabber.org/protocol/pubsub#publish-options"
    public static let caps = "http://jabber.org/protocol/caps"
    public static let discoInfo = "http://jabber.org/protocol/disco#info"
    public static let discoItems = "http://jabber.org/protocol/disco#items"

    /// A stanza error with a `pubsub#errors` condition beside the RFC's (XEP-0060 §7.1.3 and others).
    static func error(_ condition: StanzaErrorCondition, _ pubsubCondition: String, feature: String? = nil, text: String? = nil) -> IQResponse {
        var application = XMLElement(name: pubsubCondition, namespace: errors)
        if let feature { application[attribute: "feature"] = feature }
        return .failure(StanzaError(condition, application: application, text: text))
    }

    /// `feature-not-implemented` naming the unsupported XEP-0060 feature.
    static func unsupported(_ feature: String) -> IQResponse {
        error(.featureNotImplemented, "unsupported", feature: feature)
    }
}
