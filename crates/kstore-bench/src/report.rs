//! `cargo xtask bench report`: the benchmark suite in one run, and one Markdown report of it
//! with charts, each figure beside its goal.
//!
//! It runs, in turn, against one broker on this machine: `bench ingest` (one node,
//! exactly-once), `bench compare` (kstore beside the Kafka Streams baseline, with ghz
//! measuring Get, MultiGet, a Scan page and the no-op Health/Check), `bench get
//! --paused-node` (the smart client while a node is SIGSTOPped) and `bench restore` (a
//! store of about 1 GB brought up five ways, Kafka Streams restoring the same changelog among
//! them). A bench that fails leaves its section with the error and its goals unmeasured;
//! the report is written all the same. Nothing here asserts a time: a goal not met is
//! marked, with the shortfall.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::bench::IngestBench;
use crate::compare_bench::CompareBench;
use crate::restore_bench::RestoreBench;

/// What `bench report` runs and where it writes.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportBench {
    /// Where the report (`report.md`, `report.json`) and its charts go; by default the
    /// workspace's `docs/bench`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Small sizes and short phases (a few minutes in all), to try the report out; its
    /// figures are not the ones to quote.
    #[arg(long)]
    pub quick: bool,
    /// Run nothing: write `report.md` and the charts again from the `report.json` of an
    /// earlier run (after its notes were written, for example).
    #[arg(long, conflicts_with = "quick")]
    pub render_only: bool,
}

/// The hand-written notes on a run, beside the report: added to its end.
const NOTES: &str = "report-notes.md";

/// One bench's outcome: its figures, or why there are none.
type Part = std::result::Result<Value, String>;

/// The arguments each bench runs with, as on its command line.
struct Plan {
    ingest: Vec<&'static str>,
    compare: Vec<&'static str>,
    paused: Vec<&'static str>,
    restore: Vec<&'static str>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            return Plan {
                ingest: vec!["--events", "200000", "--guarantees", "exactly-once"],
                compare: vec![
                    "--events",
                    "200000",
                    "--customers",
                    "20000",
                    "--seconds",
                    "5",
                ],
                paused: vec![
                    "--seconds",
                    "8",
                    "--pause-seconds",
                    "2",
                    "--rate",
                    "500",
                    "--policy",
                    "prefer-active",
                ],
                restore: vec!["--customers", "200000", "--events", "300000"],
            };
        }
        Plan {
            ingest: vec!["--guarantees", "exactly-once"],
            compare: vec![],
            paused: vec!["--rate", "1000"],
            restore: vec![],
        }
    }
}

/// Parses a bench's arguments as its command line would, defaults included.
fn parse<T: clap::Args + clap::FromArgMatches>(args: &[&str]) -> Result<T> {
    let command = T::augment_args(clap::Command::new("bench").no_binary_name(true));
    let matches = command.try_get_matches_from(args)?;
    Ok(T::from_arg_matches(&matches)?)
}

/// Runs one bench, keeping its error as text.
fn run_part(name: &str, args: &[&str], run: impl FnOnce() -> Result<Value>) -> Part {
    eprintln!("report: running bench {name} {}", args.join(" "));
    let started = Instant::now();
    let outcome = run().map_err(|error| format!("{error:#}"));
    eprintln!(
        "report: bench {name} {} after {:.0} s",
        if outcome.is_ok() {
            "finished"
        } else {
            "failed"
        },
        started.elapsed().as_secs_f64()
    );
    outcome
}

