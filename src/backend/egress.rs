//! Where a bot's backend may be reached: the outbound policy of `[security] backend_allow` /
//! `backend_deny`. Backend URLs are chosen by management API callers, so without a policy the
//! router would be a proxy into its own network (cloud metadata, the ops listener, private
//! services) that answers into Teams.
//!
//! Default: https to public addresses only. Loopback, link-local (the metadata address included),
//! private (RFC 1918, RFC 4193), CGNAT, unspecified, multicast and reserved addresses are refused
//! unless an allow entry covers them; a destination an allow entry covers may use http too. Deny
//! entries win over everything. Names are judged on the addresses they resolve to, at connect
//! time, by [`PolicyResolver`]: the connection goes only to the addresses that passed, so a DNS
//! rebinding between a check and the connect gains nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// One entry of `backend_allow` / `backend_deny`.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Network(IpNet),
    /// A host name, exact (`bots.example.com`) or a suffix (`*.corp.example.com`: any name
    /// under it, not the name itself).
    Host {
        name: String,
        subdomains: bool,
    },
}

impl Rule {
    fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            return Ok(Self::Network(net.trunc()));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(Self::Network(IpNet::from(ip)));
        }
        let (subdomains, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!(
                "{entry:?} is neither a CIDR (10.0.0.0/8), an address nor a host pattern \
                 (bots.example.com, *.corp.example.com)"
            ));
        }
        Ok(Self::Host { name, subdomains })
    }

    fn covers_host(&self, host: &str) -> bool {
        match self {
            Self::Network(_) => false,
            Self::Host {
                name,
                subdomains: false,
            } => host == name,
            Self::Host {
                name,
                subdomains: true,
            } => host
                .strip_suffix(name.as_str())
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
        }
    }

    fn covers_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Self::Network(net) if net.contains(&ip))
    }
}

/// Why a backend URL is refused; the message names what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The outbound policy for backend URLs (webhook `url`, OpenAI `baseUrl`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

/// A backend URL that passed the checks that need no DNS.
#[derive(Debug)]
pub struct Screened {
    pub url: url::Url,
    /// An http URL whose host is a name no allow entry names: allowed only if the name resolves
    /// into an allowed network ([`EgressPolicy::admit`] finds out).
    pub plaintext_needs_allowed_address: bool,
}

impl EgressPolicy {
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |key: &str, entries: &[String]| {
            entries
                .iter()
                .map(|e| Rule::parse(e).map_err(|why| format!("security.{key}: {why}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: parse("backend_allow", allow)?,
            deny: parse("backend_deny", deny)?,
        })
    }

    /// May a connection go to `ip`? (`host` is the URL's host name when it has one.)
    pub fn address_allowed(&self, host: Option<&str>, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|r| r.covers_ip(ip)) {
            return false;
        }
        let host_allowed = host.is_some_and(|h| self.allow.iter().any(|r| r.covers_host(h)));
        host_allowed || self.allow.iter().any(|r| r.covers_ip(ip)) || !refused_by_default(ip)
    }

