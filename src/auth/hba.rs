//! Which authentication method a connection must pass: `auth_type`, or
//! the first `[[hba]]` rule that matches, as PostgreSQL's pg_hba.conf.

use std::net::IpAddr;

use serde::Deserialize;

/// How a client proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// SASL SCRAM-SHA-256, with -PLUS channel binding over TLS.
    #[value(name = "scram-sha-256")]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge; a user whose secret is a SCRAM verifier is asked for
    /// SCRAM instead, as PostgreSQL does.
    Md5,
    /// The password in clear text; only over TLS.
    Password,
    /// No proof.
    Trust,
    /// Always refused.
    Reject,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
            AuthMethod::Trust => "trust",
            AuthMethod::Reject => "reject",
        }
    }
}

/// The kind of connection a rule applies to, in pg_hba.conf's words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionType {
    /// Any connection.
    #[default]
    All,
    /// Unix-domain socket.
    Local,
    /// TCP, with or without TLS.
    Host,
    /// TCP with TLS.
    Hostssl,
    /// TCP without TLS.
    Hostnossl,
}

/// One `[[hba]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbaRule {
    #[serde(rename = "type", default)]
    pub connection: ConnectionType,
    /// Database names, or `"all"`.
    #[serde(default = "all")]
    pub databases: Vec<String>,
    /// User names, or `"all"`.
    #[serde(default = "all")]
    pub users: Vec<String>,
    /// A client address range such as `"10.0.0.0/8"` (TCP rules only).
    #[serde(default)]
    pub address: Option<String>,
    pub method: AuthMethod,
}

fn all() -> Vec<String> {
    vec!["all".to_owned()]
}

/// What is known about a connection when its method is chosen.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// None for a Unix-domain socket.
    pub address: Option<IpAddr>,
    pub tls: bool,
    pub user: &'a str,
    pub database: &'a str,
}

impl HbaRule {
    /// `(field, problem)` for the first thing wrong with the rule.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.databases.is_empty() {
            return Err((
                "databases",
                "must name at least one database, or \"all\"".to_owned(),
            ));
        }
        if self.users.is_empty() {
            return Err((
                "users",
                "must name at least one user, or \"all\"".to_owned(),
            ));
        }
        if let Some(address) = &self.address {
            if self.connection == ConnectionType::Local {
                return Err((
                    "address",
                    "a \"local\" rule matches Unix sockets, which have no address".to_owned(),
                ));
            }
            parse_cidr(address).map_err(|problem| ("address", problem))?;
        }
        Ok(())
    }

    pub fn matches(&self, peer: &Peer<'_>) -> bool {
        let connection = match self.connection {
            ConnectionType::All => true,
            ConnectionType::Local => peer.address.is_none(),
            ConnectionType::Host => peer.address.is_some(),
            ConnectionType::Hostssl => peer.address.is_some() && peer.tls,
            ConnectionType::Hostnossl => peer.address.is_some() && !peer.tls,
        };
        let address = match (&self.address, peer.address) {
            (None, _) => true,
            (Some(range), Some(address)) => {
                parse_cidr(range).is_ok_and(|(network, bits)| in_range(address, network, bits))
            }
            (Some(_), None) => false,
        };
        connection
            && address
            && listed(&self.databases, peer.database)
            && listed(&self.users, peer.user)
    }

    /// Whether this rule can apply to `user` at all.
    pub fn may_apply_to(&self, user: &str) -> bool {
        listed(&self.users, user)
    }
}

fn listed(names: &[String], name: &str) -> bool {
    names.iter().any(|entry| entry == "all" || entry == name)
}

/// The method for `peer`: the first matching rule's, `default` when there
/// are no rules, none when rules exist and none matches.
pub fn choose(rules: &[HbaRule], default: AuthMethod, peer: &Peer<'_>) -> Option<AuthMethod> {
    if rules.is_empty() {
        return Some(default);
    }
    rules
        .iter()
        .find(|rule| rule.matches(peer))
        .map(|rule| rule.method)
}

