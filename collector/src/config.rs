//! The collector's configuration file, `/etc/sensor-collector/collector.toml`: every
//! serving flag has a key (documented with its default in `packaging/collector.toml`); a
//! flag given on the command line wins. Unknown keys and bad values are errors with the
//! file, line and column.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: Option<SocketAddr>,
    /// SQLite database file or postgres:// URL.
    pub db: Option<String>,
    /// The CA of the PostgreSQL server's certificate.
    pub db_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub silence_seconds: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_connections_per_peer: Option<u64>,
    /// `tcp://HOST:PORT` or `tls://HOST:PORT` syslog receivers.
    pub forward_syslog: Vec<String>,
    /// The CA of the `tls://` receivers' certificates.
    pub forward_ca: Option<PathBuf>,
    pub retain_days: Option<u64>,
    /// Address of the /metrics endpoint.
    pub metrics: Option<SocketAddr>,
}

/// Parses configuration text; errors name `origin`, the line and the column.
pub fn parse(text: &str, origin: &Path) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| sensor_proto::position::position(text, span.start, origin))
            .unwrap_or_else(|| origin.display().to_string());
        format!("{at}: {}", e.message())
    })
}

pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("configuration {}: {e}", path.display()))?;
    parse(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged file, every key uncommented, is the defaults (`None`: the flag's).
    #[test]
    fn the_packaged_file_documents_every_key_and_parses() {
        let text = include_str!("../../packaging/collector.toml");
        let uncommented: String = text
            .lines()
            .map(|l| {
                if l.starts_with('#') && l[1..].contains(" = ") && !l.starts_with("# ") {
                    &l[1..]
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&uncommented, Path::new("collector.toml")).unwrap();
        assert_eq!(config.listen.unwrap().port(), 7443);
        assert_eq!(config.retain_days, Some(365));
        assert_eq!(
            config.db.as_deref(),
            Some("/var/lib/sensor-collector/collector.db")
        );
        assert_eq!(config.forward_syslog.len(), 1);
        for key in [
            "listen",
            "db",
            "db_ca",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "silence_seconds",
            "max_connections",
            "max_connections_per_peer",
            "forward_syslog",
            "retain_days",
            "metrics",
        ] {
            assert!(
                text.contains(&format!("#{key} = ")),
                "{key} is not documented"
            );
        }
    }

    #[test]
    fn errors_say_where() {
        let err = parse(
            "listen = \"127.0.0.1:7443\"\nretain = 3\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(
            err.starts_with("c.toml:2:1: unknown field `retain`"),
            "{err}"
        );
        let err = parse("listen = \"nowhere\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.starts_with("c.toml:1:10:"), "{err}");
    }
}
