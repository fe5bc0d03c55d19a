//! `deploy/` checked against the node, since no cluster runs here: every Kubernetes manifest
//! parses as its typed object (and nothing in it is a field Kubernetes does not know), the
//! config in the ConfigMap loads with the node's own parser with the pod's environment, and
//! the invariants hold: ports agree with that config, the grace period outlasts a drain,
//! probes ask paths the node serves on its metrics port, anti-affinity keeps copies apart,
//! the disruption budget is one. The Dockerfile runs as the user the StatefulSet expects and
//! its health check is a command that exists; every metric the Grafana dashboard and the
//! alerting rules use is one the node exports, and every alert has its runbook section.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Probe, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kstore_server::config::NodeConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn repo() -> PathBuf {
    // The checkout being tested (cargo sets it when it runs the test), not the one this
    // binary happened to be compiled in.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(repo().join(path)).with_context(|| format!("reading {path}"))
}

/// Every object of a Kubernetes manifest directory, by kind, each checked to parse as its
/// typed object and to say nothing the type does not know.
#[derive(Default)]
struct Manifests {
    stateful_sets: Vec<StatefulSet>,
    services: Vec<Service>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    budgets: Vec<PodDisruptionBudget>,
    files: BTreeSet<String>,
}

/// Parses `value` as `T` and checks that serializing it back gives the same document: a
/// misspelt or misplaced field (which the typed parse would skip) fails here.
fn typed<T: DeserializeOwned + Serialize>(value: serde_json::Value, file: &str) -> Result<T> {
    let object: T = serde_json::from_value(value.clone())
        .with_context(|| format!("{file}: not a valid object"))?;
    let back = serde_json::to_value(&object)?;
    let mut differences = Vec::new();
    differ(&value, &back, String::new(), &mut differences);
    ensure!(
        differences.is_empty(),
        "{file}: fields that Kubernetes does not know, or values it would change: {differences:#?}"
    );
    Ok(object)
}

/// Where `written` and `parsed` differ, as paths with both values.
fn differ(
    written: &serde_json::Value,
    parsed: &serde_json::Value,
    path: String,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (written, parsed) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                differ(x, y, format!("{path}.{key}"), out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differ(x, y, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: written {a}, parsed {b}")),
        _ => {}
    }
}

fn load_manifests() -> Result<Manifests> {
    let mut manifests = Manifests::default();
    let dir = repo().join("deploy/k8s");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        manifests.files.insert(name.clone());
        let text = std::fs::read_to_string(&path)?;
        for document in serde_norway::Deserializer::from_str(&text) {
            let yaml = serde_norway::Value::deserialize(document)
                .with_context(|| format!("{name}: not YAML"))?;
            if yaml.is_null() {
                continue;
            }
            let value = serde_json::to_value(&yaml)?;
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "StatefulSet" => manifests.stateful_sets.push(typed(value, &name)?),
                "Service" => manifests.services.push(typed(value, &name)?),
                "ConfigMap" => manifests.config_maps.push(typed(value, &name)?),
                "Secret" => manifests.secrets.push(typed(value, &name)?),
                "PodDisruptionBudget" => manifests.budgets.push(typed(value, &name)?),
                other => bail!("{name}: a {other:?} is not checked by this test; add it here"),
            }
        }
    }
    Ok(manifests)
}

use serde::Deserialize as _;

/// The pod's environment as the kubelet gives it to the node: field references and secrets
/// filled in (`kstore-0` in namespace `kstore`), `$(VAR)` expanded.
fn pod_environment(container: &Container, secrets: &[Secret]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            let mut expanded = value.clone();
            for (name, earlier) in &env {
                expanded = expanded.replace(&format!("$({name})"), earlier);
            }
            ensure!(
                !expanded.contains("$("),
                "{}: unresolved {expanded}",
                var.name
            );
            expanded
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                match field.field_path.as_str() {
                    "metadata.name" => "kstore-0".to_owned(),
                    "metadata.namespace" => "kstore".to_owned(),
                    other => bail!("{}: field {other} is not simulated", var.name),
                }
            } else if let Some(key) = &from.secret_key_ref {
                let secret = secrets
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(key.name.as_str()))
                    .with_context(|| format!("{}: no Secret {}", var.name, key.name))?;
                let held = secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&key.key))
                    || secret
                        .data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&key.key));
                ensure!(
                    held,
                    "{}: Secret {} has no key {}",
                    var.name,
                    key.name,
                    key.key
                );
                "a-secret-of-thirty-two-characters".to_owned()
            } else {
                bail!("{}: a value source this test does not simulate", var.name);
            }
        } else {
            String::new()
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

fn port_of(address: &str) -> Result<i32> {
    Ok(address
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("{address} is not an address"))?
        .port()
        .into())
}

