//! Benchmark figures and their report: `target/bench/<name>.json` in the
//! format of DESIGN.md, and the same figures printed as a table.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use tessera_tests::repo_root;

/// One measured figure. `met` is computed from `target`, never written by hand.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figure {
    name: String,
    value: f64,
    unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    met: Option<bool>,
}

impl Figure {
    /// A figure with no peer and no target.
    pub fn new(name: &str, value: f64, unit: &str) -> Figure {
        Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            peer: None,
            peer_value: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    /// Adds a peer measured in the same run; the ratio is value / peer value.
    pub fn with_peer(mut self, peer: &str, peer_value: f64) -> Figure {
        self.peer = Some(peer.to_owned());
        self.peer_value = Some(peer_value);
        self.ratio = (peer_value != 0.0).then(|| self.value / peer_value);
        self.met = self.target.as_deref().and_then(|t| evaluate(t, &self));
        self
    }

    /// Sets the target (`<= 5`, `>= 5000`, `>= 2x peer`) and computes `met`.
    pub fn with_target(mut self, target: &str) -> Figure {
        self.target = Some(target.to_owned());
        self.met = evaluate(target, &self);
        self
    }
}

/// Evaluates a target against a figure: `<= N`, `>= N`, or `<=`/`>=` `Nx peer`.
/// Returns None when the target cannot be read or needs a missing peer.
pub fn evaluate(target: &str, figure: &Figure) -> Option<bool> {
    let target = target.trim();
    let (op, rest) = if let Some(r) = target.strip_prefix("<=") {
        ("<=", r)
    } else if let Some(r) = target.strip_prefix(">=") {
        (">=", r)
    } else {
        return None;
    };
    let rest = rest.trim();
    let (bound, value) = if let Some(factor) = rest.strip_suffix("x peer") {
        (factor.trim().parse::<f64>().ok()?, figure.ratio?)
    } else {
        let number = rest.split_whitespace().next()?;
        (number.parse::<f64>().ok()?, figure.value)
    };
    Some(if op == "<=" {
        value <= bound
    } else {
        value >= bound
    })
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'a str,
    machine: String,
    build: Build,
    figures: &'a [Figure],
}

/// What the figures were measured on and with.
#[derive(Serialize)]
struct Build {
    /// `git rev-parse HEAD`, with `-dirty` when the tree has changes.
    commit: String,
    /// The CPU model (/proc/cpuinfo).
    cpu: String,
    /// The running kernel's release.
    kernel: String,
    /// `rustc --version` and `clang-16 --version` (first lines).
    toolchain: String,
    /// The build profile of the measured binaries (the agent and operator
    /// are built with `--release`; this driver's own is beside it).
    profile: String,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, loopback")
}

/// The first line a command prints, or `unknown (why)`.
fn first_line(program: &str, args: &[&str]) -> String {
    match std::process::Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(out) => format!("unknown ({program} exited with {})", out.status),
        Err(e) => format!("unknown (cannot run {program}: {e})"),
    }
}

fn build() -> Build {
    let dirty = !first_line("git", &["status", "--porcelain"]).is_empty();
    let commit = first_line("git", &["rev-parse", "HEAD"]);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    let driver = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    Build {
        commit: if dirty {
            format!("{commit}-dirty")
        } else {
            commit
        },
        cpu,
        kernel,
        toolchain: format!(
            "{}; {}",
            first_line("rustc", &["--version"]),
            first_line("clang-16", &["--version"])
        ),
        profile: format!("measured binaries: release; benchmark driver: {driver}"),
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes the report and prints the table.
pub fn report(name: &str, figures: &[Figure]) -> Result<()> {
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    let report = Report {
        benchmark: name,
        machine: machine(),
        build: build(),
        figures,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&path, json + "\n")?;
    println!(
        "\n{:<34} {:>12} {:<6} {:<18} {:>10} {:>8} {:<14} met",
        "figure", "value", "unit", "peer", "peer", "ratio", "target"
    );
    for f in figures {
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{:<34} {:>12.2} {:<6} {:<18} {:>10} {:>8} {:<14} {}",
            f.name,
            f.value,
            f.unit,
            f.peer.as_deref().unwrap_or("-"),
            opt(f.peer_value),
            opt(f.ratio),
            f.target.as_deref().unwrap_or("-"),
            f.met.map_or("-", |m| if m { "yes" } else { "NO" }),
        );
    }
    println!(
        "\nwrote {} ({})",
        path.display(),
        serde_json::to_string(&report.build)?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let f = Figure::new("x", 4.0, "ms").with_target("<= 5 ms");
        assert_eq!(f.met, Some(true));
        let f = Figure::new("x", 6.0, "ms").with_target("<= 5");
        assert_eq!(f.met, Some(false));
        let f = Figure::new("x", 1900.0, "1/s")
            .with_peer("go", 800.0)
            .with_target(">= 2x peer");
        assert_eq!(f.ratio, Some(2.375));
        assert_eq!(f.met, Some(true));
        let f = Figure::new("x", 1500.0, "1/s")
            .with_target(">= 2x peer")
            .with_peer("go", 800.0);
        assert_eq!(f.met, Some(false));
        assert_eq!(Figure::new("x", 1.0, "s").with_target("about 1").met, None);
        assert_eq!(
            Figure::new("x", 1.0, "s").with_target(">= 2x peer").met,
            None
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
