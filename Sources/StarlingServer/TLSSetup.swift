import Crypto
import Foundation
import Logging
import NIOSSL
import StarlingConfig
import StarlingSASL
import SwiftASN1
import X509

/// The server's TLS identity: the NIO context plus the tls-server-end-point channel binding (RFC 5929),
/// which depends only on our certificate and so is computed once.
public struct TLSIdentity: Sendable {
    public let context: NIOSSLContext
    public let channelBinding: ChannelBinding
    /// The certificate chain and key themselves, for the contexts federation builds (it presents them as a client too).
    public let certificateChain: [NIOSSLCertificate]
    public let privateKey: NIOSSLPrivateKey

    /// Loads the configured certificate, or creates (once) and reuses a self-signed one in `data_dir`.
    public static func load(_ configuration: StarlingConfiguration, logger: Logger) throws -> TLSIdentity {
        let certificatePath: String
        let keyPath: String
        if let configured = configuration.tls.certificatePath, let key = configuration.tls.privateKeyPath {
            certificatePath = configured
            keyPath = key
        } else {
            certificatePath = configuration.dataDirectory + "/selfsigned-cert.pem"
            keyPath = configuration.dataDirectory + "/selfsigned-key.pem"
            if !FileManager.default.fileExists(atPath: certificatePath) || !FileManager.default.fileExists(atPath: keyPath) {
                try generateSelfSigned(hosts: configuration.hosts, certificatePath: certificatePath, keyPath: keyPath)
                logger.warning("No TLS certificate configured: generated a SELF-SIGNED certificate for development", metadata: [
                    "certificate": "\(certificatePath)", "hosts": "\(configuration.hosts.joined(separator: ","))",
                ])
            } else {
                logger.warning("No TLS certificate configured: using the self-signed development certificate", metadata: ["certificate": "\(certificatePath)"])
            }
        }
        let chain: [NIOSSLCertificate]
        let key: NIOSSLPrivateKey
        do { chain = try NIOSSLCertificate.fromPEMFile(certificatePath) } catch {
            throw TLSSetupError("cannot read certificate \(certificatePath): \(error)")
        }
        do { key = try NIOSSLPrivateKey(file: keyPath, format: .pem) } catch {
            throw TLSSetupError("cannot read private key \(keyPath): \(error)")
        }
        guard let leaf = chain.first else { throw TLSSetupError("\(certificatePath) holds no certificate") }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        tls.minimumTLSVersion = .tlsv12
        tls.applicationProtocols = ["xmpp-client"]
        let context: NIOSSLContext
        do { context = try NIOSSLContext(configuration: tls) } catch {
            throw TLSSetupError("certificate \(certificatePath) and key \(keyPath) are unusable together: \(error)")
        }
        let der = try leaf.toDERBytes()
        return TLSIdentity(context: context, channelBinding: ChannelBinding(type: "tls-server-end-point", data: serverEndPointHash(der: der)),
                           certificateChain: chain, privateKey: key)
    }

    /// RFC 5929 §4.1: the certificate's own signature hash, with MD5 and SHA-1 upgraded to SHA-256.
    static func serverEndPointHash(der: [UInt8]) -> [UInt8] {
        let algorithm = (try? Certificate(derEncoded: der))?.signatureAlgorithm
        switch algorithm {
        case .ecdsaWithSHA384?, .sha384WithRSAEncryption?: return Array(SHA384.hash(data: der))
        case .ecdsaWithSHA512?, .sha512WithRSAEncryption?: return Array(SHA512.hash(data: der))
        default: return Array(SHA256.hash(data: der))
        }
    }

    private static func generateSelfSigned(hosts: [String], certificatePath: String, keyPath: String) throws {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName {
            CommonName(hosts[0])
            OrganizationName("Starling self-signed development certificate")
        }
        let now = Date()
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: Certificate.PublicKey(key.publicKey),
            notValidBefore: now.addingTimeInterval(-3600),
            notValidAfter: now.addingTimeInterval(365 * 86400),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                SubjectAlternativeNames(hosts.map { GeneralName.dnsName($0) })
                KeyUsage(digitalSignature: true)
                try ExtendedKeyUsage([.serverAuth])
            },
            issuerPrivateKey: Certificate.PrivateKey(key)
        )
        try FileManager.default.createDirectory(atPath: (certificatePath as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try certificate.serializeAsPEM().pemString.write(toFile: certificatePath, atomically: true, encoding: .utf8)
        _ = FileManager.default.createFile(atPath: keyPath, contents: Data(key.pemRepresentation.utf8), attributes: [.posixPermissions: 0o600])
    }
}

public struct TLSSetupError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
