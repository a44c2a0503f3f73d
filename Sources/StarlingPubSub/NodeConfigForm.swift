import StarlingAPI
import StarlingStorage

/// A node's configuration as a `pubsub#node_config` data form, and the submitted forms that change it
/// (configure, create with configuration, publish-options).
enum NodeConfigForm {
    static let accessModels = ["open", "presence", "roster", "authorize", "whitelist"]
    static let publishModels = ["publishers", "open"]
    static let sendLastModels = ["never", "on_sub", "on_sub_and_presence"]

    /// The form an owner fills in (configure, or the defaults).
    static func form(_ config: PubSubNodeConfig, maxItemsCap: Int) -> DataForm {
        DataForm(type: .form, formType: PubSubNamespace.nodeConfig, fields: [
            DataForm.Field("pubsub#title", type: "text-single", label: "A friendly name for the node", values: config.title.map { [$0] } ?? []),
            DataForm.Field("pubsub#access_model", type: "list-single", label: "Who may subscribe and retrieve items",
                           values: [config.accessModel], options: accessModels.map { DataForm.Option($0) }),
            DataForm.Field("pubsub#roster_groups_allowed", type: "list-multi", label: "Roster groups allowed to retrieve items",
                           values: config.rosterGroupsAllowed),
            DataForm.Field("pubsub#publish_model", type: "list-single", label: "Who may publish", values: [config.publishModel],
                           options: publishModels.map { DataForm.Option($0) }),
            DataForm.Field("pubsub#max_items", type: "text-single", label: "Most items to keep (at most \(maxItemsCap), or max)",
                           values: [String(config.maxItems)]),
            DataForm.Field("pubsub#persist_items", type: "boolean", label: "Keep items", values: [config.persistItems ? "1" : "0"]),
            DataForm.Field("pubsub#send_last_published_item", type: "list-single", label: "When to send the last published item",
                           values: [config.sendLastPublishedItem], options: sendLastModels.map { DataForm.Option($0) }),
            DataForm.Field("pubsub#deliver_payloads", type: "boolean", label: "Deliver payloads with notifications",
                           values: [config.deliverPayloads ? "1" : "0"]),
            DataForm.Field("pubsub#notify_retract", type: "boolean", label: "Notify when items are retracted", values: [config.notifyRetract ? "1" : "0"]),
            DataForm.Field("pubsub#notify_delete", type: "boolean", label: "Notify when the node is deleted", values: [config.notifyDelete ? "1" : "0"]),
            DataForm.Field("pubsub#type", type: "text-single", label: "The payload's namespace", values: config.type.map { [$0] } ?? []),
        ])
    }

    /// Applies a submitted form's fields to `config`; a field we do not know or a bad value is an error
    /// message (the caller answers `not-acceptable`/`bad-request`).
    static func apply(_ form: DataForm, to config: PubSubNodeConfig, maxItemsCap: Int) -> Result<PubSubNodeConfig, FormProblem> {
        var config = config
        for field in form.fields {
            guard let variable = field.variable, variable != "FORM_TYPE" else { continue }
            let value = field.value ?? ""
            switch variable {
            case "pubsub#title":
                config.title = value.isEmpty ? nil : value
            case "pubsub#access_model":
                guard accessModels.contains(value) else { return .failure(.badValue(variable, value)) }
                config.accessModel = value
            case "pubsub#roster_groups_allowed":
                config.rosterGroupsAllowed = field.values
            case "pubsub#publish_model":
                guard publishModels.contains(value) else { return .failure(.badValue(variable, value)) }
                config.publishModel = value
            case "pubsub#max_items":
                if value == "max" {
                    config.maxItems = maxItemsCap
                } else {
                    guard let count = Int(value), count >= 1 else { return .failure(.badValue(variable, value)) }
                    guard count <= maxItemsCap else { return .failure(.tooMany(maxItemsCap)) }
                    config.maxItems = count
                }
            case "pubsub#persist_items", "pubsub#deliver_payloads", "pubsub#notify_retract", "pubsub#notify_delete":
                guard let flag = boolean(value) else { return .failure(.badValue(variable, value)) }
                switch variable {
                case "pubsub#persist_items": config.persistItems = flag
                case "pubsub#deliver_payloads": config.deliverPayloads = flag
                case "pubsub#notify_retract": config.notifyRetract = flag
                default: config.notifyDelete = flag
                }
            case "pubsub#send_last_published_item":
                guard sendLastModels.contains(value) else { return .failure(.badValue(variable, value)) }
                config.sendLastPublishedItem = value
            case "pubsub#type":
                config.type = value.isEmpty ? nil : value
            case "pubsub#deliver_notifications", "pubsub#presence_based_delivery", "pubsub#notify_config", "pubsub#notify_sub",
                 "pubsub#subscribe", "pubsub#itemreply", "pubsub#notification_type", "pubsub#purge_offline":
                // Accepted and fixed for PEP: notifications go out to contacts as headlines.
                continue
            default:
                return .failure(.unknownField(variable))
            }
        }
        return .success(config)
    }

    /// Checks publish-options (XEP-0060 §7.1.5) against an existing node: every field must match what the
    /// node has. Returns the first field that does not.
    static func unmetPrecondition(_ form: DataForm, node config: PubSubNodeConfig, maxItemsCap: Int) -> String? {
        guard case .success(let wanted) = apply(form, to: config, maxItemsCap: maxItemsCap) else {
            return form.fields.first { $0.variable != "FORM_TYPE" }?.variable ?? "FORM_TYPE"
        }
        for field in form.fields {
            guard let variable = field.variable, variable != "FORM_TYPE" else { continue }
            let matches: Bool
            switch variable {
            case "pubsub#access_model": matches = wanted.accessModel == config.accessModel
            case "pubsub#publish_model": matches = wanted.publishModel == config.publishModel
            case "pubsub#max_items": matches = wanted.maxItems == config.maxItems
            case "pubsub#persist_items": matches = wanted.persistItems == config.persistItems
            case "pubsub#send_last_published_item": matches = wanted.sendLastPublishedItem == config.sendLastPublishedItem
            case "pubsub#deliver_payloads": matches = wanted.deliverPayloads == config.deliverPayloads
            case "pubsub#notify_retract": matches = wanted.notifyRetract == config.notifyRetract
            case "pubsub#notify_delete": matches = wanted.notifyDelete == config.notifyDelete
            case "pubsub#roster_groups_allowed": matches = Set(wanted.rosterGroupsAllowed) == Set(config.rosterGroupsAllowed)
            case "pubsub#title": matches = wanted.title == config.title
            case "pubsub#type": matches = wanted.type == config.type
            default: matches = true
            }
            if !matches { return variable }
        }
        return nil
    }

    private static func boolean(_ value: String) -> Bool? {
        switch value {
        case "1", "true": return true
        case "0", "false": return false
        default: return nil
        }
    }
}

/// Why a submitted node configuration was refused.
enum FormProblem: Error, Equatable {
    case unknownField(String)
    case badValue(String, String)
    case tooMany(Int)

    var text: String {
        switch self {
        case .unknownField(let variable): return "unknown field \(variable)"
        case .badValue(let variable, let value): return "\(variable) cannot be '\(value)'"
        case .tooMany(let cap): return "pubsub#max_items is at most \(cap) here"
        }
    }
}