pub fn report(options: &ReportBench) -> Result<()> {
    let out = match &options.out {
        Some(out) => out.clone(),
        None => workspace_dir().join("docs/bench"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let run = if options.render_only {
        let path = out.join("report.json");
        let json: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("reading {}", path.display()))?;
        Run::from_json(&json)
    } else {
        let run = run_suite(options.quick);
        std::fs::write(
            out.join("report.json"),
            serde_json::to_vec_pretty(&run.json())?,
        )?;
        run
    };
    let mut markdown = run.markdown();
    // What the figures mean, and why a goal is not met, is written by hand after a run: kept
    // in its own file, and added to the report whole.
    if let Ok(notes) = std::fs::read_to_string(out.join(NOTES)) {
        markdown.push('\n');
        markdown.push_str(&notes);
    }
    std::fs::write(out.join("report.md"), &markdown)?;
    run.charts(&out)?;
    println!("{markdown}");
    println!(
        "wrote {}/report.md, report.json and report-*.svg",
        out.display()
    );
    Ok(())
}

/// Runs every bench of the suite in turn.
fn run_suite(quick: bool) -> Run {
    let plan = Plan::new(quick);
    let machine_before = Machine::describe();
    let started = Instant::now();
    let began = utc_now();

    let ingest = run_part("ingest", &plan.ingest, || {
        crate::bench::ingest(&parse::<IngestBench>(&plan.ingest)?)
    });
    let compare = run_part("compare", &plan.compare, || {
        crate::compare_bench::compare(&parse::<CompareBench>(&plan.compare)?)
    });
    // compare.md, written by the compare bench beside the build, is quoted whole.
    let compare_table = crate::binaries::locate()
        .ok()
        .and_then(|b| std::fs::read_to_string(b.report_dir("bench").join("compare.md")).ok())
        .filter(|_| compare.is_ok());
    let mut paused_args = vec!["--paused-node"];
    paused_args.extend(&plan.paused);
    let paused = run_part("get", &paused_args, || {
        crate::paused_bench::run(&parse::<crate::bench::GetBench>(&paused_args)?)
    });
    let restore = run_part("restore", &plan.restore, || {
        crate::restore_bench::restore(&parse::<RestoreBench>(&plan.restore)?)
    });
    Run {
        began,
        seconds: started.elapsed().as_secs_f64(),
        quick,
        machine_before,
        machine_after: Machine::describe(),
        ingest,
        compare,
        compare_table,
        paused,
        restore,
    }
}

/// The workspace's directory: where the Kafka Streams baseline's project lives.
fn workspace_dir() -> PathBuf {
    let project = kstore_testkit::baseline::project_dir();
    project
        .parent()
        .and_then(Path::parent)
        .map_or(project.clone(), Path::to_path_buf)
}

/// The current time in UTC, as `date -u` prints it.
fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// What the machine is, and how busy.
#[derive(Debug, Clone)]
struct Machine {
    cpu: String,
    cpus: usize,
    memory: String,
    kernel: String,
    /// The 1-, 5- and 15-minute load averages.
    load: String,
    commit: String,
}

impl Machine {
    fn describe() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let field = |text: &str, name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_default()
        };
        let commit = std::process::Command::new("git")
            .arg("-C")
            .arg(workspace_dir())
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu: field(&cpuinfo, "model name"),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            memory: field(&read("/proc/meminfo"), "MemTotal")
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .map_or_else(
                    |_| "unknown".into(),
                    |kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0),
                ),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            commit,
        }
    }
}

/// One run of the suite.
struct Run {
    began: String,
    seconds: f64,
    quick: bool,
    machine_before: Machine,
    machine_after: Machine,
    ingest: Part,
    compare: Part,
    /// The table `bench compare` wrote (`compare.md`).
    compare_table: Option<String>,
    paused: Part,
    restore: Part,
}

/// A number at a JSON pointer.
fn num(value: &Value, pointer: &str) -> Option<f64> {
    value.pointer(pointer)?.as_f64()
}

/// A goal, and what the run measured of it.
struct Goal {
    what: &'static str,
    target: String,
    /// The measured figure as text, and whether it meets the target; `None` if the bench
    /// that measures it failed or measured nothing.
    measured: Option<(String, bool)>,
    /// How far from the target, when not met.
    shortfall: String,
}

