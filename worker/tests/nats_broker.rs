//! The NATS broker against a real nats-server: the shared conformance suite,
//! readiness following the connection, and every way of authenticating (user and
//! password, token, mutual TLS with a private CA, an NKey seed).

mod support;

use std::sync::Arc;

use nexo_api::config::{NatsSettings, NatsTls};
use nexo_api::spec::SecretRef;
use nexo_worker::broker::{Broker, NatsBroker};
use nexo_worker::secrets::Secrets;
use support::conformance;
use support::nats::NatsServer;
use support::process::{ClosedPort, WorkerProcess, wait_ready, write_worker_config};
use support::{TempDir, wait_for};

#[tokio::test]
async fn conformance_suite_on_nats() {
    let server = NatsServer::start().await;
    let url = server.url();
    conformance::run_all(|| {
        let url = url.clone();
        async move {
            Arc::new(NatsBroker::connect_url(&url).await.expect("connects")) as Arc<dyn Broker>
        }
    })
    .await;
}

#[tokio::test]
async fn connection_state_follows_the_server() {
    let mut server = NatsServer::start().await;
    let broker = NatsBroker::connect_url(&server.url()).await.unwrap();
    wait_for("connected", || async {
        broker.is_connected().then_some(())
    })
    .await;
    server.stop().await;
    wait_for("disconnected", || async {
        (!broker.is_connected()).then_some(())
    })
    .await;
    server.restart().await;
    wait_for("reconnected", || async {
        broker.is_connected().then_some(())
    })
    .await;
}

/// Cargo sets this variable for test processes; it stands in for a secret.
const SECRET_ENV: &str = "CARGO_PKG_NAME";

async fn connects(settings: NatsSettings) -> bool {
    let broker = NatsBroker::connect(&settings, &Secrets::new(""))
        .await
        .unwrap();
    // A refused login keeps the client retrying; connected means it got in.
    tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while !broker.is_connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn several_urls_fail_over_to_the_one_that_answers() {
    let server = NatsServer::start().await;
    // Nothing listens on the first address.
    let closed = ClosedPort::new();
    let dead = format!("nats://127.0.0.1:{}", closed.port);
    let settings = NatsSettings {
        urls: vec![dead, server.url()],
        ..NatsSettings::default()
    };
    assert!(connects(settings).await, "did not reach the live server");
}

#[tokio::test]
async fn user_and_password_come_from_the_environment() {
    let server =
        NatsServer::start_with(&["--user", "nexo", "--pass", env!("CARGO_PKG_NAME")]).await;
    let settings = |user: &str| NatsSettings {
        urls: vec![server.url()],
        user: Some(user.to_owned()),
        password: Some(SecretRef::env(SECRET_ENV.to_owned())),
        ..NatsSettings::default()
    };
    assert!(
        connects(settings("nexo")).await,
        "right credentials refused"
    );
    assert!(!connects(settings("intruder")).await, "wrong user let in");
}

#[tokio::test]
async fn token_comes_from_the_environment() {
    let server = NatsServer::start_with(&["--auth", env!("CARGO_PKG_NAME")]).await;
    let with_token = NatsSettings {
        urls: vec![server.url()],
        token: Some(SecretRef::env(SECRET_ENV.to_owned())),
        ..NatsSettings::default()
    };
    assert!(connects(with_token).await);
    let without = NatsSettings {
        urls: vec![server.url()],
        ..NatsSettings::default()
    };
    assert!(!connects(without).await);
    let err = NatsBroker::connect(
        &NatsSettings {
            urls: vec![server.url()],
            token: Some(SecretRef::env("NEXO_TEST_UNSET_TOKEN".to_owned())),
            ..NatsSettings::default()
        },
        &Secrets::new(""),
    )
    .await
    .err()
    .expect("an unset secret is an error");
    assert!(
        err.to_string()
            .contains("`NEXO_TEST_UNSET_TOKEN` is not set"),
        "{err}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
            KeyPair,
        };
        let dir = TempDir::new();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, san, usage) in [
            ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", "worker", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        }
        Self { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test]
async fn mutual_tls_with_a_private_ca() {
    let pki = Pki::new();
    let server = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &pki.file("server.pem"),
        "--tlskey",
        &pki.file("server-key.pem"),
        "--tlsverify",
        "--tlscacert",
        &pki.file("ca.pem"),
    ])
    .await;
    let settings = |tls: NatsTls| NatsSettings {
        urls: vec![format!("tls://127.0.0.1:{}", server.port)],
        tls: Some(tls),
        ..NatsSettings::default()
    };
    let with_client_cert = NatsTls {
        ca_file: Some(pki.file("ca.pem").into()),
        cert_file: Some(pki.file("client.pem").into()),
        key_file: Some(pki.file("client-key.pem").into()),
    };
    assert!(
        connects(settings(with_client_cert)).await,
        "mutual TLS refused"
    );
    let without_client_cert = NatsTls {
        ca_file: Some(pki.file("ca.pem").into()),
        cert_file: None,
        key_file: None,
    };
    assert!(
        !connects(settings(without_client_cert)).await,
        "server that verifies clients let one in without a certificate"
    );
}

/// The seed lives in the worker's environment only, so this runs the worker binary
/// against a server that knows no user but the seed's public key.
#[tokio::test]
async fn a_worker_authenticates_with_an_nkey_seed_from_its_environment() {
    let user = nkeys::KeyPair::new_user();
    let dir = TempDir::new();
    let server_config = dir.path().join("nats.conf");
    std::fs::write(
        &server_config,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let server = NatsServer::start_with(&["-c", &server_config.display().to_string()]).await;
    assert!(
        !connects(NatsSettings {
            urls: vec![server.url()],
            ..NatsSettings::default()
        })
        .await,
        "server let in a client without the nkey"
    );

    let worker_config = write_worker_config(
        dir.path(),
        &format!(
            "{{type: nats, urls: ['{}'], nkeySeed: {{env: NEXO_TEST_NKEY_SEED}}}}",
            server.url()
        ),
        "over nkey",
    );
    let seed = user.seed().unwrap();
    let worker = WorkerProcess::spawn(&worker_config, &[("NEXO_TEST_NKEY_SEED", &seed)]).await;
    let base = worker.base();
    let client = support::http_client();
    wait_ready(&client, &base).await;
    let answer: serde_json::Value = client
        .post(format!("{base}/v1/channels/api/messages"))
        .json(&serde_json::json!({"text": "hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    drop(worker);
    assert_eq!(answer["reply"], "over nkey");
}

/// A failed NATS operation keeps async-nats's error, so its kind can be read.
#[tokio::test]
async fn a_nats_error_keeps_its_kind() {
    use async_nats::{PublishError, PublishErrorKind};
    use nexo_worker::broker::BrokerError;
    use std::error::Error;

    let server = NatsServer::start().await;
    let broker = NatsBroker::connect_url(&server.url()).await.unwrap();
    // Larger than the server's default max_payload (1 MiB).
    let payload = bytes::Bytes::from(vec![b'x'; 2 * 1024 * 1024]);
    let error = broker.publish("conf.big", payload).await.unwrap_err();
    assert!(
        matches!(&error, BrokerError::Nats { operation, .. } if operation == "publish"),
        "{error:?}"
    );
    let source = error.source().expect("the NATS error is kept");
    let publish = source
        .downcast_ref::<PublishError>()
        .unwrap_or_else(|| panic!("not a PublishError: {source:?}"));
    assert_eq!(publish.kind(), PublishErrorKind::MaxPayloadExceeded);
}