struct Deployed {
    manifests: Manifests,
    set: StatefulSet,
    container: Container,
    config: NodeConfig,
    env: Vec<(String, String)>,
}

fn deployed() -> Result<Deployed> {
    let manifests = load_manifests()?;
    ensure!(manifests.stateful_sets.len() == 1, "one StatefulSet");
    let set = manifests.stateful_sets[0].clone();
    let pod = set
        .spec
        .as_ref()
        .context("spec")?
        .template
        .spec
        .clone()
        .context("pod spec")?;
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "kstore-node")
        .context("a kstore-node container")?
        .clone();
    let env = pod_environment(&container, &manifests.secrets)?;
    let config_path = env
        .iter()
        .find(|(k, _)| k == "KSTORE_CONFIG")
        .map(|(_, v)| v.clone())
        .context("KSTORE_CONFIG")?;
    // The ConfigMap mounted where KSTORE_CONFIG points.
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| config_path.starts_with(&format!("{}/", m.mount_path)))
        .context("KSTORE_CONFIG is not on a mounted volume")?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .context("the config volume")?;
    let map_name = volume
        .config_map
        .as_ref()
        .context("a ConfigMap volume")?
        .name
        .clone();
    let map = manifests
        .config_maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(map_name.as_str()))
        .with_context(|| format!("no ConfigMap {map_name}"))?;
    let file_name = Path::new(&config_path)
        .file_name()
        .unwrap()
        .to_string_lossy();
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get(file_name.as_ref()))
        .with_context(|| format!("ConfigMap {map_name} has no {file_name}"))?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(file_name.as_ref());
    std::fs::write(&file, text)?;
    let node_env = env.iter().filter(|(k, _)| k != "KSTORE_CONFIG").cloned();
    let config = NodeConfig::load(Some(&file), node_env, &[])
        .context("the ConfigMap's config with the pod's environment")?;
    Ok(Deployed {
        manifests,
        set,
        container,
        config,
        env,
    })
}

fn named_port(container: &Container, port: &IntOrString) -> Result<(i32, String)> {
    let ports = container.ports.iter().flatten();
    let found = match port {
        IntOrString::Int(n) => ports.clone().find(|p| p.container_port == *n),
        IntOrString::String(name) => ports.clone().find(|p| p.name.as_deref() == Some(name)),
    };
    let found = found.with_context(|| format!("no container port {port:?}"))?;
    Ok((
        found.container_port,
        found.protocol.clone().unwrap_or_else(|| "TCP".into()),
    ))
}

#[test]
fn the_configmap_loads_with_the_nodes_parser_as_a_pod_sees_it() -> Result<()> {
    let deployed = deployed()?;
    let config = &deployed.config;
    ensure!(config.node_id == "kstore-0", "node id from the pod's name");
    ensure!(
        config.advertise_host == "kstore-0.kstore-peers.kstore.svc.cluster.local",
        "advertise-host: {}",
        config.advertise_host
    );
    ensure!(
        config.seeds == ["kstore-peers:7946"],
        "seeds: {:?}",
        config.seeds
    );
    ensure!(
        config.admin_token.is_some(),
        "the admin token comes from the Secret"
    );
    // Node ids come from the pod name, which the env maps straight through.
    let node_id = deployed.env.iter().find(|(k, _)| k == "KSTORE_NODE_ID");
    ensure!(node_id.is_some_and(|(_, v)| v == "kstore-0"));
    Ok(())
}