    /// The checks of `raw` that need no DNS: scheme, credentials in the URL, an address host, the
    /// host patterns. Used when a backend is created or updated, and before every call.
    pub fn screen(&self, raw: &str) -> Result<Screened, Refused> {
        let url =
            url::Url::parse(raw).map_err(|e| Refused(format!("{raw:?} is not a URL: {e}")))?;
        let plaintext = match url.scheme() {
            "https" => false,
            "http" => true,
            other => return Err(Refused(format!("the scheme {other:?} is not http(s)"))),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused("credentials in the URL are not allowed".into()));
        }
        let needs_address = match url.host() {
            None => return Err(Refused("the URL has no host".into())),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if self.deny.iter().any(|r| r.covers_host(&name)) {
                    return Err(Refused(format!(
                        "the host {name:?} is refused by security.backend_deny"
                    )));
                }
                let named = self.allow.iter().any(|r| r.covers_host(&name));
                if !named && (name == "localhost" || name.ends_with(".localhost")) {
                    self.check_ip(None, IpAddr::from([127, 0, 0, 1]), plaintext)?;
                }
                plaintext && !named
            }
            Some(url::Host::Ipv4(ip)) => {
                self.check_ip(None, IpAddr::V4(ip), plaintext)?;
                false
            }
            Some(url::Host::Ipv6(ip)) => {
                self.check_ip(None, IpAddr::V6(ip), plaintext)?;
                false
            }
        };
        if needs_address && self.allow.iter().all(|r| matches!(r, Rule::Host { .. })) {
            return Err(plaintext_refused());
        }
        Ok(Screened {
            url,
            plaintext_needs_allowed_address: needs_address,
        })
    }

    fn check_ip(&self, host: Option<&str>, ip: IpAddr, plaintext: bool) -> Result<(), Refused> {
        if !self.address_allowed(host, ip) {
            return Err(Refused(format!(
                "{ip} is a loopback, private, link-local or otherwise internal address, or one \
                 security.backend_deny refuses; allow it with security.backend_allow"
            )));
        }
        if plaintext && !self.allow.iter().any(|r| r.covers_ip(ip.to_canonical())) {
            return Err(plaintext_refused());
        }
        Ok(())
    }

    /// The addresses of `host` a connection may use; refused when none of them.
    fn usable(&self, host: &str, resolved: &[IpAddr]) -> Result<Vec<IpAddr>, Refused> {
        let usable: Vec<IpAddr> = resolved
            .iter()
            .copied()
            .filter(|ip| self.address_allowed(Some(host), *ip))
            .collect();
        if usable.is_empty() {
            let shown: Vec<String> = resolved.iter().map(IpAddr::to_string).collect();
            return Err(Refused(format!(
                "refused by the outbound policy: {host:?} resolves to {} (loopback, private, \
                 link-local or otherwise internal addresses; allow them with \
                 security.backend_allow)",
                shown.join(", ")
            )));
        }
        Ok(usable)
    }

    /// Everything [`screen`](Self::screen) checks, and for a name the addresses it resolves to
    /// now (when it resolves: a name that does not is left to the connect-time check).
    pub async fn admit(&self, raw: &str) -> Result<url::Url, Refused> {
        let screened = self.screen(raw)?;
        let url = screened.url;
        let Some(url::Host::Domain(name)) = url.host() else {
            return Ok(url);
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.allow.iter().any(|r| r.covers_host(&name)) {
            return Ok(url);
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let resolved = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await;
        let addresses: Vec<IpAddr> = match resolved {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            _ if screened.plaintext_needs_allowed_address => {
                return Err(Refused(format!(
                    "{name:?} does not resolve, so http to it cannot be allowed"
                )));
            }
            _ => return Ok(url),
        };
        // As at connect time: the connection may use any address that passes.
        let usable = self.usable(&name, &addresses)?;
        if screened.plaintext_needs_allowed_address
            && !usable
                .iter()
                .all(|ip| self.allow.iter().any(|r| r.covers_ip(ip.to_canonical())))
        {
            return Err(plaintext_refused());
        }
        Ok(url)
    }
}

fn plaintext_refused() -> Refused {
    Refused(
        "http is allowed only to destinations that security.backend_allow covers; use https".into(),
    )
}

/// Addresses no backend reaches unless allowed: loopback, private (RFC 1918, RFC 4193), CGNAT,
/// link-local (169.254.169.254, the cloud metadata service, among them), unspecified, multicast,
/// broadcast, documentation and reserved ranges.
fn refused_by_default(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                // NAT64 and 6to4 carry an IPv4 address, which may be an internal one.
                || (first == 0x0064 && v6.segments()[1] == 0xff9b)
                || first == 0x2002
        }
    }
}