/// Every method that may be asked of `user` on some connection.
pub fn methods_for(rules: &[HbaRule], default: AuthMethod, user: &str) -> Vec<AuthMethod> {
    if rules.is_empty() {
        return vec![default];
    }
    rules
        .iter()
        .filter(|rule| rule.may_apply_to(user))
        .map(|rule| rule.method)
        .collect()
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, bits) = match text.split_once('/') {
        Some((address, bits)) => (address, Some(bits)),
        None => (text, None),
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => max,
        Some(bits) => bits
            .parse::<u8>()
            .ok()
            .filter(|bits| *bits <= max)
            .ok_or_else(|| format!("{text:?}: prefix length must be from 0 to {max}"))?,
    };
    Ok((address, bits))
}

fn in_range(address: IpAddr, network: IpAddr, bits: u8) -> bool {
    let address = match (address, network) {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        (IpAddr::V6(v6), IpAddr::V4(_)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return false,
        },
        _ => address,
    };
    match (address, network) {
        (IpAddr::V4(a), IpAddr::V4(n)) => prefix_equal(&a.octets(), &n.octets(), bits),
        (IpAddr::V6(a), IpAddr::V6(n)) => prefix_equal(&a.octets(), &n.octets(), bits),
        _ => false,
    }
}

fn prefix_equal(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> HbaRule {
        toml::from_str(text).expect("rule parses")
    }

    fn peer<'a>(address: Option<&str>, tls: bool, user: &'a str) -> Peer<'a> {
        Peer {
            address: address.map(|a| a.parse().expect("ip")),
            tls,
            user,
            database: "app",
        }
    }

    #[test]
    fn first_match_wins() {
        let rules = vec![
            rule("type = \"local\"\nmethod = \"trust\""),
            rule("type = \"hostssl\"\nusers = [\"alice\"]\nmethod = \"password\""),
            rule("address = \"10.0.0.0/8\"\nmethod = \"md5\""),
            rule("type = \"host\"\nmethod = \"scram-sha-256\""),
        ];
        let choose = |p: Peer<'_>| choose(&rules, AuthMethod::Reject, &p);
        assert_eq!(choose(peer(None, false, "bob")), Some(AuthMethod::Trust));
        assert_eq!(
            choose(peer(Some("1.2.3.4"), true, "alice")),
            Some(AuthMethod::Password)
        );
        assert_eq!(
            choose(peer(Some("10.9.8.7"), true, "bob")),
            Some(AuthMethod::Md5)
        );
        assert_eq!(
            choose(peer(Some("::ffff:10.1.1.1"), false, "bob")),
            Some(AuthMethod::Md5)
        );
        assert_eq!(
            choose(peer(Some("11.0.0.1"), false, "bob")),
            Some(AuthMethod::ScramSha256)
        );
        assert_eq!(
            super::choose(
                &rules[..1],
                AuthMethod::Trust,
                &peer(Some("1.1.1.1"), false, "x")
            ),
            None
        );
        assert_eq!(
            super::choose(&[], AuthMethod::Md5, &peer(None, false, "x")),
            Some(AuthMethod::Md5)
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn ranges() {
        assert!(in_range(ip("192.168.1.77"), ip("192.168.1.0"), 25));
        assert!(!in_range(ip("192.168.1.200"), ip("192.168.1.0"), 25));
        assert!(in_range(ip("fe80::1"), ip("fe80::"), 10));
        assert!(in_range(ip("8.8.8.8"), ip("0.0.0.0"), 0));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense").is_err());
        let bad = rule("type = \"local\"\naddress = \"10.0.0.0/8\"\nmethod = \"md5\"");
        assert_eq!(bad.validate().expect_err("local with address").0, "address");
        assert!(toml::from_str::<HbaRule>("method = \"kerberos\"").is_err());
    }
}