#[test]
fn ports_agree_with_the_config_the_pods_run() -> Result<()> {
    let Deployed {
        manifests,
        set,
        container,
        config,
        ..
    } = deployed()?;
    let wanted = [
        ("grpc", port_of(&config.grpc_address)?, "TCP"),
        ("metrics", port_of(&config.metrics_address)?, "TCP"),
        ("gossip", port_of(&config.gossip_address)?, "UDP"),
    ];
    for (name, port, protocol) in wanted {
        let (found, found_protocol) = named_port(&container, &IntOrString::String(name.into()))?;
        ensure!(
            (found, found_protocol.as_str()) == (port, protocol),
            "container port {name}: {found}/{found_protocol}, the config says {port}/{protocol}"
        );
    }
    let service_name = set
        .spec
        .as_ref()
        .unwrap()
        .service_name
        .clone()
        .unwrap_or_default();
    let headless = manifests
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(service_name.as_str()))
        .context("the StatefulSet's serviceName names no Service")?;
    let spec = headless.spec.as_ref().context("spec")?;
    ensure!(
        spec.cluster_ip.as_deref() == Some("None"),
        "{service_name} is headless"
    );
    ensure!(
        spec.publish_not_ready_addresses == Some(true),
        "{service_name} publishes pods that are not ready (gossip seeds)"
    );
    for service in &manifests.services {
        let name = service.metadata.name.clone().unwrap_or_default();
        let spec = service.spec.as_ref().context("spec")?;
        let selector = spec.selector.clone().unwrap_or_default();
        let labels = set
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap_or_default();
        ensure!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "Service {name} selects the pods"
        );
        for port in spec.ports.iter().flatten() {
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            let (container_port, protocol) = named_port(&container, &target)?;
            let service_protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            ensure!(
                protocol == service_protocol,
                "Service {name} port {:?}: {service_protocol} to a {protocol} port",
                port.name
            );
            ensure!(
                port.port == container_port,
                "Service {name} port {:?} is {}, the node listens on {container_port}",
                port.name,
                port.port
            );
        }
    }
    let client = manifests
        .services
        .iter()
        .find(|s| {
            s.spec
                .as_ref()
                .is_some_and(|s| s.cluster_ip.as_deref() != Some("None"))
        })
        .context("a client Service")?;
    ensure!(
        client
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .any(|p| p.port == port_of(&config.grpc_address).unwrap()),
        "the client Service serves gRPC"
    );
    // The advertised name is the pod's under the headless Service, and seeds are that Service.
    ensure!(
        config
            .advertise_host
            .starts_with(&format!("kstore-0.{service_name}."))
    );
    let gossip = port_of(&config.gossip_address)?;
    ensure!(
        !config.seeds.is_empty()
            && config.seeds.iter().all(|seed| {
                let host = seed.rsplit_once(':').map_or("", |(host, _)| host);
                (host == service_name || host.starts_with(&format!("{service_name}.")))
                    && seed.ends_with(&format!(":{gossip}"))
            }),
        "seeds must be the headless Service's gossip port: {:?}",
        config.seeds
    );
    Ok(())
}

#[test]
fn the_grace_period_outlasts_a_drain_and_sigterm_drains() -> Result<()> {
    let Deployed { set, config, .. } = deployed()?;
    let pod = set.spec.unwrap().template.spec.unwrap();
    let grace_ms = pod
        .termination_grace_period_seconds
        .context("terminationGracePeriodSeconds")?
        * 1000;
    ensure!(
        config.drain_on_shutdown,
        "SIGTERM drains the node (drain-on-shutdown)"
    );
    // Beyond the drain: leaving gossip, stopping the server, flushing (10 s is plenty).
    ensure!(
        grace_ms as u64 >= config.drain_timeout_ms + 10_000,
        "terminationGracePeriodSeconds ({grace_ms} ms) must exceed drain-timeout-ms ({}) by 10 s",
        config.drain_timeout_ms
    );
    Ok(())
}

fn probe_path(probe: &Option<Probe>, which: &str, container: &Container) -> Result<(String, i32)> {
    let probe = probe
        .as_ref()
        .with_context(|| format!("no {which} probe"))?;
    let get = probe
        .http_get
        .as_ref()
        .with_context(|| format!("{which}: not an HTTP GET"))?;
    let (port, _) = named_port(container, &get.port)?;
    Ok((get.path.clone().unwrap_or_default(), port))
}

