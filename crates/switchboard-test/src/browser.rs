//! Headless Chromium driven through chromedriver's W3C WebDriver protocol, for
//! tests that use a page as a person would.
//!
//! The client is the dozen WebDriver commands the tests need, as JSON over
//! [`crate::http`], rather than a WebDriver crate: those bring a few dozen
//! crates (a Unicode segmenter, cookies, date-time) for an API this small.
//!
//! [`Browser::start`] looks for `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (`SWITCHBOARD_CHROMIUM` and `SWITCHBOARD_CHROMEDRIVER` override them; Debian
//! packages `chromium` and `chromium-driver`, which `scripts/test.sh` installs).
//! When they are missing it fails, naming them (outside CI, `scripts/test.sh`
//! leaves the browser tests out beforehand instead).
//!
//! chromedriver runs in a process group of its own with the Chromium it
//! starts; dropping the [`Browser`] kills that group, so neither outlives a
//! failed test, and removes Chromium's profile directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use http::Method;
use serde_json::{Value, json};

use crate::services::{free_port, require, unique_prefix};

/// Flags every Chromium of the tests runs with: headless, as root in a
/// container (no sandbox), and quiet: no first-run, sync, update or
/// background traffic, nothing beyond loopback.
const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Chromium's first start on a busy machine takes seconds: session creation
/// gets longer than a test step.
const SESSION_START: Duration = Duration::from_secs(60);

/// How often a wait looks at the page again.
const POLL: Duration = Duration::from_millis(50);

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn binary(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// The chromedriver process group and Chromium's profile directory.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group chromedriver leads (its id is the group's): chromedriver
        // and every Chromium process it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A Chromium session. See the module docs.
pub struct Browser {
    driver: Driver,
    session: String,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Browser(session {} on :{})",
            self.session, self.driver.port
        )
    }
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session with
    /// a window of `width` x `height`, logging chromedriver to `log`; an error
    /// naming them when Chromium or chromedriver is missing.
    pub async fn start(log: &Path, width: u32, height: u32) -> Result<Browser> {
        let chromium = binary("SWITCHBOARD_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = binary("SWITCHBOARD_CHROMEDRIVER", "/usr/bin/chromedriver");
        let found = chromium.is_file() && chromedriver.is_file();
        let what = format!(
            "{} and {} (Debian packages chromium and chromium-driver; scripts/test.sh installs them)",
            chromium.display(),
            chromedriver.display()
        );
        require(&what, found)?;
        let profile = std::env::temp_dir().join(unique_prefix("chromium"));
        std::fs::create_dir_all(&profile)?;
        let port = free_port()?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", chromedriver.display()))?
        };
        let mut driver = Driver {
            child,
            port,
            profile,
        };
        driver.wait_ready(log).await?;

        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", driver.profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created = call(port, Method::POST, "/session", Some(&caps), SESSION_START)
            .await
            .with_context(|| format!("creating a Chromium session (see {})", log.display()))?;
        let session = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {created}"))?
            .to_owned();
        Ok(Browser { driver, session })
    }

    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        call(self.driver.port, method, &path, body.as_ref(), crate::STEP).await
    }

    /// Loads `url` (waits for the page's load event).
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.cmd(Method::POST, "/url", Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    /// `/element` (the first match) or `/elements` (all) for a CSS selector.
    async fn locate(&self, path: &str, css: &str) -> Result<Value> {
        self.cmd(
            Method::POST,
            path,
            Some(json!({"using": "css selector", "value": css})),
        )
        .await
        .with_context(|| format!("finding {css:?}"))
    }

    /// The first element matching the CSS selector.
    pub async fn find(&self, css: &str) -> Result<String> {
        let v = self.locate("/element", css).await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("not an element: {v}"))
    }

    /// How many elements match the CSS selector.
    pub async fn count(&self, css: &str) -> Result<usize> {
        let v = self.locate("/elements", css).await?;
        Ok(v.as_array().map_or(0, Vec::len))
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await
        .with_context(|| format!("clicking {css:?}"))?;
        Ok(())
    }

    /// Replaces the value of the input matching `css` by typing `text`.
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css).await?;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await?;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .with_context(|| format!("typing into {css:?}"))?;
        Ok(())
    }

    /// The rendered text of the element matching `css`.
    pub async fn text(&self, css: &str) -> Result<String> {
        let e = self.find(css).await?;
        let v = self
            .cmd(Method::GET, &format!("/element/{e}/text"), None)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page
    /// and returns its result.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value> {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Polls the text of the element matching `css` until it contains
    /// `needle`; fails after `wait` with the last text seen.
    pub async fn wait_for_text(&self, css: &str, needle: &str, wait: Duration) -> Result<String> {
        let deadline = Instant::now() + wait;
        loop {
            // The element may not exist yet: that is one more reason to wait.
            let seen = self.text(css).await;
            match &seen {
                Ok(t) if t.contains(needle) => return Ok(t.clone()),
                _ if Instant::now() >= deadline => {
                    bail!("{css:?} did not show {needle:?} within {wait:?}; last seen: {seen:?}")
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Resizes the window (the viewport is a little smaller).
    pub async fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.cmd(
            Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await?;
        Ok(())
    }

    /// Writes a PNG of the viewport to `path`, creating its directory.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.cmd(Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().ok_or_else(|| anyhow!("no screenshot data"))?)
            .context("decoding the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (Chromium exits), then stops chromedriver.
    pub async fn quit(self) {
        let _ = self.cmd(Method::DELETE, "", None).await;
    }
}

impl Driver {
    /// Waits until chromedriver answers `/status` as ready, or fails early if
    /// it exits.
    async fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + crate::STEP;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("chromedriver exited with {status} (see {})", log.display());
            }
            if let Ok(v) = call(self.port, Method::GET, "/status", None, POLL * 10).await
                && v["ready"] == true
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("chromedriver is not ready within {:?}", crate::STEP);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One WebDriver command: its `value`, or the WebDriver error as an error.
async fn call(
    port: u16,
    method: Method,
    path: &str,
    body: Option<&Value>,
    within: Duration,
) -> Result<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = crate::http::request(addr, method, path, body, within).await?;
    let mut v: Value = serde_json::from_slice(&r.body)
        .with_context(|| format!("{path}: not JSON: {}", r.text()))?;
    let value = v["value"].take();
    if !r.status.is_success() {
        bail!(
            "{path}: {} {}: {}",
            r.status,
            value["error"].as_str().unwrap_or("error"),
            value["message"].as_str().unwrap_or_default()
        );
    }
    Ok(value)
}
