//! TLS and mutual TLS on a real 3-node cluster with a cluster secret: the smart client reads
//! exact values with the right certificates, a node forwards a read to another over TLS,
//! callers without a certificate, with one from another CA or with an expired one are
//! refused with an error that says so, and the nodes' certificates rotate on SIGHUP while a
//! reader loops without a single failed read.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_client::{Client, tls_from_files};
use kstore_core::orders::OrderEvent;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{CustomerFeatures, GetRequest, get_response};
use kstore_testkit::process::http_get;
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{ClientTlsConfig, Endpoint};

const PARTITIONS: u32 = 6;
const CUSTOMERS: u32 = 200;
const EVENTS: u64 = 2_000;
const SECRET: &str = "tls-test-cluster-secret-of-32-bytes-or-more";

/// A certificate authority for the test.
type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Result<Ca> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// Writes a certificate signed by `ca` and its key to `<dir>/<name>.pem` and
/// `<dir>/<name>-key.pem` (each through a rename, so a reader never sees half a file), and
/// returns the certificate's DER.
fn leaf(
    ca: &Ca,
    dir: &Path,
    name: &str,
    sans: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
    serial: u64,
    expired: bool,
) -> Result<CertificateDer<'static>> {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    params.serial_number = Some(serial.into());
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    for (file, text) in [
        (format!("{name}.pem"), cert.pem()),
        (format!("{name}-key.pem"), key.serialize_pem()),
    ] {
        let temporary = dir.join(format!(".{file}.new"));
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, dir.join(file))?;
    }
    Ok(cert.der().clone())
}

fn node_cert(ca: &Ca, dir: &Path, serial: u64) -> Result<CertificateDer<'static>> {
    leaf(
        ca,
        dir,
        "node",
        &["127.0.0.1", "localhost"],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        serial,
        false,
    )
}

/// The client's TLS settings: trust `ca.pem`, present `<name>.pem` if given.
fn client_tls(dir: &Path, name: Option<&str>) -> Result<ClientTlsConfig> {
    let file = |suffix: &str| name.map(|n| dir.join(format!("{n}{suffix}.pem")));
    let (cert, key) = (file(""), file("-key"));
    Ok(tls_from_files(
        Some(&dir.join("ca.pem")),
        cert.as_deref(),
        key.as_deref(),
    )?)
}

/// A Query client for one node over TLS.
async fn query_client(
    address: &str,
    tls: ClientTlsConfig,
) -> Result<QueryClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(QueryClient::new(channel))
}

