//! User names for uids, read once from the host's passwd database (not per event).

use std::{collections::HashMap, path::Path};

#[derive(Clone, Debug, Default)]
pub struct UserNames {
    names: HashMap<u32, String>,
}

impl UserNames {
    /// Reads `/etc/passwd`-format `path`; a missing or unreadable file gives no names.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        let names = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut parts = l.split(':');
                let name = parts.next()?;
                let uid = parts.nth(1)?.parse().ok()?;
                Some((uid, name.to_owned()))
            })
            .collect();
        Self { names }
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, String)>) -> Self {
        Self {
            names: pairs.into_iter().collect(),
        }
    }

    /// The name of `uid`, or "" when the host does not know it.
    pub fn name(&self, uid: u32) -> String {
        self.names.get(&uid).cloned().unwrap_or_default()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(u, n)| (*u, n.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_lines() {
        let users = UserNames::parse(
            "root:x:0:0:root:/root:/bin/bash\n# c\ntomcat:x:91:91::/:/sbin/nologin\nbad\n",
        );
        assert_eq!(users.name(0), "root");
        assert_eq!(users.name(91), "tomcat");
        assert_eq!(users.name(5), "");
    }
}
