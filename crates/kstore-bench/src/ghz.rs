//! Read latency as an independent load tool measures it: ghz (github.com/bojand/ghz), a gRPC
//! benchmark that knows nothing of kstore beyond its protobuf descriptors. `bench compare`
//! runs it against both systems in the same phases as its own generator, so that the
//! figures it reports can be checked with a tool nobody here wrote. Install it with
//! `go install github.com/bojand/ghz/cmd/ghz@v0.120.0` (`bench compare` does that itself where
//! Go is installed); without it the ghz rows are left out and the report says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use serde_json::Value;

/// The ghz version `bench compare` was measured with.
pub const VERSION: &str = "v0.120.0";

/// How to install ghz, for the message when it is missing.
pub fn install_command() -> String {
    format!("go install github.com/bojand/ghz/cmd/ghz@{VERSION}")
}

/// A call for ghz to make.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    /// `kstore.v1.Query/Get` of the built-in store, keys taken in turn from a list.
    Get,
    /// `kstore.v1.Query/MultiGet` of this many keys, taken in turn from the list.
    MultiGet { keys_per_call: usize },
    /// `kstore.v1.Query/Scan`: one page of `limit` entries of a partition, the partitions
    /// in turn, each page from a key of the list (the keys in turn).
    ScanPage { limit: u32, partitions: u32 },
    /// `grpc.health.v1.Health/Check`: a call that does no work (the node's floor), described
    /// by the node's own reflection service.
    HealthCheck,
}

/// How hard ghz calls: `rps` calls per second for `duration`, from `concurrency` workers
/// over one connection.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rps: u64,
    pub duration: Duration,
    pub concurrency: u32,
}

