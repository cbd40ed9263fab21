//! What the agent guards: the EPMM version and whether the CVE-2026-1281/1340 hotfix is
//! installed, read from the appliance when present (THREATS.md 1, 2.1).

use std::{path::Path, process::Command};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplianceInfo {
    /// EPMM version, "" when this is not an EPMM appliance (or it does not say).
    pub epmm_version: String,
    pub hotfix_installed: bool,
    /// What showed the hotfix: a file of it, or its package.
    pub hotfix_evidence: String,
}

/// The hotfix replaces the bash RewriteMap helpers by these Java classes (root:root 0700).
const HOTFIX_FILES: &[&str] = &[
    "mi/bin/AppStoreUrlMapper.class",
    "mi/bin/AFTUrlMapper.class",
];
/// The hotfix RPM (`ivanti-security-update-1761642-1.0.0L-5.noarch.rpm` and the S variant).
const HOTFIX_PACKAGE: &str = "ivanti-security-update-1761642";
/// Files an EPMM release names its version in, first found wins.
const VERSION_FILES: &[&str] = &["mi/release", "mi/config-system/release"];

/// Reads the appliance under `root` (normally `/`).
pub fn detect(root: &Path) -> ApplianceInfo {
    let epmm_version = VERSION_FILES
        .iter()
        .filter_map(|f| std::fs::read_to_string(root.join(f)).ok())
        .find_map(|text| {
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if let Some(file) = HOTFIX_FILES.iter().find(|f| root.join(f).is_file()) {
        return ApplianceInfo {
            epmm_version,
            hotfix_installed: true,
            hotfix_evidence: format!("/{file}"),
        };
    }
    let package = (root == Path::new("/"))
        .then(|| {
            Command::new("rpm")
                .args(["-qa", &format!("{HOTFIX_PACKAGE}*")])
                .output()
                .ok()
        })
        .flatten()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with(HOTFIX_PACKAGE))
                .map(str::to_owned)
        });
    ApplianceInfo {
        epmm_version,
        hotfix_installed: package.is_some(),
        hotfix_evidence: package.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_and_hotfix_from_the_appliance_tree() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(detect(root.path()), ApplianceInfo::default());
        std::fs::create_dir_all(root.path().join("mi/bin")).unwrap();
        std::fs::write(root.path().join("mi/release"), "\n12.7.0.0 Build 55\n").unwrap();
        let info = detect(root.path());
        assert_eq!(info.epmm_version, "12.7.0.0 Build 55");
        assert!(!info.hotfix_installed);
        std::fs::write(
            root.path().join("mi/bin/AppStoreUrlMapper.class"),
            b"\xca\xfe",
        )
        .unwrap();
        let info = detect(root.path());
        assert!(info.hotfix_installed);
        assert_eq!(info.hotfix_evidence, "/mi/bin/AppStoreUrlMapper.class");
    }
}
