//! Checks that keep `docs/` true to the code.

use anyhow::{Context, Result, ensure};

/// Fails naming every one of `names` that `docs/<file>` does not mention
/// in backticks (`` `name` ``).
pub fn check_documented(file: &str, names: &[String]) -> Result<()> {
    let path = crate::repo_root().join("docs").join(file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !text.contains(&format!("`{n}`")))
        .collect();
    ensure!(
        missing.is_empty(),
        "docs/{file} does not mention {missing:?}; add them (what they do, their default)"
    );
    Ok(())
}

/// The metric names (`# HELP <name> ...` lines) of a Prometheus text
/// exposition.
pub fn metric_names(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.strip_suffix("_total").unwrap_or(n).to_owned())
        .collect()
}

/// The long flags of `command`, as `--name`.
pub fn long_flags(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(clap::Arg::get_long)
        .filter(|l| *l != "help")
        .map(|l| format!("--{l}"))
        .collect()
}