impl Run {
    /// The run an earlier `report.json` (see [`Run::json`]) describes.
    fn from_json(json: &Value) -> Run {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let part = |v: &Value| match (&v["ok"], &v["failed"]) {
            (Value::Null, failed) => Err(text(failed)),
            (ok, _) => Ok(ok.clone()),
        };
        let machine = &json["machine"];
        let machine_at = |load: &str| Machine {
            cpu: text(&machine["cpu"]),
            cpus: machine["cpus"].as_u64().unwrap_or(0) as usize,
            memory: text(&machine["memory"]),
            kernel: text(&machine["kernel"]),
            load: text(&machine[load]),
            commit: text(&machine["commit"]),
        };
        Run {
            began: text(&json["began"]),
            seconds: num(json, "/seconds").unwrap_or(0.0),
            quick: json["quick"].as_bool().unwrap_or(false),
            machine_before: machine_at("load_before"),
            machine_after: machine_at("load_after"),
            ingest: part(&json["ingest"]),
            compare: part(&json["compare"]),
            compare_table: json["compare_table"].as_str().map(str::to_owned),
            paused: part(&json["paused"]),
            restore: part(&json["restore"]),
        }
    }

    /// kstore's and Kafka Streams' results in `compare.json`.
    fn systems(&self) -> Option<(&Value, &Value)> {
        let compare = self.compare.as_ref().ok()?;
        let systems = compare["systems"].as_array()?;
        Some((systems.first()?, systems.get(1)?))
    }

    /// A way of `bench restore`, by name.
    fn way(&self, name: &str) -> Option<&Value> {
        self.restore.as_ref().ok()?["ways"]
            .as_array()?
            .iter()
            .find(|w| w["way"].as_str() == Some(name))
    }

    fn way_seconds(&self, name: &str) -> Option<f64> {
        num(self.way(name)?, "/seconds")
    }

