//! `cargo xtask bench detect [--against REV]`: the detection benchmark
//! (`cargo bench -p sensor-agent --bench detection`) of this tree, optionally side by side
//! with the same benchmark of an older revision built in a worktree of its own.
//!
//! The benchmark prints a Markdown table whose rows are mixes (label, events/s). Rounds
//! alternate which build runs first; the report gives each row's median per build and the
//! median of the per-round ratios, which is what survives a noisy machine: a neighbour
//! slowing one round slows both runs of it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{step, workspace};

/// Builds the detection benchmark of the tree at `root` into `target_dir` (None: the
/// workspace's own) and returns the executable.
fn build(root: &Path, target_dir: Option<&Path>) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args([
        "bench",
        "--package",
        "sensor-agent",
        "--bench",
        "detection",
        "--no-run",
        "--message-format=json",
    ]);
    if let Some(dir) = target_dir {
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    let stdout = output(
        cmd,
        &format!("building the detection benchmark in {}", root.display()),
    )?;
    String::from_utf8_lossy(&stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "detection")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no detection benchmark in {}", root.display()))
}

/// Runs `cmd` (`what` it does, for errors) and returns its standard output.
fn output(mut cmd: Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A worktree of `rev` under target/bench-against, made once and reused.
fn worktree(rev: &str) -> Result<PathBuf> {
    let ws = workspace();
    let resolved = Command::new("git")
        .current_dir(&ws)
        .args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .output()
        .context("cannot run git")?;
    if !resolved.status.success() {
        bail!("`{rev}` is not a commit of this repository");
    }
    let commit = String::from_utf8_lossy(&resolved.stdout).trim().to_owned();
    let dir = ws.join("target/bench-against").join(&commit[..12]);
    if !dir.join("Cargo.toml").exists() {
        step(&format!("git worktree for {rev} ({})", &commit[..12]));
        let status = Command::new("git")
            .current_dir(&ws)
            .args(["worktree", "add", "--force", "--detach"])
            .arg(&dir)
            .arg(&commit)
            .status()
            .context("cannot run git worktree")?;
        if !status.success() {
            bail!("git worktree add {} {commit} failed", dir.display());
        }
    }
    Ok(dir)
}

/// Runs the benchmark once; events/s by row label (a label seen again gets " #2"...).
fn run_once(exe: &Path, root: &Path) -> Result<Vec<(String, f64)>> {
    let mut cmd = Command::new(exe);
    // cargo runs a benchmark from its package's directory.
    cmd.current_dir(root.join("sensor-agent")).arg("--bench");
    if let Some(dir) = std::env::var_os("SENSOR_SIGMA_DIR") {
        // Relative to where the command was typed, for both trees.
        let dir = std::env::current_dir()?.join(dir);
        cmd.env("SENSOR_SIGMA_DIR", dir);
    }
    let stdout = output(cmd, &exe.display().to_string())?;
    let rows = rows(&String::from_utf8_lossy(&stdout));
    if rows.is_empty() {
        bail!("{} printed no result rows", exe.display());
    }
    Ok(rows)
}

/// The result rows of the benchmark's Markdown table: (label, events/s); a label seen
/// again is numbered (" #2"...), header and separator lines are skipped.
fn rows(stdout: &str) -> Vec<(String, f64)> {
    let mut rows: Vec<(String, f64)> = Vec::new();
    for line in stdout.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        // | label | Sigma rules | events | time | events/s | alerts | ...
        let (Some(label), Some(rate)) = (cols.get(1), cols.get(5)) else {
            continue;
        };
        let Ok(rate) = rate.parse::<f64>() else {
            continue;
        };
        let seen = rows
            .iter()
            .filter(|(l, _)| l == label || l.starts_with(&format!("{label} #")))
            .count();
        let label = if seen == 0 {
            (*label).to_owned()
        } else {
            format!("{label} #{}", seen + 1)
        };
        rows.push((label, rate));
    }
    rows
}

