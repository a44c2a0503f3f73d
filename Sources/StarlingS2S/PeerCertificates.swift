import Foundation
import NIOSSL
import SwiftASN1
import X509

/// The certificate authorities a peer server's certificate must chain to for SASL EXTERNAL (XEP-0178).
/// TLS itself accepts any certificate on s2s: a peer whose certificate does not verify may still
/// authenticate with dialback, so verification is ours to do and its outcome is a `PeerIdentity`.
public struct TrustRoots: Sendable {
    let store: CertificateStore
    public let count: Int

    /// Reads every certificate of a PEM bundle (Debian's `/etc/ssl/certs/ca-certificates.crt`, or a private CA).
    public init(pemFile path: String) throws {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw S2SSetupError("cannot read the CA file \(path): \(error.localizedDescription)")
        }
        var certificates: [Certificate] = []
        do {
            for document in try PEMDocument.parseMultiple(pemString: text) where document.discriminator == "CERTIFICATE" {
                // A bundle may hold certificates this library cannot read (old algorithms): skip those.
                if let certificate = try? Certificate(pemDocument: document) { certificates.append(certificate) }
            }
        } catch {
            throw S2SSetupError("\(path) is not a PEM certificate bundle: \(error)")
        }
        guard !certificates.isEmpty else { throw S2SSetupError("\(path) holds no certificate") }
        store = CertificateStore(certificates)
        count = certificates.count
    }

    /// The names the peer's chain is good for, or nil when it does not chain to these roots (or is not
    /// valid now).
    public func identity(of chain: [NIOSSLCertificate]) async -> PeerIdentity? {
        guard let leafBytes = try? chain.first?.toDERBytes(), let leaf = try? Certificate(derEncoded: leafBytes) else { return nil }
        let intermediates = chain.dropFirst().compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
        var verifier = Verifier(rootCertificates: store) { RFC5280Policy() }
        switch await verifier.validate(leaf: leaf, intermediates: CertificateStore(intermediates)) {
        case .validCertificate:
            return PeerIdentity(names: Self.dnsNames(of: leaf))
        case .couldNotValidate:
            return nil
        }
    }

    /// subjectAltName dNSNames; RFC 6125 §6.4.4 allows the CN only for a certificate without any.
    static func dnsNames(of certificate: Certificate) -> [String] {
        let alternatives = (try? certificate.extensions.subjectAlternativeNames) ?? nil
        let names = alternatives?.compactMap { name -> String? in
            if case .dnsName(let dns) = name { return dns }
            return nil
        } ?? []
        if !names.isEmpty { return names }
        return certificate.subject.flatMap { $0 }.compactMap { attribute in
            attribute.type == .RDNAttributeType.commonName ? String(describing: attribute.value) : nil
        }
    }
}

public struct S2SSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