#[test]
fn probes_ask_what_the_node_serves_on_its_metrics_port() -> Result<()> {
    let Deployed {
        container, config, ..
    } = deployed()?;
    let metrics = port_of(&config.metrics_address)?;
    for (probe, which, path) in [
        (&container.startup_probe, "startup", "/startupz"),
        (&container.readiness_probe, "readiness", "/readyz"),
        (&container.liveness_probe, "liveness", "/livez"),
    ] {
        let (asked, port) = probe_path(probe, which, &container)?;
        ensure!(asked == path, "the {which} probe asks {asked}, not {path}");
        ensure!(
            kstore_server::metrics::paths().any(|served| served == asked),
            "the node does not serve {asked}"
        );
        ensure!(
            port == metrics,
            "the {which} probe asks port {port}, metrics are on {metrics}"
        );
    }
    // A long restore: an hour before a node that has not opened its stores is restarted.
    let startup = container.startup_probe.as_ref().unwrap();
    let window = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    ensure!(
        window >= 3600,
        "the startup probe allows {window} s; allow an hour"
    );
    // Liveness tolerates a minute of unanswered probes (a busy machine), well under stall-after.
    let live = container.liveness_probe.as_ref().unwrap();
    let window = live.period_seconds.unwrap_or(10) * live.failure_threshold.unwrap_or(3);
    ensure!(window >= 30, "the liveness probe fails after {window} s");
    Ok(())
}

#[test]
fn anti_affinity_disruption_budget_and_volumes_keep_copies_apart_and_durable() -> Result<()> {
    let Deployed {
        manifests,
        set,
        container,
        config,
        ..
    } = deployed()?;
    let spec = set.spec.as_ref().unwrap();
    let labels: BTreeMap<String, String> = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap_or_default();
    let selects =
        |selector: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>| {
            selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
    ensure!(
        selects(&Some(spec.selector.clone())),
        "the StatefulSet's selector matches its pods"
    );
    let affinity = spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .affinity
        .as_ref()
        .context("affinity")?;
    let anti = affinity
        .pod_anti_affinity
        .as_ref()
        .context("pod anti-affinity")?;
    ensure!(
        anti.required_during_scheduling_ignored_during_execution
            .iter()
            .flatten()
            .any(|term| {
                term.topology_key == "kubernetes.io/hostname" && selects(&term.label_selector)
            }),
        "no two kstore pods on one machine (required anti-affinity on kubernetes.io/hostname)"
    );
    ensure!(manifests.budgets.len() == 1, "one PodDisruptionBudget");
    let budget = manifests.budgets[0].spec.as_ref().context("spec")?;
    ensure!(
        budget.max_unavailable == Some(IntOrString::Int(1)),
        "maxUnavailable: 1"
    );
    ensure!(budget.min_available.is_none(), "maxUnavailable only");
    ensure!(selects(&budget.selector), "the budget selects the pods");
    // The state directory is on a volume claim of each pod's own.
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == config.state_dir)
        .context("state-dir is not a mounted volume")?;
    ensure!(
        spec.volume_claim_templates
            .iter()
            .flatten()
            .any(|t| t.metadata.name.as_deref() == Some(mount.name.as_str())),
        "state-dir's volume comes from volumeClaimTemplates"
    );
    Ok(())
}

#[test]
fn kustomization_lists_every_manifest_but_the_secret_example() -> Result<()> {
    let manifests = load_manifests()?;
    let text = read("deploy/k8s/kustomization.yaml")?;
    let kustomization: serde_norway::Value = serde_norway::from_str(&text)?;
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .context("resources")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = manifests
        .files
        .iter()
        .filter(|f| !f.contains(".example."))
        .cloned()
        .collect();
    ensure!(
        listed == expected,
        "kustomization lists {listed:?}, the directory has {expected:?}"
    );
    Ok(())
}

