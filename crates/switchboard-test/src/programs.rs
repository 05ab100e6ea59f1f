//! Programs outside the workspace that tests drive: the example backends in
//! `examples/` (Python, PHP) and their interpreters.
//!
//! A missing interpreter fails the test that needs it, like a missing service
//! ([`crate::services::require`]); outside CI `scripts/test.sh` leaves such
//! tests out beforehand, by name (`python`, `php`).

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::services::require;

/// A file of the repository's `examples/` directory.
pub fn example(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(path)
}

/// Whether `program args` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `python3` (3.8 or later, for the examples' standard library), or an error
/// naming it.
pub fn require_python() -> Result<()> {
    require(
        "python3 (3.8 or later)",
        runs(
            "python3",
            &["-c", "import sys; sys.exit(sys.version_info < (3, 8))"],
        ),
    )
}

/// `php` with its curl extension, or an error naming them.
pub fn require_php() -> Result<()> {
    require(
        "php with the curl extension (Debian: php-cli, php-curl)",
        runs(
            "php",
            &["-r", "exit(function_exists('curl_init') ? 0 : 1);"],
        ),
    )
}

/// Runs `program args` to its end, within [`crate::STEP`]: its standard
/// output, trimmed; an error with its exit status and standard error when it
/// fails.
pub async fn output(program: &str, args: &[&str]) -> Result<String> {
    let run = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(crate::STEP, run)
        .await
        .with_context(|| format!("{program} {args:?} did not end within {:?}", crate::STEP))?
        .with_context(|| format!("running {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Starts `program args` and reads the first line it prints (an address, say);
/// the rest of its output is drained so that it never blocks. The process is
/// killed when the returned child is dropped.
pub async fn spawn_first_line(program: &str, args: &[&str]) -> Result<(Child, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(crate::STEP, lines.next_line())
        .await
        .with_context(|| {
            format!(
                "{program} {args:?} printed nothing within {:?}",
                crate::STEP
            )
        })??
        .with_context(|| format!("{program} {args:?} ended without printing"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, first))
}

/// A command line to run again and again with different last arguments: an
/// interpreter, a script and its options.
#[derive(Debug, Clone)]
pub struct Script {
    program: String,
    head: Vec<String>,
}

impl Script {
    /// `program head...`
    pub fn new(program: &str, head: &[&str]) -> Self {
        Self {
            program: program.to_owned(),
            head: head.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// [`output`] of `program head... args...`.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let all: Vec<&str> = self
            .head
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        output(&self.program, &all).await
    }
}