    fn goals(&self) -> Vec<Goal> {
        let systems = self.systems();
        let ratio = |pointer: &str| {
            let (k, s) = systems?;
            Some(num(k, pointer)? / num(s, pointer)?)
        };
        let at_most = |what, target: f64, measured: Option<f64>, unit: &str| {
            goal(
                what,
                format!("≤ {target}{unit}"),
                measured,
                unit,
                |m| m <= target,
                |m| format!("{:.0}% above the goal", 100.0 * (m / target - 1.0)),
            )
        };
        let at_least = |what, target: f64, measured: Option<f64>, unit: &str| {
            goal(
                what,
                format!("≥ {target}{unit}"),
                measured,
                unit,
                |m| m >= target,
                |m| format!("{:.0}% of the goal", 100.0 * m / target),
            )
        };
        let ghz = |pointer: &str| systems.and_then(|(k, _)| num(k, pointer));
        let eos_one_node = self.ingest.as_ref().ok().and_then(|i| {
            i["guarantees"]
                .as_array()?
                .iter()
                .find(|g| g["guarantee"] == "exactly-once")
                .and_then(|g| num(g, "/events_per_second"))
        });
        let raw = self.way_seconds("raw copy of the directory");
        let replay = self.way_seconds("full changelog replay");
        let peer = self.way_seconds("peer snapshot");
        vec![
            at_most(
                "state on disk after the ingest, kstore ÷ Kafka Streams (compare)",
                1.5,
                ratio("/state_bytes"),
                "×",
            ),
            at_most(
                "state on disk compacted, kstore ÷ Kafka Streams (compare)",
                1.5,
                ratio("/compacted_state_bytes"),
                "×",
            ),
            at_least(
                "exactly-once ingest, one node (bench ingest)",
                100_000.0,
                eos_one_node,
                " events/s",
            ),
            at_least(
                "exactly-once ingest, kstore ÷ Kafka Streams (compare)",
                2.5,
                ratio("/ingest_events_per_second"),
                "×",
            ),
            at_most(
                "ghz Get p99 idle ÷ ghz Health/Check p99 idle (compare)",
                1.5,
                ghz("/ghz/get_idle/p99_ms")
                    .zip(ghz("/ghz/health_check_idle/p99_ms"))
                    .map(|(get, health)| get / health),
                "×",
            ),
            at_most(
                "ghz Get p99 under 20k events/s ÷ ghz Get p99 idle (compare)",
                2.0,
                ghz("/ghz/get_under_ingest/p99_ms")
                    .zip(ghz("/ghz/get_idle/p99_ms"))
                    .map(|(busy, idle)| busy / idle),
                "×",
            ),
            at_least(
                "peer snapshot speed ÷ raw copy speed (restore)",
                0.8,
                raw.zip(peer).map(|(raw, peer)| raw / peer),
                "×",
            ),
            at_least(
                "peer snapshot, times faster than changelog replay (restore)",
                10.0,
                replay.zip(peer).map(|(replay, peer)| replay / peer),
                "×",
            ),
        ]
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine_before;
        md.push_str("# kstore benchmark report\n\n");
        md.push_str(&format!(
            "Written by `cargo xtask bench report{}` on {}, from commit `{}`; the whole run \
             took {:.0} minutes. Machine: {} × {}, {} of memory, Linux {}. Load average \
             (1/5/15 min) {} before the run and {} after it. The broker, the nodes, Kafka \
             Streams and every load generator share this machine, so each figure below is a \
             ratio to another figure of the same run, or comes with the no-op call's floor \
             from it.\n\n",
            if self.quick { " --quick" } else { "" },
            self.began,
            m.commit,
            self.seconds / 60.0,
            m.cpus,
            m.cpu,
            m.memory,
            m.kernel,
            m.load,
            self.machine_after.load,
        ));
        if self.quick {
            md.push_str(
                "**A quick run** (small sizes, short phases): its figures show that the \
                 report works, not what kstore does.\n\n",
            );
        }

        md.push_str("## Goals\n\n| goal | target | measured | met |\n|---|---|---|---|\n");
        for goal in self.goals() {
            let (measured, met) = match &goal.measured {
                Some((text, true)) => (text.clone(), "yes".to_owned()),
                Some((text, false)) => (text.clone(), format!("**no**: {}", goal.shortfall)),
                None => (
                    "not measured".into(),
                    "not measured (its bench failed)".into(),
                ),
            };
            md.push_str(&format!(
                "| {} | {} | {measured} | {met} |\n",
                goal.what, goal.target
            ));
        }
        md.push_str(&format!(
            "\nWhy each goal not met falls short is written by hand, after the run, in \
             [{NOTES}]({NOTES}), at the end of this report.\n\n"
        ));

        md.push_str("## Ingest\n\n");
        match &self.ingest {
            Ok(ingest) => {
                md.push_str(&format!(
                    "`bench ingest`: {} node, {} partitions, {} events over {} customers \
                     produced before the node starts; the rate counts from the first commit to \
                     every record committed.\n\n| guarantee | events/s | seconds | RSS | peak \
                     RSS |\n|---|---|---|---|---|\n",
                    ingest["nodes"], ingest["partitions"], ingest["events"], ingest["customers"]
                ));
                for g in ingest["guarantees"].as_array().into_iter().flatten() {
                    md.push_str(&format!(
                        "| {} | {:.0} | {:.1} | {:.0} MiB | {:.0} MiB |\n",
                        g["guarantee"].as_str().unwrap_or_default(),
                        num(g, "/events_per_second").unwrap_or(0.0),
                        num(g, "/seconds").unwrap_or(0.0),
                        mib(num(g, "/rss_bytes")),
                        mib(num(g, "/peak_rss_bytes")),
                    ));
                }
            }
            Err(error) => md.push_str(&failed("ingest", error)),
        }
        md.push_str("\n![exactly-once ingest](report-ingest.svg)\n\n");

        md.push_str("## Reads, and kstore beside Kafka Streams\n\n");
        match (&self.compare, &self.compare_table) {
            (Ok(_), Some(table)) => {
                md.push_str(
                    "`bench compare` (1 node and 1 instance): the same events for both, Get \
                     latency from its own open-loop generator and from ghz, idle and under \
                     ingest. Its table, as the bench wrote it:\n\n",
                );
                md.push_str(table);
                md.push('\n');
                if let Some((k, _)) = self.systems() {
                    md.push_str(&ghz_table(k));
                }
            }
            (Ok(_), None) => md.push_str("`bench compare` ran but its table was not found.\n"),
            (Err(error), _) => md.push_str(&failed("compare", error)),
        }
        md.push_str(
            "\n![read latency per call and phase, ghz](report-reads.svg)\n\n\
             ![RSS and state on disk](report-resources.svg)\n\n",
        );

        md.push_str("## Restore\n\n");
        match &self.restore {
            Ok(restore) => {
                let bytes = num(restore, "/store_bytes").unwrap_or(0.0);
                md.push_str(&format!(
                    "`bench restore`: one partition's store, {:.0} MiB on disk ({} customers, \
                     {} events through exactly-once ingest), brought up on a fresh node each \
                     way; Kafka Streams restores the same changelog topic with an empty state \
                     directory. \"First answer\" is from the process's start to its first \
                     answer of any kind (kstore answers while it restores, stating how far \
                     behind it is); \"all exact\" to the first moment all {} sampled keys \
                     answered with the values the filled store held.\n\n\
                     | way | seconds | MiB/s | vs replay | first answer | all exact | what the \
                     seconds cover |\n|---|---|---|---|---|---|---|\n",
                    bytes / f64::from(1 << 20),
                    restore["customers"],
                    restore["events"],
                    restore["sampled_keys"],
                ));
                let replay = self
                    .way_seconds("full changelog replay")
                    .unwrap_or(f64::NAN);
                for way in restore["ways"].as_array().into_iter().flatten() {
                    let seconds = num(way, "/seconds").unwrap_or(f64::NAN);
                    md.push_str(&format!(
                        "| {} | {seconds:.2} | {:.0} | {:.1}× | {} | {} | {} |\n",
                        way["way"].as_str().unwrap_or_default(),
                        bytes / f64::from(1 << 20) / seconds,
                        replay / seconds,
                        num(way, "/first_answer_seconds")
                            .map_or("-".into(), |s| format!("{s:.2} s")),
                        num(way, "/all_exact_seconds").map_or("-".into(), |s| format!("{s:.2} s")),
                        way["measured"].as_str().unwrap_or_default(),
                    ));
                }
                md.push_str(&format!(
                    "\nBackups: the first took {:.2} s ({:.0} MiB); after {} more events the \
                     incremental one took {:.2} s and added {:.1} MiB.\n",
                    num(restore, "/first_backup/seconds").unwrap_or(0.0),
                    mib(num(restore, "/first_backup/size_bytes")),
                    restore["incremental_backup"]["changed_events"],
                    num(restore, "/incremental_backup/seconds").unwrap_or(0.0),
                    mib(num(restore, "/incremental_backup/added_bytes")),
                ));
            }
            Err(error) => md.push_str(&failed("restore", error)),
        }
        md.push_str("\n![restore times](report-restore.svg)\n\n");

        md.push_str("## The smart client under a paused node\n\n");
        match &self.paused {
            Ok(paused) => {
                md.push_str(&format!(
                    "`bench get --paused-node`: 3 nodes, {} partitions with one standby each, \
                     {} customers; {} Gets/s through kstore-client for {} s per phase (open \
                     loop); in the fault phase a node is SIGSTOPped for {} s ({}).\n\n\
                     | policy | hedging | phase | p50 ms | p99 ms | p99.9 ms | max ms | errors \
                     | p99 in the pause's first 2 s | hedges won/sent | failovers | load |\n\
                     |---|---|---|---|---|---|---|---|---|---|---|---|\n",
                    paused["partitions"],
                    paused["customers"],
                    paused["rate"],
                    paused["seconds_per_phase"],
                    paused["pause_seconds"],
                    paused["paused_node_held"].as_str().unwrap_or_default(),
                ));
                for p in paused["phases"].as_array().into_iter().flatten() {
                    let text = |v: &Value| match v {
                        Value::Null => String::new(),
                        Value::String(s) => s.clone(),
                        Value::Number(n) => match n.as_f64() {
                            Some(f) if n.is_f64() => format!("{f:.2}"),
                            _ => n.to_string(),
                        },
                        other => other.to_string(),
                    };
                    let hedges = match (&p["hedges_won"], &p["hedges_sent"]) {
                        (Value::Null, _) => String::new(),
                        (won, sent) => format!("{won}/{sent}"),
                    };
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {hedges} | {} | {} |\n",
                        text(&p["policy"]),
                        text(&p["hedging"]),
                        text(&p["phase"]),
                        text(&p["p50_ms"]),
                        text(&p["p99_ms"]),
                        text(&p["p999_ms"]),
                        text(&p["max_ms"]),
                        text(&p["errors"]),
                        text(&p["pause_start_p99_ms"]),
                        text(&p["failovers"]),
                        text(&p["load_average"]),
                    ));
                }
            }
            Err(error) => md.push_str(&failed("get --paused-node", error)),
        }
        md.push_str("\n![the client under a paused node](report-paused.svg)\n");
        md
    }

    fn json(&self) -> Value {
        let part = |p: &Part| match p {
            Ok(v) => json!({"ok": v}),
            Err(e) => json!({"failed": e}),
        };
        json!({
            "began": self.began,
            "seconds": self.seconds,
            "quick": self.quick,
            "machine": {
                "cpu": self.machine_before.cpu,
                "cpus": self.machine_before.cpus,
                "memory": self.machine_before.memory,
                "kernel": self.machine_before.kernel,
                "load_before": self.machine_before.load,
                "load_after": self.machine_after.load,
                "commit": self.machine_before.commit,
            },
            "goals": self.goals().iter().map(|g| json!({
                "goal": g.what,
                "target": g.target,
                "measured": g.measured.as_ref().map(|m| &m.0),
                "met": g.measured.as_ref().map(|m| m.1),
            })).collect::<Vec<_>>(),
            "ingest": part(&self.ingest),
            "compare": part(&self.compare),
            "compare_table": self.compare_table,
            "paused": part(&self.paused),
            "restore": part(&self.restore),
        })
    }

    /// Writes the report's charts: throughput, read latency per call and phase, RSS and
    /// disk, restore times, and the client under a paused node.
    fn charts(&self, out: &Path) -> Result<()> {
        let mut ingest = Vec::new();
        if let Ok(i) = &self.ingest {
            for g in i["guarantees"].as_array().into_iter().flatten() {
                ingest.push(Bar::new(
                    format!(
                        "bench ingest, {}",
                        g["guarantee"].as_str().unwrap_or_default()
                    ),
                    num(g, "/events_per_second"),
                    KSTORE,
                ));
            }
        }
        if let Some((k, s)) = self.systems() {
            ingest.push(Bar::new(
                "compare: kstore, exactly-once",
                num(k, "/ingest_events_per_second"),
                KSTORE,
            ));
            ingest.push(Bar::new(
                "compare: Kafka Streams, exactly-once",
                num(s, "/ingest_events_per_second"),
                STREAMS,
            ));
        }
        ingest.push(Bar::new("goal, one node", Some(100_000.0), GOAL));
        bar_chart(
            &out.join("report-ingest.svg"),
            "ingest, events/s",
            "",
            &ingest,
        )?;

        let mut reads = Vec::new();
        let mut resources = Vec::new();
        if let Some((k, s)) = self.systems() {
            for (call, idle, busy) in [
                ("Health/Check", "health_check_idle", ""),
                ("Get", "get_idle", "get_under_ingest"),
                ("MultiGet", "multi_get_idle", "multi_get_under_ingest"),
                ("Scan page", "scan_page_idle", "scan_page_under_ingest"),
            ] {
                for (phase, key) in [("idle", idle), ("under ingest", busy)] {
                    for (system, values, color) in
                        [("kstore", k, KSTORE), ("Kafka Streams", s, STREAMS)]
                    {
                        if key.is_empty() || values["ghz"][key].is_null() {
                            continue;
                        }
                        for q in ["p50", "p99", "p99.9"] {
                            let field = q.replace('.', "");
                            reads.push(Bar::new(
                                format!("{system} {call}, {phase}, {q}"),
                                num(&values["ghz"][key], &format!("/{field}_ms")),
                                color,
                            ));
                        }
                    }
                }
            }
            for (what, field) in [
                ("peak RSS", "peak_rss_bytes"),
                ("steady RSS", "steady_rss_bytes"),
                ("disk after the ingest", "state_bytes"),
                ("disk once stopped", "stopped_state_bytes"),
                ("disk compacted", "compacted_state_bytes"),
            ] {
                for (system, values, color) in
                    [("kstore", k, KSTORE), ("Kafka Streams", s, STREAMS)]
                {
                    resources.push(Bar::new(
                        format!("{system}, {what}"),
                        num(values, &format!("/{field}")).map(|b| b / f64::from(1 << 20)),
                        color,
                    ));
                }
            }
        }
        bar_chart(
            &out.join("report-reads.svg"),
            "read latency measured by ghz, ms",
            " ms",
            &reads,
        )?;
        bar_chart(
            &out.join("report-resources.svg"),
            "RSS and state on disk, MiB",
            " MiB",
            &resources,
        )?;

        let mut restore = Vec::new();
        if let Ok(r) = &self.restore {
            for way in r["ways"].as_array().into_iter().flatten() {
                let name = way["way"].as_str().unwrap_or_default();
                let color = if name.starts_with("Kafka Streams") {
                    STREAMS
                } else {
                    KSTORE
                };
                restore.push(Bar::new(name, num(way, "/seconds"), color));
                if let Some(first) = num(way, "/first_answer_seconds") {
                    restore.push(Bar::new(
                        format!("{name}: start to first answer"),
                        Some(first),
                        color,
                    ));
                }
            }
        }
        bar_chart(
            &out.join("report-restore.svg"),
            "bringing a partition up, seconds",
            " s",
            &restore,
        )?;

        let mut paused = Vec::new();
        if let Ok(p) = &self.paused {
            for phase in p["phases"].as_array().into_iter().flatten() {
                let color = if phase["phase"] == "no fault" {
                    KSTORE
                } else {
                    STREAMS
                };
                for q in ["p99", "p999"] {
                    paused.push(Bar::new(
                        format!(
                            "{}, hedging {}, {}: {}",
                            phase["policy"].as_str().unwrap_or_default(),
                            phase["hedging"].as_str().unwrap_or_default(),
                            phase["phase"].as_str().unwrap_or_default(),
                            if q == "p99" { "p99" } else { "p99.9" }
                        ),
                        num(phase, &format!("/{q}_ms")),
                        color,
                    ));
                }
            }
        }
        bar_chart(
            &out.join("report-paused.svg"),
            "Get through kstore-client, no fault and with a node paused, ms",
            " ms",
            &paused,
        )
    }
}