#[test]
fn the_image_runs_as_the_pods_user_with_a_health_check_that_exists() -> Result<()> {
    let Deployed { set, .. } = deployed()?;
    let dockerfile = read("deploy/Dockerfile")?;
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .context("the image sets a USER")?;
    let uid: i64 = user[5..].split(':').next().unwrap().trim().parse()?;
    ensure!(uid != 0, "the image runs as root");
    let pod = set.spec.unwrap().template.spec.unwrap();
    ensure!(
        pod.security_context.and_then(|s| s.run_as_user) == Some(uid),
        "the pods run as the image's user {uid}"
    );
    let health = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .context("the image has a HEALTHCHECK")?;
    ensure!(
        health.contains(r#"CMD ["kstore-node", "probe", "live""#),
        "the HEALTHCHECK runs `kstore-node probe live`: {health}"
    );
    ensure!(
        dockerfile.contains("COPY --from=binaries /out/kstore-node /out/kstore /usr/local/bin/"),
        "the image ships kstore-node and kstore"
    );
    Ok(())
}

/// Every `kstore_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kstore_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

fn exported(name: &str) -> bool {
    use kstore_server::metrics::{ALL, HISTOGRAMS};
    ALL.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| HISTOGRAMS.contains(&base))
        })
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_alerts_use_only_metrics_the_node_exports() -> Result<()> {
    let mut exprs = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/kstore.json")?).context("the dashboard")?;
    collect_exprs(&dashboard, &mut exprs);
    let dashboard_count = exprs.len();
    ensure!(
        dashboard_count >= 10,
        "the dashboard has {dashboard_count} queries"
    );
    let rules: serde_norway::Value =
        serde_norway::from_str(&read("deploy/prometheus/kstore-alerts.yaml")?)?;
    collect_exprs(&serde_json::to_value(&rules)?, &mut exprs);
    ensure!(exprs.len() > dashboard_count, "the rules have expressions");
    let mut unknown = BTreeSet::new();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            if exported(&name) {
                used.insert(name);
            } else {
                unknown.insert(name);
            }
        }
    }
    ensure!(unknown.is_empty(), "the node exports none of {unknown:?}");
    ensure!(used.len() >= 15, "only {} metrics used", used.len());
    Ok(())
}

#[test]
fn every_alert_has_a_runbook_section() -> Result<()> {
    let rules: serde_norway::Value =
        serde_norway::from_str(&read("deploy/prometheus/kstore-alerts.yaml")?)?;
    let operations = read("docs/OPERATIONS.md")?;
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let runbook = rule["annotations"]["runbook"]
                .as_str()
                .with_context(|| format!("{alert}: no runbook annotation"))?;
            let anchor = runbook
                .strip_prefix("docs/OPERATIONS.md#")
                .with_context(|| {
                    format!("{alert}: runbook {runbook} is not in docs/OPERATIONS.md")
                })?;
            ensure!(
                anchors.contains(anchor),
                "{alert}: OPERATIONS.md has no section #{anchor}"
            );
            ensure!(rule["expr"].as_str().is_some(), "{alert}: no expr");
        }
    }
    ensure!(alerts >= 6, "{alerts} alerts");
    Ok(())
}

#[test]
fn tls_files_come_from_a_tls_secret_mounted_whole() -> Result<()> {
    let Deployed {
        set,
        container,
        config,
        ..
    } = deployed()?;
    let tls = config.tls.as_ref().context("[tls] in the ConfigMap")?;
    let pod = set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    for (key, path, file) in [
        ("cert", &tls.cert, "tls.crt"),
        ("key", &tls.key, "tls.key"),
        ("ca", &tls.ca, "ca.crt"),
        ("client-ca", &tls.client_ca, "ca.crt"),
    ] {
        ensure!(
            path.file_name() == Some(file.as_ref()),
            "tls.{key} is the kubernetes.io/tls Secret's {file}"
        );
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
            .with_context(|| format!("tls.{key} is not on a mounted volume"))?;
        // The kubelet never updates a subPath mount: renewed certificates would not arrive.
        ensure!(mount.sub_path.is_none(), "the TLS Secret is mounted whole");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .context("the TLS volume")?;
        ensure!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref())
                == Some("kstore-tls"),
            "tls.{key} comes from the kstore-tls Secret"
        );
    }
    Ok(())
}