/// What ghz measured in one run.
#[derive(Debug, Clone)]
pub struct GhzLatencies {
    /// Calls made.
    pub count: u64,
    /// Calls that did not answer OK, and what ghz says of them (its error distribution).
    pub errors: u64,
    pub error_kinds: String,
    /// p50, p99 and p99.9 of the answered calls, in milliseconds (computed from every call's
    /// latency, which ghz lists in its JSON report).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// The ghz binary: on `PATH`, or where `go install` puts it.
#[derive(Debug, Clone)]
pub struct Ghz {
    path: PathBuf,
}

impl Ghz {
    /// Finds ghz, if it is installed.
    pub fn find() -> Option<Ghz> {
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("ghz"))
                    .collect()
            })
            .unwrap_or_default();
        for var in ["GOBIN", "GOPATH"] {
            if let Some(dir) = std::env::var_os(var) {
                let dir = PathBuf::from(dir);
                candidates.push(if var == "GOPATH" {
                    dir.join("bin/ghz")
                } else {
                    dir.join("ghz")
                });
            }
        }
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join("go/bin/ghz"));
        }
        candidates
            .into_iter()
            .find(|path| path.is_file())
            .map(|path| Ghz { path })
    }

    /// Finds ghz, or installs it with `go install` where Go is installed.
    pub fn find_or_install() -> Option<Ghz> {
        if let Some(ghz) = Ghz::find() {
            return Some(ghz);
        }
        eprintln!("bench: ghz not found; trying `{}`", install_command());
        let installed = Command::new("go")
            .args([
                "install",
                &format!("github.com/bojand/ghz/cmd/ghz@{VERSION}"),
            ])
            .status();
        match installed {
            Ok(status) if status.success() => Ghz::find(),
            Ok(status) => {
                eprintln!("bench: go install exited with {status}");
                None
            }
            Err(error) => {
                eprintln!("bench: could not run go ({error}): no ghz figures this run");
                None
            }
        }
    }

    /// Runs `call` against `address` under `load`; `keys` are the keys Get asks for, in
    /// turn. `dir` holds the descriptor set, the request data and ghz's report.
    pub fn run(
        &self,
        call: Call,
        address: &str,
        load: Load,
        keys: &[String],
        dir: &Path,
    ) -> Result<GhzLatencies> {
        let report = dir.join("ghz-report.json");
        let mut command = Command::new(&self.path);
        command.args([
            "--insecure",
            "--connections",
            "1",
            "--concurrency",
            &load.concurrency.to_string(),
            "--rps",
            &load.rps.to_string(),
            "--duration",
            &format!("{}ms", load.duration.as_millis()),
            "--timeout",
            "5s",
            "--format",
            "json",
            "--output",
        ]);
        command.arg(&report);
        if !matches!(call, Call::HealthCheck) {
            ensure!(!keys.is_empty(), "ghz needs keys to ask for");
        }
        let encode = |key: &String| base64::engine::general_purpose::STANDARD.encode(key);
        // An array: ghz sends its messages in turn, one per call.
        let requests: Option<(&str, Vec<Value>)> = match call {
            Call::Get => Some((
                "kstore.v1.Query/Get",
                keys.iter()
                    .map(|key| serde_json::json!({"store": "features", "key": encode(key)}))
                    .collect(),
            )),
            Call::MultiGet { keys_per_call } => Some((
                "kstore.v1.Query/MultiGet",
                (0..keys.len())
                    .map(|first| {
                        let group: Vec<String> = (0..keys_per_call)
                            .map(|i| encode(&keys[(first + i) % keys.len()]))
                            .collect();
                        serde_json::json!({"store": "features", "keys": group})
                    })
                    .collect(),
            )),
            Call::ScanPage { limit, partitions } => Some((
                "kstore.v1.Query/Scan",
                keys.iter()
                    .enumerate()
                    .map(|(i, key)| {
                        serde_json::json!({
                            "store": "features",
                            "partition": i as u32 % partitions.max(1),
                            "from": encode(key),
                            "limit": limit,
                        })
                    })
                    .collect(),
            )),
            Call::HealthCheck => None,
        };
        match requests {
            Some((method, requests)) => {
                let protoset = dir.join("kstore.protoset");
                std::fs::write(&protoset, kstore_proto::FILE_DESCRIPTOR_SET)?;
                let data = dir.join("ghz-requests.json");
                std::fs::write(&data, serde_json::to_vec(&requests)?)?;
                command
                    .arg("--protoset")
                    .arg(&protoset)
                    .args(["--call", method, "--data-file"])
                    .arg(&data);
            }
            None => {
                command.args(["--call", "grpc.health.v1.Health/Check", "--data", "{}"]);
            }
        }
        command.arg(address);
        let output = command
            .output()
            .with_context(|| format!("running {}", self.path.display()))?;
        if !output.status.success() && !report.exists() {
            bail!(
                "ghz exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let report: Value = serde_json::from_slice(&std::fs::read(&report)?)
            .context("reading ghz's JSON report")?;
        latencies(&report)
    }
}

/// The latencies of a ghz JSON report: percentiles from every call's latency (ghz's own
/// distribution stops at p99), errors from its status counts.
fn latencies(report: &Value) -> Result<GhzLatencies> {
    let details = report["details"]
        .as_array()
        .context("ghz's report lists no calls (details)")?;
    let mut answered: Vec<u64> = details
        .iter()
        .filter(|d| d["status"].as_str() == Some("OK"))
        .filter_map(|d| d["latency"].as_u64())
        .collect();
    answered.sort_unstable();
    ensure!(
        !answered.is_empty(),
        "no call answered OK: {}",
        report["statusCodeDistribution"]
    );
    let at = |q: f64| {
        let index = ((answered.len() as f64 * q).ceil() as usize).clamp(1, answered.len()) - 1;
        answered[index] as f64 / 1e6
    };
    let count = details.len() as u64;
    Ok(GhzLatencies {
        count,
        errors: count - answered.len() as u64,
        error_kinds: match &report["errorDistribution"] {
            Value::Object(kinds) if !kinds.is_empty() => report["errorDistribution"].to_string(),
            _ => String::new(),
        },
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_answered_calls_only() {
        let mut details: Vec<Value> = (1..=1000)
            .map(|ms| serde_json::json!({"latency": ms * 1_000_000u64, "status": "OK"}))
            .collect();
        details.push(serde_json::json!({"latency": 9_000_000_000u64, "status": "Unavailable"}));
        let report = serde_json::json!({ "details": details });
        let measured = latencies(&report).unwrap();
        assert_eq!((measured.count, measured.errors), (1001, 1));
        assert_eq!(measured.p50_ms, 500.0);
        assert_eq!(measured.p99_ms, 990.0);
        assert_eq!(measured.p999_ms, 999.0);
    }
}