fn failed(bench: &str, error: &str) -> String {
    format!("`bench {bench}` failed in this run, so its figures are missing: {error}\n")
}

fn mib(bytes: Option<f64>) -> f64 {
    bytes.unwrap_or(0.0) / f64::from(1 << 20)
}

/// Builds a goal row: `measured` against `met`, with `shortfall` describing a miss.
fn goal(
    what: &'static str,
    target: String,
    measured: Option<f64>,
    unit: &str,
    met: impl Fn(f64) -> bool,
    shortfall: impl Fn(f64) -> String,
) -> Goal {
    let text = |m: f64| {
        if m >= 1_000.0 {
            format!("{m:.0}{unit}")
        } else {
            format!("{m:.2}{unit}")
        }
    };
    Goal {
        what,
        target,
        measured: measured
            .filter(|m| m.is_finite())
            .map(|m| (text(m), met(m))),
        shortfall: measured.map(shortfall).unwrap_or_default(),
    }
}

/// kstore's ghz rows: every call and phase, with the Health/Check floor.
fn ghz_table(kstore: &Value) -> String {
    let ghz = &kstore["ghz"];
    if ghz.is_null() {
        return String::new();
    }
    let mut table = format!(
        "\nEvery call ghz {} made to kstore in this run (p50 / p99 / p99.9 in ms; MultiGet and \
         Scan at a tenth of the Get rate):\n\n| call | phase | p50 | p99 | p99.9 | failed / \
         calls |\n|---|---|---|---|---|---|\n",
        ghz["version"].as_str().unwrap_or_default()
    );
    for (call, key) in [
        ("Health/Check (no work)", "health_check_idle"),
        ("Get", "get_idle"),
        ("Get", "get_under_ingest"),
        ("MultiGet of 100 keys", "multi_get_idle"),
        ("MultiGet of 100 keys", "multi_get_under_ingest"),
        ("Scan page of 100", "scan_page_idle"),
        ("Scan page of 100", "scan_page_under_ingest"),
    ] {
        let l = &ghz[key];
        if l.is_null() {
            continue;
        }
        table.push_str(&format!(
            "| {call} | {} | {:.2} | {:.2} | {:.2} | {} / {} |\n",
            if key.ends_with("under_ingest") {
                "under ingest"
            } else {
                "idle"
            },
            num(l, "/p50_ms").unwrap_or(f64::NAN),
            num(l, "/p99_ms").unwrap_or(f64::NAN),
            num(l, "/p999_ms").unwrap_or(f64::NAN),
            l["errors"],
            l["calls"],
        ));
    }
    table
}

