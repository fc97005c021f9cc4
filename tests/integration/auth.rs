//! Client authentication and TLS: SCRAM-SHA-256 (with -PLUS), md5 and
//! password towards clients, credentials that carry a session over to a
//! new server connection, and what bad or slow clients get.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reprise::auth::hba::AuthMethod;
use reprise::config::{ClientTlsMode, Config, ServerTlsMode};
use throwaway_pg::{Cluster, Options};
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::support::{self, frame, pki, startup_packet, Harness, Message, Pki, RawClient};

/// Superuser trusted (for the test's own setup), everyone else by
/// `method`.
fn server_options(method: &str) -> Options {
    Options {
        hba: Some(format!(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 {method}\n"
        )),
        settings: vec![(
            "password_encryption".to_owned(),
            if method == "md5" { "md5" } else { "scram-sha-256" }.to_owned(),
        )],
        ..Options::default()
    }
}

/// Creates login roles with passwords; returns each one's pg_authid secret.
async fn create_roles(cluster: &Cluster, roles: &[(&str, &str)]) -> Vec<String> {
    let (admin, _messages) = support::connect(&cluster.conn_str()).await;
    let mut secrets = Vec::new();
    for (name, password) in roles {
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{password}'; GRANT pg_signal_backend TO {name}"
            ))
            .await
            .expect("create role");
        let row = admin
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[name],
            )
            .await
            .expect("secret");
        secrets.push(row.get::<_, String>(0));
    }
    secrets
}

fn users_file(dir: &Path, entries: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("users.txt");
    let text: String = entries
        .iter()
        .map(|(user, secret)| format!("\"{user}\" \"{secret}\"\n"))
        .collect();
    std::fs::write(&path, text).expect("users file");
    path
}

fn conn_str(harness: &Harness, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
        harness.proxy.port()
    )
}

async fn server_pid_of(cluster: &Cluster, user: &str) -> Vec<i32> {
    let (admin, _messages) = support::connect(&cluster.conn_str()).await;
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 ORDER BY pid",
            &[&user],
        )
        .await
        .expect("activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn terminate(cluster: &Cluster, pid: i32) {
    let (admin, _messages) = support::connect(&cluster.conn_str()).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
}

