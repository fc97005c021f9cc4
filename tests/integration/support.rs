//! Shared test support: a real PostgreSQL cluster with Reprise in front of
//! it, and a raw protocol client for the cases no driver will produce.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use reprise::config::{Backend, Config};
use reprise::{Proxy, ProxyHandle};
use throwaway_pg::{Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// A cluster and a proxy in front of it, both gone on drop.
pub struct Harness {
    pub proxy: SocketAddr,
    pub handle: ProxyHandle,
    task: Option<tokio::task::JoinHandle<()>>,
    _data_dir: tempfile::TempDir,
    // Dropped last: sessions must not outlive their server in a way that
    // slows teardown.
    pub cluster: Cluster,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(Options::default(), |_| {}).await
    }

    /// Starts a cluster with `options` and a proxy whose config `tweak`
    /// may adjust.
    pub async fn start_with(options: Options, tweak: impl FnOnce(&mut Config)) -> Harness {
        init_logging();
        let cluster = start_cluster(options).await;
        Harness::start_on(cluster, tweak).await
    }

    /// A primary with `options`, a streaming standby of it, and a proxy
    /// with both as backends ("primary" first, then "standby").
    pub async fn start_with_standby(
        options: Options,
        tweak: impl FnOnce(&mut Config),
    ) -> (Harness, Cluster) {
        init_logging();
        let cluster = start_cluster(options).await;
        let standby = tokio::task::block_in_place(|| cluster.standby()).expect("standby starts");
        let standby_backend = Backend {
            name: "standby".to_owned(),
            host: standby.host().to_owned(),
            port: standby.port(),
        };
        let harness = Harness::start_on(cluster, |config| {
            config.backends.push(standby_backend);
            tweak(config);
        })
        .await;
        (harness, standby)
    }

    /// A proxy in front of a cluster the caller started (and prepared).
    pub async fn start_on(cluster: Cluster, tweak: impl FnOnce(&mut Config)) -> Harness {
        let data_dir = tempfile::Builder::new()
            .prefix("reprise-test-")
            .tempdir()
            .expect("tempdir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: data_dir.path().to_owned(),
            backends: vec![Backend {
                name: "primary".to_owned(),
                host: cluster.host().to_owned(),
                port: cluster.port(),
            }],
            shutdown_timeout: reprise::config::HumanDuration(Duration::from_secs(5)),
            ..Config::default()
        };
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let address = proxy.local_addr();
        let handle = proxy.handle();
        let task = tokio::spawn(proxy.run());
        Harness {
            proxy: address,
            handle,
            task: Some(task),
            _data_dir: data_dir,
            cluster,
        }
    }

    /// Reprise's data directory (the journal lives in `journal/`).
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    pub fn proxy_conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.proxy.port()
        )
    }

    /// The cluster's own address, for raw clients that bypass the proxy.
    pub fn cluster_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.cluster.port()))
    }

    pub fn direct_conn_str(&self) -> String {
        self.cluster.conn_str()
    }

    /// A tokio-postgres client through the proxy; notifications and notices
    /// arrive on the receiver.
    pub async fn connect(&self) -> (Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
        connect(&self.proxy_conn_str()).await
    }

    pub async fn connect_direct(
        &self,
    ) -> (Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
        connect(&self.direct_conn_str()).await
    }

    /// Stops the proxy gracefully and waits for it to finish.
    pub async fn shutdown(&mut self) {
        self.handle.shutdown();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("proxy stops in time")
                .expect("proxy task");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.terminate();
    }
}

/// Reprise's log, shown for failing tests when `RUST_LOG` asks for it.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn start_cluster(options: Options) -> Cluster {
    tokio::task::spawn_blocking(move || Cluster::start_with(options))
        .await
        .expect("join")
        .expect("cluster starts")
}

pub async fn connect(
    conn_str: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, mut connection) = tokio_postgres::connect(conn_str, NoTls)
        .await
        .unwrap_or_else(|err| panic!("connect {conn_str}: {err:?}"));
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = sender.send(message);
        }
    });
    (client, receiver)
}

