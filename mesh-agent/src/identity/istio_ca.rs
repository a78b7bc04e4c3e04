//! Istio's certificate API, `istio.v1.auth.IstioCertificateService`, which both
//! the mesh CA service and istiod serve: the two messages, written by hand from
//! Istio's `security/proto/providers/google/ca.proto` field numbers, and the
//! gRPC client and server that `build.rs` generates for them.

use prost_types::value::Kind;

/// A certificate request: a PEM CSR, the requested lifetime, and metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; the CA may shorten it.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Extra fields; a node agent names the workload it asks for in
    /// [`IMPERSONATED_IDENTITY`].
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// The signed certificate: leaf first, then its chain, the root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// One PEM certificate per entry.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

include!(concat!(
    env!("OUT_DIR"),
    "/istio.v1.auth.IstioCertificateService.rs"
));

/// Full gRPC method path, as istiod routes it.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Metadata field with the SPIFFE ID a node agent requests for one of its pods
/// (the field ztunnel sends).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The audience the callers' Kubernetes tokens are bound to (istiod's default).
pub const TOKEN_AUDIENCE: &str = "istio-ca";

/// Header naming the caller's cluster, which istiod uses to pick the API server
/// that reviews the token.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// Metadata asking for `identity` on a workload's behalf.
pub fn impersonation_metadata(identity: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue(identity.to_owned())),
            },
        )]
        .into(),
    }
}

/// The identity a request impersonates: `Ok(None)` when it names none, an error
/// when the field is there but not a string.
pub fn impersonated_identity(
    metadata: Option<&prost_types::Struct>,
) -> Result<Option<&str>, &'static str> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
        _ => Err("metadata.ImpersonatedIdentity is not a string"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn requests_round_trip_with_istios_field_numbers() {
        let request = IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: 3600,
            metadata: Some(impersonation_metadata("spiffe://td/ns/a/sa/b")),
        };
        let bytes = request.encode_to_vec();
        // Field 1 (csr) is a length-delimited string: tag byte 0x0a; field 3
        // (validity_duration) a varint: 0x18; field 4 (metadata) a message: 0x22.
        assert_eq!(bytes[0], 0x0a);
        assert!(bytes.windows(3).any(|w| w == [0x18, 0x90, 0x1c]));
        assert!(bytes.contains(&0x22));
        let decoded = IstioCertificateRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(
            impersonated_identity(decoded.metadata.as_ref()),
            Ok(Some("spiffe://td/ns/a/sa/b"))
        );
        assert_eq!(impersonated_identity(None), Ok(None));
        let number = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(Kind::NumberValue(1.0)),
                },
            )]
            .into(),
        };
        assert!(impersonated_identity(Some(&number)).is_err());
    }
}
