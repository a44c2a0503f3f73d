/// XEP-0004 data forms: what configuration, registration and query forms are made of.
public struct DataForm: Sendable, Equatable {
    public static let namespace = "jabber:x:data"

    public enum FormType: String, Sendable {
        case form, submit, cancel, result
    }

    public struct Option: Sendable, Equatable {
        public var label: String?
        public var value: String

        public init(_ value: String, label: String? = nil) {
            self.value = value
            self.label = label
        }
    }

    public struct Field: Sendable, Equatable {
        public var variable: String?
        /// boolean, fixed, hidden, jid-multi, jid-single, list-multi, list-single, text-multi,
        /// text-private, text-single (nil: not given, as in submissions).
        public var type: String?
        public var label: String?
        public var values: [String]
        public var options: [Option]
        public var required: Bool

        public init(_ variable: String?, type: String? = nil, label: String? = nil, values: [String] = [], options: [Option] = [],
                    required: Bool = false) {
            self.variable = variable
            self.type = type
            self.label = label
            self.values = values
            self.options = options
            self.required = required
        }

        public var value: String? { values.first }
    }

    public var type: FormType
    public var title: String?
    public var instructions: String?
    public var fields: [Field]

    public init(type: FormType, title: String? = nil, instructions: String? = nil, fields: [Field] = []) {
        self.type = type
        self.title = title
        self.instructions = instructions
        self.fields = fields
    }

    /// A form of `type` whose hidden FORM_TYPE field is `formType`.
    public init(type: FormType, formType: String, title: String? = nil, fields: [Field] = []) {
        self.init(type: type, title: title, fields: [Field("FORM_TYPE", type: "hidden", values: [formType])] + fields)
    }

    /// Parses `<x xmlns='jabber:x:data'/>`; nil when it is not one or its type is unknown.
    public init?(_ element: XMLElement) {
        guard element.name == "x", element.namespace == Self.namespace,
              let type = FormType(rawValue: element[attribute: "type"] ?? "form") else { return nil }
        self.type = type
        title = element.child("title", namespace: Self.namespace)?.text
        instructions = element.child("instructions", namespace: Self.namespace)?.text
        fields = element.elements.filter { $0.name == "field" && $0.namespace == Self.namespace }.map { field in
            Field(field[attribute: "var"], type: field[attribute: "type"], label: field[attribute: "label"],
                  values: field.elements.filter { $0.name == "value" }.map(\.text),
                  options: field.elements.filter { $0.name == "option" }.map {
                      Option($0.child("value", namespace: Self.namespace)?.text ?? "", label: $0[attribute: "label"])
                  },
                  required: field.child("required", namespace: Self.namespace) != nil)
        }
    }

    /// The first data form among `element`'s children.
    public static func first(in element: XMLElement) -> DataForm? {
        element.elements.lazy.compactMap { DataForm($0) }.first
    }

    /// The FORM_TYPE field's value.
    public var formType: String? { self["FORM_TYPE"]?.value }

    public subscript(variable: String) -> Field? {
        fields.first { $0.variable == variable }
    }

    /// A boolean field's value ("1"/"true" or "0"/"false"); nil when absent or not a boolean.
    public func boolean(_ variable: String) -> Bool? {
        switch self[variable]?.value {
        case "1", "true": return true
        case "0", "false": return false
        default: return nil
        }
    }

    public var element: XMLElement {
        var x = XMLElement(name: "x", namespace: Self.namespace, attributes: ["type": type.rawValue])
        if let title { x.append(XMLElement(name: "title", namespace: Self.namespace).with(text: title)) }
        if let instructions { x.append(XMLElement(name: "instructions", namespace: Self.namespace).with(text: instructions)) }
        for field in fields {
            var element = XMLElement(name: "field", namespace: Self.namespace)
            if let variable = field.variable { element[attribute: "var"] = variable }
            if let type = field.type { element[attribute: "type"] = type }
            if let label = field.label { element[attribute: "label"] = label }
            if field.required { element.append(XMLElement(name: "required", namespace: Self.namespace)) }
            for value in field.values { element.append(XMLElement(name: "value", namespace: Self.namespace).with(text: value)) }
            for option in field.options {
                var optionElement = XMLElement(name: "option", namespace: Self.namespace)
                if let label = option.label { optionElement[attribute: "label"] = label }
                optionElement.append(XMLElement(name: "value", namespace: Self.namespace).with(text: option.value))
                element.append(optionElement)
            }
            x.append(element)
        }
        return x
    }
}
