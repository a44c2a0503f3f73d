import Foundation
import StarlingAPI
import StarlingXML

extension ModuleHost {
    /// A service the module cannot work without.
    func require<Service>(_ type: Service.Type, _ what: String) throws -> Service {
        guard let service = service(type) else { throw ModuleStartError("no \(what) available") }
        return service
    }
}

/// Parses one stored stanza back into an element.
enum StoredXML {
    static func parse(_ text: String) -> XMLElement? {
        XMLFragmentParser.parse(text)
    }
}