/// The backends' DNS resolver: resolves with the system resolver and keeps only the addresses
/// the policy allows, so that reqwest connects to nothing else (the resolved address is the
/// one connected to: no second lookup to rebind).
pub struct PolicyResolver {
    pub policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            if policy.deny.iter().any(|r| r.covers_host(&host)) {
                return Err(
                    format!("the host {host:?} is refused by security.backend_deny").into(),
                );
            }
            let resolved: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect();
            let allowed: Vec<SocketAddr> = policy
                .usable(&host, &resolved)?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The message of `error` and its sources, so a refusal deep in a connect error is told.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EgressPolicy::new(&owned(allow), &owned(deny)).unwrap()
    }

    #[test]
    fn the_default_refuses_internal_addresses_and_plain_http() {
        let p = EgressPolicy::default();
        for url in [
            "https://127.0.0.1/hook",
            "https://127.1/hook",
            "https://0x7f000001/hook",
            "https://[::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://169.254.169.254/latest/meta-data/",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://localhost/",
            "https://api.localhost/",
            "http://bots.example.com/hook",
            "http://93.184.216.34/hook",
            "ftp://bots.example.com/",
            "https://user:pw@bots.example.com/",
        ] {
            assert!(p.screen(url).is_err(), "{url} passed");
        }
        for url in ["https://bots.example.com/hook", "https://93.184.216.34/v1"] {
            assert!(p.screen(url).is_ok(), "{url} refused");
        }
    }

    #[tokio::test]
    async fn allow_entries_open_networks_and_hosts_to_http_and_deny_wins() {
        let p = policy(&["127.0.0.0/8", "*.corp.example.com"], &["127.0.0.2"]);
        assert!(p.screen("http://127.0.0.1:8080/hook").is_ok());
        assert!(p.screen("http://127.0.0.2:8080/hook").is_err());
        assert!(p.screen("http://[::1]/hook").is_err());
        assert!(p.screen("http://bots.corp.example.com/hook").is_ok());
        // Not named by the pattern: http only if the name resolves into 127.0.0.0/8.
        assert!(p.admit("http://corp.example.com/hook").await.is_err());
        assert!(p.admit("http://evilcorp.example.com/hook").await.is_err());
        assert!(p.address_allowed(Some("bots.corp.example.com"), "10.0.0.5".parse().unwrap()));
        assert!(!p.address_allowed(Some("bots.example.com"), "10.0.0.5".parse().unwrap()));
        let denied = policy(&[], &["*.internal.example.com", "203.0.113.0/24"]);
        assert!(denied.screen("https://a.internal.example.com/").is_err());
        assert!(!denied.address_allowed(None, "203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let err = EgressPolicy::new(&["not a host!".into()], &[]).unwrap_err();
        assert!(err.contains("security.backend_allow"), "{err}");
    }

    #[tokio::test]
    async fn names_are_judged_on_their_addresses() {
        let p = EgressPolicy::default();
        let err = p.admit("https://localhost:9/hook").await.unwrap_err();
        assert!(
            err.0.contains("127.0.0.1") || err.0.contains("internal"),
            "{err}"
        );
        let allowed = policy(&["127.0.0.0/8"], &[]);
        assert!(allowed.admit("http://localhost:9/hook").await.is_ok());
    }

    #[tokio::test]
    async fn the_resolver_connects_only_to_allowed_addresses() {
        use reqwest::dns::Resolve;
        let strict = PolicyResolver {
            policy: Arc::new(EgressPolicy::default()),
        };
        let refused = strict.resolve("localhost".parse().unwrap()).await;
        let err = refused.err().expect("localhost resolves to loopback only");
        assert!(err.to_string().contains("outbound policy"), "{err}");
        let open = PolicyResolver {
            policy: Arc::new(policy(&["127.0.0.0/8"], &[])),
        };
        let addrs: Vec<SocketAddr> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()),
            "{addrs:?}"
        );
    }
}