/// The certificate a node serves now, seen from a fresh client connection.
async fn served_certificate(address: &str, dir: &Path) -> Result<CertificateDer<'static>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
        roots.add(cert?)?;
    }
    let chain =
        CertificateDer::pem_file_iter(dir.join("client.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let host = address.rsplit_once(':').context("no port")?.0.to_owned();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host)?, tcp)
        .await?;
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .context("the node sent no certificate")?
        .clone()
        .into_owned();
    Ok(served)
}

fn customers() -> Vec<String> {
    (0..CUSTOMERS).map(OrderGenerator::customer_id).collect()
}

fn forwarded_reads(metrics: &str) -> Result<f64> {
    let text = http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("kstore_forwarded_reads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Builds a client with `tls` and expects the seed to refuse it: the client's error says a
/// certificate was refused, and the node's log says which check failed (`logged`).
async fn expect_refused(
    seed: &Node,
    address: &str,
    app: &str,
    tls: ClientTlsConfig,
    case: &str,
    logged: &str,
) -> Result<()> {
    let failures_before = seed
        .process
        .output()
        .matches("TLS handshake failed")
        .count();
    let built = Client::builder()
        .seeds([address.to_owned()])
        .cluster_id(app.to_owned())
        .connect_timeout(Duration::from_secs(3))
        .tls(tls)
        .build()
        .await;
    let error = match built {
        Ok(_) => bail!("{case}: the node accepted the client"),
        Err(error) => error.to_string(),
    };
    eprintln!("{case}: refused: {error}");
    ensure!(
        error.to_lowercase().contains("certificate"),
        "{case}: the error does not say a certificate was refused: {error}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = seed.process.output();
        let failures: Vec<&str> = output
            .lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .skip(failures_before)
            .collect();
        if failures
            .iter()
            .any(|l| l.to_lowercase().contains(&logged.to_lowercase()))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{case}: the node's log does not say {logged:?}: {failures:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn mutual_tls_cluster_reads_refuses_bad_certificates_and_rotates_without_failing_a_read()
-> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("tls", PARTITIONS).await?;
        let pki: PathBuf = scenario.dir.path().join("pki");
        std::fs::create_dir_all(&pki)?;
        let authority = ca("kstore test CA")?;
        std::fs::write(pki.join("ca.pem"), authority.pem())?;
        let first = node_cert(&authority, &pki, 1)?;
        let client_usage = || vec![ExtendedKeyUsagePurpose::ClientAuth];
        leaf(
            &authority,
            &pki,
            "client",
            &["client"],
            client_usage(),
            100,
            false,
        )?;
        leaf(
            &authority,
            &pki,
            "expired",
            &["client"],
            client_usage(),
            101,
            true,
        )?;
        let stranger = ca("another CA")?;
        leaf(
            &stranger,
            &pki,
            "stranger",
            &["client"],
            client_usage(),
            102,
            false,
        )?;

        scenario.extra.extend([
            format!("cluster-secret={SECRET}"),
            "metrics-address=127.0.0.1:0".into(),
            format!("tls.cert={}", pki.join("node.pem").display()),
            format!("tls.key={}", pki.join("node-key.pem").display()),
            format!("tls.ca={}", pki.join("ca.pem").display()),
            format!("tls.client-ca={}", pki.join("ca.pem").display()),
            // Only SIGHUP reloads here (the polling is covered by the unit tests).
            "tls.reload-interval-ms=3600000".into(),
        ]);

        let generator = GeneratorConfig {
            customers: CUSTOMERS,
            seed: 7,
            ..GeneratorConfig::default()
        };
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take(EVENTS as usize)
            .collect();
        scenario.produce(&generator, EVENTS)?;
        let expected = expected_features(&events);

        let ids = ["node-1", "node-2", "node-3"];
        let mut nodes = Vec::new();
        let mut addresses = Vec::new();
        let mut metrics = Vec::new();
        for id in ids {
            let mut process = scenario.start_node(id, "only")?;
            let address = process.logged_address("serving gRPC", Duration::from_secs(120))?;
            scenario.wait_gossiping(&mut process)?;
            metrics.push(scenario.metrics_address(&mut process)?);
            let client = query_client(&address, client_tls(&pki, Some("client"))?).await?;
            addresses.push(address);
            nodes.push(Node {
                id: id.to_owned(),
                process,
                client,
            });
        }
        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        {
            let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
            wait_for_agreement(&mut refs, &ids, Duration::from_secs(120)).await?;
        }

        // The smart client, with the right certificates, reads the exact values.
        let client = Client::builder()
            .seeds([addresses[0].clone()])
            .cluster_id(scenario.app.clone())
            .tls(client_tls(&pki, Some("client"))?)
            .build()
            .await?;
        for customer in customers() {
            let answer = client
                .get_as::<CustomerFeatures>(customer.as_bytes())
                .await?;
            ensure!(
                answer.value.as_ref() == expected.get(&customer),
                "{customer}"
            );
        }

        // A plain client asks node-1 for every key: the keys it does not hold are forwarded
        // to their holders, over TLS with node-1's certificate.
        let before: f64 = metrics
            .iter()
            .map(|m| forwarded_reads(m))
            .sum::<Result<f64>>()?;
        for customer in customers() {
            let answer = nodes[0]
                .client
                .get(GetRequest {
                    store: "features".into(),
                    key: customer.clone().into_bytes(),
                    ..GetRequest::default()
                })
                .await
                .with_context(|| format!("reading {customer} through node-1"))?
                .into_inner();
            let value = match answer.value {
                Some(get_response::Value::Message(any)) => {
                    Some(CustomerFeatures::decode(any.value.as_slice())?)
                }
                Some(get_response::Value::Raw(raw)) => {
                    Some(CustomerFeatures::decode(raw.as_slice())?)
                }
                None => None,
            };
            ensure!(
                value.as_ref() == expected.get(&customer),
                "{customer} through node-1"
            );
        }
        let after: f64 = metrics
            .iter()
            .map(|m| forwarded_reads(m))
            .sum::<Result<f64>>()?;
        ensure!(
            after > before,
            "node-1 forwarded no read ({before} then {after})"
        );

        // Copies bootstrapped from peers' snapshots, fetched over TLS with the node's
        // certificate; none was refused as unreachable.
        let mut fetched = 0.0;
        for address in &metrics {
            let text = http_get(address, "/metrics")?;
            for line in text.lines() {
                if line.starts_with("kstore_snapshots_fetched_total") && line.contains("\"ok\"") {
                    fetched += line.rsplit(' ').next().unwrap_or("0").parse::<f64>()?;
                }
                ensure!(
                    !(line.starts_with("kstore_snapshot_refusals_total")
                        && line.contains("unreachable")),
                    "a peer's snapshot was unreachable: {line}"
                );
            }
        }
        eprintln!("snapshots fetched from peers over TLS: {fetched}");
        // node-1 ingested everything before the others joined: their copies came from it.
        ensure!(fetched > 0.0, "no snapshot was fetched from a peer");

        // Callers the nodes must refuse.
        for (name, case, logged) in [
            (None, "no client certificate", "no certificates"),
            (
                Some("stranger"),
                "a certificate from another CA",
                "UnknownIssuer",
            ),
            (Some("expired"), "an expired certificate", "expired"),
        ] {
            let tls = client_tls(&pki, name)?;
            expect_refused(&nodes[1], &addresses[1], &scenario.app, tls, case, logged).await?;
        }
        // A client without TLS is told that the node most likely speaks TLS, and how to
        // give it what it needs.
        let plaintext = Client::builder()
            .seeds([addresses[1].clone()])
            .cluster_id(scenario.app.clone())
            .connect_timeout(Duration::from_secs(3))
            .build()
            .await;
        match plaintext {
            Ok(_) => bail!("a plaintext client was answered by a TLS node"),
            Err(error) => {
                let error = error.to_string();
                eprintln!("plaintext client: {error}");
                ensure!(
                    error.contains("speaks TLS") && error.contains("--ca"),
                    "a plaintext client's error does not say the node speaks TLS: {error}"
                );
            }
        }

        // Rotation: new node certificates (a new key too), then SIGHUP, while a reader loops.
        let stop = Arc::new(AtomicBool::new(false));
        let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let reader = {
            let (stop, reads, failures) = (stop.clone(), reads.clone(), failures.clone());
            let expected = expected.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let keys = customers();
                let mut at = 0;
                while !stop.load(Ordering::Relaxed) {
                    let customer = &keys[at % keys.len()];
                    at += 1;
                    match client.get_as::<CustomerFeatures>(customer.as_bytes()).await {
                        Ok(answer) if answer.value.as_ref() == expected.get(customer) => {}
                        Ok(_) => {
                            eprintln!("rotation: wrong value for {customer}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            eprintln!("rotation: reading {customer}: {error}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = node_cert(&authority, &pki, 2)?;
        ensure!(first != second);
        for node in &nodes {
            let status = std::process::Command::new("kill")
                .args(["-HUP", &node.process.pid().to_string()])
                .status()?;
            ensure!(status.success(), "kill -HUP {}", node.id);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            while !node.process.output().contains("TLS certificates reloaded") {
                ensure!(
                    Instant::now() < deadline,
                    "{} did not reload its certificates:\n{}",
                    node.id,
                    node.process.tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Fresh connections (the reader's new ones, a new client's) get the new certificate.
        for address in &addresses {
            let served = served_certificate(address, &pki).await?;
            ensure!(
                served == second,
                "{address} still serves the old certificate"
            );
        }
        let fresh = Client::builder()
            .seeds([addresses[2].clone()])
            .cluster_id(scenario.app.clone())
            .tls(client_tls(&pki, Some("client"))?)
            .build()
            .await?;
        for customer in customers() {
            let answer = fresh
                .get_as::<CustomerFeatures>(customer.as_bytes())
                .await?;
            ensure!(
                answer.value.as_ref() == expected.get(&customer),
                "{customer} after rotation"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        reader.await?;
        let (reads, failures) = (
            reads.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed),
        );
        eprintln!("rotation: {reads} reads, {failures} failed");
        ensure!(reads > 100, "the reader read only {reads} times");
        ensure!(
            failures == 0,
            "{failures} of {reads} reads failed during the rotation"
        );

        for mut node in nodes {
            node.process.terminate(Duration::from_secs(60))?;
        }
        Ok(())
    })
}
