//! The configuration file, `/etc/sensor-agent/agent.toml`: every `run` flag has a key
//! here (documented with its default in `packaging/agent.toml`); a flag given on the
//! command line wins over the file. Unknown keys and bad values are errors that name the
//! file, the line and column, and what is allowed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::probes::{Probe, SyscallHooks};

/// Where `run` looks when `--config` is not given (absent: defaults only).
pub const DEFAULT_PATH: &str = "/etc/sensor-agent/agent.toml";

/// Bytes in a MiB and nanoseconds in a second, for turning the configuration's units into
/// the components'.
pub const MIB: u64 = 1024 * 1024;
pub const SECOND_NS: u64 = 1_000_000_000;

/// The configuration file. Its `Default` is the one place every default lives: the
/// components' own constructors (`LoadOptions`, `SpoolOptions`, `DeliveryOptions`,
/// `RecordOptions`, `FlightOptions`, the collapse window) take their numbers from it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentSection,
    pub rules: RulesSection,
    pub record: RecordSection,
    pub flight: FlightSection,
    pub collector: CollectorSection,
    pub metrics: MetricsSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// Agent id on alerts; empty: derived from /etc/machine-id.
    pub agent_id: String,
    /// Print every event as a JSON line.
    pub events: bool,
    #[serde(deserialize_with = "ring_mib")]
    pub ring_mib: u32,
    pub skip_probes: Vec<Probe>,
    /// `auto` (fexit where the kernel offers it) or `sys_exit`.
    pub syscall_hooks: SyscallHooks,
    pub collapse_seconds: u64,
    /// `off`, `audit` or `on` (prevention for the enforced web-tier lineages).
    pub enforce: crate::probes::enforce::Mode,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            agent_id: String::new(),
            events: false,
            ring_mib: 16,
            skip_probes: Vec::new(),
            syscall_hooks: SyscallHooks::Auto,
            collapse_seconds: 60,
            enforce: crate::probes::enforce::Mode::Off,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSection {
    /// Rule directories loaded after the embedded pack.
    pub dirs: Vec<PathBuf>,
    /// SigmaHQ rule directories.
    pub sigma: Vec<PathBuf>,
    /// Extra absolute path prefixes whose file activity is reported.
    #[serde(deserialize_with = "absolute_paths")]
    pub watch: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordSection {
    /// Trace file or directory; empty: no recording.
    pub path: Option<PathBuf>,
    #[serde(deserialize_with = "at_least_one")]
    pub max_mib: u64,
    #[serde(deserialize_with = "at_least_one")]
    pub max_age_seconds: u64,
    #[serde(deserialize_with = "at_least_one")]
    pub max_total_mib: u64,
}

impl Default for RecordSection {
    fn default() -> Self {
        Self {
            path: None,
            max_mib: 64,
            max_age_seconds: 3600,
            max_total_mib: 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlightSection {
    pub dir: Option<PathBuf>,
    pub before_seconds: u64,
    pub after_seconds: u64,
    #[serde(deserialize_with = "at_least_one_usize")]
    pub max_mib: usize,
}

impl Default for FlightSection {
    fn default() -> Self {
        Self {
            dir: None,
            before_seconds: 30,
            after_seconds: 10,
            max_mib: 32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorSection {
    /// `https://HOST:PORT` or `http://127.0.0.1:PORT`, or a list of them in order of
    /// preference (failover); empty: no collector.
    #[serde(deserialize_with = "one_or_more")]
    pub url: Vec<String>,
    pub send_events: bool,
    pub spool: PathBuf,
    #[serde(deserialize_with = "at_least_one")]
    pub spool_max_mib: u64,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    #[serde(deserialize_with = "seconds_1_3600")]
    pub heartbeat_seconds: u64,
    #[serde(deserialize_with = "seconds_1_3600")]
    pub retry_max_seconds: u64,
}

impl Default for CollectorSection {
    fn default() -> Self {
        Self {
            url: Vec::new(),
            send_events: false,
            spool: PathBuf::from("/var/lib/sensor-agent/spool"),
            spool_max_mib: 256,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            heartbeat_seconds: 5,
            retry_max_seconds: 30,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// `HOST:PORT` for the Prometheus endpoint; empty: off.
    pub listen: Option<std::net::SocketAddr>,
}

fn ring_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let mib = u32::deserialize(d)?;
    if !(1..=1024).contains(&mib) || !mib.is_power_of_two() {
        return Err(D::Error::custom(format!(
            "ring_mib = {mib}: allowed values are powers of two from 1 to 1024"
        )));
    }
    Ok(mib)
}

fn absolute_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let paths = Vec::<String>::deserialize(d)?;
    for p in &paths {
        if !p.starts_with('/') {
            return Err(D::Error::custom(format!(
                "watch: {p:?} is not an absolute path (allowed: paths starting with /)"
            )));
        }
    }
    Ok(paths)
}

/// A string, or a list of strings.
fn one_or_more<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    Ok(
        match OneOrMore::deserialize(d)
            .map_err(|_| D::Error::custom("expected a URL or a list of URLs"))?
        {
            OneOrMore::One(s) => vec![s],
            OneOrMore::More(v) => v,
        },
    )
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v == 0 {
        return Err(D::Error::custom("0: allowed values are 1 or more"));
    }
    Ok(v)
}

fn at_least_one_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    at_least_one(d).map(|v| v as usize)
}

fn seconds_1_3600<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if !(1..=3600).contains(&v) {
        return Err(D::Error::custom(format!(
            "{v}: allowed values are 1 to 3600 seconds"
        )));
    }
    Ok(v)
}

/// Where rules come from: what SIGHUP reloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleSources {
    pub rules: Vec<PathBuf>,
    pub sigma: Vec<PathBuf>,
    pub watch: Vec<String>,
}

impl RuleSources {
    /// The file's `[rules]`, each list replaced by the command line's when it gave one.
    pub fn resolve(config: &Config, cli: &RuleSources) -> RuleSources {
        fn pick<T: Clone>(cli: &[T], file: &[T]) -> Vec<T> {
            if cli.is_empty() { file } else { cli }.to_vec()
        }
        RuleSources {
            rules: pick(&cli.rules, &config.rules.dirs),
            sigma: pick(&cli.sigma, &config.rules.sigma),
            watch: pick(&cli.watch, &config.rules.watch),
        }
    }
}

/// A configuration file that cannot be used, and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("configuration {path}: {message}")]
    Read { path: PathBuf, message: String },
    /// `at` is `FILE:LINE:COLUMN` (or `FILE` when the parser gives no position).
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
}

/// Parses configuration text; errors name `origin`, the line and the column.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| sensor_proto::position::position(text, span.start, origin))
            .unwrap_or_else(|| origin.display().to_string());
        ConfigError::Invalid {
            at,
            message: e.message().to_owned(),
        }
    })
}

