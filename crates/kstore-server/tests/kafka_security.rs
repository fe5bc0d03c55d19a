//! kstore against a secured Kafka: a broker of these tests' own, beside the shared one,
//! with an SSL listener that requires client certificates (mTLS) and a SASL_SSL listener
//! with SCRAM-SHA-256 and SCRAM-SHA-512, its certificates made here with rcgen. Nodes
//! ingest exactly once over each and a drained node's partitions move at once (its
//! LeaveGroup goes over the same TLS and SASL); wrong settings stop a node at start with what
//! to fix.
//!
//! The broker listens on ports 39192 (PLAINTEXT, for the tests' own topic admin), 39193
//! (its controller), 39194 (SSL) and 39195 (SASL_SSL), with its state in
//! `<tmp>/kstore-kafka-39192/`; it stops by itself once no test process has used it for
//! 30 seconds.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_kafka::local::{Broker, ScramUser, SecureListeners};
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::{CustomerFeatures, DrainRequest, GetRequest, Role, get_response};
use kstore_server::kafka::connect::{ConnectError, Connector};
use kstore_testkit::TestKafka;
use kstore_testkit::process::TestProcess;
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

const PLAINTEXT_PORT: u16 = 39192;
const SSL_PORT: u16 = 39194;
const SASL_SSL_PORT: u16 = 39195;
const PARTITIONS: u32 = 6;
const USER: &str = "kstore-node";
const PASSWORD: &str = "kstore-test-password";

/// The secured broker and the files a client needs for it.
struct SecureKafka {
    kafka: TestKafka,
    certs: PathBuf,
    _lease: File,
}

impl SecureKafka {
    fn file(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    /// `kafka.*` settings of a node on the mTLS listener.
    fn mtls(&self) -> Vec<(String, String)> {
        pairs(&[
            ("bootstrap.servers", &format!("127.0.0.1:{SSL_PORT}")),
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &self.file("ca.pem")),
            ("ssl.certificate.location", &self.file("client.pem")),
            ("ssl.key.location", &self.file("client.key")),
        ])
    }

    /// `kafka.*` settings of a node on the SASL_SSL listener.
    fn scram(&self, mechanism: &str, password: &str) -> Vec<(String, String)> {
        pairs(&[
            ("bootstrap.servers", &format!("127.0.0.1:{SASL_SSL_PORT}")),
            ("security.protocol", "sasl_ssl"),
            ("ssl.ca.location", &self.file("ca.pem")),
            ("sasl.mechanism", mechanism),
            ("sasl.username", USER),
            ("sasl.password", password),
        ])
    }
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `--set kafka.<key>=<value>` overrides for a node.
fn node_settings(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .map(|(key, value)| format!("kafka.{key}={value}"))
        .collect()
}

fn secure_kafka() -> &'static SecureKafka {
    static KAFKA: OnceLock<SecureKafka> = OnceLock::new();
    KAFKA.get_or_init(|| match start_secure_kafka() {
        Ok(kafka) => kafka,
        Err(error) => panic!("no secured Kafka broker for the tests: {error:#}"),
    })
}

fn start_secure_kafka() -> Result<SecureKafka> {
    let broker = Broker::on_port(PLAINTEXT_PORT);
    let certs = broker.state_dir().join("certs");
    // A broker still running from an earlier test process keeps the certificates it
    // started with; a new one gets new ones.
    if !(broker.is_healthy() && certs.join("ca.pem").exists()) {
        make_certificates(&certs)?;
    }
    let mut scram_users = Vec::new();
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        scram_users.push(ScramUser {
            mechanism: mechanism.into(),
            name: USER.into(),
            password: PASSWORD.into(),
        });
    }
    let broker = broker.with_secure_listeners(SecureListeners {
        ssl_port: SSL_PORT,
        sasl_ssl_port: SASL_SSL_PORT,
        certificate_chain: certs.join("broker.pem"),
        private_key: certs.join("broker.key"),
        client_ca: certs.join("ca.pem"),
        scram_users,
    });
    let started = Instant::now();
    let (how, lease) = broker.start_leased()?;
    eprintln!(
        "secured broker {how:?} in {:?} at {}",
        started.elapsed(),
        broker.bootstrap()
    );
    Ok(SecureKafka {
        kafka: TestKafka::at(&broker.bootstrap()),
        certs,
        _lease: lease,
    })
}

