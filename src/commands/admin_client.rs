//! Reaching the running instance's admin listener named in the config, from this host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::Config;

/// The address to reach a listener bound to `listen` from this host: an unspecified
/// address (0.0.0.0, ::) is reached on loopback.
pub fn loopback(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

/// The admin listener's base URL for `cfg`.
pub fn base_url(cfg: &Config) -> String {
    format!("http://{}", loopback(cfg.admin.listen))
}

/// An HTTP client for the admin listener (never through a proxy).
pub fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        for (listen, reached) in [
            ("0.0.0.0:9901", "127.0.0.1:9901"),
            ("[::]:9901", "[::1]:9901"),
            ("127.0.0.2:9901", "127.0.0.2:9901"),
            ("[::1]:9901", "[::1]:9901"),
            ("10.0.0.5:9901", "10.0.0.5:9901"),
        ] {
            let listen: SocketAddr = listen.parse().unwrap();
            assert_eq!(loopback(listen).to_string(), reached, "{listen}");
        }
    }
}
