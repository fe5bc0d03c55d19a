//! Processes under test, such as `kstore-node`: started with their output in a log file,
//! stopped with SIGTERM or killed with SIGKILL, and never left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use kstore_kafka::local::alive;

/// A child process whose stdout and stderr go to a log file. Dropping it kills it.
#[derive(Debug)]
pub struct TestProcess {
    name: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl TestProcess {
    /// Starts `program` with `args`, writing its output to `log`.
    pub fn start(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(TestProcess {
            name: name.into(),
            child,
            log: log.into(),
            exit: None,
        })
    }

    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns what the process has written so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to log a line containing `what` and
    /// `address=…` (as kstore-node logs the addresses it serves on), and returns the
    /// address. Fails at once if the process exits.
    pub fn logged_address(&mut self, what: &str, timeout: Duration) -> Result<String> {
        let mut address = None;
        wait_until(timeout, what, || {
            if let Some(status) = self.try_exit()? {
                bail!("{} exited with {status}:\n{}", self.name, self.tail());
            }
            address = self
                .output()
                .lines()
                .find(|l| l.contains(what))
                .and_then(|l| l.split("address=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned);
            Ok(address.is_some())
        })?;
        Ok(address.unwrap_or_default())
    }

    /// Returns the exit status if the process has exited.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; its output:\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit(timeout)
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal("KILL")?;
        self.wait_exit(Duration::from_secs(30))
    }

    /// Pauses the process with SIGSTOP, as a stalled host would be: its sockets stay open
    /// and connections are accepted, but nothing answers. Returns once every thread has
    /// stopped (a signal is delivered asynchronously: a busy thread can still answer a
    /// request for a moment after `kill` returns). The guard resumes it (SIGCONT) when
    /// dropped, so that a failing test never leaves it stopped.
    pub fn pause(&mut self) -> Result<Paused> {
        self.signal("STOP")?;
        let paused = Paused {
            pid: self.child.id(),
            resumed: false,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !threads_stopped(paused.pid) {
            if Instant::now() > deadline {
                bail!("{} did not stop within 10 s of SIGSTOP", self.name);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(paused)
    }

    fn signal(&mut self, name: &str) -> Result<()> {
        if self.try_exit()?.is_some() {
            bail!("{} already exited; its output:\n{}", self.name, self.tail());
        }
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {} failed", self.child.id());
        }
        Ok(())
    }

    /// Returns the last lines of the output, for error messages.
    pub fn tail(&self) -> String {
        let output = self.output();
        let lines: Vec<&str> = output.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        if matches!(self.try_exit(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc`).
fn threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

/// A process paused by [`TestProcess::pause`]; resumed when dropped.
#[derive(Debug)]
#[must_use = "the process is resumed when the guard drops"]
pub struct Paused {
    pid: u32,
    resumed: bool,
}

impl Paused {
    /// Resumes the process (SIGCONT).
    pub fn resume(mut self) -> Result<()> {
        self.resumed = true;
        let status = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -CONT {} failed", self.pid);
        }
        Ok(())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

/// Sends `GET path` over HTTP/1.1 to `address` (such as a node's metrics port) and returns the
/// whole response, failing unless its status is 200.
pub fn http_get(address: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", text.lines().next().unwrap_or_default());
    }
    Ok(text)
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
