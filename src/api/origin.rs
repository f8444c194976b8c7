//! Who may reach the service from a browser. Two checks close the doors a
//! service without keys would leave open to any web page:
//! - the `Host` allow-list stops DNS rebinding (a page on `evil.test` whose
//!   name is made to resolve to this machine): a request must name this
//!   service by an IP address, `localhost` (or a `*.localhost` name) or a
//!   name given with `--allowed-host`, as Vite's dev server does by default;
//! - a state-changing request (any method but GET, HEAD and OPTIONS) that a
//!   browser sends from another origin (its `Origin` names another host, or
//!   is `null`) is refused unless CORS allows that origin. Browsers send
//!   `Origin` with every such request, so this stops cross-site form posts.
//!
//! Both answer 403 in the usual error shape, with what to configure.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{HOST, ORIGIN};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The configured names and origins; cheap to clone.
#[derive(Debug, Clone)]
pub struct SitePolicy {
    /// Lower-case host names; a leading dot allows every name under it; `*` any name.
    allowed_hosts: Arc<[String]>,
    /// CORS origins (`*` for any): those may also change state.
    cors_origins: Arc<[String]>,
}

impl SitePolicy {
    pub fn new(allowed_hosts: &[String], cors_origins: Arc<[String]>) -> Self {
        // A port given with a name is dropped: the check is on names.
        let name = |h: &String| match h.trim() {
            "*" => "*".to_string(),
            h if h.starts_with('.') => h.trim_end_matches('.').to_ascii_lowercase(),
            h => host_name(h).unwrap_or_else(|| h.to_ascii_lowercase()),
        };
        Self { allowed_hosts: allowed_hosts.iter().map(name).collect(), cors_origins }
    }

    /// Whether `host` (a `Host` header: a name or address, maybe a port) names this service.
    fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else { return false };
        if name.parse::<IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        self.allowed_hosts.iter().any(|allowed| {
            allowed == "*"
                || *allowed == name
                || allowed.strip_prefix('.').is_some_and(|parent| name == parent || name.ends_with(allowed.as_str()))
        })
    }

    /// Whether a state-changing request carrying `origin` may go on: the same
    /// host name and port as the request's `Host` (a port left out is the
    /// scheme's default: `forwarded_proto` for `Host` behind a proxy, else the
    /// origin's), or an origin CORS allows.
    fn origin_allowed(&self, origin: &str, host: Option<&str>, forwarded_proto: Option<&str>) -> bool {
        if self.cors_origins.iter().any(|o| o == "*" || o.trim().eq_ignore_ascii_case(origin)) {
            return true;
        }
        let (Some((scheme, authority)), Some(host)) = (origin.split_once("://"), host) else { return false };
        let site = |authority: &str, scheme: &str| -> Option<(String, u16)> {
            let parsed: Authority = authority.parse().ok()?;
            let default = if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 };
            Some((host_name(authority)?, parsed.port_u16().unwrap_or(default)))
        };
        let theirs = site(authority, scheme);
        theirs.is_some() && theirs == site(host, forwarded_proto.unwrap_or(scheme))
    }
}

/// The host name of a `Host` header, lower-case, without port, brackets or a trailing dot.
fn host_name(host: &str) -> Option<String> {
    let authority: Authority = host.parse().ok()?;
    let name = authority.host().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    Some(name.to_ascii_lowercase())
}

fn header<'a>(headers: &'a HeaderMap, name: &axum::http::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub async fn check(State(policy): State<SitePolicy>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    // HTTP/2 carries the host in the URI's authority instead of a header.
    let host = header(headers, &HOST).or_else(|| request.uri().authority().map(Authority::as_str));
    if let Some(host) = host.filter(|h| !policy.host_allowed(h)) {
        let message = format!(
            "this service does not answer to the host name in `Host: {host}`; start it with `--allowed-host <name>` \
             (LOOKALIKE_ALLOWED_HOSTS) to serve that name"
        );
        return ApiError::Forbidden { code: "host_not_allowed", message }.into_response();
    }
    let safe = [Method::GET, Method::HEAD, Method::OPTIONS].contains(request.method());
    let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok());
    if let Some(origin) = header(headers, &ORIGIN).filter(|o| !safe && !policy.origin_allowed(o, host, proto)) {
        let message = format!(
            "a browser page on {origin} may not change this service; allow that origin with `--cors-origins` \
             if it is your own frontend"
        );
        return ApiError::Forbidden { code: "foreign_origin", message }.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str], cors: &[&str]) -> SitePolicy {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        SitePolicy::new(&hosts, cors.iter().map(|o| o.to_string()).collect())
    }

    #[test]
    fn addresses_and_localhost_are_always_allowed_names_only_when_listed() {
        let p = policy(&["Search.Example.com:443", ".corp.test"], &[]);
        for host in ["127.0.0.1:8080", "[::1]:8080", "10.1.2.3", "localhost:8080", "app.localhost", "LOCALHOST."] {
            assert!(p.host_allowed(host), "{host}");
        }
        for host in ["search.example.com:443", "a.corp.test", "corp.test", "search.example.com."] {
            assert!(p.host_allowed(host), "{host}");
        }
        for host in ["evil.test", "evil.test:8080", "localhost.evil.test", "example.com", "corp.test.evil", "", "a b"] {
            assert!(!p.host_allowed(host), "{host}");
        }
        assert!(policy(&["*"], &[]).host_allowed("anything.example"));
    }

    #[test]
    fn only_the_same_host_or_a_cors_origin_may_change_state() {
        let p = policy(&[], &["https://app.example.com"]);
        let allowed = |origin: &str, host: Option<&str>, proto: Option<&str>| p.origin_allowed(origin, host, proto);
        assert!(allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080"), None));
        assert!(allowed("https://app.example.com", Some("127.0.0.1:8080"), None));
        assert!(allowed("https://Search.example.com", Some("search.example.com:443"), Some("https")));
        assert!(allowed("https://search.example.com", Some("search.example.com"), None));
        assert!(allowed("http://[::1]:8080", Some("[::1]:8080"), None));
        assert!(!allowed("http://evil.test", Some("127.0.0.1:8080"), None));
        assert!(!allowed("http://127.0.0.1:9999", Some("127.0.0.1:8080"), None));
        assert!(!allowed("https://search.example.com", Some("search.example.com:80"), Some("http")));
        assert!(!allowed("null", Some("127.0.0.1:8080"), None));
        assert!(!allowed("http://127.0.0.1:8080", None, None));
        assert!(policy(&[], &["*"]).origin_allowed("http://evil.test", Some("127.0.0.1:8080"), None));
    }
}
