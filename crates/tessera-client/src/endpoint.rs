//! Turning what a person types (`host:port`, `http://host:port`, `https://host:port`) into
//! a URI tonic accepts.

use crate::ClientError;

/// The URI of an endpoint given as `host:port`, `http://host:port` (plaintext HTTP/2) or
/// `https://host:port` (TLS): `http://` unless the endpoint says `https://`.
///
/// The port is required: a bare `http://host` would silently mean port 80, which is never
/// where a Tessera coordinator listens. IPv6 hosts go in brackets (`[::1]:50051`). A
/// trailing `/` is tolerated; a path or another scheme is refused with a reason.
pub fn endpoint_uri(endpoint: &str) -> Result<String, ClientError> {
    let original = endpoint;
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        endpoint: original.to_string(),
        reason: reason.to_string(),
    };
    let endpoint = endpoint.trim();
    if endpoint.is_empty() {
        return Err(invalid("it is empty; give host:port, e.g. 127.0.0.1:50051"));
    }
    let (scheme, authority) = match endpoint.split_once("://") {
        None => ("http", endpoint),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => ("http", rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => ("https", rest),
        Some(_) => return Err(invalid("the scheme must be http or https (or none)")),
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains('/') {
        return Err(invalid("a path is not allowed; give host:port"));
    }
    if authority.contains('@') {
        return Err(invalid("user info is not allowed; give host:port"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 host lacks its closing `]`"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("the port is missing; give [ipv6]:port"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid("the host in brackets is not an IPv6 address"));
        }
        (format!("[{host}]"), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| invalid("the port is missing; give host:port"))?;
        if host.contains(':') {
            return Err(invalid("an IPv6 host needs brackets: [::1]:50051"));
        }
        (host.to_string(), port)
    };
    if host.is_empty() {
        return Err(invalid("the host is empty"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| invalid("the port must be a number from 1 to 65535"))?;
    if port == 0 {
        return Err(invalid("the port must be a number from 1 to 65535"));
    }
    let uri = format!("{scheme}://{host}:{port}");
    // Anything left that `http::Uri` would reject (spaces, odd characters in the host).
    tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|_| invalid("the host is not a valid host name or address"))?;
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(endpoint: &str) -> String {
        match endpoint_uri(endpoint) {
            Err(ClientError::InvalidEndpoint {
                endpoint: named,
                reason,
            }) => {
                assert_eq!(named, endpoint, "the error names the endpoint as given");
                reason
            }
            other => panic!("{endpoint:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn host_port_gets_the_http_scheme() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_uri("localhost:8080").unwrap(),
            "http://localhost:8080"
        );
        assert_eq!(
            endpoint_uri("coordinator.internal:1").unwrap(),
            "http://coordinator.internal:1"
        );
    }

    #[test]
    fn http_scheme_is_kept_and_case_and_slash_tolerated() {
        assert_eq!(
            endpoint_uri("http://10.0.0.7:50051").unwrap(),
            "http://10.0.0.7:50051"
        );
        assert_eq!(
            endpoint_uri("HTTP://host:50051/").unwrap(),
            "http://host:50051"
        );
        assert_eq!(endpoint_uri("  host:50051\n").unwrap(), "http://host:50051");
    }

    #[test]
    fn https_is_kept() {
        assert_eq!(
            endpoint_uri("https://tessera.internal:443").unwrap(),
            "https://tessera.internal:443"
        );
        assert_eq!(
            endpoint_uri("HTTPS://[::1]:50051/").unwrap(),
            "https://[::1]:50051"
        );
        assert!(reason("https://host").contains("port is missing"));
    }

    #[test]
    fn ipv6_needs_brackets() {
        assert_eq!(endpoint_uri("[::1]:50051").unwrap(), "http://[::1]:50051");
        assert_eq!(
            endpoint_uri("http://[fe80::1]:7").unwrap(),
            "http://[fe80::1]:7"
        );
        assert!(reason("::1:50051").contains("brackets"));
        assert!(reason("[::1]").contains("port is missing"));
        assert!(reason("[::1:50051").contains("closing"));
        assert!(reason("[nothost]:50051").contains("IPv6"));
    }

    #[test]
    fn the_port_is_required_and_checked() {
        assert!(reason("localhost").contains("port is missing"));
        assert!(reason("http://localhost").contains("port is missing"));
        assert!(reason("localhost:").contains("1 to 65535"));
        assert!(reason("localhost:0").contains("1 to 65535"));
        assert!(reason("localhost:65536").contains("1 to 65535"));
        assert!(reason("localhost:http").contains("1 to 65535"));
        assert_eq!(
            endpoint_uri("localhost:65535").unwrap(),
            "http://localhost:65535"
        );
    }

    #[test]
    fn other_shapes_are_refused_with_a_reason() {
        assert!(reason("").contains("empty"));
        assert!(reason("   ").contains("empty"));
        assert!(reason(":50051").contains("host is empty"));
        assert!(reason("grpc://host:50051").contains("scheme"));
        assert!(reason("http://host:50051/v1").contains("path"));
        assert!(reason("user@host:50051").contains("user info"));
        assert!(reason("bad host:50051").contains("not a valid host"));
    }
}