/// Waits (up to 10 s) for the first asynchronous message `pick` accepts,
/// skipping the others.
pub async fn next_async<T>(
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
    pick: impl Fn(AsyncMessage) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = messages.recv().await.expect("connection open");
            if let Some(found) = pick(message) {
                return found;
            }
        }
    })
    .await
    .expect("the message arrives within 10s")
}

pub fn notification(message: AsyncMessage) -> Option<tokio_postgres::Notification> {
    match message {
        AsyncMessage::Notification(notification) => Some(notification),
        _ => None,
    }
}

/// The SQLSTATE and message of a refused connection attempt.
pub async fn refusal(conn_str: &str) -> (Option<tokio_postgres::error::SqlState>, String) {
    let err = tokio_postgres::connect(conn_str, NoTls)
        .await
        .err()
        .expect("the connection is refused");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    (err.code().cloned(), message)
}

/// One backend message: its tag and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

impl Message {
    /// SQLSTATE of an ErrorResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if field == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// The status byte of a ReadyForQuery.
    pub fn ready_status(&self) -> Option<u8> {
        if self.tag == b'Z' {
            self.body.first().copied()
        } else {
            None
        }
    }

    /// The columns of a DataRow as text, `None` for NULL.
    pub fn data_row(&self) -> Vec<Option<String>> {
        let mut body = &self.body[..];
        let count = body.get_i16();
        (0..count)
            .map(|_| {
                let len = body.get_i32();
                (len >= 0).then(|| {
                    let value = String::from_utf8_lossy(&body[..len as usize]).into_owned();
                    body.advance(len as usize);
                    value
                })
            })
            .collect()
    }
}

/// The DataRows among `messages`, as text.
pub fn data_rows(messages: &[Message]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter(|m| m.tag == b'D')
        .map(Message::data_row)
        .collect()
}

/// A protocol client that sends exactly the bytes it is given.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (key, value) in params {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frame(b'Q', &body)
}

fn c_string(body: &mut Vec<u8>, text: &str) {
    body.extend_from_slice(text.as_bytes());
    body.push(0);
}

/// Parse: a statement `name` ("" for the unnamed one) with parameter type
/// OIDs (0 lets the server infer).
pub fn parse_message(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    c_string(&mut body, name);
    c_string(&mut body, sql);
    body.extend_from_slice(&(param_types.len() as i16).to_be_bytes());
    for oid in param_types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    frame(b'P', &body)
}