/// Loads the configuration: `explicit` must exist; without it the default path is read
/// when present and defaults are used when it is not.
pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let default = PathBuf::from(DEFAULT_PATH);
            if !default.exists() {
                return Ok((Config::default(), None));
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((parse(&text, &path)?, Some(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, Path::new("/etc/sensor-agent/agent.toml"))
            .unwrap_err()
            .to_string()
    }

    const SHIPPED: &str = include_str!("../../packaging/agent.toml");

    fn is_key_line(line: &str) -> bool {
        line.strip_prefix('#')
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()))
    }

    /// The shipped file's commented values, uncommented, are exactly the defaults (keys
    /// marked "example" are off by default and only show the form).
    #[test]
    fn the_shipped_file_documents_the_real_defaults() {
        let lines: Vec<&str> = SHIPPED.lines().collect();
        let mut text = String::new();
        let mut examples = 0;
        for (i, line) in lines.iter().enumerate() {
            if is_key_line(line) {
                let doc = lines[i - 1];
                assert!(
                    doc.starts_with("# "),
                    "line {}: undocumented key {line}",
                    i + 1
                );
                if doc.ends_with(" example") {
                    examples += 1;
                    continue;
                }
                text.push_str(&line[1..]);
            } else {
                text.push_str(line);
            }
            text.push('\n');
        }
        assert_eq!(
            parse(&text, Path::new("agent.toml")).unwrap(),
            Config::default()
        );
        // And with the examples too, it is a valid file.
        let all: String = lines
            .iter()
            .map(|l| if is_key_line(l) { &l[1..] } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&all, Path::new("agent.toml")).unwrap();
        assert!(!config.collector.url.is_empty() && config.metrics.listen.is_some());
        assert_eq!(examples, 7);
    }

    #[test]
    fn a_full_file_parses() {
        let config = parse(
            r#"
[agent]
agent_id = "epmm-1"
ring_mib = 64
skip_probes = ["tamper"]
[rules]
dirs = ["/etc/sensor-agent/rules.d"]
watch = ["/mi/tomcat/webapps"]
[collector]
url = "https://collector.example:7443"
heartbeat_seconds = 10
[metrics]
listen = "127.0.0.1:9464"
"#,
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(config.agent.ring_mib, 64);
        assert_eq!(
            config.collector.spool_max_mib, 256,
            "unset keys keep defaults"
        );
        assert_eq!(config.metrics.listen.unwrap().port(), 9464);
        assert_eq!(config.collector.url, ["https://collector.example:7443"]);
        // A list: failover in order.
        let config = parse(
            "[collector]\nurl = [\"https://a.example:7443\", \"https://b.example:7443\"]\n",
            Path::new("b.toml"),
        )
        .unwrap();
        assert_eq!(config.collector.url.len(), 2);
        let e = parse("[collector]\nurl = 7\n", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("a URL or a list of URLs"), "{e}");
    }

    #[test]
    fn errors_name_the_line_the_key_and_what_is_allowed() {
        let e = err("[agent]\nring_mib = 16\nringmib = 3\n");
        assert!(e.starts_with("/etc/sensor-agent/agent.toml:3:1: "), "{e}");
        assert!(
            e.contains("unknown field `ringmib`") && e.contains("`ring_mib`"),
            "{e}"
        );

        let e = err("[agent]\n\nring_mib = 3\n");
        assert!(e.contains(":3:12: ") && e.contains("powers of two"), "{e}");

        let e = err("[agent]\nskip_probes = [\"net\", \"everything\"]\n");
        assert!(
            e.contains(":2:") && e.contains("everything") && e.contains("sys_exit"),
            "{e}"
        );

        let e = err("[collector]\nheartbeat_seconds = 0\n");
        assert!(e.contains(":2:") && e.contains("1 to 3600"), "{e}");

        let e = err("[rules]\nwatch = [\"relative/dir\"]\n");
        assert!(e.contains("absolute"), "{e}");

        let e = err("[metrics]\nlisten = \"nine thousand\"\n");
        assert!(e.contains(":2:"), "{e}");

        let e = err("[collectr]\nurl = \"x\"\n");
        assert!(e.contains(":1:") && e.contains("`collector`"), "{e}");

        let e = err("[agent]\nevents = \"yes\"\n");
        assert!(e.contains(":2:") && e.contains("bool"), "{e}");

        let e = err("[agent]\nenforce = \"kill\"\n");
        assert!(
            e.contains(":2:") && e.contains("`off`, `audit`, `on`"),
            "{e}"
        );
    }
}