const KSTORE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const STREAMS: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const GOAL: RGBColor = RGBColor(0x99, 0x99, 0x99);

/// One bar of a chart; a figure the run did not measure is left out.
struct Bar {
    label: String,
    value: Option<f64>,
    color: RGBColor,
}

impl Bar {
    fn new(label: impl Into<String>, value: Option<f64>, color: RGBColor) -> Bar {
        Bar {
            label: label.into(),
            value,
            color,
        }
    }
}

/// A horizontal bar chart, one labelled bar per figure, top to bottom.
fn bar_chart(path: &Path, title: &str, unit: &str, bars: &[Bar]) -> Result<()> {
    let bars: Vec<(&Bar, f64)> = bars
        .iter()
        .filter_map(|b| Some((b, b.value.filter(|v| v.is_finite())?)))
        .collect();
    let rows = bars.len().max(1);
    let height = 70 + 24 * rows as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(28)
        .build_cartesian_2d(0.0..max * 1.9, 0.0..rows as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .draw()?;
    for (i, (bar, value)) in bars.iter().enumerate() {
        let top = (rows - i) as f64 - 0.15;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, top), (*value, top - 0.7)],
            bar.color.filled(),
        )))?;
        let figure = if *value >= 1_000.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.2}")
        };
        chart.draw_series(std::iter::once(Text::new(
            format!("{}: {figure}{unit}", bar.label),
            (value + max * 0.02, top - 0.1),
            ("sans-serif", 13),
        )))?;
    }
    root.present()?;
    Ok(())
}