/// Writes a CA, the broker's certificate (for 127.0.0.1 and localhost) and key, a client
/// certificate and key signed by the CA, and another CA that signed nothing here.
fn make_certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca = certificate_authority("kstore test CA")?;
    let other_ca = certificate_authority("another CA")?;

    let mut broker = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    broker
        .distinguished_name
        .push(DnType::CommonName, "kstore test broker");
    broker.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let broker_key = KeyPair::generate()?;
    let broker_cert = broker.signed_by(&broker_key, &ca)?;

    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(DnType::CommonName, USER);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &ca)?;

    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("other-ca.pem", other_ca.pem()),
        ("broker.pem", broker_cert.pem()),
        ("broker.key", broker_key.serialize_pem()),
        ("client.pem", client_cert.pem()),
        ("client.key", client_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

fn certificate_authority(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn connector(settings: &[(String, String)]) -> Result<Connector> {
    Ok(Connector::from_settings(
        &settings.iter().cloned().collect(),
    )?)
}

/// Two nodes ingest exactly once over `security`; one of them drains while events keep
/// coming, and its partitions must move well before the session timeout; the other then
/// holds the exact state of every customer.
async fn ingest_exactly_once_then_drain(name: &str, security: Vec<(String, String)>) -> Result<()> {
    let kafka = &secure_kafka().kafka;
    let mut scenario = Scenario::on(kafka, name, PARTITIONS).await?;
    // Without leaving the group, a drained static member's partitions would wait this long.
    let session_timeout = Duration::from_secs(60);
    scenario.extra = node_settings(&security);
    // The default, said here because it is what the test is about: transactions over TLS
    // and SASL.
    scenario
        .extra
        .push("processing-guarantee=exactly-once".into());
    scenario.extra.push(format!(
        "kafka.session.timeout.ms={}",
        session_timeout.as_millis()
    ));
    let generator = GeneratorConfig {
        customers: 200,
        seed: 18,
        ..GeneratorConfig::default()
    };
    let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone()).take(4_000).collect();
    scenario.produce(&generator, 2_000)?;

    let mut node1 = Node::start(&scenario, "node-1", "only").await?;
    let mut node2 = Node::start(&scenario, "node-2", "only").await?;
    ensure!(
        node1
            .process
            .output()
            .contains("the brokers accept the node's Kafka security settings"),
        "node-1 did not check its settings:\n{}",
        node1.process.tail()
    );
    wait_for_agreement(
        &mut [&mut node1, &mut node2],
        &["node-1", "node-2"],
        Duration::from_secs(120),
    )
    .await?;

    let mut admin = AdminClient::connect(format!(
        "http://{}",
        node2
            .process
            .logged_address("serving gRPC", Duration::from_secs(5))?
    ))
    .await?;
    let drained = Instant::now();
    let answer = admin.drain(DrainRequest {}).await?.into_inner();
    ensure!(answer.node_id == "node-2" && !answer.active_partitions.is_empty());
    scenario.produce_from(&generator, 2_000, 2_000)?;
    let status = node2.process.wait_exit(Duration::from_secs(120))?;
    let took = drained.elapsed();
    let output = node2.process.output();
    ensure!(
        status.success() && output.contains("left the consumer group"),
        "node-2 exit {status}, without leaving the group:\n{}",
        node2.process.tail()
    );
    ensure!(
        output.contains("drained: every partition") && took < session_timeout,
        "the drain took {took:?}: its partitions waited for the session timeout\n{}",
        node2.process.tail()
    );
    eprintln!("{name}: node-2 drained in {took:?}");

    scenario.wait_caught_up(&mut node1.process, Duration::from_secs(120))?;
    let expected = expected_features(&events);
    let deadline = Instant::now() + Duration::from_secs(60);
    for customer in (0..200).map(OrderGenerator::customer_id) {
        loop {
            let answer = node1
                .client
                .get(GetRequest {
                    store: "features".into(),
                    key: customer.as_bytes().to_vec(),
                    partition: None,
                    options: None,
                })
                .await?
                .into_inner();
            let read = answer.read.clone().context("read metadata")?;
            let features = match &answer.value {
                Some(get_response::Value::Message(any)) => {
                    Some(CustomerFeatures::decode(any.value.as_slice())?)
                }
                _ => None,
            };
            if read.role() == Role::Active && features.as_ref() == expected.get(&customer) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{customer}: {read:?} {features:?}, expected {:?}",
                expected.get(&customer)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let status = node1.process.terminate(Duration::from_secs(60))?;
    ensure!(status.success(), "node-1 exit: {status}");
    Ok(())
}

#[test]
fn nodes_ingest_exactly_once_and_drain_at_once_over_mtls() -> Result<()> {
    let security = secure_kafka().mtls();
    run_async(ingest_exactly_once_then_drain("kafka-mtls", security))
}

#[test]
fn nodes_ingest_exactly_once_and_drain_at_once_over_sasl_ssl_with_scram_sha_512() -> Result<()> {
    let security = secure_kafka().scram("SCRAM-SHA-512", PASSWORD);
    run_async(ingest_exactly_once_then_drain("kafka-scram", security))
}

#[test]
fn the_drain_connection_speaks_scram_sha_256_and_sha_512_and_names_what_to_fix() -> Result<()> {
    let kafka = secure_kafka();
    let timeout = Duration::from_secs(10);
    let sasl_ssl = format!("127.0.0.1:{SASL_SSL_PORT}");
    let ssl = format!("127.0.0.1:{SSL_PORT}");
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let answered = connector(&kafka.scram(mechanism, PASSWORD))?.check(&sasl_ssl, timeout)?;
        ensure!(answered == sasl_ssl);
    }
    connector(&kafka.mtls())?.check(&ssl, timeout)?;

    let expect = |error: ConnectError, words: &[&str]| -> Result<()> {
        let message = error.to_string();
        eprintln!("{message}");
        ensure!(
            error.is_configuration(),
            "not a configuration error: {message}"
        );
        for word in words {
            ensure!(message.contains(word), "{message:?} does not say {word:?}");
        }
        Ok(())
    };
    let wrong_password = connector(&kafka.scram("SCRAM-SHA-512", "not-the-password"))?
        .check(&sasl_ssl, timeout)
        .unwrap_err();
    expect(
        wrong_password,
        &["kafka.sasl.username", "kafka.sasl.password"],
    )?;

    let mut wrong_ca = kafka.mtls();
    wrong_ca[2].1 = kafka.file("other-ca.pem");
    let wrong_ca = connector(&wrong_ca)?.check(&ssl, timeout).unwrap_err();
    expect(
        wrong_ca,
        &["not signed by a trusted CA", "kafka.ssl.ca.location"],
    )?;

    let no_client_certificate: Vec<_> = kafka.mtls().into_iter().take(3).collect();
    let refused = connector(&no_client_certificate)?
        .check(&ssl, timeout)
        .unwrap_err();
    expect(
        refused,
        &["kafka.ssl.certificate.location", "kafka.ssl.key.location"],
    )?;

    let plain = pairs(&[
        ("security.protocol", "sasl_ssl"),
        ("ssl.ca.location", &kafka.file("ca.pem")),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", USER),
        ("sasl.password", PASSWORD),
    ]);
    let not_enabled = connector(&plain)?.check(&sasl_ssl, timeout).unwrap_err();
    expect(not_enabled, &["SCRAM-SHA-512", "kafka.sasl.mechanism"])?;
    Ok(())
}

/// Starts a node with `settings` and returns what it printed when it stopped by itself.
fn start_expecting_refusal(
    scenario: &Scenario,
    node_id: &str,
    settings: &[(String, String)],
) -> Result<String> {
    let mut args = scenario.args(node_id);
    for setting in node_settings(settings) {
        args.extend(["--set".to_owned(), setting]);
    }
    let log = scenario.dir.path().join(format!("{node_id}.log"));
    let mut node = TestProcess::start(
        node_id,
        Path::new(env!("CARGO_BIN_EXE_kstore-node")),
        &args,
        &log,
    )?;
    let status = node.wait_exit(Duration::from_secs(60))?;
    ensure!(!status.success(), "the node started:\n{}", node.tail());
    Ok(node.output())
}

#[test]
fn a_node_with_a_wrong_password_or_ca_refuses_to_start_and_says_what_to_fix() -> Result<()> {
    let kafka = secure_kafka();
    run_async(async {
        let scenario = Scenario::on(&kafka.kafka, "kafka-refused", 1).await?;
        let said = start_expecting_refusal(
            &scenario,
            "wrong-password",
            &kafka.scram("SCRAM-SHA-256", "not-the-password"),
        )?;
        ensure!(
            said.contains("refused the credentials") && said.contains("kafka.sasl.password"),
            "{said}"
        );
        let mut wrong_ca = kafka.scram("SCRAM-SHA-256", PASSWORD);
        wrong_ca[2].1 = kafka.file("other-ca.pem");
        let said = start_expecting_refusal(&scenario, "wrong-ca", &wrong_ca)?;
        ensure!(
            said.contains("not signed by a trusted CA") && said.contains("kafka.ssl.ca.location"),
            "{said}"
        );
        Ok(())
    })
}