/// The message with the user's name taken out, to compare refusals.
fn anonymous(message: &str, user: &str) -> String {
    message.replace(&format!("\"{user}\""), "\"…\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_pass_through_survives_a_terminated_server_connection() {
    let cluster = support::start_cluster(server_options("scram-sha-256")).await;
    let secrets = create_roles(&cluster, &[("alice", "alice-pw")]).await;
    assert!(secrets[0].starts_with("SCRAM-SHA-256$"), "{}", secrets[0]);
    let files = tempfile::tempdir().expect("tempdir");
    // Reprise holds only the server's verifier, never the password.
    let users = users_file(files.path(), &[("alice", &secrets[0])]);
    let harness = Harness::start_on(cluster, |config| {
        config.auth_type = AuthMethod::ScramSha256;
        config.users_file = Some(users);
    })
    .await;

    let (client, _messages) = support::connect(&conn_str(&harness, "alice", "alice-pw")).await;
    client
        .batch_execute("SET application_name = 'kept'")
        .await
        .expect("set");
    let first = server_pid_of(&harness.cluster, "alice").await;
    assert_eq!(first.len(), 1, "one server connection for alice");
    terminate(&harness.cluster, first[0]).await;
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('application_name')",
            &[],
        )
        .await
        .expect("the session goes on after its server connection was terminated");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("alice".to_owned(), "kept".to_owned())
    );
    let second = server_pid_of(&harness.cluster, "alice").await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(
        second, first,
        "a new server connection, opened with the recovered key"
    );

    let (wrong_code, wrong) =
        support::refusal(&conn_str(&harness, "alice", "not-the-password")).await;
    let (unknown_code, unknown) = support::refusal(&conn_str(&harness, "nobody", "x")).await;
    assert_eq!(wrong_code, Some(SqlState::INVALID_PASSWORD));
    assert_eq!(unknown_code, Some(SqlState::INVALID_PASSWORD));
    assert_eq!(wrong, "password authentication failed for user \"alice\"");
    assert_eq!(anonymous(&wrong, "alice"), anonymous(&unknown, "nobody"));

    // Nothing secret reaches the journal.
    let key_material = secrets[0].split('$').nth(2).expect("keys").to_owned();
    for entry in walk(harness.data_dir()) {
        let bytes = std::fs::read(&entry).expect("read journal file");
        for secret in ["alice-pw", key_material.as_str()] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn tls_config(config: &mut Config, pki: &Pki, users: std::path::PathBuf) {
    config.auth_type = AuthMethod::ScramSha256;
    config.users_file = Some(users);
    config.client_tls = ClientTlsMode::Require;
    config.tls_cert_file = Some(pki.cert.clone());
    config.tls_key_file = Some(pki.key.clone());
}

fn psql(harness: &Harness, conninfo: &str, password: &str, sql: &str) -> std::process::Output {
    Command::new(harness.cluster.install().bin("psql"))
        .arg("-X")
        .arg("-At")
        .arg("-c")
        .arg(sql)
        .arg(conninfo)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_log_in_over_verify_full_tls_with_channel_binding() {
    let cluster = support::start_cluster(server_options("scram-sha-256")).await;
    let secrets = create_roles(&cluster, &[("alice", "alice-pw")]).await;
    let files = tempfile::tempdir().expect("tempdir");
    let users = users_file(files.path(), &[("alice", &secrets[0])]);
    let pki = pki();
    let harness = Harness::start_on(cluster, |config| tls_config(config, &pki, users)).await;
    let port = harness.proxy.port();

    let verified = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=alice dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=require",
        pki.ca.display()
    );
    let out = psql(&harness, &verified, "alice-pw", "SELECT current_user");
    assert!(
        out.status.success(),
        "psql over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice");

    let wrong = psql(&harness, &verified, "wrong", "SELECT 1");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("password authentication failed for user \"alice\""),
        "{stderr}"
    );

    let plain = psql(
        &harness,
        &format!("host=127.0.0.1 port={port} user=alice dbname=postgres sslmode=disable"),
        "alice-pw",
        "SELECT 1",
    );
    assert!(!plain.status.success());
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("requires TLS"), "{stderr}");

    // tokio-postgres over rustls, verifying the certificate and the name,
    // with channel binding required: only SCRAM-SHA-256-PLUS will do.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("ca");
    let tls_client = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr("127.0.0.1".parse().expect("ip"))
        .port(port)
        .user("alice")
        .password("alice-pw")
        .dbname("postgres")
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Require);
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_client);
    let (client, connection) = config
        .connect(connector.clone())
        .await
        .expect("tokio-postgres over TLS with channel binding");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "alice");

    // A cancel request comes on a connection of its own, over TLS too.
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(connector).await.expect("cancel sent");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the sleep ends soon")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(cancelled.code(), Some(&SqlState::QUERY_CANCELED));

    // A client that asks for TLS and then sends garbage is dropped; the
    // proxy goes on.
    let mut garbage = tokio::net::TcpStream::connect(harness.proxy)
        .await
        .expect("tcp");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    garbage
        .write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .expect("ssl request");
    let mut answer = [0u8; 1];
    garbage.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"S");
    garbage.write_all(&[0x42; 300]).await.expect("garbage");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut rest)).await;
    let out = psql(&harness, &verified, "alice-pw", "SELECT 'after garbage'");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_on_both_sides_with_a_password_or_a_hash() {
    let cluster = support::start_cluster(server_options("md5")).await;
    let secrets = create_roles(&cluster, &[("mallory", "m-pw"), ("hashed", "h-pw")]).await;
    assert!(secrets[1].starts_with("md5"), "{}", secrets[1]);
    let files = tempfile::tempdir().expect("tempdir");
    let users = users_file(
        files.path(),
        &[("mallory", "m-pw"), ("hashed", &secrets[1])],
    );
    let harness = Harness::start_on(cluster, |config| {
        config.auth_type = AuthMethod::Md5;
        config.users_file = Some(users);
    })
    .await;

    let (client, _messages) = support::connect(&conn_str(&harness, "mallory", "m-pw")).await;
    assert_eq!(
        support::scalar(&client, "SELECT current_user").await,
        "mallory"
    );
    // Only the hash is known for this one: it serves the client's MD5
    // answer and the server's MD5 challenge, also after a failure.
    let (hashed, _messages) = support::connect(&conn_str(&harness, "hashed", "h-pw")).await;
    let before = server_pid_of(&harness.cluster, "hashed").await;
    terminate(&harness.cluster, before[0]).await;
    assert_eq!(
        support::scalar(&hashed, "SELECT current_user").await,
        "hashed"
    );
    assert_ne!(server_pid_of(&harness.cluster, "hashed").await, before);

    let out = psql(
        &harness,
        &format!(
            "host=127.0.0.1 port={} user=mallory dbname=postgres",
            harness.proxy.port()
        ),
        "m-pw",
        "SELECT current_user",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mallory");

    let (wrong_code, wrong) = support::refusal(&conn_str(&harness, "mallory", "nope")).await;
    let (unknown_code, unknown) = support::refusal(&conn_str(&harness, "ghost", "nope")).await;
    assert_eq!(wrong_code, Some(SqlState::INVALID_PASSWORD));
    assert_eq!(unknown_code, wrong_code);
    assert_eq!(anonymous(&wrong, "mallory"), anonymous(&unknown, "ghost"));
}

/// Reads up to the AuthenticationSASL request and returns it.
async fn start_sasl(harness: &Harness) -> (RawClient, Message) {
    let mut client = RawClient::connect(harness.proxy).await;
    client
        .send(&startup_packet(
            196_608,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await;
    let request = client.message().await.expect("authentication request");
    assert_eq!(request.tag, b'R');
    assert_eq!(
        &request.body[..4],
        &10i32.to_be_bytes(),
        "AuthenticationSASL"
    );
    (client, request)
}

fn sasl_initial(mechanism: &str, data: &[u8], declared: i32) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&declared.to_be_bytes());
    body.extend_from_slice(data);
    frame(b'p', &body)
}

/// The FATAL error that ends the connection, as (SQLSTATE, message).
async fn refusal_of(client: &mut RawClient) -> (String, String) {
    let messages = client.until_closed().await;
    let error = messages
        .iter()
        .find(|message| message.tag == b'E')
        .unwrap_or_else(|| panic!("an ErrorResponse, got {messages:?}"));
    (
        error.sqlstate().unwrap_or_default(),
        error.field(b'M').unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sasl_input_gets_a_precise_error_and_costs_others_nothing() {
    let files = tempfile::tempdir().expect("tempdir");
    let users = users_file(files.path(), &[("postgres", "pg-pw")]);
    let harness = Harness::start_with(Options::default(), |config| {
        config.auth_type = AuthMethod::ScramSha256;
        config.users_file = Some(users);
        config.auth_timeout = reprise::config::HumanDuration(Duration::from_secs(1));
    })
    .await;
    let (healthy, _messages) = support::connect(&conn_str(&harness, "postgres", "pg-pw")).await;

    let (mut garbage, _) = start_sasl(&harness).await;
    garbage
        .send(&sasl_initial("SCRAM-SHA-256", b"garbage", 7))
        .await;
    let (code, message) = refusal_of(&mut garbage).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("malformed SCRAM message"), "{message}");

    let (mut mechanism, _) = start_sasl(&harness).await;
    mechanism
        .send(&sasl_initial("MD4-OF-COURSE", b"n,,n=,r=abc", 11))
        .await;
    let (code, message) = refusal_of(&mut mechanism).await;
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid SASL authentication mechanism"),
        "{message}"
    );

    let (mut truncated, _) = start_sasl(&harness).await;
    truncated
        .send(&sasl_initial("SCRAM-SHA-256", b"n,,n=", 100))
        .await;
    let (code, message) = refusal_of(&mut truncated).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("data length 100"), "{message}");

    let (mut nonce, _) = start_sasl(&harness).await;
    nonce
        .send(&sasl_initial("SCRAM-SHA-256", b"n,,n=,r=clientnonce", 19))
        .await;
    let server_first = nonce.message().await.expect("server-first");
    assert_eq!(&server_first.body[..4], &11i32.to_be_bytes());
    let proof = "A".repeat(43) + "=";
    nonce
        .send(&frame(
            b'p',
            format!("c=biws,r=clientnonceWRONG,p={proof}").as_bytes(),
        ))
        .await;
    let (code, message) = refusal_of(&mut nonce).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("nonce does not match"), "{message}");

    let (mut oversized, _) = start_sasl(&harness).await;
    let mut lying = vec![b'p'];
    lying.extend_from_slice(&(1_000_000i32).to_be_bytes());
    oversized.send(&lying).await;
    let (code, message) = refusal_of(&mut oversized).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("too long"), "{message}");

    let (mut wrong_type, _) = start_sasl(&harness).await;
    wrong_type.send(&support::query("SELECT 1")).await;
    let (code, message) = refusal_of(&mut wrong_type).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("expected SASL response"), "{message}");

    let (mut silent, _) = start_sasl(&harness).await;
    let started = std::time::Instant::now();
    let (code, message) = refusal_of(&mut silent).await;
    assert_eq!(code, "28000");
    assert!(message.contains("auth_timeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));

    assert_eq!(
        support::scalar(&healthy, "SELECT 'still here'").await,
        "still here"
    );
    let (again, _messages) = support::connect(&conn_str(&harness, "postgres", "pg-pw")).await;
    assert_eq!(support::scalar(&again, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_limited() {
    let harness = Harness::start_with(Options::default(), |config| {
        config.max_unauthenticated = 2;
    })
    .await;
    let idle: Vec<_> = futures_util::future::join_all(
        (0..2).map(|_| tokio::net::TcpStream::connect(harness.proxy)),
    )
    .await;
    // Both idle connections hold their places before the next arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, message) = support::refusal(&harness.proxy_conn_str()).await;
    assert_eq!(code, Some(SqlState::TOO_MANY_CONNECTIONS));
    assert!(message.contains("max_unauthenticated = 2"), "{message}");
    drop(idle);
    support::eventually(Duration::from_secs(10), "places are given back", || async {
        tokio_postgres::connect(&harness.proxy_conn_str(), NoTls)
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn bad_tls_files_and_unrecoverable_users_are_refused_at_start() {
    let pki = pki();
    let data = tempfile::tempdir().expect("tempdir");
    // A data directory per attempt: a child another test forks may hold
    // the previous attempt's lock file open for a moment.
    let attempts = std::cell::Cell::new(0);
    let base = || Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: {
            attempts.set(attempts.get() + 1);
            data.path().join(format!("attempt-{}", attempts.get()))
        },
        backends: vec![reprise::config::Backend {
            name: "primary".to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 1,
        }],
        client_tls: ClientTlsMode::Allow,
        tls_cert_file: Some(pki.cert.clone()),
        tls_key_file: Some(pki.key.clone()),
        ..Config::default()
    };
    let refusal = |config: Config| async move {
        reprise::Proxy::bind(config)
            .await
            .expect_err("refused")
            .to_string()
    };

    let missing = data.path().join("no-such.crt");
    let mut config = base();
    config.tls_cert_file = Some(missing.clone());
    let message = refusal(config).await;
    assert!(
        message.contains("tls_cert_file") && message.contains(&missing.display().to_string()),
        "{message}"
    );

    let other = data.path().join("other.key");
    std::fs::write(
        &other,
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write");
    let mut config = base();
    config.tls_key_file = Some(other.clone());
    let message = refusal(config).await;
    assert!(
        message.contains(&other.display().to_string()) && message.contains("does not fit"),
        "{message}"
    );

    let garbage = data.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let mut config = base();
    config.tls_cert_file = Some(garbage.clone());
    let message = refusal(config).await;
    assert!(
        message.contains(&garbage.display().to_string()),
        "{message}"
    );

    let no_ca = data.path().join("no-such-ca.pem");
    let mut config = base();
    config.server_tls = ServerTlsMode::VerifyFull;
    config.server_tls_ca_file = Some(no_ca.clone());
    let message = refusal(config).await;
    assert!(
        message.contains("server_tls_ca_file") && message.contains(&no_ca.display().to_string()),
        "{message}"
    );

    // A verifier alone, with trust for that user: nothing to log in with
    // after a failure.
    let verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$Xc9qgHgPf3PDy/kNUqJRaBv5zsR3wtNhyPsW8HA7mqc=:OI6lTJ9yqnZoQYAMoQ2XNtLv5H/Z3jMLpJwXDbPYDWY=";
    let users = users_file(data.path(), &[("vera", verifier)]);
    let mut config = base();
    config.users_file = Some(users.clone());
    config.auth_type = AuthMethod::Trust;
    let message = refusal(config).await;
    assert!(
        message.contains("\"vera\"") && message.contains("failover_exempt_users"),
        "{message}"
    );
    let mut config = base();
    config.users_file = Some(users);
    config.auth_type = AuthMethod::Trust;
    config.failover_exempt_users = vec!["vera".to_owned()];
    let proxy = reprise::Proxy::bind(config)
        .await
        .expect("exempt user is accepted");
    drop(proxy);

    let mut config = base();
    config.client_tls = ClientTlsMode::Disable;
    config.auth_type = AuthMethod::Password;
    let problem = config
        .validate()
        .expect_err("password needs TLS")
        .to_string();
    assert!(
        problem.contains("auth_type") && problem.contains("TLS"),
        "{problem}"
    );
}

/// A server that takes only TLS, with the test CA's leaf certificate.
fn tls_server_options(pki: &Pki) -> Options {
    Options {
        hba: Some(
            "local all all trust\nhostssl all postgres 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
                .to_owned(),
        ),
        settings: vec![
            ("ssl".to_owned(), "on".to_owned()),
            ("ssl_cert_file".to_owned(), "server.crt".to_owned()),
            ("ssl_key_file".to_owned(), "server.key".to_owned()),
        ],
        data_files: vec![
            ("server.crt".to_owned(), pki.cert_pem.clone().into_bytes()),
            ("server.key".to_owned(), pki.key_pem.clone().into_bytes()),
        ],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_verify_full_with_scram_channel_binding_to_the_server() {
    let pki = pki();
    let cluster = support::start_cluster(tls_server_options(&pki)).await;
    let admin_conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        cluster.port()
    );
    // The test's own setup goes over TLS too (the server takes nothing
    // else); certificates are checked below, by Reprise.
    let status = Command::new(cluster.install().bin("psql"))
        .args(["-X", "-At", "-c"])
        .arg("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'; GRANT pg_signal_backend TO alice; SELECT 1")
        .arg(&admin_conn)
        .output()
        .expect("psql");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let verifier = Command::new(cluster.install().bin("psql"))
        .args([
            "-X",
            "-At",
            "-c",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
        ])
        .arg(&admin_conn)
        .output()
        .expect("psql");
    let verifier = String::from_utf8_lossy(&verifier.stdout).trim().to_owned();
    let files = tempfile::tempdir().expect("tempdir");
    let users = users_file(files.path(), &[("alice", &verifier)]);
    let harness = Harness::start_on(cluster, |config| {
        config.auth_type = AuthMethod::ScramSha256;
        config.users_file = Some(users);
        config.server_tls = ServerTlsMode::VerifyFull;
        config.server_tls_ca_file = Some(pki.ca.clone());
    })
    .await;

    let (client, _messages) = support::connect(&conn_str(&harness, "alice", "alice-pw")).await;
    let ssl = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(support::scalar(&client, ssl).await, "true");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    // Terminated from another session through Reprise: alice may signal
    // her own backends.
    let (other, _messages) = support::connect(&conn_str(&harness, "alice", "alice-pw")).await;
    other
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    assert_eq!(
        support::scalar(&client, ssl).await,
        "true",
        "the new server connection uses TLS and the recovered key"
    );

    // A CA that did not sign the server's certificate: refused.
    let stranger = pki_other_ca(files.path());
    let strict = Harness::start_on(
        support::start_cluster(tls_server_options(&pki)).await,
        |config| {
            config.server_tls = ServerTlsMode::VerifyFull;
            config.server_tls_ca_file = Some(stranger);
        },
    )
    .await;
    let (code, message) = support::refusal(&strict.proxy_conn_str()).await;
    assert_eq!(
        code,
        Some(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)
    );
    assert!(message.contains("TLS with server"), "{message}");

    // require against a server without TLS: refused, never sent in clear.
    let plain = Harness::start_with(Options::default(), |config| {
        config.server_tls = ServerTlsMode::Require;
    })
    .await;
    let (_, message) = support::refusal(&plain.proxy_conn_str()).await;
    assert!(message.contains("does not accept TLS"), "{message}");
    let preferring = Harness::start_with(Options::default(), |config| {
        config.server_tls = ServerTlsMode::Prefer;
    })
    .await;
    let (client, _messages) = preferring.connect().await;
    assert_eq!(support::scalar(&client, "SELECT 1").await, "1");
}

/// A CA file of a CA that signed nothing here.
fn pki_other_ca(dir: &Path) -> std::path::PathBuf {
    let other = pki();
    let path = dir.join("stranger-ca.pem");
    std::fs::copy(&other.ca, &path).expect("copy ca");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_fetches_the_verifier_and_the_session_reconnects_with_it() {
    let cluster = support::start_cluster(server_options("scram-sha-256")).await;
    create_roles(&cluster, &[("alice", "alice-pw")]).await;
    // No users file at all: the server trusts postgres, who reads
    // pg_shadow for everyone else.
    let harness = Harness::start_on(cluster, |config| {
        config.auth_type = AuthMethod::ScramSha256;
        config.auth_user = Some("postgres".to_owned());
    })
    .await;
    let (client, _messages) = support::connect(&conn_str(&harness, "alice", "alice-pw")).await;
    assert_eq!(
        support::scalar(&client, "SELECT current_user").await,
        "alice"
    );
    let before = server_pid_of(&harness.cluster, "alice").await;
    terminate(&harness.cluster, before[0]).await;
    assert_eq!(
        support::scalar(&client, "SELECT current_user").await,
        "alice"
    );
    assert_ne!(server_pid_of(&harness.cluster, "alice").await, before);

    let (wrong_code, wrong) = support::refusal(&conn_str(&harness, "alice", "nope")).await;
    let (unknown_code, unknown) = support::refusal(&conn_str(&harness, "nobody", "nope")).await;
    assert_eq!(wrong_code, Some(SqlState::INVALID_PASSWORD));
    assert_eq!(unknown_code, wrong_code);
    assert_eq!(anonymous(&wrong, "alice"), anonymous(&unknown, "nobody"));
    // The lookups leave no connection behind.
    let (admin, _messages) = support::connect(&harness.cluster.conn_str()).await;
    support::eventually(
        Duration::from_secs(5),
        "lookup connections close",
        || async {
            support::scalar(
            &admin,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reprise auth_query'",
        )
        .await
            == "0"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_text_passwords_only_over_tls() {
    let files = tempfile::tempdir().expect("tempdir");
    let users = users_file(files.path(), &[("postgres", "pg-pw")]);
    let pki = pki();
    let harness = Harness::start_with(Options::default(), |config| {
        config.users_file = Some(users);
        config.auth_type = AuthMethod::Password;
        config.client_tls = ClientTlsMode::Allow;
        config.tls_cert_file = Some(pki.cert.clone());
        config.tls_key_file = Some(pki.key.clone());
    })
    .await;
    let port = harness.proxy.port();
    let plain = psql(
        &harness,
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        "pg-pw",
        "SELECT 1",
    );
    assert!(!plain.status.success());
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("only offered over TLS"), "{stderr}");
    let over_tls = psql(
        &harness,
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"),
        "pg-pw",
        "SELECT 'over tls'",
    );
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&over_tls.stdout).trim(), "over tls");
    let wrong = psql(
        &harness,
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"),
        "nope",
        "SELECT 1",
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("password authentication failed for user \"postgres\""),
        "{stderr}"
    );
}
