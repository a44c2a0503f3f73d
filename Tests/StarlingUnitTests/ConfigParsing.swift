import StarlingConfig
import StarlingModules
import XCTest

/// Parsing configuration text as `/etc/starling/starling.yml` with the built-in modules, and expecting
/// the error a mistake in it gets.
protocol ConfigParsing {}

extension ConfigParsing {
    func parse(_ yaml: String) throws -> StarlingConfiguration {
        try StarlingConfiguration.parse(yaml: yaml, file: "/etc/starling/starling.yml", moduleCatalog: BuiltinModules.descriptors)
    }

    /// The error names the file, `line` and `key`, and says `text`.
    func expectError(_ yaml: String, line: Int?, key: String?, contains text: String, file: StaticString = #filePath, lineNumber: UInt = #line) {
        XCTAssertThrowsError(try parse(yaml), file: file, line: lineNumber) { error in
            guard let error = error as? ConfigError else { return XCTFail("\(error)", file: file, line: lineNumber) }
            XCTAssertEqual(error.line, line, "\(error)", file: file, line: lineNumber)
            XCTAssertEqual(error.key, key, "\(error)", file: file, line: lineNumber)
            XCTAssertTrue(error.description.contains(text), "\(error)", file: file, line: lineNumber)
            XCTAssertTrue(error.description.hasPrefix("/etc/starling/starling.yml:"), "\(error)", file: file, line: lineNumber)
        }
    }
}
