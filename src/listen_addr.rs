//! The grammar of the addresses sidekey listens on (`--proxy-listen`, `--admin-listen`,
//! `--grpc-listen`), shared by the configuration and the control plane's listener.

use std::net::SocketAddr;

/// A listen address as `--proxy-listen`, `--admin-listen` and `--grpc-listen` take it:
/// `IP:PORT` (`[IPv6]:PORT`), or `NAME:PORT` with NAME a host name (letters, digits, `-`
/// and `.`), resolved once, here: the first IPv4 address it resolves to, else the first
/// IPv6 one. The port is digits.
pub fn parse(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let invalid =
        || format!("{value:?} is not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080, localhost:8080)");
    let (host, port) = value.rsplit_once(':').ok_or_else(invalid)?;
    let is_name = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !is_name || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("{value:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{value:?}: {host:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn listen_addresses_take_ip_literals_and_host_names() {
        assert_eq!(parse("127.0.0.1:8080"), Ok(([127, 0, 0, 1], 8080).into()));
        assert_eq!(
            parse("[::1]:0"),
            Ok((std::net::Ipv6Addr::LOCALHOST, 0).into())
        );
        // localhost resolves from /etc/hosts: IPv4 is preferred when it has both.
        assert_eq!(parse("localhost:8080"), Ok(([127, 0, 0, 1], 8080).into()));
        for bad in [
            "",
            "8080",
            ":8080",
            "localhost",
            "localhost:",
            "localhost:http",
            "localhost:65536",
            "localhost:+1",
            "local host:1",
            "localhost.:1",
            "http://localhost:1",
            "[localhost]:1",
            "127.0.0.1:8080:1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