/// One row's events/s in one round: this tree's, the other revision's (None where a run
/// lacks the row).
type Round = (Option<f64>, Option<f64>);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(against: Option<&str>, rounds: u32) -> Result<()> {
    let ws = workspace();
    step("build the detection benchmark (release)");
    let current = build(&ws, None)?;
    let other = match against {
        Some(rev) => {
            let tree = worktree(rev)?;
            step(&format!("build the detection benchmark of {rev} (release)"));
            let exe = build(&tree, Some(&ws.join("target/bench-against/target")))?;
            Some((rev, tree, exe))
        }
        None => None,
    };
    let mut results: BTreeMap<String, Vec<Round>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for round in 0..rounds {
        step(&format!("round {}/{rounds}", round + 1));
        let run_other = || match &other {
            Some((_, tree, exe)) => run_once(exe, tree),
            None => Ok(Vec::new()),
        };
        let (ours, theirs) = if round % 2 == 1 {
            let theirs = run_other()?;
            (run_once(&current, &ws)?, theirs)
        } else {
            let ours = run_once(&current, &ws)?;
            (ours, run_other()?)
        };
        for (label, _) in ours.iter().chain(&theirs) {
            if !order.contains(label) {
                order.push(label.clone());
            }
        }
        for label in &order {
            let find = |rows: &[(String, f64)]| rows.iter().find(|(l, _)| l == label).map(|r| r.1);
            results
                .entry(label.clone())
                .or_default()
                .push((find(&ours), find(&theirs)));
        }
        let summary: Vec<String> = ours
            .iter()
            .map(|(l, r)| match theirs.iter().find(|(t, _)| t == l) {
                Some((_, t)) => format!("{l}: {r:.0} vs {t:.0}"),
                None => format!("{l}: {r:.0}"),
            })
            .collect();
        eprintln!("{}", summary.join("; "));
    }
    match &other {
        None => {
            println!("| row | rounds | events/s (median) |");
            println!("| --- | --- | --- |");
            for label in &order {
                let ours: Vec<f64> = results[label].iter().filter_map(|r| r.0).collect();
                println!("| {label} | {} | {:.0} |", ours.len(), median(ours.clone()));
            }
        }
        Some((rev, ..)) => {
            println!(
                "| row | rounds | this tree, events/s (median) | {rev}, events/s (median) | ratio (median of rounds) |"
            );
            println!("| --- | --- | --- | --- | --- |");
            for label in &order {
                let rows = &results[label];
                let ours: Vec<f64> = rows.iter().filter_map(|r| r.0).collect();
                let theirs: Vec<f64> = rows.iter().filter_map(|r| r.1).collect();
                let ratios: Vec<f64> = rows.iter().filter_map(|r| Some(r.0? / r.1?)).collect();
                let cell = |v: &[f64]| {
                    if v.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("{:.0}", median(v.to_vec()))
                    }
                };
                let ratio = if ratios.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.3}", median(ratios.clone()))
                };
                println!(
                    "| {label} | {} | {} | {} | {ratio} |",
                    rows.len(),
                    cell(&ours),
                    cell(&theirs)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_from_the_table_and_repeated_labels_numbered() {
        let out = "| rules | Sigma rules | events | time | events/s (one core) | alerts |\n\
                   | --- | --- | --- | --- | --- | --- |\n\
                   | default pack, service mix | 0 | 1000000 | 1.0 s | 1000000 | 0 |\n\
                   | default pack + recording (zstd) | 0 | 10 | 1 s | 500 | 0 | trace 1 MiB |\n\
                   | default pack + recording (zstd) | 0 | 10 | 1 s | 250 | 0 |\n\
                   \n\
                   JVM mix with SigmaHQ: pipeline 1.00x\n";
        assert_eq!(
            rows(out),
            vec![
                ("default pack, service mix".to_owned(), 1_000_000.0),
                ("default pack + recording (zstd)".to_owned(), 500.0),
                ("default pack + recording (zstd) #2".to_owned(), 250.0),
            ]
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