/// Bind: text parameters, text results.
pub fn bind_message(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    c_string(&mut body, portal);
    c_string(&mut body, statement);
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for param in params {
        body.extend_from_slice(&(param.len() as i32).to_be_bytes());
        body.extend_from_slice(param.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'B', &body)
}

/// Execute: all rows when `max_rows` is 0.
pub fn execute_message(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut body = Vec::new();
    c_string(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    frame(b'E', &body)
}

/// Close of a statement (`b'S'`) or portal (`b'P'`).
pub fn close_message(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    c_string(&mut body, name);
    frame(b'C', &body)
}

pub fn sync_message() -> Vec<u8> {
    frame(b'S', b"")
}

impl RawClient {
    pub async fn connect(address: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(address).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes startup as `postgres`; returns the messages
    /// up to and including the first ReadyForQuery.
    pub async fn login(address: SocketAddr) -> (RawClient, Vec<Message>) {
        RawClient::login_with(address, &[("user", "postgres"), ("database", "postgres")]).await
    }

    /// Connects and completes startup with `params` (protocol 3.0).
    pub async fn login_with(
        address: SocketAddr,
        params: &[(&str, &str)],
    ) -> (RawClient, Vec<Message>) {
        let mut client = RawClient::connect(address).await;
        client.send(&startup_packet(196_608, params)).await;
        let greeting = client.until_ready().await;
        (client, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends, ignoring a connection the proxy already closed.
    pub async fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next message, or `None` at end of stream.
    pub async fn message(&mut self) -> Option<Message> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).freeze();
                    return Some(Message { tag, body });
                }
            }
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("a message within 30s")
                    .unwrap_or(0);
            if read == 0 {
                return None;
            }
        }
    }

    /// A single byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn byte(&mut self) -> u8 {
        if let Some(&first) = self.buf.first() {
            self.buf.advance(1);
            return first;
        }
        let mut one = [0u8; 1];
        self.stream.read_exact(&mut one).await.expect("one byte");
        one[0]
    }

    /// `SHOW reprise.state` as (kind, name, value) rows, NULL as "".
    pub async fn reprise_state(&mut self) -> Vec<(String, String, String)> {
        self.send(&query("SHOW reprise.state")).await;
        data_rows(&self.until_ready().await)
            .into_iter()
            .map(|row| {
                let mut fields = row.into_iter().map(Option::unwrap_or_default);
                let mut next = || fields.next().unwrap_or_default();
                (next(), next(), next())
            })
            .collect()
    }

    pub async fn until_ready(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let message = self
                .message()
                .await
                .expect("connection closed before ReadyForQuery");
            let done = message.tag == b'Z';
            messages.push(message);
            if done {
                return messages;
            }
        }
    }

    /// Reads to the end of the stream and returns the messages.
    pub async fn until_closed(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(message) = self.message().await {
            messages.push(message);
        }
        messages
    }
}

/// The process id a greeting's BackendKeyData carries.
pub fn backend_pid(greeting: &[Message]) -> i32 {
    let key = greeting
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    i32::from_be_bytes([key.body[0], key.body[1], key.body[2], key.body[3]])
}

/// Runs a statement and returns the first column of the first row as
/// text.
pub async fn scalar(client: &Client, sql: &str) -> String {
    text_rows(client, sql)
        .await
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
        .unwrap_or_default()
}

/// `SHOW reprise.stats` as a map from counter to value.
pub async fn reprise_stats(client: &Client) -> std::collections::BTreeMap<String, u64> {
    text_rows(client, "SHOW reprise.stats")
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().expect("counter")))
        .collect()
}

/// The rows of a simple query as text, NULL as "".
pub async fn text_rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"))
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Sets a server setting with ALTER SYSTEM and waits until it is in
/// force: pg_reload_conf() only signals the postmaster, and a backend
/// forked before the postmaster re-read its files keeps the old value.
pub async fn set_system(client: &Client, setting: &str, value: &str) {
    client
        .batch_execute(&format!("alter system set {setting} = '{value}'"))
        .await
        .expect("alter system");
    scalar(client, "select pg_reload_conf()").await;
    eventually(
        Duration::from_secs(10),
        "the setting is in force",
        || async { scalar(client, &format!("show {setting}")).await == value },
    )
    .await;
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {limit:?}: {what}");
}

/// A `SHOW reprise.state` row.
pub fn state_row(kind: &str, name: &str, value: &str) -> (String, String, String) {
    (kind.to_owned(), name.to_owned(), value.to_owned())
}

/// A CA and a leaf certificate for `localhost` and 127.0.0.1 signed by
/// it, made at test time (valid until 4096) and written as PEM files.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca_der: rustls_pki_types::CertificateDer<'static>,
    /// The leaf's certificate and key, PEM, for a server's data files.
    pub cert_pem: String,
    pub key_pem: String,
    _dir: tempfile::TempDir,
}

pub fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Reprise test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca certificate");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("leaf params");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&leaf_key, &ca).expect("leaf certificate");
    let dir = tempfile::Builder::new()
        .prefix("reprise-pki-")
        .tempdir()
        .expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        cert: write("server.crt", &cert.pem()),
        key: write("server.key", &leaf_key.serialize_pem()),
        cert_pem: cert.pem(),
        key_pem: leaf_key.serialize_pem(),
        ca_der: ca.der().clone(),
        _dir: dir,
    }
}
